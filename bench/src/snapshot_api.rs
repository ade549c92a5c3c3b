//! Scenario `snapshot-api-list`: `kubectl get snapshots -A` over 10 repositories of 200
//! snapshots each, served by the operator's Snapshot API through kube-sim's aggregation
//! layer, against `restic snapshots --json` per repository, serially, as Stash ran them.
//! Goals: at least 100× faster, and the list under 100 ms at the API server.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Map, Value, json};

use crate::{Outcome, alternate, median};
// The repositories are copies of the snapshots-list dataset, with its password.
use crate::snapshots::PASSWORD;

pub const SCENARIO: &str = "snapshot-api-list";
const REPOS: usize = 10;
const PER_REPO: usize = 200;
const GOAL: f64 = 100.0;
const SERVER_GOAL_MS: f64 = 100.0;

/// Ten repositories of 200 snapshots: copies of the 1,000-snapshot dataset, each left with
/// 200 snapshot files (a listing reads only those).
fn dataset(restic_bin: &Path, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let source = crate::snapshots::dataset(restic_bin, dir)?;
    let mut out = Vec::new();
    for i in 0..REPOS {
        let repo = dir.join("snapshot-api").join(format!("repo-{i}"));
        let snaps = repo.join("snapshots");
        let ready = std::fs::read_dir(&snaps).map(|d| d.count()).unwrap_or(0) == PER_REPO;
        if !ready {
            let _ = std::fs::remove_dir_all(&repo);
            std::fs::create_dir_all(&repo)?;
            let status = std::process::Command::new("cp")
                .arg("-a")
                .arg(format!("{}/.", source.display()))
                .arg(&repo)
                .status()?;
            ensure!(status.success(), "cannot copy the dataset");
            let mut names: Vec<PathBuf> = std::fs::read_dir(&snaps)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            names.sort();
            for extra in names.iter().skip(PER_REPO) {
                std::fs::remove_file(extra)?;
            }
        }
        out.push(repo);
    }
    Ok(out)
}

async fn create(
    client: &kube::Client,
    ar: &ApiResource,
    ns: Option<&str>,
    v: Value,
) -> anyhow::Result<()> {
    let api = match ns {
        Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, ar),
        None => Api::<DynamicObject>::all_with(client.clone(), ar),
    };
    api.create(&PostParams::default(), &serde_json::from_value(v)?)
        .await?;
    Ok(())
}

fn ar(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

pub async fn run(restic_bin: &Path, data_dir: &Path, rounds: usize) -> anyhow::Result<Outcome> {
    let repos = dataset(restic_bin, data_dir)?;
    let root = data_dir.join("snapshot-api");
    let sim = kube_sim::KubeSim::start(kube_sim::Options::default()).await?;
    let client = sim.client().await?;
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for crd in stash_api::crds() {
        crds.create(&PostParams::default(), &crd).await?;
    }
    let ns_ar = ApiResource::erase::<k8s_openapi::api::core::v1::Namespace>(&());
    for ns in ["stash", "bench"] {
        create(
            &client,
            &ns_ar,
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        )
        .await?;
    }
    let secret_ar = ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&());
    create(&client, &secret_ar, Some("bench"), json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pw"}, "stringData": {"RESTIC_PASSWORD": PASSWORD}})).await?;
    let repo_ar = ar(
        "stash.appscode.com",
        "v1alpha1",
        "Repository",
        "repositories",
    );
    for _ in 0..100 {
        if Api::<DynamicObject>::all_with(client.clone(), &repo_ar)
            .list(&Default::default())
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for i in 0..REPOS {
        create(&client, &repo_ar, Some("bench"), json!({
            "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": format!("repo-{i}")},
            "spec": {"backend": {"local": {"hostPath": {"path": root.display().to_string()}, "mountPath": "/r", "subPath": format!("repo-{i}")}, "storageSecretName": "pw"}},
        })).await?;
    }
    create(&client, &ar("apiregistration.k8s.io", "v1", "APIService", "apiservices"), None, json!({
        "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": "v1alpha1.repositories.stash.appscode.com"},
        "spec": {"group": "repositories.stash.appscode.com", "version": "v1alpha1", "groupPriorityMinimum": 10000, "versionPriority": 15,
                 "service": {"namespace": "stash", "name": "stash", "port": 443}},
    })).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    sim.map_service("stash", "stash", 443, &listener.local_addr()?.to_string());
    let state = tempfile::tempdir()?;
    let cli = <stash_controller::Cli as clap::Parser>::try_parse_from([
        "stash-operator",
        "run",
        "--namespace",
        "stash",
        "--state-dir",
        &state.path().display().to_string(),
        "--local-repository-roots",
        &root.display().to_string(),
    ])?;
    let stash_controller::Command::Run(args) = cli.command else {
        anyhow::bail!("not a run command");
    };
    let server = tokio::spawn(stash_controller::snapshots::serve_on(
        listener,
        client.clone(),
        *args,
        Default::default(),
        // The only replica: it leads.
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
    ));

    let kc_dir = tempfile::tempdir()?;
    let kubeconfig = kc_dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig)?;
    let kubectl = restic_bin.with_file_name("kubectl");
    let want = REPOS * PER_REPO;
    let get_all = || {
        let (kubectl, kubeconfig, cache) = (
            kubectl.clone(),
            kubeconfig.clone(),
            kc_dir.path().join("cache"),
        );
        async move {
            let out = tokio::process::Command::new(&kubectl)
                .args(["get", "snapshots", "-A", "--no-headers"])
                .env("KUBECONFIG", &kubeconfig)
                .env("KUBECACHEDIR", &cache)
                .output()
                .await
                .context("failed to run kubectl")?;
            ensure!(
                out.status.success(),
                "kubectl: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let rows = out
                .stdout
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
                .count();
            Ok(rows)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if matches!(get_all().await, Ok(n) if n == want) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the Snapshot API never listed {want} snapshots"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ours = || async {
        ensure!(get_all().await? == want);
        Ok(())
    };
    let baseline = || {
        let (bin, repos) = (restic_bin.to_path_buf(), repos.clone());
        async move {
            for repo in &repos {
                ensure!(crate::snapshots::stock_listing(&bin, repo).await? == PER_REPO);
            }
            Ok(())
        }
    };
    let (a, b) = alternate(rounds, ours, baseline).await?;
    // The server's own time for the list, from its Server-Timing header.
    let mut server_ms = Vec::new();
    for _ in 0..rounds {
        let req = http::Request::get("/apis/repositories.stash.appscode.com/v1alpha1/snapshots")
            .header("accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
            .body(Vec::new())?;
        let resp = client.send(req.map(kube::client::Body::from)).await?;
        let timing = resp
            .headers()
            .get("server-timing")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split("dur=").nth(1))
            .and_then(|d| d.parse::<f64>().ok())
            .context("no Server-Timing from the Snapshot API")?;
        server_ms.push(Duration::from_secs_f64(timing / 1000.0));
    }
    server.abort();
    // kubectl's own cost, with no request at all: the floor under `ours`, so the ratio can
    // be no better than the baseline over it.
    let mut start = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let out = tokio::process::Command::new(&kubectl)
            .args(["version", "--client"])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .await
            .context("failed to run kubectl")?;
        ensure!(out.status.success(), "kubectl version --client failed");
        start.push(t.elapsed());
    }
    let kubectl_start_ms = median(&start).as_secs_f64() * 1000.0;
    let (ours_ms, base_ms) = (
        median(&a).as_secs_f64() * 1000.0,
        median(&b).as_secs_f64() * 1000.0,
    );
    let server_median = median(&server_ms).as_secs_f64() * 1000.0;
    let ratio = base_ms / ours_ms.max(f64::EPSILON);
    let mut notes = Map::new();
    notes.insert("server_list_ms".into(), json!(server_median));
    notes.insert("server_goal_ms".into(), json!(SERVER_GOAL_MS));
    notes.insert("snapshots".into(), json!(want));
    notes.insert("kubectl_start_ms".into(), json!(kubectl_start_ms));
    notes.insert(
        "ratio_bound_by_kubectl_start".into(),
        json!(base_ms / kubectl_start_ms.max(f64::EPSILON)),
    );
    notes.insert(
        "kubectl".into(),
        json!(
            std::fs::canonicalize(&kubectl)
                .unwrap_or(kubectl.clone())
                .display()
                .to_string()
        ),
    );
    notes.insert(
        "ours".into(),
        json!("kubectl get snapshots -A (aggregated, from the index)"),
    );
    notes.insert(
        "baseline".into(),
        json!("restic snapshots --json per repository, serially (Stash)"),
    );
    Ok(Outcome {
        ours: ours_ms,
        baseline: base_ms,
        ratio,
        unit: "ms",
        goal: format!(">= {GOAL}"),
        met: ratio >= GOAL && server_median < SERVER_GOAL_MS,
        notes,
    })
}
