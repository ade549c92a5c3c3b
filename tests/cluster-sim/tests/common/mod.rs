//! The test harness: a simulated cluster in this process on a free port, kubectl pointed
//! at it, and polling helpers. Dropping the harness stops the cluster (processes, mounts,
//! addresses) and removes its state directory.

#![allow(dead_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, Result, bail};
use cluster_sim::{Cluster, Images, Options};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct Sim {
    pub cluster: Option<Cluster>,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

pub fn kubectl_bin() -> PathBuf {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/kubectl");
    if tools.exists() {
        tools
    } else {
        PathBuf::from("kubectl")
    }
}

impl Sim {
    pub async fn start(nodes: usize) -> Result<Self> {
        Self::start_with(nodes, Images::default()).await
    }

    pub async fn start_with(nodes: usize, images: Images) -> Result<Self> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
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
            kubeconfig,
        })
    }

    pub fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("running")
    }

    /// Runs kubectl; fails with its stderr when it exits non-zero.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_stdin(args, None).await
    }

    pub async fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::new(kubectl_bin());
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(if stdin.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("failed to run kubectl")?;
        if let Some(input) = stdin {
            let mut si = child.stdin.take().context("no stdin")?;
            si.write_all(input.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!(
                "kubectl {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub async fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml)).await
    }

    pub async fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&a).await?)?)
    }

    /// Polls `check` until it returns `Some`; the bound only guards against a hang.
    pub async fn until<T, F, Fut>(&self, what: &str, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        for _ in 0..600 {
            if let Some(v) = check().await? {
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bail!("gave up waiting for {what}")
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
