//! The ReplicaSet controller: keeps `spec.replicas` active pods from the template, deletes
//! the least useful ones first when there are too many, and reports counts in status.

use super::{generate_prefix, log_failure, pod_from_template};
use crate::error::Result;
use crate::util::{
    self, controller_ref, is_controlled_by, now, pod_is_active, pod_is_available, pod_is_ready,
};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::json;

/// Pods created per pass at most (the real controller's burst, `BurstReplicas`).
const BURST: usize = 500;

pub async fn pass(client: &Client) -> Result<()> {
    let all: Api<ReplicaSet> = Api::all(client.clone());
    let pods: Vec<Pod> = util::list(&Api::all(client.clone()), "pods").await?;
    for rs in util::list(&all, "replicasets").await? {
        if util::is_deleting(&rs) {
            continue;
        }
        if let Err(e) = sync(client, &rs, &pods).await {
            log_failure(
                "ReplicaSet",
                &rs.namespace().unwrap_or_default(),
                &rs.name_any(),
                &e,
            );
        }
    }
    Ok(())
}

/// `controller.ActivePodsWithRanks` order, most deletable first: unassigned, pending,
/// not ready, ready for less time, more restarts, newer.
fn deletion_rank(p: &Pod) -> (bool, u8, bool, i64, i64) {
    let assigned = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    let phase = match util::pod_phase(p) {
        "Pending" => 0,
        "Unknown" => 1,
        _ => 2,
    };
    let restarts: i32 = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_deref())
        .unwrap_or_default()
        .iter()
        .map(|c| c.restart_count)
        .sum();
    let created = p
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(0, |t| t.0.as_second());
    (
        assigned,
        phase,
        pod_is_ready(p),
        -i64::from(restarts),
        -created,
    )
}

async fn sync(client: &Client, rs: &ReplicaSet, all_pods: &[Pod]) -> Result<()> {
    let ns = rs.namespace().unwrap_or_default();
    let name = rs.name_any();
    let uid = rs.uid().unwrap_or_default();
    let spec = rs.spec.clone().unwrap_or_default();
    let want = usize::try_from(spec.replicas.unwrap_or(1)).unwrap_or(0);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut active: Vec<&Pod> = all_pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
        .filter(|p| is_controlled_by(*p, &uid) && pod_is_active(p))
        .collect();
    let what = format!("a pod of ReplicaSet {ns}/{name}");
    if active.len() < want {
        let Some(template) = spec.template.as_ref() else {
            return Ok(());
        };
        for _ in 0..(want - active.len()).min(BURST) {
            let pod = pod_from_template(
                template,
                &ns,
                controller_ref(rs),
                Some(generate_prefix(&name)),
                None,
            );
            util::create(&pods_api, &pod, &what).await?;
        }
    } else if active.len() > want {
        active.sort_by_key(|p| deletion_rank(p));
        for p in &active[..active.len() - want] {
            util::delete(&pods_api, &p.name_any(), &what).await?;
        }
        active.drain(..active.len() - want);
    }
    let now = now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let fully_labeled = active
        .iter()
        .filter(|p| {
            let l = p.labels();
            template_labels.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .count();
    let status = json!({
        "replicas": active.len(),
        "fullyLabeledReplicas": fully_labeled,
        "readyReplicas": active.iter().filter(|p| pod_is_ready(p)).count(),
        "availableReplicas": active.iter().filter(|p| pod_is_available(p, min_ready, &now)).count(),
        "observedGeneration": rs.metadata.generation.unwrap_or(0),
    });
    let current = serde_json::to_value(&rs.status).unwrap_or_default();
    if util::status_differs(&current, &status) {
        let api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
        util::patch_status(&api, &name, status, &format!("ReplicaSet {ns}/{name}")).await?;
    }
    Ok(())
}
