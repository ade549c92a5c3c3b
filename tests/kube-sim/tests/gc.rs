//! The garbage collector as kube-controller-manager's: an object created with owners that do
//! not exist is deleted, one whose owner exists stays, and deleting the owner deletes it.

// Helpers in an integration test are test code too: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube_sim::{KubeSim, Options};
use serde_json::json;
use std::time::Duration;

/// Polls until `name` is gone; a deadline so a broken collector fails instead of hanging.
async fn gone(api: &Api<ConfigMap>, name: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while api.get_opt(name).await.unwrap().is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} was never collected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn owned(name: &str, owner: &str, uid: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": owner, "uid": uid}
        ]},
    }))
    .unwrap()
}

#[tokio::test]
async fn owners_decide_what_the_collector_deletes() {
    let sim = KubeSim::start(Options::default()).await.unwrap();
    let api: Api<ConfigMap> = Api::namespaced(sim.client().await.unwrap(), "default");
    let pp = PostParams::default();
    let owner = api
        .create(
            &pp,
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let uid = owner.uid().unwrap();
    api.create(&pp, &owned("child", "owner", &uid))
        .await
        .unwrap();
    api.create(
        &pp,
        &owned("orphan", "ghost", "00000000-0000-0000-0000-000000000000"),
    )
    .await
    .unwrap();
    gone(&api, "orphan").await;
    assert!(api.get_opt("child").await.unwrap().is_some());

    api.delete("owner", &DeleteParams::default()).await.unwrap();
    gone(&api, "child").await;
    sim.shutdown();
}
