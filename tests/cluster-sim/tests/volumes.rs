//! Volumes as the kubelet lays them out on the node, the scheduler's volume and selector
//! rules, and teardown: pods sharing a claim share one staging mount; local PVs pull their
//! pods to their node; hostPath resolves inside the node's filesystem.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::Result;
use common::Sim;
use sha2::{Digest, Sha256};

fn pod(name: &str, node_selector: &str, volumes: &str, mounts: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default}}
spec:
  nodeSelector: {{{node_selector}}}
  containers: [{{name: c, image: nginx:1.27, volumeMounts: [{mounts}]}}]
  volumes: [{volumes}]
"#
    )
}

async fn running(sim: &Sim, name: &str) -> Result<serde_json::Value> {
    sim.kubectl(&[
        "wait",
        "--for=jsonpath={.status.phase}=Running",
        &format!("pod/{name}"),
        "--timeout=120s",
    ])
    .await?;
    sim.json(&["get", "pod", name]).await
}

fn mounted_under(dir: &std::path::Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| std::path::Path::new(p).starts_with(dir))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_are_laid_out_shared_and_torn_down_as_the_kubelet_does() -> Result<()> {
    let sim = Sim::start(2).await?;
    sim.apply(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: shared, namespace: default}
spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
"#,
    )
    .await?;
    let vols = "{name: data, persistentVolumeClaim: {claimName: shared}}, {name: scratch, emptyDir: {}}, {name: host, hostPath: {path: /srv/app, type: DirectoryOrCreate}}";
    let mounts = "{name: data, mountPath: /data}, {name: scratch, mountPath: /scratch}, {name: host, mountPath: /host}";
    sim.apply(&pod("a", "kubernetes.io/hostname: node-1", vols, mounts))
        .await?;
    sim.apply(&pod("b", "kubernetes.io/hostname: node-1", vols, mounts))
        .await?;
    let a = running(&sim, "a").await?;
    let b = running(&sim, "b").await?;
    let pvc = sim.json(&["get", "pvc", "shared"]).await?;
    assert_eq!(pvc["status"]["phase"], "Bound");
    // Delayed binding: the scheduler picked the node, the provisioner made the volume.
    assert_eq!(
        pvc["metadata"]["annotations"]["volume.kubernetes.io/selected-node"],
        "node-1"
    );
    assert_eq!(
        pvc["metadata"]["annotations"]["volume.kubernetes.io/storage-provisioner"],
        cluster_sim::CSI_DRIVER
    );
    let pv = pvc["spec"]["volumeName"].as_str().unwrap().to_owned();
    let node = sim
        .cluster()
        .nodes()
        .into_iter()
        .find(|n| n.name == "node-1")
        .unwrap();
    let dir = |p: &serde_json::Value| {
        node.kubelet_root
            .join("pods")
            .join(p["metadata"]["uid"].as_str().unwrap())
    };
    let mount_a = dir(&a).join(format!("volumes/kubernetes.io~csi/{pv}/mount"));
    let mount_b = dir(&b).join(format!("volumes/kubernetes.io~csi/{pv}/mount"));
    std::fs::write(mount_a.join("hello"), b"from a")?;
    assert_eq!(
        std::fs::read(mount_b.join("hello"))?,
        b"from a",
        "both pods see one volume"
    );
    let handle = sim.json(&["get", "pv", &pv]).await?["spec"]["csi"]["volumeHandle"]
        .as_str()
        .unwrap()
        .to_owned();
    let global = node
        .kubelet_root
        .join("plugins/kubernetes.io/csi")
        .join(cluster_sim::CSI_DRIVER)
        .join(hex::encode(Sha256::digest(handle.as_bytes())))
        .join("globalmount");
    assert_eq!(std::fs::read(global.join("hello"))?, b"from a");
    assert!(
        dir(&a)
            .join("volumes/kubernetes.io~empty-dir/scratch")
            .is_dir()
    );
    assert!(
        node.root.join("srv/app").is_dir(),
        "hostPath resolves inside the node's filesystem"
    );
    assert!(dir(&a).join("etc-hosts").is_file());

    // Deleting one pod keeps the shared staging mount; deleting both removes it.
    sim.kubectl(&["delete", "pod", "a"]).await?;
    sim.until("pod a's directory to go", || async {
        Ok((!dir(&a).exists()).then_some(()))
    })
    .await?;
    assert!(mounted_under(&global));
    sim.kubectl(&["delete", "pod", "b"]).await?;
    sim.until("the staging mount to go", || async {
        Ok((!mounted_under(&global) && !dir(&b).exists()).then_some(()))
    })
    .await?;
    // The data is the volume's, not the pod's: it is still on the storage backend.
    sim.kubectl(&["delete", "pvc", "shared"]).await?;
    sim.until("the released volume to be deleted", || async {
        Ok(sim
            .kubectl(&["get", "pv", &pv])
            .await
            .is_err()
            .then_some(()))
    })
    .await?;
    sim.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_volumes_pin_pods_and_unfit_pods_say_why() -> Result<()> {
    let sim = Sim::start(2).await?;
    let node2 = sim
        .cluster()
        .nodes()
        .into_iter()
        .find(|n| n.name == "node-2")
        .unwrap();
    std::fs::create_dir_all(node2.root.join("mnt/disk"))?;
    std::fs::write(node2.root.join("mnt/disk/existing"), b"data on node-2")?;
    sim.apply(
        r#"
apiVersion: v1
kind: PersistentVolume
metadata: {name: local-disk}
spec:
  capacity: {storage: 5Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: local
  local: {path: /mnt/disk}
  nodeAffinity:
    required:
      nodeSelectorTerms: [{matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [node-2]}]}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: local, namespace: default}
spec: {accessModes: [ReadWriteOnce], storageClassName: local, resources: {requests: {storage: 1Gi}}}
"#,
    )
    .await?;
    sim.apply(&pod(
        "user",
        "",
        "{name: d, persistentVolumeClaim: {claimName: local}}",
        "{name: d, mountPath: /d}",
    ))
    .await?;
    let p = running(&sim, "user").await?;
    assert_eq!(p["spec"]["nodeName"], "node-2");
    let pv_dir = node2
        .kubelet_root
        .join("pods")
        .join(p["metadata"]["uid"].as_str().unwrap())
        .join("volumes/kubernetes.io~local-volume/local-disk");
    assert_eq!(std::fs::read(pv_dir.join("existing"))?, b"data on node-2");
    let pv = sim.json(&["get", "pv", "local-disk"]).await?;
    assert_eq!(pv["status"]["phase"], "Bound");
    assert_eq!(pv["spec"]["claimRef"]["name"], "local");

    sim.apply(&pod("nowhere", "disk: ssd", "", "")).await?;
    let cond = sim
        .until("PodScheduled=False", || async {
            let v = sim.json(&["get", "pod", "nowhere"]).await?;
            Ok(v["status"]["conditions"].as_array().and_then(|cs| {
                cs.iter()
                    .find(|c| c["type"] == "PodScheduled" && c["status"] == "False")
                    .cloned()
            }))
        })
        .await?;
    assert_eq!(cond["reason"], "Unschedulable");
    assert_eq!(
        cond["message"],
        "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector."
    );
    let nodes = sim.kubectl(&["get", "nodes"]).await?;
    assert!(
        nodes.contains("node-1") && nodes.contains("node-2"),
        "{nodes}"
    );
    let ready = sim.json(&["get", "node", "node-1"]).await?;
    let cs = ready["status"]["conditions"].as_array().unwrap();
    assert!(
        cs.iter().any(|c| c["type"] == "Ready"
            && c["status"] == "True"
            && c["reason"] == "KubeletReady")
    );
    let lease = sim
        .json(&["get", "lease", "node-1", "-n", "kube-node-lease"])
        .await?;
    assert_eq!(lease["spec"]["holderIdentity"], "node-1");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 40);
    sim.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_kubelet_stops_becomes_unknown_and_tainted() -> Result<()> {
    let mut sim = Sim::start(2).await?;
    sim.cluster.as_mut().unwrap().stop_node("node-2").await;
    let node = sim
        .until("node-2 to be Unknown", || async {
            let n = sim.json(&["get", "node", "node-2"]).await?;
            let unknown = n["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "Unknown")
            });
            // The condition and the taint are two writes; wait for both.
            let tainted = n["spec"]["taints"]
                .as_array()
                .is_some_and(|ts| !ts.is_empty());
            Ok((unknown && tainted).then_some(n))
        })
        .await?;
    let ready = node["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(ready["reason"], "NodeStatusUnknown");
    assert_eq!(ready["message"], "Kubelet stopped posting node status.");
    assert!(
        node["spec"]["taints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute")
    );
    let other = sim.json(&["get", "node", "node-1"]).await?;
    assert!(
        other["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    );
    sim.stop().await;
    Ok(())
}
