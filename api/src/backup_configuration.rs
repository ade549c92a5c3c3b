//! BackupConfiguration (`stash.appscode.com/v1beta1`): one target, its schedule and retention.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    BackupHooks, BackupTarget, Driver, EmptyDirSettings, Executor, InvokerPhase, IoBudget,
    ObjectRef, PersistentVolumeClaimTemplate, ReadMode, RetentionPolicy, RetryConfig,
    RuntimeSettings, TaskRef, UnreadablePolicy,
};
use crate::conditions::Condition;

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "BackupConfiguration",
    namespaced,
    status = "BackupConfigurationStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "bc",
    category = "stash",
    category = "appscode",
    category = "all",
    doc = "What to back up, where to, how often and how long to keep it.",
    printcolumn(name = "Task", type_ = "string", json_path = ".spec.task.name"),
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
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.repository) || (has(self.driver) && self.driver == 'VolumeSnapshotter')",
    "message": "spec.repository is required unless driver is VolumeSnapshotter"
}]))]
pub struct BackupConfigurationSpec {
    pub task: Option<TaskRef>,
    pub target: Option<BackupTarget>,
    pub runtime_settings: Option<RuntimeSettings>,
    pub temp_dir: Option<EmptyDirSettings>,
    pub interim_volume_template: Option<PersistentVolumeClaimTemplate>,
    pub hooks: Option<BackupHooks>,
    /// Cron expression of the trigger CronJob.
    pub schedule: Option<String>,
    #[schemars(extend("default" = "Restic"))]
    pub driver: Option<Driver>,
    /// Where the snapshots go; required unless `driver: VolumeSnapshotter`.
    pub repository: Option<ObjectRef>,
    pub retention_policy: RetentionPolicy,
    /// Suspends the CronJob; manual BackupSessions still run.
    pub paused: Option<bool>,
    /// How many finished BackupSessions to keep (default 1).
    pub backup_history_limit: Option<i32>,
    /// Session deadline, a duration such as `30m`.
    pub time_out: Option<String>,
    pub retry_config: Option<RetryConfig>,
    #[schemars(extend("default" = "agent"))]
    pub executor: Option<Executor>,
    pub read_mode: Option<ReadMode>,
    pub io_budget: Option<IoBudget>,
    pub on_unreadable: Option<UnreadablePolicy>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupConfigurationStatus {
    pub observed_generation: Option<i64>,
    pub phase: Option<InvokerPhase>,
    pub conditions: Option<Vec<Condition>>,
}
