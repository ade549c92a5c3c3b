//! The DaemonSet controller: one pod per node that the template's selector, affinity and
//! tolerations admit, pinned by a `metadata.name` node affinity (the scheduler binds it),
//! replaced on template changes within maxUnavailable.

use super::statefulset::{REVISION_LABEL, ensure_revision};
use super::{generate_prefix, log_failure, pod_from_template};
use crate::error::Result;
use crate::util::{
    self, controller_ref, is_controlled_by, now, pod_is_active, pod_is_available, pod_is_ready,
};
use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodSpec, Toleration,
};
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;

const GENERATION_LABEL: &str = "pod-template-generation";

pub async fn pass(client: &Client) -> Result<()> {
    let all: Api<DaemonSet> = Api::all(client.clone());
    let pods: Vec<Pod> = util::list(&Api::all(client.clone()), "pods").await?;
    let nodes: Vec<Node> = util::list(&Api::all(client.clone()), "nodes").await?;
    let revs: Vec<ControllerRevision> =
        util::list(&Api::all(client.clone()), "controllerrevisions").await?;
    for ds in util::list(&all, "daemonsets").await? {
        if util::is_deleting(&ds) {
            continue;
        }
        if let Err(e) = sync(client, &ds, &pods, &nodes, &revs).await {
            log_failure(
                "DaemonSet",
                &ds.namespace().unwrap_or_default(),
                &ds.name_any(),
                &e,
            );
        }
    }
    Ok(())
}

/// The tolerations the controller adds to every daemon pod (docs "DaemonSet").
fn add_daemon_tolerations(spec: &mut PodSpec) {
    let t = spec.tolerations.get_or_insert_with(Vec::new);
    let mut add = |key: &str, effect: &str| {
        if !t
            .iter()
            .any(|x| x.key.as_deref() == Some(key) && x.effect.as_deref() == Some(effect))
        {
            t.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some(effect.into()),
                ..Default::default()
            });
        }
    };
    add("node.kubernetes.io/not-ready", "NoExecute");
    add("node.kubernetes.io/unreachable", "NoExecute");
    add("node.kubernetes.io/disk-pressure", "NoSchedule");
    add("node.kubernetes.io/memory-pressure", "NoSchedule");
    add("node.kubernetes.io/pid-pressure", "NoSchedule");
    add("node.kubernetes.io/unschedulable", "NoSchedule");
    if spec.host_network == Some(true) {
        add("node.kubernetes.io/network-unavailable", "NoSchedule");
    }
}

/// `ReplaceDaemonSetPodNodeNameNodeAffinity`: the required terms become one term selecting
/// the node by name.
fn pin_to_node(spec: &mut PodSpec, node: &str) {
    let term = NodeSelectorTerm {
        match_fields: Some(vec![NodeSelectorRequirement {
            key: "metadata.name".into(),
            operator: "In".into(),
            values: Some(vec![node.into()]),
        }]),
        match_expressions: None,
    };
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let na = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    na.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
        node_selector_terms: vec![term],
    });
}

/// `NodeShouldRunDaemonPod`: selector, required affinity and taints.
fn should_run(spec: &PodSpec, node: &Node) -> bool {
    let labels_ok = util::pod_fits_node_labels(spec, node);
    let mut with_tolerations = spec.clone();
    add_daemon_tolerations(&mut with_tolerations);
    let taints_ok = util::tolerates_node(
        with_tolerations.tolerations.as_deref().unwrap_or_default(),
        node,
    );
    labels_ok && taints_ok
}

/// The node a daemon pod is for: where it runs, or where its affinity pins it.
fn target_node(p: &Pod) -> Option<String> {
    let spec = p.spec.as_ref()?;
    if let Some(n) = &spec.node_name {
        return Some(n.clone());
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|r| r.key == "metadata.name" && r.operator == "In")
        .and_then(|r| r.values.as_ref()?.first().cloned())
}

async fn sync(
    client: &Client,
    ds: &DaemonSet,
    all_pods: &[Pod],
    nodes: &[Node],
    revs: &[ControllerRevision],
) -> Result<()> {
    let ns = ds.namespace().unwrap_or_default();
    let name = ds.name_any();
    let uid = ds.uid().unwrap_or_default();
    let Some(spec) = ds.spec.clone() else {
        return Ok(());
    };
    let template_spec = spec.template.spec.clone().unwrap_or_default();
    let collision = ds.status.as_ref().and_then(|s| s.collision_count);
    let (_, hash) = ensure_revision(client, ds, &spec.template, collision, revs).await?;
    let generation = ds.metadata.generation.unwrap_or(0);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut by_node: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
    for p in all_pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && is_controlled_by(*p, &uid))
    {
        if let Some(n) = target_node(p) {
            by_node.entry(n).or_default().push(p);
        }
    }
    let what = |p: &Pod| format!("daemon pod {ns}/{}", p.name_any());
    let wanted: Vec<&Node> = nodes
        .iter()
        .filter(|n| should_run(&template_spec, n))
        .collect();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let now = now();
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        != Some("OnDelete");
    let desired = i32::try_from(wanted.len()).unwrap_or(i32::MAX);
    let max_unavailable = util::scaled(
        spec.update_strategy
            .as_ref()
            .and_then(|u| u.rolling_update.as_ref())
            .and_then(|r| r.max_unavailable.as_ref()),
        desired,
        true,
        1,
    )
    .max(1);
    let is_current = |p: &Pod| p.labels().get(REVISION_LABEL) == Some(&hash);
    let mut unavailable = 0;
    let mut stale: Vec<&Pod> = Vec::new();
    for node in &wanted {
        let node_name = node.name_any();
        let pods = by_node.remove(&node_name).unwrap_or_default();
        let active: Vec<&Pod> = pods.iter().copied().filter(|p| pod_is_active(p)).collect();
        for p in pods
            .iter()
            .filter(|p| util::pod_is_terminal(p) && !util::is_deleting(**p))
        {
            util::delete(&pods_api, &p.name_any(), &what(p)).await?;
        }
        if active.is_empty() {
            let mut pod = pod_from_template(
                &spec.template,
                &ns,
                controller_ref(ds),
                Some(generate_prefix(&name)),
                None,
            );
            let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
            labels.insert(REVISION_LABEL.into(), hash.clone());
            labels.insert(GENERATION_LABEL.into(), generation.to_string());
            if let Some(ps) = pod.spec.as_mut() {
                pin_to_node(ps, &node_name);
                add_daemon_tolerations(ps);
            }
            util::create(&pods_api, &pod, &format!("a daemon pod of {ns}/{name}")).await?;
            unavailable += 1;
            continue;
        }
        // More than one: keep the oldest.
        let mut sorted = active.clone();
        sorted.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        for p in &sorted[1..] {
            util::delete(&pods_api, &p.name_any(), &what(p)).await?;
        }
        let p = sorted[0];
        if !pod_is_available(p, min_ready, &now) {
            unavailable += 1;
        }
        if !is_current(p) {
            stale.push(p);
        }
    }
    // Pods on nodes that should not run one.
    let misscheduled = by_node
        .values()
        .filter(|ps| ps.iter().any(|p| pod_is_active(p)))
        .count();
    for p in by_node
        .values()
        .flatten()
        .filter(|p| !util::is_deleting(**p))
    {
        util::delete(&pods_api, &p.name_any(), &what(p)).await?;
    }
    if rolling {
        // Unavailable old pods go first, then available ones within the budget.
        stale.sort_by_key(|p| pod_is_available(p, min_ready, &now));
        let mut budget = max_unavailable - unavailable;
        for p in stale {
            let available = pod_is_available(p, min_ready, &now);
            if available && budget <= 0 {
                break;
            }
            util::delete(&pods_api, &p.name_any(), &what(p)).await?;
            if available {
                budget -= 1;
            }
        }
    }
    // Status, from what exists now on wanted nodes.
    let on_wanted: Vec<&Pod> = all_pods
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns.as_str())
                && is_controlled_by(*p, &uid)
                && pod_is_active(p)
        })
        .filter(|p| target_node(p).is_some_and(|n| wanted.iter().any(|w| w.name_any() == n)))
        .collect();
    let scheduled = on_wanted
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let available = on_wanted
        .iter()
        .filter(|p| pod_is_available(p, min_ready, &now))
        .count();
    let status = json!({
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": scheduled,
        "numberMisscheduled": misscheduled,
        "numberReady": on_wanted.iter().filter(|p| pod_is_ready(p)).count(),
        "updatedNumberScheduled": on_wanted.iter().filter(|p| is_current(p) && p.spec.as_ref().is_some_and(|s| s.node_name.is_some())).count(),
        "numberAvailable": available,
        "numberUnavailable": (wanted.len().saturating_sub(available)),
        "observedGeneration": generation,
    });
    let cur = serde_json::to_value(&ds.status).unwrap_or_default();
    let differs = util::status_differs(&cur, &status);
    if differs {
        let api: Api<DaemonSet> = Api::namespaced(client.clone(), &ns);
        util::patch_status(&api, &name, status, &format!("DaemonSet {ns}/{name}")).await?;
    }
    Ok(())
}
