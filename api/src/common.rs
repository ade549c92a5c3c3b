//! Types shared by several Stash resources (STASH-API.md §1): backends, retention, targets,
//! task references, runtime settings, hooks and retries, plus this design's executor fields.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, AzureFileVolumeSource, CSIVolumeSource, CephFSVolumeSource, EmptyDirVolumeSource,
    EnvFromSource, EnvVar, EphemeralVolumeSource, ExecAction, HTTPGetAction, HTTPHeader,
    HostPathVolumeSource, Lifecycle, LocalObjectReference, NFSVolumeSource,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodReadinessGate,
    PodSecurityContext, Probe, ResourceRequirements, SecurityContext, TCPSocketAction, Toleration,
    TopologySpreadConstraint, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a restic repository lives (kmodules objectstore-api `Backend`). Exactly one provider.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "[has(self.local), has(self.s3), has(self.gcs), has(self.azure), has(self.swift), has(self.b2), has(self.rest)].exists_one(x, x)",
    "message": "exactly one backend (local, s3, gcs, azure, swift, b2 or rest) must be set"
}]))]
pub struct Backend {
    /// The Secret, in the Repository's namespace, holding RESTIC_PASSWORD and credentials.
    pub storage_secret_name: Option<String>,
    pub local: Option<LocalSpec>,
    pub s3: Option<S3Spec>,
    pub gcs: Option<GcsSpec>,
    pub azure: Option<AzureSpec>,
    pub swift: Option<SwiftSpec>,
    pub b2: Option<B2Spec>,
    pub rest: Option<RestServerSpec>,
}

/// The backend providers, as Stash names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Local,
    S3,
    Gcs,
    Azure,
    Swift,
    B2,
    Rest,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Local => "local",
            Provider::S3 => "s3",
            Provider::Gcs => "gcs",
            Provider::Azure => "azure",
            Provider::Swift => "swift",
            Provider::B2 => "b2",
            Provider::Rest => "rest",
        }
    }
}

impl Backend {
    /// The provider that is set, or `None` when the backend names none (refused by the schema).
    pub fn provider(&self) -> Option<Provider> {
        if self.local.is_some() {
            Some(Provider::Local)
        } else if self.s3.is_some() {
            Some(Provider::S3)
        } else if self.gcs.is_some() {
            Some(Provider::Gcs)
        } else if self.azure.is_some() {
            Some(Provider::Azure)
        } else if self.swift.is_some() {
            Some(Provider::Swift)
        } else if self.b2.is_some() {
            Some(Provider::B2)
        } else if self.rest.is_some() {
            Some(Provider::Rest)
        } else {
            None
        }
    }

    /// The connection limit restic gets through `--option <provider>.connections`; only gcs,
    /// azure and b2 have one.
    pub fn max_connections(&self) -> Option<i64> {
        let n = match (&self.gcs, &self.azure, &self.b2) {
            (Some(g), _, _) => g.max_connections,
            (_, Some(a), _) => a.max_connections,
            (_, _, Some(b)) => b.max_connections,
            _ => None,
        };
        n.filter(|n| *n > 0)
    }
}

/// A repository on a volume: a volume source plus where it is mounted.
///
/// Stash inlines the whole core `VolumeSource`; the sources a repository can sensibly live on
/// are listed here. Others are pruned by the API server like any unknown field.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.mountPath != '/stash' && !self.mountPath.startsWith('/stash/')",
    "message": "mountPath must not be /stash or below it: Stash uses that directory itself"
}]))]
pub struct LocalSpec {
    pub host_path: Option<HostPathVolumeSource>,
    pub empty_dir: Option<EmptyDirVolumeSource>,
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    pub nfs: Option<NFSVolumeSource>,
    pub csi: Option<CSIVolumeSource>,
    pub ephemeral: Option<EphemeralVolumeSource>,
    pub azure_file: Option<AzureFileVolumeSource>,
    pub cephfs: Option<CephFSVolumeSource>,
    /// Where the volume is mounted in the pods that use the repository.
    #[schemars(length(min = 1))]
    pub mount_path: String,
    /// A directory inside the volume that holds the repository.
    pub sub_path: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Spec {
    /// The S3 endpoint, for example `s3.amazonaws.com` or `http://minio.storage:9000`.
    #[schemars(length(min = 1))]
    pub endpoint: String,
    #[schemars(length(min = 1))]
    pub bucket: String,
    pub prefix: Option<String>,
    pub region: Option<String>,
    /// Skip TLS certificate verification (restic `--insecure-tls`).
    #[serde(rename = "insecureTLS")]
    pub insecure_tls: Option<bool>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GcsSpec {
    pub bucket: String,
    pub prefix: Option<String>,
    #[schemars(range(min = 0))]
    pub max_connections: Option<i64>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AzureSpec {
    pub container: String,
    pub prefix: Option<String>,
    #[schemars(range(min = 0))]
    pub max_connections: Option<i64>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SwiftSpec {
    pub container: String,
    pub prefix: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct B2Spec {
    pub bucket: String,
    pub prefix: Option<String>,
    #[schemars(range(min = 0))]
    pub max_connections: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestServerSpec {
    /// The REST server URL; its path is the repository prefix.
    #[schemars(length(min = 1))]
    pub url: String,
}

/// How long restic keeps snapshots (`restic forget --keep-*`). Zero means "not set".
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicy {
    #[schemars(length(min = 1))]
    pub name: String,
    #[schemars(range(min = 0))]
    pub keep_last: Option<i64>,
    #[schemars(range(min = 0))]
    pub keep_hourly: Option<i64>,
    #[schemars(range(min = 0))]
    pub keep_daily: Option<i64>,
    #[schemars(range(min = 0))]
    pub keep_weekly: Option<i64>,
    #[schemars(range(min = 0))]
    pub keep_monthly: Option<i64>,
    #[schemars(range(min = 0))]
    pub keep_yearly: Option<i64>,
    pub keep_tags: Option<Vec<String>>,
    /// Run `restic prune` after forgetting, so the space is given back.
    pub prune: bool,
    pub dry_run: Option<bool>,
}

/// A reference to the object being backed up or restored.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    /// Empty means the invoker's namespace.
    pub namespace: Option<String>,
}

/// A reference to an object by name, optionally in another namespace.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ObjectRef {
    #[schemars(length(min = 1))]
    pub name: String,
    pub namespace: Option<String>,
}

/// What to back up (`spec.target` of a BackupConfiguration or a BackupBatch member).
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupTarget {
    /// The restic `--host` identifier, or its prefix for StatefulSets and DaemonSets.
    pub alias: Option<String>,
    #[serde(rename = "ref")]
    pub ref_: TargetRef,
    /// Paths inside the pod to back up; one snapshot per path.
    pub paths: Option<Vec<String>>,
    /// The pod volumes that hold `paths`.
    pub volume_mounts: Option<Vec<VolumeMount>>,
    /// Replicas to back up, for the VolumeSnapshotter driver.
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    pub snapshot_class_name: Option<String>,
    /// restic `--exclude` patterns.
    pub exclude: Option<Vec<String>>,
    /// Extra arguments appended to `restic backup`.
    pub args: Option<Vec<String>>,
}

/// What to restore into (`spec.target` of a RestoreSession or a RestoreBatch member).
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTarget {
    pub alias: Option<String>,
    #[serde(rename = "ref")]
    pub ref_: Option<TargetRef>,
    pub volume_mounts: Option<Vec<VolumeMount>>,
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    /// Restore into new PVCs; `${POD_ORDINAL}` in a claim name is replaced per replica.
    pub volume_claim_templates: Option<Vec<PersistentVolumeClaimTemplate>>,
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.filter(r, !has(r.targetHosts) || size(r.targetHosts) == 0).size() <= 1",
        "message": "at most one rule may leave targetHosts empty"
    }]))]
    pub rules: Option<Vec<Rule>>,
    pub args: Option<Vec<String>>,
}

/// Which snapshots go to which hosts on restore.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.snapshots) && size(self.snapshots) > 0 && has(self.paths) && size(self.paths) > 0)",
    "message": "snapshots and paths are mutually exclusive in a rule: one snapshot holds exactly one path"
}]))]
pub struct Rule {
    /// Hosts this rule applies to; empty means every host without a rule of its own.
    pub target_hosts: Option<Vec<String>>,
    /// The host whose snapshots are restored; defaults to the restoring host.
    pub source_host: Option<String>,
    pub snapshots: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub exclude: Option<Vec<String>>,
    pub include: Option<Vec<String>>,
}

/// The task to run, with parameters. Empty for the workload (agent or sidecar) model.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskRef {
    pub name: Option<String>,
    pub params: Option<Vec<Param>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Param {
    pub name: String,
    pub value: String,
}

/// Settings for the pods and containers Stash runs (kmodules offshoot-api `RuntimeSettings`).
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSettings {
    pub pod: Option<PodRuntimeSettings>,
    pub container: Option<ContainerRuntimeSettings>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodRuntimeSettings {
    pub pod_labels: Option<BTreeMap<String, String>>,
    pub pod_annotations: Option<BTreeMap<String, String>>,
    pub node_selector: Option<BTreeMap<String, String>>,
    pub service_account_name: Option<String>,
    pub service_account_annotations: Option<BTreeMap<String, String>>,
    pub automount_service_account_token: Option<bool>,
    pub node_name: Option<String>,
    pub security_context: Option<PodSecurityContext>,
    pub image_pull_secrets: Option<Vec<LocalObjectReference>>,
    pub affinity: Option<Affinity>,
    pub scheduler_name: Option<String>,
    pub tolerations: Option<Vec<Toleration>>,
    pub priority_class_name: Option<String>,
    pub priority: Option<i32>,
    pub readiness_gates: Option<Vec<PodReadinessGate>>,
    pub runtime_class_name: Option<String>,
    pub enable_service_links: Option<bool>,
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerRuntimeSettings {
    pub resources: Option<ResourceRequirements>,
    pub liveness_probe: Option<Probe>,
    pub readiness_probe: Option<Probe>,
    pub lifecycle: Option<Lifecycle>,
    pub security_context: Option<SecurityContext>,
    pub env: Option<Vec<EnvVar>>,
    pub env_from: Option<Vec<EnvFromSource>>,
    /// restic runs under `nice -n <adjustment>`.
    pub nice: Option<NiceSettings>,
    /// restic runs under `ionice -c <class> -n <classData>`.
    pub ionice: Option<IONiceSettings>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NiceSettings {
    #[schemars(range(min = -20, max = 19))]
    pub adjustment: Option<i32>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IONiceSettings {
    #[schemars(range(min = 0, max = 3))]
    pub class: Option<i32>,
    #[schemars(range(min = 0, max = 7))]
    pub class_data: Option<i32>,
}

/// The scratch directory Stash mounts at `/stash-tmp`.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmptyDirSettings {
    pub medium: Option<String>,
    pub size_limit: Option<Quantity>,
    /// Run restic with `--no-cache`.
    pub disable_caching: Option<bool>,
}

/// Metadata a template may carry.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PartialObjectMeta {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    pub annotations: Option<BTreeMap<String, String>>,
}

/// A PVC to create (interim volumes, restore into new claims).
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PersistentVolumeClaimTemplate {
    pub metadata: Option<PartialObjectMeta>,
    pub spec: Option<PersistentVolumeClaimSpec>,
}

/// A hook action (kmodules prober `Handler`): exactly one of exec, httpGet, httpPost, tcpSocket.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Handler {
    /// The command may contain Go templates rendered against the session summary.
    pub exec: Option<ExecAction>,
    pub http_get: Option<HTTPGetAction>,
    pub http_post: Option<HTTPPostAction>,
    pub tcp_socket: Option<TCPSocketAction>,
    /// The container to exec into or whose pod is probed.
    pub container_name: Option<String>,
}

/// A hook that runs after the work, with a policy for when it fires.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostHookHandler {
    #[serde(flatten)]
    pub handler: Handler,
    pub execution_policy: Option<HookExecutionPolicy>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HookExecutionPolicy {
    #[default]
    Always,
    OnSuccess,
    OnFailure,
    /// Fire only if the backup failed and no retries are left.
    OnFinalRetryFailure,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPPostAction {
    pub path: Option<String>,
    pub port: IntOrString,
    pub host: Option<String>,
    pub scheme: Option<String>,
    pub http_headers: Option<Vec<HTTPHeader>>,
    /// May contain Go templates rendered against the session summary.
    pub body: Option<String>,
    pub form: Option<Vec<FormEntry>>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FormEntry {
    pub key: String,
    pub values: Option<Vec<String>>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupHooks {
    pub pre_backup: Option<Handler>,
    pub post_backup: Option<PostHookHandler>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreHooks {
    pub pre_restore: Option<Handler>,
    pub post_restore: Option<PostHookHandler>,
}

/// On failure, a new session is created after `delay`, at most `maxRetry` times.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryConfig {
    #[schemars(range(min = 0))]
    #[schemars(extend("default" = 1))]
    pub max_retry: Option<i32>,
    /// A duration such as `10m`.
    pub delay: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Driver {
    #[default]
    Restic,
    VolumeSnapshotter,
}

/// Who does the work: the node agent (default, no pod restart), an injected sidecar or init
/// container (Stash's model, restarts the pods), or a Job that mounts the volume.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Executor {
    #[default]
    Agent,
    Sidecar,
    Job,
}

/// How the agent reads a volume: `stream` through its own io_uring reader into
/// `restic backup --stdin`, or `direct` where restic reads the host path itself (snapshots
/// identical to a Stash sidecar's). Unset means the agent's configured default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    Stream,
    #[default]
    Direct,
}

/// What a backup does with files it is not allowed to read (a root-owned file under a
/// non-root reader, an NFS export with root squashing). `Fail` (the default) fails the
/// backup and keeps no snapshot of it; `Warn` keeps a snapshot without those files, tags it
/// `stash.unreadable=<count>` so it never passes for complete, and lists them in the
/// status. Files that cannot be read for another reason (an I/O error) always fail it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UnreadablePolicy {
    #[default]
    Fail,
    Warn,
}

/// A read budget that can only lower the node's own limits.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IoBudget {
    /// Read bytes per second, as a quantity such as `50Mi`.
    pub bytes_per_second: Option<Quantity>,
    /// Read operations per second.
    #[schemars(range(min = 1))]
    pub iops: Option<i64>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ExecutionOrder {
    #[default]
    Parallel,
    Sequential,
}

/// Phase of an invoker (BackupConfiguration, BackupBatch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum InvokerPhase {
    Invalid,
    Ready,
    NotReady,
}

/// Which namespaces may use a Repository.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsagePolicy {
    pub allowed_namespaces: Option<AllowedNamespaces>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedNamespaces {
    #[schemars(extend("default" = "Same"))]
    pub from: Option<FromNamespaces>,
    /// Labels of the namespaces allowed when `from` is `Selector`.
    pub selector: Option<LabelSelector>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum FromNamespaces {
    All,
    Selector,
    #[default]
    Same,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_and_connections_follow_the_set_backend() {
        let gcs = Backend {
            gcs: Some(GcsSpec {
                bucket: "b".into(),
                prefix: None,
                max_connections: Some(8),
            }),
            ..Backend::default()
        };
        assert_eq!(gcs.provider().map(Provider::as_str), Some("gcs"));
        assert_eq!(gcs.max_connections(), Some(8));
        let s3 = Backend {
            s3: Some(S3Spec::default()),
            ..Backend::default()
        };
        assert_eq!(s3.provider(), Some(Provider::S3));
        assert_eq!(s3.max_connections(), None);
        assert_eq!(Backend::default().provider(), None);
    }
}
