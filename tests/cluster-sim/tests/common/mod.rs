//! The test harness: a simulated cluster in this process on a free port, kubectl pointed
//! at it (stash-test-support's), and polling helpers. Dropping the harness stops the
//! cluster (processes, mounts, addresses) and removes its state directory.

#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, Result};
use cluster_sim::{Cluster, Image, Images, Options};
use stash_test_support::Kubectl;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Sim {
    pub cluster: Option<Cluster>,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    kube: Kubectl,
}

/// `sim.kubectl(..)`, `sim.apply(..)`, `sim.json(..)`: kubectl against this cluster.
impl std::ops::Deref for Sim {
    type Target = Kubectl;

    fn deref(&self) -> &Kubectl {
        &self.kube
    }
}

impl Sim {
    pub async fn start(nodes: usize) -> Result<Self> {
        Self::start_with(nodes, Images::default()).await
    }

    pub async fn start_with(nodes: usize, images: Images) -> Result<Self> {
        stash_test_support::log_to_test_output();
        let dir = tempfile::tempdir()?;
        let cluster = Cluster::start(Options {
            state_dir: dir.path().to_owned(),
            nodes,
            port: 0,
            images,
            init_exe: PathBuf::from(env!("CARGO_BIN_EXE_cluster-sim")),
        })
        .await?;
        let kubeconfig = cluster.kubeconfig_path().to_owned();
        Ok(Self {
            cluster: Some(cluster),
            dir,
            kube: Kubectl::new(&kubeconfig),
            kubeconfig,
        })
    }

    pub fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("running")
    }

    /// Polls `check` until it returns `Some`; the bound only guards against a hang.
    pub async fn until<T, F, Fut>(&self, what: &str, check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        stash_test_support::until(what, Duration::from_secs(120), check).await
    }

    /// `kubectl wait --for=condition=Ready pod/<name>` in the default namespace.
    pub async fn wait_ready(&self, pod: &str) -> Result<()> {
        let target = format!("pod/{pod}");
        self.kubectl(&["wait", "--for=condition=Ready", &target, "--timeout=120s"])
            .await?;
        Ok(())
    }

    pub async fn stop(mut self) {
        if let Some(c) = self.cluster.take() {
            c.stop().await;
        }
    }
}

/// Pod names of `kubectl get pods -l <selector>`.
pub async fn pod_names(sim: &Sim, ns: &str, selector: &str) -> Result<Vec<String>> {
    let v = sim.json(&["get", "pods", "-n", ns, "-l", selector]).await?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect())
}

/// The images of the tests that run pods: `sim-test-server` (this crate's test binary).
pub fn images() -> Images {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_sim-test-server"));
    let mut images = Images::default();
    images.known.insert(
        "sim-test-server".into(),
        Image::binary(bin, "sim-test-server", &[]),
    );
    images
}

/// A GET to the test image's plain-HTTP port: status and body.
pub async fn http_get(ip: &str, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect((ip, 8080))
        .await
        .with_context(|| format!("connect {ip}:8080"))?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}
