//! The node lifecycle controller: a node whose Lease has not been renewed within the grace
//! period gets Ready (and the pressure conditions) `Unknown` with `NodeStatusUnknown`, and
//! the `node.kubernetes.io/unreachable` NoExecute taint, removed again once it is Ready.

use crate::error::Result;
use crate::util::{self, now};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::json;

/// `--node-monitor-grace-period` (40 s in the source the facts were read from).
pub const GRACE_SECONDS: i64 = 40;
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
const WATCHED: &[&str] = &["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"];

pub async fn pass(client: &Client) -> Result<()> {
    let nodes: Vec<Node> = util::list(&Api::all(client.clone()), "nodes").await?;
    let leases: Vec<Lease> = util::list(
        &Api::namespaced(client.clone(), crate::kubelet::node::LEASE_NAMESPACE),
        "node leases",
    )
    .await?;
    let api: Api<Node> = Api::all(client.clone());
    let now = now();
    for node in nodes {
        let name = node.name_any();
        let renewed = leases
            .iter()
            .find(|l| l.name_any() == name)
            .and_then(|l| l.spec.as_ref()?.renew_time.as_ref().map(|t| t.0));
        let conditions = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        // The last sign of life: the Lease, the Ready heartbeat, or the node's creation (a
        // node that just registered has no Lease yet).
        let heartbeat = conditions
            .iter()
            .find(|c| c.type_ == "Ready")
            .and_then(|c| c.last_heartbeat_time.as_ref().map(|t| t.0));
        let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
        let last = [renewed, heartbeat, created].into_iter().flatten().max();
        let stale = last.is_none_or(|t| t + jiff::SignedDuration::from_secs(GRACE_SECONDS) < now.0);
        let already = conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "Unknown");
        let taints = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.clone())
            .unwrap_or_default();
        if !stale && util::node_is_ready(&node) && taints.iter().any(|t| t.key == UNREACHABLE_TAINT)
        {
            // Back: the kubelet posted Ready again, so the taint goes.
            let kept: Vec<_> = taints
                .into_iter()
                .filter(|t| t.key != UNREACHABLE_TAINT)
                .collect();
            util::merge_patch(
                &api,
                &name,
                json!({"spec": {"taints": kept}}),
                &format!("Node {name}"),
            )
            .await?;
            continue;
        }
        if !stale || already {
            continue;
        }
        let stamp = serde_json::to_value(&now).unwrap_or_default();
        let conditions: Vec<serde_json::Value> = conditions
            .iter()
            .map(|c| {
                let mut v = serde_json::to_value(c).unwrap_or_default();
                if WATCHED.contains(&c.type_.as_str()) {
                    v["status"] = json!("Unknown");
                    v["reason"] = json!("NodeStatusUnknown");
                    v["message"] = json!("Kubelet stopped posting node status.");
                    v["lastTransitionTime"] = stamp.clone();
                }
                v
            })
            .collect();
        util::patch_status(
            &api,
            &name,
            json!({"conditions": conditions}),
            &format!("Node {name}"),
        )
        .await?;
        let mut taints = taints;
        if !taints.iter().any(|t| t.key == UNREACHABLE_TAINT) {
            taints.push(k8s_openapi::api::core::v1::Taint {
                key: UNREACHABLE_TAINT.into(),
                effect: "NoExecute".into(),
                time_added: Some(now.clone()),
                value: None,
            });
            util::merge_patch(
                &api,
                &name,
                json!({"spec": {"taints": taints}}),
                &format!("Node {name}"),
            )
            .await?;
        }
    }
    Ok(())
}
