//! The workload controllers as a user sees them through kubectl: rollouts, pod names,
//! labels and owner chains as Kubernetes makes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::Result;
use common::{Sim, pod_names};

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx:1.27}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_rolls_out_replaces_pods_on_template_change_and_cleans_up() -> Result<()> {
    let sim = Sim::start(2).await?;
    sim.apply(DEPLOYMENT).await?;
    let out = sim
        .kubectl(&["rollout", "status", "deploy/web", "--timeout=120s"])
        .await?;
    assert!(
        out.contains("deployment \"web\" successfully rolled out"),
        "{out}"
    );
    let pods = sim.json(&["get", "pods", "-l", "app=web"]).await?;
    let items = pods["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(items.len(), 3);
    let rs = sim.json(&["get", "rs", "-l", "app=web"]).await?;
    let rs_items = rs["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(rs_items.len(), 1);
    let rs_name = rs_items[0]["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let hash = rs_items[0]["metadata"]["labels"]["pod-template-hash"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(rs_name, format!("web-{hash}"));
    assert!(hash.chars().all(|c| "456789bcdf".contains(c)), "{hash}");
    assert_eq!(
        rs_items[0]["metadata"]["ownerReferences"][0]["kind"],
        "Deployment"
    );
    assert_eq!(
        rs_items[0]["metadata"]["ownerReferences"][0]["controller"],
        true
    );
    assert_eq!(
        rs_items[0]["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "1"
    );
    let mut nodes = std::collections::BTreeSet::new();
    let mut uids = std::collections::BTreeSet::new();
    for p in &items {
        let name = p["metadata"]["name"].as_str().unwrap_or_default();
        assert!(
            name.starts_with(&format!("{rs_name}-")) && name.len() == rs_name.len() + 6,
            "{name}"
        );
        assert_eq!(p["metadata"]["labels"]["pod-template-hash"], hash.as_str());
        assert_eq!(
            p["metadata"]["ownerReferences"][0]["name"],
            rs_name.as_str()
        );
        assert_eq!(p["status"]["phase"], "Running");
        assert!(p["status"]["podIP"].as_str().is_some());
        nodes.insert(
            p["spec"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        uids.insert(p["metadata"]["uid"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(
        nodes.len(),
        2,
        "three replicas spread over both nodes: {nodes:?}"
    );
    let wide = sim.kubectl(&["get", "pods", "-o", "wide"]).await?;
    assert!(
        wide.contains("node-1") && wide.contains("node-2") && wide.contains("Running"),
        "{wide}"
    );

    // A template change (what `kubectl rollout restart` does) replaces every pod.
    sim.kubectl(&["rollout", "restart", "deploy/web"]).await?;
    let out = sim
        .kubectl(&["rollout", "status", "deploy/web", "--timeout=120s"])
        .await?;
    assert!(out.contains("successfully rolled out"), "{out}");
    let after = sim
        .until("the old pods to go", || async {
            let v = sim.json(&["get", "pods", "-l", "app=web"]).await?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            Ok((items.len() == 3).then_some(items))
        })
        .await?;
    for p in &after {
        assert!(
            !uids.contains(p["metadata"]["uid"].as_str().unwrap_or_default()),
            "a pod survived the restart"
        );
    }
    let rs = sim.json(&["get", "rs", "-l", "app=web"]).await?;
    let revisions: Vec<(String, i64)> = rs["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["metadata"]["annotations"]["deployment.kubernetes.io/revision"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                r["spec"]["replicas"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert!(
        revisions.contains(&("1".into(), 0)) && revisions.contains(&("2".into(), 3)),
        "{revisions:?}"
    );

    // Deleting the Deployment removes its ReplicaSets and pods (garbage collection).
    sim.kubectl(&["delete", "deploy/web"]).await?;
    sim.until("the pods to be collected", || async {
        Ok(pod_names(&sim, "default", "app=web")
            .await?
            .is_empty()
            .then_some(()))
    })
    .await?;
    sim.stop().await;
    Ok(())
}
