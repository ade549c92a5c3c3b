//! BackupSession (`stash.appscode.com/v1beta1`): one backup run of an invoker.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::TargetRef;
use crate::conditions::Condition;

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "BackupSession",
    namespaced,
    status = "BackupSessionStatus",
    derive = "PartialEq",
    derive = "Default",
    category = "stash",
    category = "appscode",
    category = "all",
    doc = "One run of a backup; create one for an instant backup.",
    printcolumn(
        name = "Invoker-Type",
        type_ = "string",
        json_path = ".spec.invoker.kind"
    ),
    printcolumn(
        name = "Invoker-Name",
        type_ = "string",
        json_path = ".spec.invoker.name"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Duration",
        type_ = "string",
        json_path = ".status.sessionDuration"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BackupSessionSpec {
    pub invoker: Option<BackupInvokerRef>,
    /// Retries left after this session fails.
    #[schemars(range(min = 0))]
    pub retry_left: Option<i32>,
}

/// The BackupConfiguration or BackupBatch that started a session.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupInvokerRef {
    pub api_group: Option<String>,
    #[schemars(extend("enum" = ["BackupConfiguration", "BackupBatch"]))]
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BackupSessionPhase {
    Pending,
    Skipped,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupSessionStatus {
    pub phase: Option<BackupSessionPhase>,
    pub session_duration: Option<String>,
    pub session_deadline: Option<Time>,
    pub retried: Option<bool>,
    pub next_retry: Option<Time>,
    pub conditions: Option<Vec<Condition>>,
    pub targets: Option<Vec<BackupTargetStatus>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TargetPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupTargetStatus {
    #[serde(rename = "ref")]
    pub ref_: TargetRef,
    pub total_hosts: Option<i32>,
    pub phase: Option<TargetPhase>,
    pub pre_backup_actions: Option<Vec<String>>,
    pub post_backup_actions: Option<Vec<String>>,
    pub conditions: Option<Vec<Condition>>,
    pub stats: Option<Vec<HostBackupStats>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HostPhase {
    Succeeded,
    Failed,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostBackupStats {
    pub hostname: String,
    pub phase: Option<HostPhase>,
    pub duration: Option<String>,
    pub error: Option<String>,
    pub snapshots: Option<Vec<SnapshotStats>>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStats {
    /// restic's short snapshot id.
    pub name: Option<String>,
    pub path: Option<String>,
    pub total_size: Option<String>,
    pub uploaded: Option<String>,
    pub processing_time: Option<String>,
    pub file_stats: Option<FileStats>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FileStats {
    pub total_files: Option<i64>,
    pub new_files: Option<i64>,
    pub modified_files: Option<i64>,
    pub unmodified_files: Option<i64>,
}
