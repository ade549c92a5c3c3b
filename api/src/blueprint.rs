//! BackupBlueprint (`stash.appscode.com/v1beta1`, cluster scope): a template from which a
//! Repository and a BackupConfiguration are generated for annotated targets.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Backend, BackupHooks, EmptyDirSettings, PersistentVolumeClaimTemplate, RetentionPolicy,
    RetryConfig, RuntimeSettings, TaskRef, UsagePolicy,
};

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "BackupBlueprint",
    derive = "PartialEq",
    derive = "Default",
    shortname = "bb",
    category = "stash",
    category = "appscode",
    doc = "A template for a Repository and BackupConfiguration per annotated target.",
    printcolumn(name = "Task", type_ = "string", json_path = ".spec.task.name"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.backend.storageSecretName) && self.backend.storageSecretName != ''",
    "message": "backend.storageSecretName is required"
}]))]
pub struct BackupBlueprintSpec {
    pub backend: Backend,
    pub wipe_out: Option<bool>,
    pub usage_policy: Option<UsagePolicy>,
    /// Namespace of the generated BackupConfiguration; the target's by default.
    pub backup_namespace: Option<String>,
    /// Namespace of the generated Repository; the target's by default.
    pub repo_namespace: Option<String>,
    #[schemars(length(min = 1))]
    pub schedule: String,
    pub task: Option<TaskRef>,
    pub retention_policy: Option<RetentionPolicy>,
    pub runtime_settings: Option<RuntimeSettings>,
    pub temp_dir: Option<EmptyDirSettings>,
    pub interim_volume_template: Option<PersistentVolumeClaimTemplate>,
    pub hooks: Option<BackupHooks>,
    pub backup_history_limit: Option<i32>,
    pub time_out: Option<String>,
    pub retry_config: Option<RetryConfig>,
}
