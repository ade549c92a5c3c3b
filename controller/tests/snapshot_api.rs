//! The Snapshot API through kube-sim's aggregation layer: the operator's server registered by
//! an APIService, reached as clients reach it (kube-rs through kube-sim, which presents the
//! front-proxy certificate), over local restic repositories written by the real restic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
    WatchEvent, WatchParams,
};
use serde_json::{Value, json};
use stash_api::repository::Repository;

const GROUP: &str = "repositories.stash.appscode.com";

fn snapshots() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1alpha1", "Snapshot"),
        "snapshots",
    )
}

fn apiservices() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("apiregistration.k8s.io", "v1", "APIService"),
        "apiservices",
    )
}

fn restic(repo: &Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new(stash_test_support::tool("restic").unwrap())
        .args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", "pw")
        .env("RESTIC_CACHE_DIR", repo.with_extension("cache"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restic {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn backup(repo: &Path, data: &Path, host: &str) -> String {
    std::fs::create_dir_all(data).unwrap();
    std::fs::write(data.join(format!("f-{host}-{}", std::process::id())), host).unwrap();
    let out = restic(
        repo,
        &["backup", "--json", "--host", host, data.to_str().unwrap()],
    );
    let summary = out
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .find(|m| m["message_type"] == "summary")
        .unwrap();
    summary["snapshot_id"].as_str().unwrap().to_owned()
}

fn restic_ids(repo: &Path) -> Vec<String> {
    let out: Vec<Value> =
        serde_json::from_slice(&restic(repo, &["snapshots", "--json", "--no-lock"])).unwrap();
    out.iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn create<K>(api: &Api<K>, v: Value)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    api.create(&PostParams::default(), &serde_json::from_value(v).unwrap())
        .await
        .unwrap();
}

/// A Repository `name` in `ns` at `root/<ns>/<name>`, initialised, and its Secret.
async fn repository(
    client: &kube::Client,
    root: &Path,
    ns: &str,
    name: &str,
    labels: Value,
) -> PathBuf {
    let path = root.join(ns).join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    restic(&path, &["init"]);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    if secrets.get_opt("repo-secret").await.unwrap().is_none() {
        create(
            &secrets,
            json!({"metadata": {"name": "repo-secret"}, "stringData": {"RESTIC_PASSWORD": "pw"}}),
        )
        .await;
    }
    create(
        &Api::<Repository>::namespaced(client.clone(), ns),
        json!({
            "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": name, "labels": labels},
            "spec": {"backend": {"local": {"hostPath": {"path": root.join(ns).display().to_string()}, "mountPath": "/repo", "subPath": name}, "storageSecretName": "repo-secret"}},
        }),
    )
    .await;
    path
}

async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..300 {
        if let Some(v) = f().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("timed out waiting for {what}");
}

fn names(list: &kube::core::ObjectList<DynamicObject>) -> Vec<String> {
    list.items
        .iter()
        .map(|o| o.metadata.name.clone().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_served_from_the_index_through_the_aggregation_layer() {
    let sim = kube_sim::KubeSim::start(kube_sim::Options::default())
        .await
        .unwrap();
    let client = sim.client().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("repos");

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in stash_api::crds() {
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    let nss: Api<Namespace> = Api::all(client.clone());
    for ns in ["stash", "demo", "other"] {
        create(&nss, json!({"metadata": {"name": ns}})).await;
    }
    eventually("the Repository CRD", || async {
        Api::<Repository>::all(client.clone())
            .list(&ListParams::default())
            .await
            .ok()
    })
    .await;
    let r1 = repository(&client, &root, "demo", "r1", json!({"team": "a"})).await;
    let r2 = repository(&client, &root, "demo", "r2", json!({})).await;
    let r3 = repository(&client, &root, "other", "r3", json!({})).await;
    let data = dir.path().join("data");
    let id_a = backup(&r1, &data, "host-0");
    let id_b = backup(&r1, &data, "host-1");
    let id_c = backup(&r2, &data, "host-1");
    let _id_d = backup(&r3, &data, "host-0");

    // The APIService as the chart renders it, without a caBundle: the operator writes it.
    create(
        &Api::<DynamicObject>::all_with(client.clone(), &apiservices()),
        json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
               "metadata": {"name": "v1alpha1.repositories.stash.appscode.com"},
               "spec": {"group": GROUP, "version": "v1alpha1", "groupPriorityMinimum": 10000, "versionPriority": 15,
                        "service": {"namespace": "stash", "name": "stash", "port": 443}}}),
    )
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    sim.map_service("stash", "stash", 443, &addr.to_string());
    let state = dir.path().join("state");
    let cli = stash_controller::Cli::try_parse_from([
        "stash-operator",
        "run",
        "--namespace",
        "stash",
        "--pod-name",
        "op-0",
        "--state-dir",
        state.to_str().unwrap(),
        "--restic",
        stash_test_support::tool("restic")
            .unwrap()
            .to_str()
            .unwrap(),
        "--local-repository-roots",
        root.to_str().unwrap(),
        "--snapshot-index-interval-seconds",
        "1",
    ])
    .unwrap();
    let stash_controller::Command::Run(args) = cli.command else {
        unreachable!()
    };
    let server = tokio::spawn(stash_controller::snapshots::serve_on(
        listener,
        client.clone(),
        *args,
        Default::default(),
        // The only replica: it leads.
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    ));

    let api = Api::<DynamicObject>::namespaced_with(client.clone(), "demo", &snapshots());
    let all = Api::<DynamicObject>::all_with(client.clone(), &snapshots());
    let short = |id: &str| id[..8].to_owned();
    let want_demo = {
        let mut v = vec![
            format!("r1-{}", short(&id_a)),
            format!("r1-{}", short(&id_b)),
            format!("r2-{}", short(&id_c)),
        ];
        v.sort();
        v
    };
    // Once the APIService is Available and the index has listed the repositories.
    let listed = eventually("the demo snapshots through the aggregator", || async {
        let l = api.list(&ListParams::default()).await.ok()?;
        (names(&l) == want_demo).then_some(l)
    })
    .await;
    let rv: u64 = listed
        .metadata
        .resource_version
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    assert!(rv > 0);
    // The index lists repositories concurrently: the other namespace's may come later.
    let everywhere = eventually("every namespace's snapshots", || async {
        let l = all.list(&ListParams::default()).await.ok()?;
        (l.items.len() >= 4).then_some(l)
    })
    .await;
    assert_eq!(everywhere.items.len(), 4, "{:?}", names(&everywhere));
    assert_eq!(
        names(
            &api.list(&ListParams::default().labels("repository=r1"))
                .await
                .unwrap()
        ),
        [
            format!("r1-{}", short(&id_a)),
            format!("r1-{}", short(&id_b))
        ]
        .iter()
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
    );
    let host1 = names(
        &all.list(&ListParams::default().labels("hostname=host-1"))
            .await
            .unwrap(),
    );
    let mut want_host1 = vec![
        format!("r1-{}", short(&id_b)),
        format!("r2-{}", short(&id_c)),
    ];
    want_host1.sort();
    assert_eq!(host1, want_host1);
    assert_eq!(
        names(
            &api.list(&ListParams::default().labels("team=a"))
                .await
                .unwrap()
        )
        .len(),
        2
    );

    // limit/continue pages through in order.
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(names(&first), want_demo[..2]);
    let token = first.metadata.continue_.clone().unwrap();
    let rest = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(names(&rest), want_demo[2..]);
    assert!(rest.metadata.continue_.as_deref().is_none_or(str::is_empty));

    // get: Stash's fields.
    let name_a = format!("r1-{}", short(&id_a));
    let got = api.get(&name_a).await.unwrap();
    assert_eq!(got.metadata.uid.as_deref(), Some(id_a.as_str()));
    assert_eq!(got.metadata.namespace.as_deref(), Some("demo"));
    assert_eq!(got.data["status"]["hostname"], "host-0");
    assert_eq!(got.data["status"]["repository"], "r1");
    assert_eq!(got.data["status"]["paths"][0], data.display().to_string());
    let labels = got.metadata.labels.clone().unwrap();
    assert_eq!(labels["repository"], "r1");
    assert_eq!(labels["hostname"], "host-0");
    assert_eq!(labels["team"], "a");
    match api.get("r1-00000000").await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 404);
            assert_eq!(
                e.message,
                format!("snapshots.{GROUP} \"r1-00000000\" not found")
            );
        }
        other => panic!("a missing snapshot: {other:?}"),
    }

    // watch from the list: the next backup appears (the index lists on its interval here),
    // a deleted snapshot goes.
    let mut events = api
        .watch(&WatchParams::default().timeout(120), &rv.to_string())
        .await
        .unwrap()
        .boxed();
    let id_e = backup(&r1, &data, "host-0");
    let name_e = format!("r1-{}", short(&id_e));
    let added = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(ev) = events.try_next().await.unwrap() {
            if let WatchEvent::Added(o) = ev {
                return o;
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("the new snapshot was never watched");
    assert_eq!(added.metadata.name.as_deref(), Some(name_e.as_str()));

    // delete: restic forget --prune, under the repository's Lease.
    let deleted = api.delete(&name_a, &DeleteParams::default()).await.unwrap();
    assert!(deleted.is_right(), "a Status comes back");
    assert!(
        !restic_ids(&r1).contains(&id_a),
        "the snapshot is gone from restic too"
    );
    assert!(restic_ids(&r1).contains(&id_b));
    let gone = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(ev) = events.try_next().await.unwrap() {
            if let WatchEvent::Deleted(o) = ev {
                return o;
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("the deletion was never watched");
    assert_eq!(gone.metadata.name.as_deref(), Some(name_a.as_str()));
    assert!(matches!(api.get(&name_a).await, Err(kube::Error::Api(e)) if e.code == 404));
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), "stash");
    eventually("the repository Lease released", || async {
        leases
            .list(&ListParams::default())
            .await
            .ok()
            .filter(|l| l.items.is_empty())
    })
    .await;

    // A user allowed snapshots but not Repositories is refused by the operator's review,
    // with the API server's message.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "demo");
    create(&sas, json!({"metadata": {"name": "viewer"}})).await;
    let token = sas
        .create_token_request("viewer", &PostParams::default(), &Default::default())
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(client.clone(), "demo");
    create(&roles, json!({"metadata": {"name": "snapshots"}, "rules": [{"apiGroups": [GROUP], "resources": ["snapshots"], "verbs": ["get", "list", "watch"]}]})).await;
    let rbs: Api<k8s_openapi::api::rbac::v1::RoleBinding> = Api::namespaced(client.clone(), "demo");
    create(&rbs, json!({"metadata": {"name": "snapshots"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "snapshots"},
        "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": "demo"}]})).await;
    let viewer = kube_sim::KubeSim::client_for(&sim.kubeconfig_with_token(&token))
        .await
        .unwrap();
    let as_viewer = Api::<DynamicObject>::namespaced_with(viewer.clone(), "demo", &snapshots());
    match as_viewer.list(&ListParams::default()).await {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403);
            assert_eq!(e.reason, "Forbidden");
            assert_eq!(
                e.message,
                r#"repositories.stash.appscode.com is forbidden: User "system:serviceaccount:demo:viewer" cannot get resource "repositories" in API group "stash.appscode.com" in the namespace "demo""#
            );
        }
        other => panic!("a user who cannot read Repositories listed snapshots: {other:?}"),
    }
    // Granted Repositories too, it lists them.
    create(&roles, json!({"metadata": {"name": "repos"}, "rules": [{"apiGroups": ["stash.appscode.com"], "resources": ["repositories"], "verbs": ["get"]}]})).await;
    create(&rbs, json!({"metadata": {"name": "repos"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "repos"},
        "subjects": [{"kind": "ServiceAccount", "name": "viewer", "namespace": "demo"}]})).await;
    eventually(
        "the viewer's list once allowed (the review cache expires)",
        || async { as_viewer.list(&ListParams::default()).await.ok() },
    )
    .await;
    // Deleting needs delete on snapshots: refused by the API server itself, before the proxy.
    match as_viewer
        .delete(&format!("r1-{}", short(&id_b)), &DeleteParams::default())
        .await
    {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("the viewer deleted a snapshot: {other:?}"),
    }

    // Straight to the operator without the front-proxy certificate: refused, whatever the
    // headers claim.
    let ca = Api::<Secret>::namespaced(client.clone(), "stash")
        .get("stash-apiserver-cert")
        .await
        .unwrap()
        .data
        .unwrap()["ca.crt"]
        .0
        .clone();
    let tls = kube_sim::tls::client_config(std::str::from_utf8(&ca).unwrap(), false).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(kube_sim::tls::server_name("stash.stash.svc").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("/apis/{GROUP}/v1alpha1/namespaces/demo/snapshots"))
        .header("host", "stash.stash.svc")
        .header("x-remote-user", "system:admin")
        .header("x-remote-group", "system:masters")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let status: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status["reason"], "Unauthorized");

    // An unreachable repository keeps its last listing, and its Repository says why.
    std::fs::remove_file(r2.join("config")).unwrap();
    let repos: Api<Repository> = Api::namespaced(client.clone(), "demo");
    let cond = eventually("the stale condition", || async {
        let r = repos.get("r2").await.ok()?;
        r.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "SnapshotsListed" && !c.is_true())
    })
    .await;
    assert_eq!(cond.reason.as_deref(), Some("SnapshotListingStale"));
    assert!(
        cond.message.as_deref().unwrap().contains("stale"),
        "{cond:?}"
    );
    assert!(
        names(
            &api.list(&ListParams::default().labels("repository=r2"))
                .await
                .unwrap()
        ) == [format!("r2-{}", short(&id_c))],
        "the last listing is still served"
    );
    let r1_cond = repos
        .get("r1")
        .await
        .unwrap()
        .status
        .unwrap()
        .conditions
        .unwrap();
    assert!(
        r1_cond
            .iter()
            .any(|c| c.type_ == "SnapshotsListed" && c.is_true()),
        "{r1_cond:?}"
    );

    server.abort();
}
