//! Helpers every component shares: owner references, label and node selectors, pod
//! readiness and availability, and the API calls with the error naming the action.

use crate::error::{Error, Result};
use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, ObjectMeta, OwnerReference, Time,
};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;

pub fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// `metav1.NewControllerRef`: the owner with `controller` and `blockOwnerDeletion` set.
pub fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The UID of the object's controller, if it has one.
pub fn controller_uid(meta: &ObjectMeta) -> Option<&str> {
    meta.owner_references
        .as_deref()?
        .iter()
        .find(|r| r.controller == Some(true))
        .map(|r| r.uid.as_str())
}

pub fn is_controlled_by<K: Resource>(obj: &K, owner_uid: &str) -> bool {
    controller_uid(obj.meta()) == Some(owner_uid)
}

pub fn is_deleting<K: Resource>(obj: &K) -> bool {
    obj.meta().deletion_timestamp.is_some()
}

/// `metav1.LabelSelectorAsSelector` semantics: an empty selector matches everything.
pub fn selector_matches(sel: Option<&LabelSelector>, labels: &BTreeMap<String, String>) -> bool {
    let Some(sel) = sel else { return false };
    let by_label = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expr = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let got = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => got.is_some_and(|g| values.contains(g)),
            "NotIn" => got.is_none_or(|g| !values.contains(g)),
            "Exists" => got.is_some(),
            "DoesNotExist" => got.is_none(),
            _ => false,
        }
    });
    by_label && by_expr
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(number),
                values.first().and_then(|b| number(b)),
            ) else {
                return false;
            };
            if r.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// One nodeSelectorTerm: its expressions (labels) and fields (`metadata.name`) are ANDed.
pub fn node_term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let labels = node.labels();
    let name = node.name_any();
    let exprs = term.match_expressions.iter().flatten();
    let fields = term.match_fields.iter().flatten();
    let has_any = term
        .match_expressions
        .as_ref()
        .is_some_and(|v| !v.is_empty())
        || term.match_fields.as_ref().is_some_and(|v| !v.is_empty());
    has_any
        && exprs
            .clone()
            .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields.clone().all(|r| {
            let v = (r.key == "metadata.name").then_some(name.as_str());
            requirement_matches(r, v)
        })
}

/// nodeSelectorTerms are ORed.
pub fn node_terms_match(terms: &[NodeSelectorTerm], node: &Node) -> bool {
    terms.iter().any(|t| node_term_matches(t, node))
}

/// `v1helper.TolerationsTolerateTaint` for one taint.
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_ok = t
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() || k == taint.key);
        let value_ok = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => {
                t.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default()
            }
        };
        effect_ok
            && key_ok
            && value_ok
            && (t.key.is_some() || t.operator.as_deref() == Some("Exists"))
    })
}

/// Whether every NoSchedule/NoExecute taint of the node is tolerated.
pub fn tolerates_node(tolerations: &[Toleration], node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|t| tolerates(tolerations, t))
}

pub fn node_is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

pub fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

pub fn pod_is_terminal(pod: &Pod) -> bool {
    matches!(pod_phase(pod), "Succeeded" | "Failed")
}

/// `controller.IsPodActive`: not terminal and not being deleted.
pub fn pod_is_active(pod: &Pod) -> bool {
    !pod_is_terminal(pod) && !is_deleting(pod)
}

fn ready_condition(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_deref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

pub fn pod_is_ready(pod: &Pod) -> bool {
    ready_condition(pod).is_some_and(|c| c.status == "True")
}

/// `podutil.IsPodAvailable`: Ready for at least `min_ready_seconds`.
pub fn pod_is_available(pod: &Pod, min_ready_seconds: i32, now: &Time) -> bool {
    let Some(c) = ready_condition(pod).filter(|c| c.status == "True") else {
        return false;
    };
    if min_ready_seconds <= 0 {
        return true;
    }
    c.last_transition_time.as_ref().is_some_and(|t| {
        t.0 + jiff::SignedDuration::from_secs(i64::from(min_ready_seconds)) <= now.0
    })
}

/// Lists objects of one kind in one namespace (or all, with `None`).
pub async fn list<K>(api: &Api<K>, what: &str) -> Result<Vec<K>>
where
    K: Clone + DeserializeOwned + Debug,
{
    Ok(api
        .list(&ListParams::default())
        .await
        .map_err(Error::kube(format!("list {what}")))?
        .items)
}

pub async fn create<K>(api: &Api<K>, obj: &K, what: &str) -> Result<K>
where
    K: Clone + DeserializeOwned + Serialize + Debug,
{
    api.create(&PostParams::default(), obj)
        .await
        .map_err(Error::kube(format!("create {what}")))
}

/// Creates, treating "already exists" as done (a previous pass or another writer made it).
pub async fn create_if_absent<K>(api: &Api<K>, obj: &K, what: &str) -> Result<()>
where
    K: Clone + DeserializeOwned + Serialize + Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(Error::Kube {
            action: format!("create {what}"),
            source,
        }),
    }
}

pub async fn merge_patch<K>(
    api: &Api<K>,
    name: &str,
    patch: serde_json::Value,
    what: &str,
) -> Result<K>
where
    K: Clone + DeserializeOwned + Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .map_err(Error::kube(format!("patch {what}")))
}

pub async fn patch_status<K>(
    api: &Api<K>,
    name: &str,
    status: serde_json::Value,
    what: &str,
) -> Result<K>
where
    K: Clone + DeserializeOwned + Debug,
{
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .map_err(Error::kube(format!("update the status of {what}")))
}

/// Deletes in the background (dependents go to the garbage collector); a missing object is
/// already what we wanted.
pub async fn delete<K>(api: &Api<K>, name: &str, what: &str) -> Result<()>
where
    K: Clone + DeserializeOwned + Debug,
{
    match api
        .delete(name, &kube::api::DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            action: format!("delete {what}"),
            source,
        }),
    }
}

/// A metav1 condition list update that keeps `lastTransitionTime` while the status stays.
pub fn set_condition(
    conditions: &mut Vec<serde_json::Value>,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
) {
    let now = now();
    let stamp = serde_json::to_value(&now).unwrap_or_default();
    if let Some(c) = conditions.iter_mut().find(|c| c["type"] == type_) {
        // Unchanged conditions are left alone, so a pass that finds nothing new writes
        // nothing (and wakes no watcher).
        if c["status"] == status && c["reason"] == reason && c["message"] == message {
            return;
        }
        if c["status"] != status {
            c["lastTransitionTime"] = stamp.clone();
        }
        c["status"] = status.into();
        c["reason"] = reason.into();
        c["message"] = message.into();
        if c.get("lastUpdateTime").is_some() {
            c["lastUpdateTime"] = stamp;
        }
    } else {
        conditions.push(serde_json::json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": stamp,
        }));
    }
}

pub fn conditions_of(status: Option<&serde_json::Value>) -> Vec<serde_json::Value> {
    status
        .and_then(|s| s.get("conditions"))
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// An int-or-percent against a total (`intstr.GetScaledValueFromIntOrPercent`).
pub fn scaled(
    v: Option<&k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
    total: i32,
    round_up: bool,
    default: i32,
) -> i32 {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    match v {
        None => default,
        Some(IntOrString::Int(i)) => *i,
        Some(IntOrString::String(s)) => {
            let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            let prod = pct * i64::from(total);
            let r = if round_up {
                (prod + 99) / 100
            } else {
                prod / 100
            };
            i32::try_from(r).unwrap_or(i32::MAX)
        }
    }
}

/// Whether a pod's nodeSelector and required node affinity admit the node.
pub fn pod_fits_node_labels(spec: &k8s_openapi::api::core::v1::PodSpec, node: &Node) -> bool {
    let labels = node.labels();
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let affinity_ok = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_none_or(|r| node_terms_match(&r.node_selector_terms, node));
    selector_ok && affinity_ok
}

/// Whether any field of a freshly computed status differs from the stored one (a missing
/// stored field counts as 0), so unchanged passes write nothing.
pub fn status_differs(current: &serde_json::Value, want: &serde_json::Value) -> bool {
    want.as_object().is_some_and(|m| {
        m.iter()
            .any(|(k, v)| current.get(k).cloned().unwrap_or(serde_json::json!(0)) != *v)
    })
}

/// Deletes the given pods (a missing one is already gone).
pub async fn delete_pods(api: &Api<Pod>, pods: &[&&Pod]) -> Result<()> {
    for p in pods {
        let ns = p.namespace().unwrap_or_default();
        delete(api, &p.name_any(), &format!("pod {ns}/{}", p.name_any())).await?;
    }
    Ok(())
}
