//! Repository (`stash.appscode.com/v1alpha1`): where a target's restic repository lives.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Backend, UsagePolicy};

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1alpha1",
    kind = "Repository",
    plural = "repositories",
    namespaced,
    status = "RepositoryStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "repo",
    category = "stash",
    category = "appscode",
    category = "all",
    doc = "A restic repository on a backend, with the Secret that opens it.",
    printcolumn(name = "Integrity", type_ = "boolean", json_path = ".status.integrity"),
    printcolumn(name = "Size", type_ = "string", json_path = ".status.totalSize"),
    printcolumn(
        name = "Snapshot-Count",
        type_ = "integer",
        json_path = ".status.snapshotCount"
    ),
    printcolumn(
        name = "Last-Successful-Backup",
        type_ = "date",
        format = "date-time",
        json_path = ".status.lastBackupTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.wipeOut) && self.wipeOut && (has(self.backend.local) || has(self.backend.b2)))",
    "message": "wipeOut is not supported for local and b2 backends"
}]))]
pub struct RepositorySpec {
    pub backend: Backend,
    /// When the Repository is deleted, also delete the restic data from the backend.
    pub wipe_out: Option<bool>,
    /// Which namespaces may use this Repository; without it only its own namespace.
    pub usage_policy: Option<UsagePolicy>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryStatus {
    pub observed_generation: Option<i64>,
    pub first_backup_time: Option<Time>,
    pub last_backup_time: Option<Time>,
    /// Result of the last `restic check`.
    pub integrity: Option<bool>,
    /// Human readable, for example "41 B".
    pub total_size: Option<String>,
    pub snapshot_count: Option<i64>,
    pub snapshots_removed_on_last_cleanup: Option<i64>,
    /// The invokers that use this Repository.
    pub references: Option<Vec<ResourceRef>>,
    /// Whether the backend and its Secret are usable and the restic repository is initialised
    /// (`BackendSecretFound`, `BackendRepositoryInitialized`); an addition to Stash's status.
    pub conditions: Option<Vec<crate::conditions::Condition>>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRef {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}
