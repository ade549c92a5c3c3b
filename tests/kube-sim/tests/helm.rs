//! Helm's engine (helm-python-sdk, installed by `make setup`) installs, upgrades and
//! uninstalls a chart against kube-sim; the objects appear and go away.

// Helpers in an integration test are test code too: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams};
use kube_sim::{KubeSim, Options};
use std::path::PathBuf;

fn python_helm() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/python-helm");
    p.exists().then_some(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_installs_and_uninstalls_a_chart() {
    // A missing Helm engine is a broken setup, not a pass.
    let python = python_helm().expect(".tools/bin/python-helm is missing: run `make setup`");
    let sim = KubeSim::start(Options::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kc = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kc).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/helm-install.py");

    // Install and upgrade first, checking the objects while the release exists.
    let client = sim.client().await.unwrap();
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&kc)
        .arg(dir.path())
        .env("HOME", dir.path())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "helm failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("installed: demo"), "{stdout}");
    assert!(stdout.contains("status: deployed"), "{stdout}");
    assert!(stdout.contains("upgraded"), "{stdout}");
    assert!(stdout.contains("uninstalled"), "{stdout}");

    // After uninstall the chart's objects are gone and so is the release record.
    let deploys: Api<Deployment> = Api::namespaced(client.clone(), "helm-demo");
    assert!(deploys.get_opt("demo-app").await.unwrap().is_none());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "helm-demo");
    assert!(cms.get_opt("demo-config").await.unwrap().is_none());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "helm-demo");
    let releases = secrets
        .list(&ListParams::default().labels("owner=helm"))
        .await
        .unwrap();
    assert!(
        releases.items.is_empty(),
        "release secrets left: {:?}",
        releases.items.len()
    );
}
