//! kube-rs against kube-sim, unchanged: reflectors and a Controller over Pods and a custom
//! resource converge on 5,000 objects, and keep converging after every watch is expired with
//! 410 Gone and while watches restart on a short timeout.

// Helpers in an integration test are test code too: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube_sim::{KubeSim, Options};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

fn n() -> usize {
    std::env::var("KUBE_SIM_TEST_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    // A deadline so a broken server fails the test instead of hanging it; not a timing check.
    let deadline = tokio::time::Instant::now()
        + Duration::from_secs(
            std::env::var("KUBE_SIM_TEST_DEADLINE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(300),
        );
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never converged: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn widget_crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wg"]},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"value": {"type": "integer"}}},
                    "status": {"type": "object", "properties": {"observed": {"type": "integer"}}}
                }}}
            }]
        }
    }))
    .unwrap()
}

#[derive(Debug, thiserror::Error)]
#[error("reconcile failed: {0}")]
struct ReconcileError(#[from] kube::Error);

async fn reconcile(
    obj: Arc<DynamicObject>,
    api: Arc<Api<DynamicObject>>,
) -> Result<Action, ReconcileError> {
    let want = obj.data["spec"]["value"].clone();
    if obj.data["status"]["observed"] != want {
        let name = obj.metadata.name.clone().unwrap_or_default();
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observed": want}})),
        )
        .await?;
    }
    Ok(Action::await_change())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_reflectors_converge_through_expiry() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let sim = KubeSim::start(Options {
        bookmark_interval: Duration::from_secs(1),
        ..Options::default()
    })
    .await
    .unwrap();
    let client = sim.client().await.unwrap();

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &widget_crd())
        .await
        .unwrap();
    eventually("CRD established", || async {
        crds.get("widgets.example.com")
            .await
            .ok()
            .and_then(|c| c.status)
            .and_then(|s| s.conditions)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            })
    })
    .await;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    futures::stream::iter(0..n())
        .map(|i| {
            let pods = pods.clone();
            let widgets = widgets.clone();
            let ar = ar.clone();
            async move {
                let pod: Pod = serde_json::from_value(json!({
                    "metadata": {"name": format!("pod-{i}"), "labels": {"app": "load"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}], "nodeName": format!("node-{}", i % 4)}
                }))
                .unwrap();
                pods.create(&PostParams::default(), &pod).await?;
                let mut w = DynamicObject::new(&format!("w-{i}"), &ar);
                w.data = json!({"spec": {"value": i}});
                widgets.create(&PostParams::default(), &w).await?;
                Ok::<_, kube::Error>(())
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();

    // Short watch timeouts: every watch restarts (resuming from its last resourceVersion)
    // several times during the test.
    let cfg = watcher::Config::default().timeout(3);
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let pod_reflector = tokio::spawn(
        watcher(pods.clone(), cfg.clone().labels("app=load"))
            .default_backoff()
            .reflect(pod_writer)
            .applied_objects()
            .for_each(|_| async {}),
    );
    let api = Arc::new(widgets.clone());
    let controller = tokio::spawn(
        Controller::new_with(widgets.clone(), cfg.clone(), ar.clone())
            .run(
                reconcile,
                |_, _, _| Action::requeue(Duration::from_millis(200)),
                api,
            )
            .for_each(|_| async {}),
    );

    let all_observed = || async {
        let list = widgets.list(&Default::default()).await.unwrap();
        list.items.len() == n()
            && list
                .items
                .iter()
                .all(|w| w.data["status"]["observed"] == w.data["spec"]["value"])
    };
    eventually("pod reflector sees all pods", || async {
        pod_store.state().len() == n()
    })
    .await;
    eventually("controller reconciled every widget", all_observed).await;

    // Every watch ends with 410 Gone and the history is forgotten; the clients must re-list.
    sim.expire_watches();
    // Recovery first: objects made after the expiry show up once the clients re-listed.
    let canary: Pod = serde_json::from_value(json!({
        "metadata": {"name": "after-expiry", "labels": {"app": "load"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &canary).await.unwrap();
    let mut w = DynamicObject::new("w-after-expiry", &ar);
    w.data = json!({"spec": {"value": 7}});
    widgets.create(&PostParams::default(), &w).await.unwrap();
    eventually("pod reflector re-listed after expiry", || async {
        pod_store.state().len() == n() + 1
    })
    .await;
    eventually("controller recovered after expiry", || async {
        widgets.get("w-after-expiry").await.unwrap().data["status"]["observed"] == 7
    })
    .await;
    widgets
        .delete("w-after-expiry", &Default::default())
        .await
        .unwrap();
    pods.delete("after-expiry", &Default::default())
        .await
        .unwrap();
    for i in 0..50 {
        widgets
            .patch(
                &format!("w-{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"value": i + 100_000}})),
            )
            .await
            .unwrap();
        pods.delete(&format!("pod-{i}"), &Default::default())
            .await
            .unwrap();
    }
    eventually("pod reflector saw the deletions after expiry", || async {
        pod_store.state().len() == n() - 50
    })
    .await;
    eventually(
        "controller reconciled the changes after expiry",
        all_observed,
    )
    .await;

    // And once more, after the watches have been restarted by their timeouts.
    tokio::time::sleep(Duration::from_secs(4)).await;
    widgets
        .patch(
            &format!("w-{}", n() - 1),
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"value": -1}})),
        )
        .await
        .unwrap();
    eventually("controller reconciled after a watch restart", all_observed).await;

    pod_reflector.abort();
    controller.abort();
}
