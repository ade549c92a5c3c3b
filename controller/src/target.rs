//! A backup or restore target as the operator reads it: the label selector of its pods and
//! how many hosts it should have, then its pods, their claims and volumes, and the nodes with
//! a Ready agent. One read serves both the BackupConfiguration's `BackupTargetFound` and a
//! session's planning.

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{
    PersistentVolume, PersistentVolumeClaim, Pod, ReplicationController,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::Client;
use kube::api::{Api, ListParams};
use stash_api::common::TargetRef;

use crate::context::Ctx;
use crate::error::Error;

/// What planning needs of a target workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// The label selector of its pods; empty for a PVC, whose pods are those that mount it.
    pub selector: String,
    /// StatefulSet replicas, DaemonSet scheduled pods, otherwise 1.
    pub total_hosts: i32,
}

/// Whether `labels` satisfy a label selector, as the API server decides it.
pub fn selector_matches(
    sel: &LabelSelector,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let vals = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| vals.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !vals.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && exprs_ok
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

async fn get<K: crate::context::Namespaced>(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<K>, Error> {
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

/// What the reads found: the target's pods and what their volumes refer to.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The target exists (and is of a kind the agent serves).
    pub found: bool,
    pub pods: Vec<Pod>,
    pub claims: Vec<PersistentVolumeClaim>,
    pub volumes: Vec<PersistentVolume>,
    /// Hosts the target should have (StatefulSet replicas, DaemonSet scheduled pods, else 1).
    pub total_hosts: i32,
    /// Nodes whose agent is Ready.
    pub ready_agents: BTreeSet<String>,
}

/// Whether a pod's agent reports Ready.
fn is_ready(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Reads what planning needs: the target's pods, claims and volumes, and the Ready agents.
/// `ns` is the session's namespace, the target's unless its ref names another.
pub async fn observe(ctx: &Ctx, ns: &str, target: Option<&TargetRef>) -> Result<Observed, Error> {
    let mut observed = Observed {
        total_hosts: 1,
        ..Observed::default()
    };
    let Some(target) = target else {
        return Ok(observed);
    };
    let tns = target.namespace.clone().unwrap_or_else(|| ns.to_owned());
    let c = ctx.client.clone();
    let Some(workload) = read(&c, &tns, target).await? else {
        return Ok(observed);
    };
    observed.found = true;
    // A workload without a selector has no pods of its own; a PVC's pods are found among all.
    if workload.selector.is_empty() && target.kind != "PersistentVolumeClaim" {
        return Ok(observed);
    }
    observed.total_hosts = workload.total_hosts;
    observed.pods = Api::<Pod>::namespaced(c.clone(), &tns)
        .list(&ListParams::default().labels(&workload.selector))
        .await
        .map_err(Error::kube("list the target's pods"))?
        .items;
    // Claims (and their volumes) matter only to pods that mount one.
    let uses_claims = observed.pods.iter().any(|p| {
        p.spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .any(|v| v.persistent_volume_claim.is_some() || v.ephemeral.is_some())
    });
    if uses_claims {
        observed.claims = Api::<PersistentVolumeClaim>::namespaced(c.clone(), &tns)
            .list(&ListParams::default())
            .await
            .map_err(Error::kube("list the claims"))?
            .items;
    }
    let wanted: BTreeSet<String> = observed
        .claims
        .iter()
        .filter_map(|c| c.spec.as_ref().and_then(|s| s.volume_name.clone()))
        .collect();
    for pv in wanted {
        if let Some(v) = Api::<PersistentVolume>::all(c.clone())
            .get_opt(&pv)
            .await
            .map_err(Error::kube("read a persistent volume"))?
        {
            observed.volumes.push(v);
        }
    }
    observed.ready_agents = crate::context::cached(&ctx.agents, "node agents")
        .await?
        .iter()
        .filter(|p| is_ready(p))
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .collect();
    Ok(observed)
}

/// Whether a pod is Running on a node, and not being deleted.
pub fn is_running(p: &Pod) -> bool {
    p.metadata.deletion_timestamp.is_none()
        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        && p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
}

/// The Running pods of a target, oldest first; for a kind that is one host (a Deployment,
/// ReplicaSet, ReplicationController or PVC) only the oldest, which stands for that host.
pub fn running_pods<'a>(kind: &str, pods: &'a [Pod]) -> Vec<&'a Pod> {
    use kube::ResourceExt;
    let mut out: Vec<&Pod> = pods.iter().filter(|p| is_running(p)).collect();
    out.sort_by(|a, b| {
        let t = |p: &Pod| p.metadata.creation_timestamp.clone().map(|t| t.0);
        t(a).cmp(&t(b))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    if !matches!(kind, "StatefulSet" | "DaemonSet") {
        out.truncate(1);
    }
    out
}
