//! RestoreSession (`stash.appscode.com/v1beta1`): one restore run into a target.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    Driver, EmptyDirSettings, Executor, IoBudget, ObjectRef, PersistentVolumeClaimTemplate,
    ReadMode, RestoreHooks, RestoreTarget, Rule, RuntimeSettings, TaskRef,
};
use crate::conditions::Condition;

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "RestoreSession",
    namespaced,
    status = "RestoreSessionStatus",
    derive = "PartialEq",
    derive = "Default",
    shortname = "restore",
    category = "stash",
    category = "appscode",
    category = "all",
    doc = "One restore of snapshots from a Repository into a target.",
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
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self == oldSelf",
    "message": "the spec of a RestoreSession is immutable; create a new RestoreSession instead"
}]))]
pub struct RestoreSessionSpec {
    pub task: Option<TaskRef>,
    pub target: Option<RestoreTarget>,
    pub runtime_settings: Option<RuntimeSettings>,
    pub temp_dir: Option<EmptyDirSettings>,
    pub interim_volume_template: Option<PersistentVolumeClaimTemplate>,
    pub hooks: Option<RestoreHooks>,
    #[schemars(extend("default" = "Restic"))]
    pub driver: Option<Driver>,
    pub repository: Option<ObjectRef>,
    /// Deprecated: moved into `target.rules` by the mutating webhook.
    pub rules: Option<Vec<Rule>>,
    pub time_out: Option<String>,
    #[schemars(extend("default" = "agent"))]
    pub executor: Option<Executor>,
    /// Not used by restores: a snapshot is restored in the mode it was taken in.
    pub read_mode: Option<ReadMode>,
    /// What the restore may write per second on each node, lowering the node's budget: a
    /// stream snapshot's extraction is paced; restic writes a direct snapshot's files itself.
    pub io_budget: Option<IoBudget>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RestorePhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
    Invalid,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum HostRestorePhase {
    Succeeded,
    Failed,
    Running,
    Unknown,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSessionStatus {
    pub phase: Option<RestorePhase>,
    pub total_hosts: Option<i32>,
    pub session_duration: Option<String>,
    pub session_deadline: Option<Time>,
    pub conditions: Option<Vec<Condition>>,
    pub stats: Option<Vec<HostRestoreStats>>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostRestoreStats {
    pub hostname: String,
    pub phase: Option<HostRestorePhase>,
    pub duration: Option<String>,
    pub error: Option<String>,
}
