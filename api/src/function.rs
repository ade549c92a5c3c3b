//! Function and Task (`stash.appscode.com/v1beta1`, cluster scope): the container steps of the
//! job model. String fields may hold `${VAR}` / `${VAR:=default}` placeholders.

use k8s_openapi::api::core::v1::{ContainerPort, Volume, VolumeDevice, VolumeMount};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ContainerRuntimeSettings, Param};

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "Function",
    derive = "PartialEq",
    derive = "Default",
    shortname = "fn",
    category = "stash",
    category = "appscode",
    doc = "A container template: one step of a Task.",
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.image"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct FunctionSpec {
    #[schemars(length(min = 1))]
    pub image: String,
    pub command: Option<Vec<String>>,
    pub args: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub ports: Option<Vec<ContainerPort>>,
    pub volume_mounts: Option<Vec<VolumeMount>>,
    pub volume_devices: Option<Vec<VolumeDevice>>,
    pub runtime_settings: Option<ContainerRuntimeSettings>,
    pub pod_security_policy_name: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "stash.appscode.com",
    version = "v1beta1",
    kind = "Task",
    derive = "PartialEq",
    derive = "Default",
    shortname = "task",
    category = "stash",
    category = "appscode",
    doc = "An ordered list of Functions: all but the last run as init containers.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TaskSpec {
    #[schemars(length(min = 1))]
    pub steps: Option<Vec<FunctionRef>>,
    /// Volumes of the pod; may be templated, for example `claimName: ${TARGET_NAME}`.
    pub volumes: Option<Vec<Volume>>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FunctionRef {
    /// The Function's name.
    pub name: String,
    pub params: Option<Vec<Param>>,
}
