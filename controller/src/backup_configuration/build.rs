//! Pure parts of the BackupConfiguration reconciler: what the spec asks that this operator
//! cannot do, the trigger CronJob with its ServiceAccount and RoleBinding, and the phase.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, LocalObjectReference, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, SecurityContext, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use stash_api::BackupConfiguration;
use stash_api::common::{Driver, Executor, InvokerPhase};
use stash_api::conditions::{Condition, find_condition, types};
use stash_api::labels;

/// Target kinds the node agent backs up.
pub const AGENT_TARGET_KINDS: [&str; 6] = [
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "ReplicationController",
    "PersistentVolumeClaim",
];

/// The longest CronJob name Kubernetes accepts (its Jobs append 11 characters).
const CRONJOB_NAME_MAX: usize = 52;

/// What the operator needs to build the CronJob.
#[derive(Clone, Debug)]
pub struct TriggerSettings {
    pub image: String,
    pub pull_secrets: Vec<String>,
    pub cluster_role: String,
}

/// A name cut to `max` characters with a hash of the whole, so long names stay unique.
pub fn bounded_name(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(name.as_bytes()));
    let keep = max.saturating_sub(9);
    let mut cut = name[..keep.min(name.len())].to_owned();
    while !cut.is_char_boundary(cut.len()) {
        cut.pop();
    }
    format!("{}-{}", cut.trim_end_matches(['-', '.']), &digest[..8])
}

/// Stash's CronJob name: `stash-trigger-<invoker>`, with the invoker's namespace added when
/// the target is in another namespace (dots become `-`).
pub fn cronjob_name(bc: &BackupConfiguration) -> String {
    let ns = bc.namespace().unwrap_or_default();
    let target_ns = bc
        .spec
        .target
        .as_ref()
        .and_then(|t| t.ref_.namespace.clone())
        .unwrap_or_else(|| ns.clone());
    let raw = if target_ns == ns {
        format!("stash-trigger-{}", bc.name_any())
    } else {
        format!("stash-trigger-{}-{}", ns.replace('.', "-"), bc.name_any())
    };
    bounded_name(&raw, CRONJOB_NAME_MAX)
}

/// The ServiceAccount (and RoleBinding) the trigger pods run as.
pub fn trigger_account_name(bc: &BackupConfiguration) -> String {
    bounded_name(&format!("stash-trigger-{}", bc.name_any()), 253)
}

/// Why the spec cannot be served as written; empty when it can. Each entry is a sentence.
pub fn validate(bc: &BackupConfiguration) -> Vec<String> {
    let mut problems = Vec::new();
    let spec = &bc.spec;
    if spec.driver == Some(Driver::VolumeSnapshotter) {
        problems.push(
            "driver VolumeSnapshotter is not supported yet; use driver Restic (the default)"
                .to_owned(),
        );
        return problems;
    }
    if spec.repository.is_none() {
        problems.push("spec.repository is required for driver Restic".to_owned());
    }
    match spec.executor.unwrap_or_default() {
        Executor::Agent => {}
        Executor::Sidecar => problems.push(
            "executor sidecar (Stash's sidecar injection) is not served yet; use executor agent"
                .to_owned(),
        ),
        Executor::Job => problems
            .push("executor job (a backup Job) is not served yet; use executor agent".to_owned()),
    }
    if spec
        .task
        .as_ref()
        .and_then(|t| t.name.as_deref())
        .is_some_and(|n| !n.is_empty())
    {
        problems.push(
            "a task (addon or database backups) needs the job model, which is not served yet"
                .to_owned(),
        );
    }
    if spec
        .hooks
        .as_ref()
        .is_some_and(|h| h.pre_backup.is_some() || h.post_backup.is_some())
    {
        problems.push(
            "backup hooks (spec.hooks) are not run yet; remove them, or the backup would run \
             without the preparation they do"
                .to_owned(),
        );
    }
    match &spec.target {
        None => problems.push("spec.target is required".to_owned()),
        Some(t) if !AGENT_TARGET_KINDS.contains(&t.ref_.kind.as_str()) => problems.push(format!(
            "target kind {} is not one the node agent backs up ({})",
            t.ref_.kind,
            AGENT_TARGET_KINDS.join(", ")
        )),
        Some(t) => {
            let mounts = t.volume_mounts.as_ref().is_some_and(|v| !v.is_empty());
            let paths = t.paths.as_ref().is_some_and(|v| !v.is_empty());
            if !mounts && !paths && t.ref_.kind != "PersistentVolumeClaim" {
                problems.push(
                    "spec.target names neither volumeMounts nor paths, so there is nothing to back up"
                        .to_owned(),
                );
            }
        }
    }
    match spec.schedule.as_deref() {
        None | Some("") => {}
        Some(s) => {
            if let Err(e) = crate::schedule::validate(s) {
                problems.push(format!("schedule {s:?} is invalid: {e}"));
            }
        }
    }
    if let Some(t) = &spec.time_out
        && crate::backup_session::parse_duration(t).is_none()
    {
        problems.push(format!(
            "timeOut {t:?} is not a duration such as 30m or 1h30m"
        ));
    }
    if let Some(d) = spec.retry_config.as_ref().and_then(|r| r.delay.as_ref())
        && crate::backup_session::parse_duration(d).is_none()
    {
        problems.push(format!(
            "retryConfig.delay {d:?} is not a duration such as 10m"
        ));
    }
    problems
}

fn owner(
    bc: &BackupConfiguration,
) -> Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference> {
    bc.controller_owner_ref(&()).into_iter().collect()
}

fn invoker_labels(bc: &BackupConfiguration) -> BTreeMap<String, String> {
    [
        (labels::MANAGED_BY, labels::MANAGED_BY_STASH),
        (labels::COMPONENT, labels::COMPONENT_BACKUP),
        (labels::INVOKER_TYPE, "BackupConfiguration"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .chain([(labels::INVOKER_NAME.to_owned(), bc.name_any())])
    .collect()
}

/// The metadata of an object the configuration owns: its namespace, Stash's invoker labels,
/// and the configuration as controller, so it goes when the configuration goes.
fn owned_meta(bc: &BackupConfiguration, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: bc.namespace(),
        labels: Some(invoker_labels(bc)),
        owner_references: Some(owner(bc)),
        ..ObjectMeta::default()
    }
}

pub fn build_service_account(bc: &BackupConfiguration) -> ServiceAccount {
    ServiceAccount {
        metadata: owned_meta(bc, trigger_account_name(bc)),
        ..ServiceAccount::default()
    }
}

pub fn build_role_binding(bc: &BackupConfiguration, settings: &TriggerSettings) -> RoleBinding {
    RoleBinding {
        metadata: owned_meta(bc, trigger_account_name(bc)),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: settings.cluster_role.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: trigger_account_name(bc),
            namespace: bc.namespace(),
            ..Subject::default()
        }]),
    }
}

/// The CronJob whose pods run `stash-operator trigger` on the schedule; suspended while the
/// configuration is paused (manual sessions still run).
pub fn build_cronjob(bc: &BackupConfiguration, settings: &TriggerSettings) -> CronJob {
    let container = Container {
        name: labels::TRIGGER_CONTAINER.into(),
        image: Some(settings.image.clone()),
        args: Some(vec![
            "trigger".into(),
            "--invoker-kind=BackupConfiguration".into(),
            format!("--invoker-name={}", bc.name_any()),
        ]),
        env: Some(vec![EnvVar {
            name: "STASH_INVOKER_NAMESPACE".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.namespace".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(65534),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let pull_secrets: Vec<LocalObjectReference> = settings
        .pull_secrets
        .iter()
        .map(|n| LocalObjectReference { name: n.clone() })
        .collect();
    let pod = PodSpec {
        containers: vec![container],
        restart_policy: Some("Never".into()),
        service_account_name: Some(trigger_account_name(bc)),
        image_pull_secrets: (!pull_secrets.is_empty()).then_some(pull_secrets),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            ..PodSecurityContext::default()
        }),
        ..PodSpec::default()
    };
    CronJob {
        metadata: owned_meta(bc, cronjob_name(bc)),
        spec: Some(CronJobSpec {
            schedule: bc.spec.schedule.clone().unwrap_or_default(),
            suspend: Some(bc.spec.paused.unwrap_or(false)),
            // A trigger only creates a session; the session controller decides about overlap.
            concurrency_policy: Some("Allow".into()),
            successful_jobs_history_limit: Some(1),
            failed_jobs_history_limit: Some(1),
            job_template: JobTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(invoker_labels(bc)),
                    ..ObjectMeta::default()
                }),
                spec: Some(JobSpec {
                    backoff_limit: Some(1),
                    template: PodTemplateSpec {
                        metadata: Some(ObjectMeta {
                            labels: Some(invoker_labels(bc)),
                            ..ObjectMeta::default()
                        }),
                        spec: Some(pod),
                    },
                    ..JobSpec::default()
                }),
            },
            ..CronJobSpec::default()
        }),
        status: None,
    }
}

fn is(conds: &[Condition], t: &str) -> Option<bool> {
    find_condition(conds, t).map(Condition::is_true)
}

/// Stash's phase rule (STASH-API.md §3.2).
pub fn phase(conds: &[Condition]) -> InvokerPhase {
    if is(conds, types::VALIDATION_PASSED) == Some(false) {
        return InvokerPhase::Invalid;
    }
    if is(conds, types::REPOSITORY_FOUND) != Some(true)
        || is(conds, types::BACKEND_SECRET_FOUND) != Some(true)
    {
        return InvokerPhase::NotReady;
    }
    if is(conds, types::VALIDATION_PASSED) == Some(true)
        && is(conds, types::CRON_JOB_CREATED) == Some(true)
        && is(conds, types::BACKUP_TARGET_FOUND) != Some(false)
    {
        return InvokerPhase::Ready;
    }
    InvokerPhase::NotReady
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use stash_api::backup_configuration::BackupConfigurationSpec;
    use stash_api::common::{BackupTarget, ObjectRef, TargetRef};

    fn bc(yaml: &str) -> BackupConfiguration {
        let mut bc = BackupConfiguration::new(
            "nightly",
            serde_yaml::from_str::<BackupConfigurationSpec>(yaml).unwrap(),
        );
        bc.metadata.namespace = Some("demo".into());
        bc.metadata.uid = Some("uid-1".into());
        bc
    }

    const GOOD: &str = r#"
repository: {name: s3-repo}
schedule: "*/5 * * * *"
target:
  ref: {apiVersion: apps/v1, kind: Deployment, name: app}
  volumeMounts: [{name: data, mountPath: /data}]
  paths: [/data]
retentionPolicy: {name: keep, keepLast: 5, prune: true}
"#;

    #[test]
    fn a_good_spec_passes_and_builds_stashs_cronjob() {
        let bc = bc(GOOD);
        assert_eq!(validate(&bc), Vec::<String>::new());
        let settings = TriggerSettings {
            image: "ghcr.io/stash-rs/stash-operator:0.1.0".into(),
            pull_secrets: vec!["regcred".into()],
            cluster_role: "stash-trigger".into(),
        };
        let cj = build_cronjob(&bc, &settings);
        assert_eq!(cj.metadata.name.as_deref(), Some("stash-trigger-nightly"));
        let spec = cj.spec.unwrap();
        assert_eq!(spec.schedule, "*/5 * * * *");
        assert_eq!(spec.suspend, Some(false));
        let pod = spec.job_template.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers[0].name, "stash-trigger");
        assert_eq!(
            pod.containers[0].args.as_ref().unwrap()[2],
            "--invoker-name=nightly"
        );
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some("stash-trigger-nightly")
        );
        assert_eq!(cj.metadata.owner_references.unwrap()[0].uid, "uid-1");
        let rb = build_role_binding(&bc, &settings);
        assert_eq!(rb.role_ref.name, "stash-trigger");
    }

    #[test]
    fn paused_suspends_the_cronjob() {
        let mut bc = bc(GOOD);
        bc.spec.paused = Some(true);
        let settings = TriggerSettings {
            image: "x".into(),
            pull_secrets: vec![],
            cluster_role: "r".into(),
        };
        assert_eq!(
            build_cronjob(&bc, &settings).spec.unwrap().suspend,
            Some(true)
        );
    }

    #[test]
    fn what_cannot_be_served_is_said_plainly() {
        let mut b = bc(GOOD);
        b.spec.schedule = Some("61 * * * *".into());
        b.spec.executor = Some(Executor::Sidecar);
        let problems = validate(&b);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("executor sidecar"));
        assert!(problems[1].contains("schedule"));
        let mut vs = bc(GOOD);
        vs.spec.driver = Some(Driver::VolumeSnapshotter);
        vs.spec.repository = None;
        assert!(validate(&vs)[0].contains("VolumeSnapshotter is not supported yet"));
        let mut job = bc(GOOD);
        job.spec.target = Some(BackupTarget {
            ref_: TargetRef {
                api_version: "v1".into(),
                kind: "AppBinding".into(),
                name: "db".into(),
                namespace: None,
            },
            ..BackupTarget::default()
        });
        job.spec.repository = Some(ObjectRef::default());
        assert!(validate(&job)[0].contains("AppBinding"));
    }

    #[test]
    fn long_names_are_cut_with_a_hash() {
        let long = "x".repeat(80);
        let n = bounded_name(&long, 52);
        assert_eq!(n.len(), 52);
        assert_ne!(bounded_name(&"y".repeat(80), 52), n);
        assert_eq!(bounded_name("short", 52), "short");
    }

    #[test]
    fn phase_follows_stash() {
        let c = |t: &str, s: bool| Condition::new(t, s, "R", "");
        assert_eq!(phase(&[]), InvokerPhase::NotReady);
        assert_eq!(
            phase(&[c(types::VALIDATION_PASSED, false)]),
            InvokerPhase::Invalid
        );
        let ready = [
            c(types::REPOSITORY_FOUND, true),
            c(types::BACKEND_SECRET_FOUND, true),
            c(types::VALIDATION_PASSED, true),
            c(types::CRON_JOB_CREATED, true),
        ];
        assert_eq!(phase(&ready), InvokerPhase::Ready);
        assert_eq!(phase(&ready[1..]), InvokerPhase::NotReady);
    }
}
