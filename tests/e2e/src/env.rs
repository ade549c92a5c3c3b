//! The cluster under test: by default a simulated cluster of two nodes started in this
//! process, a Garage S3 server on its gateway address and the chart installed with `helm
//! install`; with `STASH_E2E_KUBECONFIG` set, that cluster as it is (nothing started).
//! Dropping a simulated environment stops every process and removes every mount and address.

use anyhow::{Context, Result, bail};
use cluster_sim::{Cluster, Image, Images, Options};
use stash_test_support::{Garage, Kubectl, binaries, tool, until, workspace};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::leftovers::Footprint;

/// Label of the chart's operator pods and Deployment.
pub const OPERATOR_SELECTOR: &str = "app.kubernetes.io/component=operator";
/// Label of the chart's node-agent pods and DaemonSet.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/component=node-agent";
/// The pushgateway container's port in the operator pod (Stash's layout).
pub const PUSHGATEWAY_PORT: u16 = 56789;
/// The host directory the simulated cluster's chart mounts for local repositories
/// (`localRepositories.hostPaths`), on every node.
pub const LOCAL_REPOSITORY_ROOT: &str = "/var/lib/stash-e2e/repositories";

/// Rollouts on a loaded two-core machine; only a guard against a hang.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(300);

/// An S3 bucket the pods and this host can both reach.
#[derive(Debug, Clone)]
pub struct S3 {
    /// How pods reach it: `Repository.spec.backend.s3.endpoint`.
    pub endpoint: String,
    /// How this host's stock restic reaches it.
    pub host_endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// A simulated cluster and what the harness started beside it.
struct Sim {
    cluster: Option<Cluster>,
    garage: Option<Garage>,
    gateway: IpAddr,
    // Last: the state directory outlives the cluster's mounts in it.
    dir: tempfile::TempDir,
}

pub struct Env {
    pub kube: Kubectl,
    pub s3: S3,
    /// Where the chart is installed.
    pub stash_namespace: String,
    /// Unique per run: namespaces and bucket prefixes never collide with an earlier run's.
    pub run_id: String,
    pushgateway_url: Option<String>,
    sim: Option<Sim>,
    /// How long bringing the environment up took, for the report.
    pub startup: Duration,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Env")
            .field("kubeconfig", &self.kube.kubeconfig)
            .field("s3", &self.s3.endpoint)
            .field("simulated", &self.sim.is_some())
            .finish()
    }
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn required(name: &str) -> Result<String> {
    var(name).with_context(|| format!("STASH_E2E_KUBECONFIG is set, so {name} must be too"))
}

fn run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    format!("{:x}{:x}", secs % 0x10_0000, std::process::id() % 0x1000)
}

impl Env {
    /// The simulated cluster with Garage beside it, or the cluster `STASH_E2E_KUBECONFIG`
    /// names; [`Env::install`] then puts (or finds) the chart on it.
    pub async fn start() -> Result<Env> {
        let began = Instant::now();
        let mut env = match var("STASH_E2E_KUBECONFIG") {
            Some(kubeconfig) => Self::external(PathBuf::from(kubeconfig))?,
            None => Self::simulated().await?,
        };
        env.startup = began.elapsed();
        Ok(env)
    }

    /// `helm install stash charts/stash -n stash --create-namespace` on the simulated
    /// cluster (a real one must have the chart already), then waits until the node agents
    /// are Ready on every node and the operator Deployment is Available.
    pub async fn install(&mut self) -> Result<()> {
        let began = Instant::now();
        if self.sim.is_some() {
            let ns = self.stash_namespace.clone();
            let mut args = vec![
                "install",
                "stash",
                "charts/stash",
                "-n",
                &ns,
                "--create-namespace",
            ];
            // The host directory the local-repository scenario keeps its repositories in.
            let local = format!("localRepositories.hostPaths={{{LOCAL_REPOSITORY_ROOT}}}");
            args.extend(["--set", &local]);
            // Values to try the suite with (`--set agent.readMode=direct`); none by default.
            let extra = var("STASH_E2E_HELM_ARGS").unwrap_or_default();
            args.extend(extra.split_whitespace());
            let out = self.helm(&args).await?;
            if !out.contains("STATUS: deployed") {
                bail!("helm install did not deploy: {out}");
            }
        }
        self.wait_installed().await?;
        self.startup += began.elapsed();
        Ok(())
    }

    fn external(kubeconfig: PathBuf) -> Result<Env> {
        let endpoint = required("STASH_E2E_S3_ENDPOINT")?;
        Ok(Env {
            kube: Kubectl::new(&kubeconfig),
            s3: S3 {
                host_endpoint: var("STASH_E2E_S3_HOST_ENDPOINT")
                    .unwrap_or_else(|| endpoint.clone()),
                endpoint,
                bucket: required("STASH_E2E_S3_BUCKET")?,
                region: var("STASH_E2E_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
                access_key_id: required("STASH_E2E_S3_ACCESS_KEY_ID")?,
                secret_access_key: required("STASH_E2E_S3_SECRET_ACCESS_KEY")?,
            },
            stash_namespace: var("STASH_E2E_NAMESPACE").unwrap_or_else(|| "stash".into()),
            run_id: run_id(),
            pushgateway_url: var("STASH_E2E_PUSHGATEWAY_URL"),
            sim: None,
            startup: Duration::ZERO,
        })
    }

    async fn simulated() -> Result<Env> {
        if !rustix::process::geteuid().is_root() {
            bail!(
                "the simulated cluster needs root (mounts, network namespaces, addresses); \
                 or set STASH_E2E_KUBECONFIG to use a real cluster"
            );
        }
        stash_test_support::log_to_test_output();
        let built = tokio::task::spawn_blocking(|| {
            binaries::build(&["stash-operator", "stash-node-agent", "cluster-sim"])
        })
        .await??;
        let images = images(&built)?;
        let dir = tempfile::Builder::new()
            .prefix("stash-e2e-")
            .tempdir()
            .context("failed to create the cluster's state directory")?;
        let cluster = Cluster::start(Options {
            state_dir: dir.path().join("cluster"),
            nodes: 2,
            port: 0,
            images,
            init_exe: built["cluster-sim"].clone(),
        })
        .await
        .context("failed to start the simulated cluster")?;
        let gateway = cluster.api_server().addr().ip();
        let kube = Kubectl::new(cluster.kubeconfig_path());
        let mut sim = Sim {
            cluster: Some(cluster),
            garage: None,
            gateway,
            dir,
        };
        // Pods reach the host at the gateway address, so Garage listens there.
        let garage = tokio::task::spawn_blocking(move || Garage::start(gateway)).await??;
        let s3 = S3 {
            endpoint: garage.endpoint.clone(),
            host_endpoint: garage.endpoint.clone(),
            bucket: garage.bucket.clone(),
            region: garage.region.clone(),
            access_key_id: garage.key_id.clone(),
            secret_access_key: garage.secret.clone(),
        };
        sim.garage = Some(garage);
        Ok(Env {
            kube,
            s3,
            stash_namespace: "stash".into(),
            run_id: run_id(),
            pushgateway_url: None,
            sim: Some(sim),
            startup: Duration::ZERO,
        })
    }

    /// Runs the `helm` of `make setup` against this cluster, from the workspace root.
    pub async fn helm(&self, args: &[&str]) -> Result<String> {
        let mut cmd = tokio::process::Command::new(tool("helm")?);
        cmd.args(args)
            .current_dir(workspace())
            .env("KUBECONFIG", &self.kube.kubeconfig);
        let what = format!("helm {}", args.join(" "));
        let out = stash_test_support::run(cmd, None, &what).await?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn wait_installed(&self) -> Result<()> {
        self.wait_agents().await?;
        self.wait_operator().await
    }

    /// `kubectl rollout status` of the node-agent DaemonSet: an agent Ready on every node.
    pub async fn wait_agents(&self) -> Result<()> {
        let ns = self.stash_namespace.as_str();
        let timeout = format!("--timeout={}s", INSTALL_TIMEOUT.as_secs());
        let ds = self.name_of("daemonset", AGENT_SELECTOR).await?;
        self.kube
            .kubectl(&[
                "rollout",
                "status",
                &format!("daemonset/{ds}"),
                "-n",
                ns,
                &timeout,
            ])
            .await
            .context("the node agents did not become Ready")?;
        Ok(())
    }

    /// The operator Deployment `Available`.
    pub async fn wait_operator(&self) -> Result<()> {
        let ns = self.stash_namespace.as_str();
        let deploy = self.name_of("deployment", OPERATOR_SELECTOR).await?;
        let waited = self
            .kube
            .wait_for(
                &format!("deployment/{deploy}"),
                ns,
                "condition=Available",
                INSTALL_TIMEOUT,
            )
            .await;
        if let Err(e) = waited {
            let pods = self
                .kube
                .kubectl(&["get", "pods", "-n", ns, "-o", "wide"])
                .await
                .unwrap_or_default();
            bail!("the operator Deployment did not become Available: {e}\n{pods}");
        }
        Ok(())
    }

    /// The name of the chart's one object of `kind` with the component label.
    async fn name_of(&self, kind: &str, selector: &str) -> Result<String> {
        let ns = self.stash_namespace.as_str();
        until(
            &format!("the chart's {kind} ({selector})"),
            INSTALL_TIMEOUT,
            || async move {
                let v = self
                    .kube
                    .json(&["get", kind, "-n", ns, "-l", selector])
                    .await?;
                Ok(v["items"][0]["metadata"]["name"]
                    .as_str()
                    .map(str::to_owned))
            },
        )
        .await
    }

    /// Whether this is the simulated cluster (which the harness may look inside).
    pub fn is_simulated(&self) -> bool {
        self.sim.is_some()
    }

    /// The simulated cluster's nodes (name, kubelet root), for the host-path checks of a
    /// scenario that wants them; empty on a real cluster.
    pub fn sim_nodes(&self) -> Vec<cluster_sim::NodeInfo> {
        self.sim
            .as_ref()
            .and_then(|s| s.cluster.as_ref())
            .map(Cluster::nodes)
            .unwrap_or_default()
    }

    /// How many nodes the cluster has.
    pub async fn node_count(&self) -> Result<usize> {
        let v = self.kube.json(&["get", "nodes"]).await?;
        Ok(v["items"].as_array().map_or(0, Vec::len))
    }

    /// The last `lines` lines of every container log of the pods in `ns`: read from the
    /// nodes' `/var/log/pods` on the simulated cluster, `kubectl logs` elsewhere.
    pub async fn logs(&self, ns: &str, lines: usize) -> String {
        let mut out = String::new();
        if self.sim.is_none() {
            let tail = format!("--tail={lines}");
            let pods = self.kube.json(&["get", "pods", "-n", ns]).await;
            for p in pods
                .iter()
                .flat_map(|v| v["items"].as_array().cloned().unwrap_or_default())
            {
                let name = p["metadata"]["name"].as_str().unwrap_or_default();
                let logs = self
                    .kube
                    .kubectl(&[
                        "logs",
                        "-n",
                        ns,
                        name,
                        "--all-containers",
                        "--prefix",
                        &tail,
                    ])
                    .await
                    .unwrap_or_else(|e| e.to_string());
                out.push_str(&logs);
            }
            return out;
        }
        for node in self.sim_nodes() {
            let pods = node.root.join("var/log/pods");
            let Ok(entries) = std::fs::read_dir(&pods) else {
                continue;
            };
            for pod in entries.flatten() {
                let name = pod.file_name().to_string_lossy().into_owned();
                if !name.starts_with(&format!("{ns}_")) {
                    continue;
                }
                for ctr in std::fs::read_dir(pod.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    // The newest restart's log: `<restarts>.log`.
                    let newest = std::fs::read_dir(ctr.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.path())
                        .max_by_key(|p| {
                            p.file_stem()
                                .and_then(|s| s.to_str()?.parse::<u64>().ok())
                                .unwrap_or(0)
                        });
                    let Some(log) = newest else { continue };
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    let all: Vec<&str> = text.lines().collect();
                    out.push_str(&format!(
                        "--- {} {name}/{}:\n",
                        node.name,
                        ctr.file_name().to_string_lossy()
                    ));
                    for l in &all[all.len().saturating_sub(lines)..] {
                        out.push_str(l);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    /// The chart's Running operator pods (not being deleted).
    pub async fn operator_pods(&self) -> Result<Vec<serde_json::Value>> {
        let v = self
            .kube
            .json(&[
                "get",
                "pods",
                "-n",
                &self.stash_namespace,
                "-l",
                OPERATOR_SELECTOR,
            ])
            .await?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| {
                p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
            })
            .cloned()
            .collect())
    }

    /// What the pushgateway serves on `/metrics`: at `STASH_E2E_PUSHGATEWAY_URL`; on the
    /// simulated cluster at the operator pod's IP (the host routes to pods); elsewhere
    /// through the API server's pod proxy.
    pub async fn pushgateway_metrics(&self) -> Result<String> {
        if let Some(url) = &self.pushgateway_url {
            return crate::http::get(&format!("{}/metrics", url.trim_end_matches('/'))).await;
        }
        let pods = self.operator_pods().await?;
        let pod = pods.first().context("no Running operator pod")?;
        if self.sim.is_some() {
            let ip = pod["status"]["podIP"]
                .as_str()
                .context("the operator pod has no IP")?;
            return crate::http::get(&format!("http://{ip}:{PUSHGATEWAY_PORT}/metrics")).await;
        }
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        self.kube
            .kubectl(&[
                "get",
                "--raw",
                &format!(
                    "/api/v1/namespaces/{}/pods/{name}:{PUSHGATEWAY_PORT}/proxy/metrics",
                    self.stash_namespace
                ),
            ])
            .await
    }

    /// Stops everything the harness started and checks that nothing is left: no process,
    /// no mount under the state directory, no address or link of the cluster. Returns how
    /// long the teardown took.
    pub async fn stop(mut self) -> Result<Duration> {
        let began = Instant::now();
        let Some(mut sim) = self.sim.take() else {
            return Ok(Duration::ZERO);
        };
        let footprint = Footprint::take(sim.dir.path(), sim.gateway, sim.garage.as_ref());
        if let Some(cluster) = sim.cluster.take() {
            cluster.stop().await;
        }
        drop(sim.garage.take());
        let state = sim.dir.path().to_owned();
        drop(sim);
        footprint.check_gone().await?;
        if state.exists() {
            bail!("the state directory {} is still there", state.display());
        }
        Ok(began.elapsed())
    }
}

/// The chart's images mapped to this checkout's binaries (each carrying restic, as the
/// Dockerfile's images do), the real pushgateway for the operator pod's second container,
/// and busybox for workloads, run on this host's tools.
fn images(built: &std::collections::BTreeMap<String, PathBuf>) -> Result<Images> {
    let restic = tool("restic")?
        .canonicalize()
        .context("failed to resolve restic")?;
    let mut images = Images {
        host_commands: vec!["busybox".into()],
        ..Default::default()
    };
    for bin in ["stash-operator", "stash-node-agent"] {
        let mut image = Image::binary(built[bin].clone(), bin, &["run"]);
        image
            .files
            .push(("/usr/local/bin/restic".into(), restic.clone()));
        images.known.insert(bin.into(), image);
    }
    // quay.io/prometheus/pushgateway: the chart gives only args, so where the image keeps
    // its entrypoint does not show (the real one is /bin/pushgateway; the simulated root's
    // /bin is the host's, read-only, so it lives in /usr/local/bin here).
    let pushgateway = tool("pushgateway")?
        .canonicalize()
        .context("failed to resolve the pushgateway")?;
    images.known.insert(
        "pushgateway".into(),
        Image::binary(pushgateway, "pushgateway", &[]),
    );
    Ok(images)
}
