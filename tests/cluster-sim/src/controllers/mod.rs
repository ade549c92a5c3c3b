//! kube-controller-manager's workload, volume and namespace controllers, each a
//! level-triggered pass over what the API holds.

pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub mod job;
pub mod namespace;
pub mod nodelifecycle;
pub mod proxy;
pub mod replicaset;
pub mod statefulset;
pub mod volume;

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// `controller.GetPodFromTemplate`: labels, annotations, finalizers and spec from the
/// template, the owner as controller, and a generated name `<prefix>` + five characters
/// (the API server fills in generateName) or a fixed `name`.
pub fn pod_from_template(
    template: &PodTemplateSpec,
    namespace: &str,
    owner: OwnerReference,
    generate_name: Option<String>,
    name: Option<String>,
) -> Pod {
    let tm = template.metadata.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            name,
            generate_name,
            namespace: Some(namespace.to_owned()),
            labels: tm.labels,
            annotations: tm.annotations,
            finalizers: tm.finalizers,
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

/// The part of a name the API server keeps before appending five random characters.
pub fn generate_prefix(base: &str) -> String {
    let base = format!("{base}-");
    if base.len() > 58 {
        base[..58].to_owned()
    } else {
        base
    }
}

/// Logs a per-object failure without ending the pass over the other objects.
pub fn log_failure(kind: &'static str, ns: &str, name: &str, error: &crate::error::Error) {
    if error.is_retryable() {
        tracing::debug!(kind, ns, name, category = error.category(), %error, "sync failed");
    } else {
        tracing::warn!(kind, ns, name, category = error.category(), %error, "sync failed");
    }
}
