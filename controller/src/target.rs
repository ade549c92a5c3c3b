//! A backup target as the operator reads it: the label selector of its pods and how many
//! hosts it should have. One read serves both the BackupConfiguration's `BackupTargetFound`
//! and a session's planning.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, ReplicationController};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Client;
use kube::api::Api;
use stash_api::common::TargetRef;

use crate::error::Error;

/// What planning needs of a target workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The label selector of its pods; empty for a PVC, whose pods are those that mount it.
    pub selector: String,
    /// StatefulSet replicas, DaemonSet scheduled pods, otherwise 1.
    pub total_hosts: i32,
}

/// A label selector as a list-request string.
pub fn selector_string(sel: &LabelSelector) -> String {
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for e in sel.match_expressions.iter().flatten() {
        let vals = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({vals})", e.key),
            "NotIn" => format!("{} notin ({vals})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

async fn get<K>(client: &Client, ns: &str, name: &str) -> Result<Option<K>, Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    Api::<K>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(Error::kube("read the backup target"))
}

/// Reads the target in `ns` (or its own namespace); `None` when it does not exist or is of a
/// kind the agent does not back up.
pub async fn read(client: &Client, ns: &str, t: &TargetRef) -> Result<Option<Workload>, Error> {
    let ns = t.namespace.as_deref().unwrap_or(ns);
    let one = |selector: String| Workload {
        selector,
        total_hosts: 1,
    };
    Ok(match t.kind.as_str() {
        "Deployment" => get::<Deployment>(client, ns, &t.name).await?.map(|d| {
            one(d
                .spec
                .map(|s| selector_string(&s.selector))
                .unwrap_or_default())
        }),
        "ReplicaSet" => get::<ReplicaSet>(client, ns, &t.name).await?.map(|r| {
            one(r
                .spec
                .map(|s| selector_string(&s.selector))
                .unwrap_or_default())
        }),
        "StatefulSet" => get::<StatefulSet>(client, ns, &t.name).await?.map(|s| {
            let spec = s.spec.unwrap_or_default();
            Workload {
                selector: selector_string(&spec.selector),
                total_hosts: spec.replicas.unwrap_or(1),
            }
        }),
        "DaemonSet" => get::<DaemonSet>(client, ns, &t.name)
            .await?
            .map(|d| Workload {
                selector: d
                    .spec
                    .map(|s| selector_string(&s.selector))
                    .unwrap_or_default(),
                total_hosts: d.status.map_or(0, |s| s.desired_number_scheduled),
            }),
        "ReplicationController" => get::<ReplicationController>(client, ns, &t.name)
            .await?
            .map(|r| {
                one(r
                    .spec
                    .and_then(|s| s.selector)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default())
            }),
        "PersistentVolumeClaim" => get::<PersistentVolumeClaim>(client, ns, &t.name)
            .await?
            .map(|_| one(String::new())),
        _ => None,
    })
}
