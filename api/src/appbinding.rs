//! AppBinding (`appcatalog.appscode.com/v1alpha1`): how to reach an application, usually a
//! database, and with which credentials. Targets of this kind use the job model.

use k8s_openapi::api::core::v1::{LocalObjectReference, TypedObjectReference};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "appcatalog.appscode.com",
    version = "v1alpha1",
    kind = "AppBinding",
    namespaced,
    derive = "PartialEq",
    derive = "Default",
    category = "catalog",
    category = "appscode",
    category = "all",
    doc = "How to connect to an application, such as a database, for backup and restore.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AppBindingSpec {
    /// `<group>/<resource>`, for example `kubedb.com/postgres`.
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub app_ref: Option<TypedObjectReference>,
    pub version: Option<String>,
    pub client_config: ClientConfig,
    /// The Secret with the application's credentials.
    pub secret: Option<TypedLocalObjectReference>,
    pub secret_transforms: Option<Vec<SecretTransform>>,
    /// Application-specific parameters, kept as written.
    #[schemars(extend("x-kubernetes-preserve-unknown-fields" = true))]
    pub parameters: Option<serde_json::Value>,
    pub tls_secret: Option<LocalObjectReference>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfig {
    pub url: Option<String>,
    pub service: Option<ServiceReference>,
    #[serde(rename = "insecureSkipTLSVerify")]
    pub insecure_skip_tls_verify: Option<bool>,
    /// PEM CA bundle, base64 encoded as in the Kubernetes API.
    pub ca_bundle: Option<String>,
    pub server_name: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceReference {
    pub scheme: Option<String>,
    pub namespace: Option<String>,
    pub name: String,
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    pub path: Option<String>,
    pub query: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TypedLocalObjectReference {
    pub api_group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
}

/// One change applied to the credentials Secret before it is used.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretTransform {
    pub rename_key: Option<RenameKeyTransform>,
    pub add_key: Option<AddKeyTransform>,
    pub add_keys_from: Option<AddKeysFromTransform>,
    pub remove_key: Option<RemoveKeyTransform>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RenameKeyTransform {
    pub from: String,
    pub to: String,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddKeyTransform {
    pub key: String,
    /// Base64 encoded value.
    pub value: Option<String>,
    pub string_value: Option<String>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddKeysFromTransform {
    pub secret_ref: Option<LocalObjectReference>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RemoveKeyTransform {
    pub key: String,
}
