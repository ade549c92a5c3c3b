//! The kubelet's node registration and heartbeat: the Node object with its conditions,
//! addresses and capacity, and the Lease in `kube-node-lease` renewed every 10 seconds.

use crate::error::{Error, Result};
use crate::util::{self, now};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use std::net::Ipv4Addr;

pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const LEASE_SECONDS: i32 = 40;
pub const KUBELET_VERSION: &str = "v1.33.0";

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> serde_json::Value {
    let t = serde_json::to_value(now()).unwrap_or_default();
    json!({"type": type_, "status": status, "reason": reason, "message": message,
        "lastHeartbeatTime": t, "lastTransitionTime": t})
}

/// What the kubelet posts as node status (`setNodeStatus`): healthy conditions, the
/// node's addresses, capacity and build information.
pub fn node_status(name: &str, ip: Ipv4Addr) -> serde_json::Value {
    let capacity = json!({"cpu": "2", "memory": "8Gi", "pods": "110", "ephemeral-storage": "100Gi", "hugepages-2Mi": "0"});
    json!({
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "addresses": [{"type": "InternalIP", "address": ip.to_string()}, {"type": "Hostname", "address": name}],
        "capacity": capacity,
        "allocatable": capacity,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
            "operatingSystem": "linux",
            "osImage": "cluster-sim",
            "kernelVersion": rustix::system::uname().release().to_string_lossy(),
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": KUBELET_VERSION,
            "containerRuntimeVersion": concat!("cluster-sim://", env!("CARGO_PKG_VERSION")),
            "machineID": name, "systemUUID": name, "bootID": name,
        },
    })
}

pub async fn register(client: &Client, name: &str, ip: Ipv4Addr) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let labels = json!({
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "beta.kubernetes.io/os": "linux",
        "beta.kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
    });
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {},
    }))
    .map_err(|e| Error::Invalid {
        action: "build the Node",
        message: e.to_string(),
    })?;
    util::create_if_absent(&api, &node, &format!("Node {name}")).await?;
    util::patch_status(&api, name, node_status(name, ip), &format!("Node {name}")).await?;
    Ok(())
}

/// Creates or renews the node's Lease.
pub async fn renew_lease(client: &Client, name: &str) -> Result<()> {
    let api: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let renew = MicroTime(now().0);
    match api
        .get_opt(name)
        .await
        .map_err(Error::kube(format!("read Lease {name}")))?
    {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some(LEASE_NAMESPACE.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(name.into()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    renew_time: Some(renew),
                    ..Default::default()
                }),
            };
            util::create_if_absent(&api, &lease, &format!("Lease {name}")).await
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.renew_time = Some(renew);
            spec.holder_identity = Some(name.into());
            spec.lease_duration_seconds = Some(LEASE_SECONDS);
            api.replace(name, &Default::default(), &lease)
                .await
                .map_err(Error::kube(format!("renew Lease {name}")))?;
            Ok(())
        }
    }
}

/// Re-posts the conditions with a fresh heartbeat, keeping their transition times (the
/// kubelet does so every five minutes when nothing changed).
pub async fn heartbeat(client: &Client, name: &str) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let node = api
        .get(name)
        .await
        .map_err(Error::kube(format!("read Node {name}")))?;
    let stamp = serde_json::to_value(now()).unwrap_or_default();
    let mut conditions =
        serde_json::to_value(node.status.and_then(|s| s.conditions).unwrap_or_default())
            .unwrap_or_default();
    for c in conditions.as_array_mut().into_iter().flatten() {
        c["lastHeartbeatTime"] = stamp.clone();
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conditions}})),
    )
    .await
    .map_err(Error::kube(format!("post the status of Node {name}")))?;
    Ok(())
}

/// Posts the full status again when the node is not Ready (the node lifecycle controller
/// marked it Unknown while this kubelet was away), as a status change is posted at once.
pub async fn repost_if_not_ready(client: &Client, name: &str, ip: Ipv4Addr) -> Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let node = api
        .get(name)
        .await
        .map_err(Error::kube(format!("read Node {name}")))?;
    if util::node_is_ready(&node) {
        return Ok(());
    }
    util::patch_status(&api, name, node_status(name, ip), &format!("Node {name}")).await?;
    Ok(())
}
