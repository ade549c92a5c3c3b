//! kube-scheduler: binds each unscheduled pod to a feasible Ready node (nodeSelector, node
//! affinity, taints, the node affinity of its PVs), spreading pods of one owner across
//! nodes; records `PodScheduled=False` with the filter reasons when none fits.

use crate::controllers::volume::SELECTED_NODE;
use crate::error::{Error, Result};
use crate::util::{self, controller_uid, node_is_ready, node_terms_match, tolerates_node};
use k8s_openapi::api::core::v1::{
    Binding, Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;

pub const SCHEDULER_NAME: &str = "default-scheduler";

struct World {
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    pvcs: Vec<PersistentVolumeClaim>,
    pvs: Vec<PersistentVolume>,
    classes: Vec<StorageClass>,
}

pub async fn pass(client: &Client) -> Result<()> {
    let w = World {
        nodes: util::list(&Api::all(client.clone()), "nodes").await?,
        pods: util::list(&Api::all(client.clone()), "pods").await?,
        pvcs: util::list(&Api::all(client.clone()), "persistentvolumeclaims").await?,
        pvs: util::list(&Api::all(client.clone()), "persistentvolumes").await?,
        classes: util::list(&Api::all(client.clone()), "storageclasses").await?,
    };
    let mut placed: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    for p in &w.pods {
        if let Some(n) = p.spec.as_ref().and_then(|s| s.node_name.clone())
            && util::pod_is_active(p)
        {
            placed
                .entry(n)
                .or_default()
                .push(controller_uid(&p.metadata).map(str::to_owned));
        }
    }
    for pod in &w.pods {
        let Some(spec) = pod.spec.as_ref() else {
            continue;
        };
        let mine = spec
            .scheduler_name
            .as_deref()
            .is_none_or(|s| s == SCHEDULER_NAME);
        let gated = spec
            .scheduling_gates
            .as_ref()
            .is_some_and(|g| !g.is_empty());
        if spec.node_name.is_some() || !mine || gated || !util::pod_is_active(pod) {
            continue;
        }
        match schedule_one(client, &w, pod, &placed).await {
            Ok(Some(node)) => placed
                .entry(node)
                .or_default()
                .push(controller_uid(&pod.metadata).map(str::to_owned)),
            Ok(None) => {}
            Err(e) => crate::controllers::log_failure(
                "Pod",
                &pod.namespace().unwrap_or_default(),
                &pod.name_any(),
                &e,
            ),
        }
    }
    Ok(())
}

/// The claims of the pod's volumes, or the message that stops scheduling outright.
fn claims<'a>(
    w: &'a World,
    pod: &Pod,
) -> std::result::Result<Vec<&'a PersistentVolumeClaim>, String> {
    let ns = pod.namespace().unwrap_or_default();
    let mut out = Vec::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let Some(src) = &v.persistent_volume_claim else {
            continue;
        };
        let Some(pvc) = w.pvcs.iter().find(|c| {
            c.namespace().as_deref() == Some(ns.as_str()) && c.name_any() == src.claim_name
        }) else {
            return Err(format!(
                "persistentvolumeclaim \"{}\" not found",
                src.claim_name
            ));
        };
        if util::is_deleting(pvc) {
            return Err(format!(
                "persistentvolumeclaim \"{}\" is being deleted",
                src.claim_name
            ));
        }
        out.push(pvc);
    }
    Ok(out)
}

fn class_waits(w: &World, pvc: &PersistentVolumeClaim) -> bool {
    let class = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref());
    w.classes
        .iter()
        .find(|c| Some(c.name_any().as_str()) == class)
        .is_some_and(|c| c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"))
}

/// Why the node cannot take the pod, in the scheduler's filter wording; `None` if it can.
fn unfit(w: &World, pod: &Pod, node: &Node, claims: &[&PersistentVolumeClaim]) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    if !node_is_ready(node) {
        let taint = k8s_openapi::api::core::v1::Taint {
            key: "node.kubernetes.io/not-ready".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        };
        if !util::tolerates(tolerations, &taint) {
            return Some("node(s) had untolerated taint {node.kubernetes.io/not-ready: }".into());
        }
    }
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        return Some("node(s) were unschedulable".into());
    }
    if !util::pod_fits_node_labels(spec, node) {
        return Some("node(s) didn't match Pod's node affinity/selector".into());
    }
    if !tolerates_node(tolerations, node) {
        return Some("node(s) had untolerated taint".into());
    }
    for pvc in claims {
        let volume = pvc.spec.as_ref().and_then(|s| s.volume_name.as_ref());
        match volume.and_then(|v| w.pvs.iter().find(|p| p.name_any() == *v)) {
            Some(pv) => {
                let required = pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_affinity.as_ref())
                    .and_then(|a| a.required.as_ref());
                if required.is_some_and(|r| !node_terms_match(&r.node_selector_terms, node)) {
                    return Some("node(s) had volume node affinity conflict".into());
                }
            }
            None if class_waits(w, pvc) => {}
            None => return Some("node(s) didn't find available persistent volumes to bind".into()),
        }
    }
    None
}

async fn schedule_one(
    client: &Client,
    w: &World,
    pod: &Pod,
    placed: &BTreeMap<String, Vec<Option<String>>>,
) -> Result<Option<String>> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let what = format!("pod {ns}/{name}");
    let claims = match claims(w, pod) {
        Ok(c) => c,
        Err(message) => {
            mark_unschedulable(&api, pod, &message, &what).await?;
            return Ok(None);
        }
    };
    let unbound_immediate = claims.iter().any(|c| {
        c.spec
            .as_ref()
            .and_then(|s| s.volume_name.as_ref())
            .is_none()
            && !class_waits(w, c)
    });
    if unbound_immediate {
        mark_unschedulable(
            &api,
            pod,
            "pod has unbound immediate PersistentVolumeClaims",
            &what,
        )
        .await?;
        return Ok(None);
    }
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut feasible: Vec<&Node> = Vec::new();
    for node in &w.nodes {
        match unfit(w, pod, node, &claims) {
            None => feasible.push(node),
            Some(r) => *reasons.entry(r).or_default() += 1,
        }
    }
    let owner = controller_uid(&pod.metadata).map(str::to_owned);
    let Some(node) = feasible.into_iter().min_by_key(|n| {
        let here = placed
            .get(&n.name_any())
            .map(Vec::as_slice)
            .unwrap_or_default();
        let siblings = here
            .iter()
            .filter(|o| owner.is_some() && **o == owner)
            .count();
        (siblings, here.len(), n.name_any())
    }) else {
        let parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
        let message = format!(
            "0/{} nodes are available: {}.",
            w.nodes.len(),
            parts.join(", ")
        );
        mark_unschedulable(&api, pod, &message, &what).await?;
        return Ok(None);
    };
    let node_name = node.name_any();
    // Delayed binding: tell the provisioner where the pod goes.
    for pvc in claims.iter().filter(|c| {
        c.spec
            .as_ref()
            .and_then(|s| s.volume_name.as_ref())
            .is_none()
    }) {
        let capi: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        util::merge_patch(
            &capi,
            &pvc.name_any(),
            json!({"metadata": {"annotations": {SELECTED_NODE: node_name}}}),
            &format!("PVC {ns}/{}", pvc.name_any()),
        )
        .await?;
    }
    bind(&api, pod, &node_name).await?;
    Ok(Some(node_name))
}

async fn mark_unschedulable(api: &Api<Pod>, pod: &Pod, message: &str, what: &str) -> Result<()> {
    let current = serde_json::to_value(&pod.status).unwrap_or_default();
    let mut conditions = util::conditions_of(Some(&current));
    let before = conditions.clone();
    util::set_condition(
        &mut conditions,
        "PodScheduled",
        "False",
        "Unschedulable",
        message,
    );
    if before != conditions {
        util::patch_status(
            api,
            &pod.name_any(),
            json!({"conditions": conditions}),
            what,
        )
        .await?;
    }
    Ok(())
}

/// POSTs the Binding, as kube-scheduler's DefaultBinder does: the API server sets the
/// pod's nodeName and its `PodScheduled` condition, once.
async fn bind(api: &Api<Pod>, pod: &Pod, node: &str) -> Result<()> {
    let name = pod.name_any();
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: pod.namespace(),
            uid: pod.uid(),
            ..Default::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..Default::default()
        },
    };
    let what = format!("pod {}/{name}", pod.namespace().unwrap_or_default());
    api.create_subresource::<Binding, serde_json::Value>(
        "binding",
        &name,
        &PostParams::default(),
        &binding,
    )
    .await
    .map_err(|source| Error::Kube {
        action: format!("bind {what} to {node}"),
        source,
    })?;
    Ok(())
}
