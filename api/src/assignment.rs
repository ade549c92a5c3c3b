//! BackupAssignment and RestoreAssignment (`stash.appscode.com/v1beta1`): the work of one
//! session on one node. Only the controller creates them; the agent on that node, which
//! watches them by the `stash.appscode.com/node` label, writes their status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::backup_session::BackupInvokerRef;
use crate::common::{IoBudget, ObjectRef, ReadMode, TargetRef, UnreadablePolicy};
use crate::conditions::Condition;

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "BackupAssignment",
    namespaced,
    status = "AssignmentStatus",
    derive = "PartialEq",
    derive = "Default",
    category = "stash",
    doc = "The volumes one node agent backs up for one BackupSession.",
    selectable = ".spec.nodeName",
    printcolumn(name = "Session", type_ = "string", json_path = ".spec.backupSession"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self == oldSelf",
    "message": "the spec of an assignment is immutable"
}]))]
pub struct BackupAssignmentSpec {
    /// The BackupSession, in this namespace, the assignment belongs to.
    #[schemars(length(min = 1))]
    pub backup_session: String,
    pub invoker: Option<BackupInvokerRef>,
    pub target: Option<TargetRef>,
    /// The node whose agent does the work.
    #[schemars(length(min = 1))]
    pub node_name: String,
    pub repository: ObjectRef,
    pub read_mode: Option<ReadMode>,
    pub io_budget: Option<IoBudget>,
    pub on_unreadable: Option<UnreadablePolicy>,
    /// restic `--exclude` patterns.
    pub exclude: Option<Vec<String>>,
    /// Extra arguments for `restic backup`, direct mode only, from a fixed list of flags that
    /// change how restic reads or stores the files (`--exclude-larger-than=1G`,
    /// `--exclude-caches`, `--exclude-if-present=.nobackup`, `--one-file-system`,
    /// `--ignore-ctime`, `--ignore-inode`, `--no-scan`, `--with-atime`, `--compression=max`,
    /// `--pack-size=64`), each as one `--flag` or `--flag=value` entry, passed to restic as
    /// written. Anything else fails the assignment with the reason.
    pub args: Option<Vec<String>>,
    #[schemars(length(min = 1))]
    pub volumes: Vec<AssignedVolume>,
}

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "RestoreAssignment",
    namespaced,
    status = "AssignmentStatus",
    derive = "PartialEq",
    derive = "Default",
    category = "stash",
    doc = "The volumes one node agent restores in place for one RestoreSession.",
    selectable = ".spec.nodeName",
    printcolumn(name = "Session", type_ = "string", json_path = ".spec.restoreSession"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self == oldSelf",
    "message": "the spec of an assignment is immutable"
}]))]
pub struct RestoreAssignmentSpec {
    /// The RestoreSession, in this namespace, the assignment belongs to.
    #[schemars(length(min = 1))]
    pub restore_session: String,
    pub target: Option<TargetRef>,
    #[schemars(length(min = 1))]
    pub node_name: String,
    pub repository: ObjectRef,
    pub io_budget: Option<IoBudget>,
    #[schemars(length(min = 1))]
    pub volumes: Vec<AssignedVolume>,
}

/// A pod volume to back up or restore, resolved by the controller.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssignedVolume {
    pub pod_namespace: String,
    pub pod_name: String,
    /// The kubelet keeps the volume under `pods/<podUID>/volumes/…`.
    pub pod_uid: String,
    pub volume_name: String,
    pub source_kind: VolumeSourceKind,
    /// The PV name for persistent volumes; part of the host path.
    pub persistent_volume: Option<String>,
    /// The restic `--host` (Stash's `host-N` / alias scheme).
    pub host: String,
    /// Stable identity across pod restarts: the PVC UID, or `namespace/workload/volume`.
    pub snapshot_key: String,
    /// Sub-directories of the volume to include; all of it when empty.
    pub paths: Option<Vec<String>>,
    /// Backup: where the target's containers mount the volume (`/source/data`). Its snapshot
    /// is tagged with it, so a restore finds it by the path Stash's users name, also into a
    /// new claim of another workload.
    pub mount_path: Option<String>,
    /// Restore only: the snapshot to restore (an id, or `latest` of this host and key).
    pub snapshot: Option<String>,
    /// Restore only: include patterns.
    pub include: Option<Vec<String>>,
    /// Restore only: exclude patterns.
    pub exclude: Option<Vec<String>>,
    /// Restore only: delete files that are not in the snapshot.
    pub delete_extraneous: Option<bool>,
}

/// How the kubelet lays out a volume on the node, which decides its host path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VolumeSourceKind {
    #[default]
    EmptyDir,
    /// A CSI persistent volume, mounted at `<pv>/mount`.
    CsiPersistentVolume,
    /// An in-tree, local or NFS persistent volume, mounted at `<pv>`.
    PersistentVolume,
    /// A CSI ephemeral (inline) volume.
    CsiEphemeral,
    /// A generic ephemeral volume, backed by a PVC the kubelet mounts like a CSI PV.
    Ephemeral,
    /// A raw block device under `volumeDevices/`.
    Block,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum AssignmentPhase {
    #[default]
    Pending,
    Accepted,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl AssignmentPhase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            AssignmentPhase::Succeeded | AssignmentPhase::Failed | AssignmentPhase::Canceled
        )
    }
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentStatus {
    pub observed_generation: Option<i64>,
    pub phase: Option<AssignmentPhase>,
    /// The agent pod that accepted the work.
    pub agent: Option<String>,
    pub start_time: Option<Time>,
    pub completion_time: Option<Time>,
    /// Refreshed with each progress report, so a dead agent is noticed.
    pub last_heartbeat_time: Option<Time>,
    pub volumes: Option<Vec<VolumeProgress>>,
    /// Why the assignment failed, for a human.
    pub error: Option<String>,
    pub conditions: Option<Vec<Condition>>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum VolumePhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    /// Nothing changed since the last snapshot of this key; `snapshotId` is that snapshot.
    Unchanged,
    Failed,
    /// Interrupted because the assignment was deleted or canceled; it left no snapshot.
    Canceled,
}

impl VolumePhase {
    pub fn is_final(self) -> bool {
        !matches!(self, VolumePhase::Pending | VolumePhase::Running)
    }
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeProgress {
    pub pod_name: String,
    pub volume_name: String,
    pub phase: Option<VolumePhase>,
    pub bytes_total: Option<i64>,
    pub bytes_done: Option<i64>,
    pub files_total: Option<i64>,
    pub files_done: Option<i64>,
    pub eta_seconds: Option<i64>,
    pub snapshot_id: Option<String>,
    /// Files that vanished, changed or could not be read during the read.
    pub warnings: Option<Vec<String>>,
    pub error: Option<String>,
    /// The error's fixed category (`wrong-password`, `locked`, `invalid-spec`, …), for
    /// alerts and the operator.
    pub reason: Option<String>,
    /// To the microsecond, as a Lease's times are: a volume's restore can take less than a
    /// second, and the session's per-host `duration` is measured from these.
    pub start_time: Option<MicroTime>,
    /// When the volume ended, to the microsecond.
    pub completion_time: Option<MicroTime>,
}

/// The condition types of an assignment's status.
pub mod condition_types {
    /// The agent of the node took the assignment (`False`: it cannot carry it out as written).
    pub const ACCEPTED: &str = "Accepted";
    /// Volumes are being read or restored (`False` once nothing runs any more).
    pub const PROGRESSING: &str = "Progressing";
    /// The work is over, one way or another; the reason says which.
    pub const COMPLETED: &str = "Completed";
}

/// The reasons of those conditions.
pub mod condition_reasons {
    pub const ACCEPTED_BY_NODE_AGENT: &str = "AcceptedByNodeAgent";
    /// The spec cannot be read or asks for something the agent cannot do.
    pub const INVALID_ASSIGNMENT: &str = "InvalidAssignment";
    pub const WAITING: &str = "Waiting";
    pub const VOLUMES_RUNNING: &str = "VolumesRunning";
    /// A retryable failure (a lock held by someone else, a backend that does not answer):
    /// the agent tries again with a growing delay until its deadline.
    pub const RETRYING: &str = "Retrying";
    pub const IN_PROGRESS: &str = "InProgress";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    pub const CANCELED: &str = "Canceled";
}
