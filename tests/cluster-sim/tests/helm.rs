//! `helm install stash charts/stash -n stash --create-namespace` into the simulated cluster,
//! with the chart's images mapped to the binaries of this checkout: the node agent runs as a
//! real process on every node and its readiness probe makes it Ready.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use anyhow::{Context, Result, bail};
use cluster_sim::{Image, Images};
use common::Sim;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the workspace")
}

/// Builds (or finds up to date) a binary of this checkout, in the test's own target dir.
fn build(package: &str, bin: &str) -> Result<PathBuf> {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--locked", "--quiet", "-p", package, "--bin", bin])
        .current_dir(workspace())
        .status()
        .context("failed to run cargo build")?;
    if !status.success() {
        bail!("cargo build -p {package} failed");
    }
    // The test binary lives in <target>/debug/deps.
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("the target dir")?;
    Ok(dir.join(bin))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_gives_a_ready_node_agent_on_every_node() -> Result<()> {
    let helm = workspace().join(".tools/bin/helm");
    assert!(helm.exists(), "make setup installs .tools/bin/helm");
    let restic = workspace()
        .join(".tools/bin/restic")
        .canonicalize()
        .context("make setup installs restic")?;
    let mut images = Images::default();
    for (package, bin) in [
        ("stash-node-agent", "stash-node-agent"),
        ("stash-controller", "stash-operator"),
    ] {
        let mut image = Image::binary(build(package, bin)?, bin, &["run"]);
        image
            .files
            .push(("/usr/local/bin/restic".into(), restic.clone()));
        images.known.insert(bin.into(), image);
    }
    let sim = Sim::start_with(2, images).await?;
    let out = tokio::process::Command::new(&helm)
        .args([
            "install",
            "stash",
            "charts/stash",
            "-n",
            "stash",
            "--create-namespace",
        ])
        .current_dir(workspace())
        .env("KUBECONFIG", &sim.kubeconfig)
        .output()
        .await?;
    assert!(
        out.status.success(),
        "helm install failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("STATUS: deployed"));
    let rolled = sim
        .kubectl(&[
            "rollout",
            "status",
            "ds/stash-node-agent",
            "-n",
            "stash",
            "--timeout=180s",
        ])
        .await?;
    assert!(rolled.contains("successfully rolled out"), "{rolled}");
    let pods = sim
        .json(&[
            "get",
            "pods",
            "-n",
            "stash",
            "-l",
            "app.kubernetes.io/component=node-agent",
        ])
        .await?;
    let items = pods["items"].as_array().cloned().unwrap_or_default();
    let mut nodes: Vec<&str> = items
        .iter()
        .map(|p| p["spec"]["nodeName"].as_str().unwrap_or_default())
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["node-1", "node-2"]);
    for p in &items {
        assert_eq!(p["status"]["phase"], "Running");
        let cs = &p["status"]["containerStatuses"][0];
        assert_eq!(cs["ready"], true, "{cs}");
        assert_eq!(cs["restartCount"], 0, "{cs}");
        // A real process: the kubelet wrote its log under the node's /var/log/pods.
        let node = p["spec"]["nodeName"].as_str().unwrap();
        let root = sim
            .cluster()
            .nodes()
            .into_iter()
            .find(|n| n.name == node)
            .unwrap()
            .root;
        let uid = p["metadata"]["uid"].as_str().unwrap();
        let name = p["metadata"]["name"].as_str().unwrap();
        let log_dir = root.join(format!("var/log/pods/stash_{name}_{uid}"));
        assert!(log_dir.is_dir(), "{}", log_dir.display());
    }
    // The operator's pod is not checked: the operator's backup loop does not exist yet, so its
    // process may exit and the pod crash-loop until that issue lands.
    let list = tokio::process::Command::new(&helm)
        .args(["list", "-n", "stash"])
        .env("KUBECONFIG", &sim.kubeconfig)
        .output()
        .await?;
    assert!(String::from_utf8_lossy(&list.stdout).contains("deployed"));
    sim.stop().await;
    Ok(())
}
