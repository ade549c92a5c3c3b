//! BackupBatch and RestoreBatch (`stash.appscode.com/v1beta1`): several targets backed up into,
//! or restored from, one Repository under one schedule.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    BackupHooks, BackupTarget, Driver, EmptyDirSettings, ExecutionOrder, InvokerPhase, ObjectRef,
    PersistentVolumeClaimTemplate, RestoreHooks, RestoreTarget, RetentionPolicy, RetryConfig,
    RuntimeSettings, TargetRef, TaskRef,
};
use crate::conditions::Condition;
use crate::restore_session::{HostRestoreStats, RestorePhase};

/// One member of a BackupBatch: the per-target part of a BackupConfiguration.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupConfigurationTemplateSpec {
    pub task: Option<TaskRef>,
    pub target: Option<BackupTarget>,
    pub runtime_settings: Option<RuntimeSettings>,
    pub temp_dir: Option<EmptyDirSettings>,
    pub interim_volume_template: Option<PersistentVolumeClaimTemplate>,
    pub hooks: Option<BackupHooks>,
}

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "BackupBatch",
    namespaced,
    status = "BackupBatchStatus",
    derive = "PartialEq",
    derive = "Default",
    category = "stash",
    category = "appscode",
    category = "all",
    doc = "Several targets backed up together into one Repository.",
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Paused", type_ = "boolean", json_path = ".spec.paused"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BackupBatchSpec {
    pub members: Option<Vec<BackupConfigurationTemplateSpec>>,
    pub schedule: Option<String>,
    /// Used for the CronJob and its ServiceAccount.
    pub runtime_settings: Option<RuntimeSettings>,
    #[schemars(extend("default" = "Restic"))]
    pub driver: Option<Driver>,
    pub repository: ObjectRef,
    pub retention_policy: RetentionPolicy,
    pub paused: Option<bool>,
    pub backup_history_limit: Option<i32>,
    /// Global hooks, run by the operator around the whole batch.
    pub hooks: Option<BackupHooks>,
    #[schemars(extend("default" = "Parallel"))]
    pub execution_order: Option<ExecutionOrder>,
    pub time_out: Option<String>,
    pub retry_config: Option<RetryConfig>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupBatchStatus {
    pub observed_generation: Option<i64>,
    pub phase: Option<InvokerPhase>,
    pub conditions: Option<Vec<Condition>>,
    pub member_conditions: Option<Vec<MemberConditions>>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberConditions {
    pub target: TargetRef,
    pub conditions: Option<Vec<Condition>>,
}

/// One member of a RestoreBatch: the per-target part of a RestoreSession.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreTargetSpec {
    pub task: Option<TaskRef>,
    pub target: Option<RestoreTarget>,
    pub runtime_settings: Option<RuntimeSettings>,
    pub temp_dir: Option<EmptyDirSettings>,
    pub interim_volume_template: Option<PersistentVolumeClaimTemplate>,
    pub hooks: Option<RestoreHooks>,
}

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "RestoreBatch",
    namespaced,
    status = "RestoreBatchStatus",
    derive = "PartialEq",
    derive = "Default",
    category = "stash",
    category = "appscode",
    category = "all",
    doc = "Restores the members of a BackupBatch.",
    printcolumn(
        name = "Repository",
        type_ = "string",
        json_path = ".spec.repository.name"
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
pub struct RestoreBatchSpec {
    #[schemars(extend("default" = "Restic"))]
    pub driver: Option<Driver>,
    pub repository: Option<ObjectRef>,
    pub members: Option<Vec<RestoreTargetSpec>>,
    #[schemars(extend("default" = "Parallel"))]
    pub execution_order: Option<ExecutionOrder>,
    /// Global hooks, run by the operator around the whole batch.
    pub hooks: Option<RestoreHooks>,
    pub time_out: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreBatchStatus {
    pub phase: Option<RestorePhase>,
    pub session_duration: Option<String>,
    pub conditions: Option<Vec<Condition>>,
    pub session_deadline: Option<Time>,
    pub members: Option<Vec<RestoreMemberStatus>>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreMemberStatus {
    #[serde(rename = "ref")]
    pub ref_: TargetRef,
    pub conditions: Option<Vec<Condition>>,
    pub total_hosts: Option<i32>,
    pub phase: Option<RestoreMemberPhase>,
    pub stats: Option<Vec<HostRestoreStats>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestoreMemberPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}
