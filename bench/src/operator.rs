//! Scenario `operator`: the real `stash-operator run` against an in-process kube-sim holding
//! 1,000 BackupConfigurations on 200 nodes; 500 BackupSessions created at once, each timed
//! until its BackupAssignment exists; the operator's memory at rest and CPU per 1,000 sessions.
//!
//! kube-sim stands in for the API server only: the bench writes what the kubelets of a real
//! cluster would (Nodes, Running and Ready pods through the status subresource, the node
//! agents' pods included) and nothing Stash-specific. No agent works on the assignments, so
//! what is measured is the operator's planning. The repositories are local (hostPath) and
//! initialised with restic beforehand, which keeps restic and a storage backend out of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use stash_api::assignment::BackupAssignment;
use stash_api::common::InvokerPhase;
use stash_api::repository::Repository;
use stash_api::{BackupConfiguration, BackupSession};

use crate::Outcome;

pub const SCENARIO: &str = "operator";

const PASSWORD: &str = "bench password";
const OPERATOR_NAMESPACE: &str = "stash";
const AGENT_SELECTOR: (&str, &str) = ("app.kubernetes.io/component", "node-agent");
/// Requests the bench keeps in flight while it seeds the cluster.
const SEED_CONCURRENCY: usize = 32;
const P99_GOAL_MS: f64 = 1000.0;
const RSS_GOAL_MIB: f64 = 100.0;

/// How big the simulated cluster is.
#[derive(Clone, Copy, Debug)]
pub struct Size {
    pub nodes: usize,
    pub configs: usize,
    /// Namespaces the configurations are spread over, each with one Repository they share.
    pub namespaces: usize,
    pub sessions: usize,
}

impl Size {
    pub const FULL: Size = Size {
        nodes: 200,
        configs: 1000,
        namespaces: 10,
        sessions: 500,
    };

    /// `BENCH_OPERATOR_SIZE=nodes,configs,namespaces,sessions` shrinks the scenario for a
    /// quick look; the figures are those of [`Size::FULL`].
    pub fn from_env() -> anyhow::Result<Size> {
        let Ok(spec) = std::env::var("BENCH_OPERATOR_SIZE") else {
            return Ok(Size::FULL);
        };
        let n: Vec<usize> = spec
            .split(',')
            .map(|x| x.trim().parse())
            .collect::<Result<_, _>>()
            .with_context(|| format!("BENCH_OPERATOR_SIZE={spec:?}: not four numbers"))?;
        let [nodes, configs, namespaces, sessions] = n[..] else {
            anyhow::bail!("BENCH_OPERATOR_SIZE={spec:?}: want nodes,configs,namespaces,sessions");
        };
        ensure!(
            nodes > 0 && namespaces > 0 && configs >= namespaces && sessions <= configs,
            "BENCH_OPERATOR_SIZE={spec:?}: needs nodes > 0, configs >= namespaces, sessions <= configs"
        );
        Ok(Size {
            nodes,
            configs,
            namespaces,
            sessions,
        })
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

fn namespace_name(i: usize) -> String {
    format!("bench-{i:02}")
}

/// Configuration `i`: its namespace, name, and the node its target's pod runs on.
fn config_place(size: &Size, i: usize) -> (String, String, String) {
    (
        namespace_name(i % size.namespaces),
        format!("app-{i:04}"),
        node_name(i % size.nodes),
    )
}

fn typed<K: DeserializeOwned>(v: Value) -> anyhow::Result<K> {
    serde_json::from_value(v).context("failed to build an object of the scenario")
}

/// kube-sim on a runtime of its own, so the API server and the bench's clocks (its watch
/// of the assignments above all) do not wait in one scheduler queue behind each other.
struct Sim {
    sim: Option<kube_sim::KubeSim>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Sim {
    async fn start() -> anyhow::Result<Sim> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-sim")
            .enable_all()
            .build()?;
        let sim = rt
            .spawn(kube_sim::KubeSim::start(kube_sim::Options::default()))
            .await??;
        Ok(Sim {
            sim: Some(sim),
            rt: Some(rt),
        })
    }

    fn get(&self) -> anyhow::Result<&kube_sim::KubeSim> {
        self.sim.as_ref().context("kube-sim has stopped")
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if let Some(sim) = self.sim.take() {
            sim.shutdown();
        }
        // Dropping a runtime inside another one's task is refused; this one just stops.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The operator as a child process; killed and reaped when dropped, whatever happened.
struct Operator {
    child: Child,
}

impl Operator {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn ensure_running(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "the operator exited ({status}); its log: {}\n{}",
                log.display(),
                tail(log, 20)
            );
        }
        Ok(())
    }

    /// Resident memory now (`VmRSS`) or at its peak (`VmHWM`), from `/proc/<pid>/status`.
    fn memory_mib(&self, field: &str) -> anyhow::Result<f64> {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        text.lines()
            .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib as f64 / 1024.0)
            .with_context(|| format!("no {field} in /proc/<pid>/status"))
    }

    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds(&self.pid().to_string())
    }
}

/// User plus system CPU time of all a process's threads, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after its `)` are fixed.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/<pid>/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .context("short /proc/<pid>/stat")?
            .parse::<u64>()?)
    };
    let hz = rustix::param::clock_ticks_per_second() as f64;
    Ok((ticks(11)? + ticks(12)?) as f64 / hz)
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Creates every object, `SEED_CONCURRENCY` requests at a time.
async fn create_all<K>(client: &Client, objects: Vec<K>) -> anyhow::Result<()>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::Serialize
        + DeserializeOwned,
{
    futures::stream::iter(objects)
        .map(|o| async move {
            let ns = o.namespace().unwrap_or_default();
            Api::<K>::namespaced(client.clone(), &ns)
                .create(&PostParams::default(), &o)
                .await
                .with_context(|| format!("failed to create {} {ns}/{}", K::kind(&()), o.name_any()))
                .map(|_| ())
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .try_collect()
        .await
}

/// Pod status as a kubelet writes it once the containers run: Running and Ready.
async fn mark_running(client: &Client, pods: &[(String, String)]) -> anyhow::Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    futures::stream::iter(pods)
        .map(|(ns, name)| {
            let now = now.clone();
            async move {
                let conditions: Vec<Value> =
                    ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
                        .iter()
                        .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": now}))
                        .collect();
                let status = json!({"status": {
                    "phase": "Running",
                    "conditions": conditions,
                    "startTime": now,
                    "podIP": "10.244.0.10",
                    "hostIP": "10.0.0.10",
                }});
                Api::<Pod>::namespaced(client.clone(), ns)
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .with_context(|| format!("failed to write the status of pod {ns}/{name}"))
                    .map(|_| ())
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .try_collect()
        .await
}

fn pod(
    ns: &str,
    name: &str,
    labels: Value,
    node: &str,
    image: &str,
    mounts: Value,
    volumes: Value,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": image, "volumeMounts": mounts}],
            "volumes": volumes,
        },
    })
}

/// Initialises one restic repository per namespace (before the operator starts, which then
/// finds them initialised and only opens them).
async fn init_repositories(restic: &Path, dir: &Path, size: &Size) -> anyhow::Result<()> {
    for i in 0..size.namespaces {
        let path = dir.join(namespace_name(i));
        let out = tokio::process::Command::new(restic)
            .arg("init")
            .env("RESTIC_REPOSITORY", &path)
            .env("RESTIC_PASSWORD", PASSWORD)
            .env("RESTIC_CACHE_DIR", dir.join("cache"))
            .output()
            .await
            .context("failed to run restic init")?;
        ensure!(
            out.status.success(),
            "restic init {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What a cluster with the workloads already running looks like: CRDs, namespaces, Nodes,
/// one Ready node agent per node, and per configuration a Deployment with its Running pod.
async fn seed(client: &Client, size: &Size, repos: &Path) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in stash_api::crds() {
        crds.create(&PostParams::default(), &crd)
            .await
            .context("failed to install a CRD")?;
    }
    for crd in stash_api::crds() {
        let name = crd.name_any();
        let established = kube::runtime::wait::await_condition(
            crds.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        tokio::time::timeout(Duration::from_secs(60), established)
            .await
            .with_context(|| format!("CRD {name} was not established in time"))??;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in std::iter::once(OPERATOR_NAMESPACE.to_owned())
        .chain((0..size.namespaces).map(namespace_name))
    {
        namespaces
            .create(
                &PostParams::default(),
                &typed(json!({"metadata": {"name": ns}}))?,
            )
            .await
            .with_context(|| format!("failed to create namespace {ns}"))?;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    futures::stream::iter(0..size.nodes)
        .map(|i| {
            let (nodes, now) = (nodes.clone(), now.clone());
            async move {
                let name = node_name(i);
                let node: Node = typed(json!({
                    "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
                }))?;
                nodes.create(&PostParams::default(), &node).await?;
                let status = json!({"status": {"conditions": [
                    {"type": "Ready", "status": "True", "reason": "KubeletReady",
                     "lastHeartbeatTime": now, "lastTransitionTime": now},
                ]}});
                nodes
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await
                    .with_context(|| format!("failed to write the status of node {name}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(SEED_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    // The node agents, as their DaemonSet's pods would be.
    let mut agents = Vec::new();
    for i in 0..size.nodes {
        let name = format!("stash-node-agent-{}", node_name(i));
        agents.push(typed::<Pod>(pod(
            OPERATOR_NAMESPACE,
            &name,
            json!({AGENT_SELECTOR.0: AGENT_SELECTOR.1, "app.kubernetes.io/name": "stash"}),
            &node_name(i),
            "ghcr.io/stash-rs/stash-node-agent:latest",
            json!([]),
            json!([]),
        ))?);
    }
    let agent_names: Vec<_> = agents
        .iter()
        .map(|p| (OPERATOR_NAMESPACE.to_owned(), p.name_any()))
        .collect();
    create_all(client, agents).await?;
    mark_running(client, &agent_names).await?;
    // One Repository per namespace, local on a host path the operator reads directly.
    let mut secrets = Vec::new();
    let mut repositories = Vec::new();
    for i in 0..size.namespaces {
        let ns = namespace_name(i);
        secrets.push(Secret {
            metadata: kube::api::ObjectMeta {
                name: Some("repo-secret".into()),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            data: Some(
                [(
                    "RESTIC_PASSWORD".to_owned(),
                    ByteString(PASSWORD.as_bytes().to_vec()),
                )]
                .into(),
            ),
            ..Secret::default()
        });
        repositories.push(typed::<Repository>(json!({
            "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
            "metadata": {"name": "repo", "namespace": ns},
            "spec": {"backend": {
                "local": {"hostPath": {"path": repos.join(&ns)}, "mountPath": "/safe/data"},
                "storageSecretName": "repo-secret",
            }},
        }))?);
    }
    create_all(client, secrets).await?;
    create_all(client, repositories).await?;
    // The workloads: a Deployment each, and the pod its ReplicaSet would have made.
    let mounts = json!([{"name": "data", "mountPath": "/data"}]);
    let volumes = json!([{"name": "data", "emptyDir": {}}]);
    let mut deployments = Vec::new();
    let mut pods = Vec::new();
    for i in 0..size.configs {
        let (ns, name, node) = config_place(size, i);
        let labels = json!({"app": name});
        deployments.push(typed::<Deployment>(json!({
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [{"name": "main", "image": "busybox:1.36", "volumeMounts": mounts}],
                        "volumes": volumes,
                    },
                },
            },
        }))?);
        pods.push(typed::<Pod>(pod(
            &ns,
            &format!("{name}-6d4cf56db6-x{i:04}"),
            labels,
            &node,
            "busybox:1.36",
            mounts.clone(),
            volumes.clone(),
        ))?);
    }
    let pod_names: Vec<_> = pods
        .iter()
        .map(|p| (p.namespace().unwrap_or_default(), p.name_any()))
        .collect();
    create_all(client, deployments).await?;
    create_all(client, pods).await?;
    mark_running(client, &pod_names).await?;
    Ok(())
}

fn configurations(size: &Size) -> anyhow::Result<Vec<BackupConfiguration>> {
    (0..size.configs)
        .map(|i| {
            let (ns, name, _) = config_place(size, i);
            typed(json!({
                "apiVersion": "stash.appscode.com/v1beta1", "kind": "BackupConfiguration",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "repository": {"name": "repo"},
                    // Daily, so no CronJob would fire during a run even on a real cluster.
                    "schedule": "30 3 * * *",
                    "target": {
                        "ref": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        "paths": ["/data"],
                    },
                    "retentionPolicy": {"name": "keep-last-5", "keepLast": 5, "prune": false},
                },
            }))
        })
        .collect()
}

/// Waits until `want` configurations are Ready; returns them.
async fn wait_ready(
    client: &Client,
    want: usize,
    op: &mut Operator,
    log: &Path,
) -> anyhow::Result<Vec<BackupConfiguration>> {
    let api: Api<BackupConfiguration> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        op.ensure_running(log)?;
        let all = api.list(&ListParams::default()).await?.items;
        let ready: Vec<_> = all
            .into_iter()
            .filter(|c| c.status.as_ref().and_then(|s| s.phase) == Some(InvokerPhase::Ready))
            .collect();
        if ready.len() >= want {
            return Ok(ready);
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {want} BackupConfigurations became Ready in 15 minutes; the operator's log: {}",
            ready.len(),
            log.display()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until the operator has used less than 2% of a core for two seconds in a row.
async fn wait_idle(op: &Operator) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let window = Duration::from_secs(2);
    let mut before = op.cpu_seconds()?;
    loop {
        tokio::time::sleep(window).await;
        let after = op.cpu_seconds()?;
        if after - before < 0.02 * window.as_secs_f64() {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the operator did not go idle within 5 minutes ({:.2} CPU s in the last {window:?})",
            after - before
        );
        before = after;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    // Nearest rank: the smallest sample with at least p of the samples at or below it.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied().unwrap_or_default()
}

/// What the burst measured.
struct Burst {
    /// From sending each session's create until its assignment was seen, per session.
    from_send: Vec<Duration>,
    /// From each create's response until its assignment was seen (negative counts as zero).
    from_response: Vec<Duration>,
    /// Until the last session's assignment was seen.
    wall: Duration,
    /// Until the last create returned.
    creates: Duration,
}

/// Creates one session for each of `configs` at once and waits for every assignment.
async fn burst(
    client: &Client,
    size: &Size,
    configs: &[BackupConfiguration],
    op: &mut Operator,
    log: &Path,
) -> anyhow::Result<Burst> {
    let by_name: HashMap<String, &BackupConfiguration> = configs
        .iter()
        .map(|c| {
            (
                format!("{}/{}", c.namespace().unwrap_or_default(), c.name_any()),
                c,
            )
        })
        .collect();
    let unix = k8s_openapi::jiff::Timestamp::now().as_second();
    // A session as the trigger CronJob creates it, for configurations 0.., which spread over
    // every namespace (so every repository) and node.
    let mut sessions = Vec::new();
    let mut expected: HashMap<String, usize> = HashMap::new();
    for i in 0..size.sessions {
        let (ns, name, node) = config_place(size, i);
        let bc = by_name
            .get(&format!("{ns}/{name}"))
            .with_context(|| format!("BackupConfiguration {ns}/{name} is not Ready"))?;
        let session = stash_controller::backup_session::post::new_session(bc, &ns, unix, 0);
        let assignment =
            stash_controller::backup_session::plan::assignment_name(&session.name_any(), &node);
        expected.insert(format!("{ns}/{assignment}"), i);
        sessions.push(session);
    }
    // Watch the assignments first, so none is missed.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let assignments: Api<BackupAssignment> = Api::all(client.clone());
    let watch = tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        let mut stream = std::pin::pin!(watcher(assignments, watcher::Config::default()));
        while let Some(event) = stream.next().await {
            let at = Instant::now();
            match event {
                Ok(watcher::Event::InitDone) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(watcher::Event::Apply(a) | watcher::Event::InitApply(a)) => {
                    let key = format!("{}/{}", a.namespace().unwrap_or_default(), a.name_any());
                    if seen_tx.send((key, at)).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(error) => eprintln!("operator bench: the assignment watch failed: {error}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), ready_rx)
        .await
        .context("the assignment watch did not start")??;
    let started = Instant::now();
    let creates = futures::future::try_join_all(sessions.into_iter().map(|s| {
        let client = client.clone();
        tokio::spawn(async move {
            let ns = s.namespace().unwrap_or_default();
            let sent = Instant::now();
            Api::<BackupSession>::namespaced(client, &ns)
                .create(&PostParams::default(), &s)
                .await
                .with_context(|| format!("failed to create BackupSession {ns}/{}", s.name_any()))?;
            anyhow::Ok((sent, Instant::now()))
        })
    }))
    .await?
    .into_iter()
    .collect::<anyhow::Result<Vec<_>>>()?;
    let creates_done = started.elapsed();
    let mut seen: Vec<Option<Instant>> = vec![None; creates.len()];
    let mut missing = creates.len();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while missing > 0 {
        op.ensure_running(log)?;
        match tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_secs(5)),
            seen_rx.recv(),
        )
        .await
        {
            Ok(Some((key, at))) => {
                if let Some(&i) = expected.get(&key)
                    && let Some(slot) = seen.get_mut(i)
                    && slot.is_none()
                {
                    *slot = Some(at);
                    missing -= 1;
                }
            }
            Ok(None) => anyhow::bail!("the assignment watch ended"),
            Err(_) => ensure!(
                tokio::time::Instant::now() < deadline,
                "{missing} of {} sessions still had no BackupAssignment after 10 minutes; the operator's log: {}",
                creates.len(),
                log.display()
            ),
        }
    }
    let wall = started.elapsed();
    watch.abort();
    let mut from_send = Vec::new();
    let mut from_response = Vec::new();
    for ((sent, returned), at) in creates.iter().zip(seen.iter().flatten()) {
        from_send.push(at.saturating_duration_since(*sent));
        from_response.push(at.saturating_duration_since(*returned));
    }
    from_send.sort();
    from_response.sort();
    Ok(Burst {
        from_send,
        from_response,
        wall,
        creates: creates_done,
    })
}

/// Requests served between two counts, by verb and resource; what did not change is left out.
fn request_diff(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> std::collections::BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, n)| *n > 0)
        .collect()
}

/// A free TCP port on the loopback interface, for the operator's /metrics.
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

/// Runs the scenario against `operator` (a release `stash-operator`), writing its log to
/// `data/operator-bench.log`.
pub async fn run(
    restic: &Path,
    operator: &Path,
    data: &Path,
) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    ensure!(
        operator.exists(),
        "build the operator first: cargo build --release -p stash-controller"
    );
    let size = Size::from_env()?;
    let total = Instant::now();
    std::fs::create_dir_all(data)?;
    let scratch = tempfile::Builder::new()
        .prefix("stash-bench-operator")
        .tempdir()?;
    let repos = scratch.path().join("repositories");
    init_repositories(restic, &repos, &size).await?;

    let sim = Sim::start().await?;
    let client = sim.get()?.client().await?;
    let kubeconfig = scratch.path().join("kubeconfig");
    sim.get()?.write_kubeconfig(&kubeconfig)?;
    let t = Instant::now();
    seed(&client, &size, &repos).await?;
    let seeded = t.elapsed();

    let log: PathBuf = data.join("operator-bench.log");
    let mut op = Operator {
        child: Command::new(operator)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", scratch.path())
            .env("KUBECONFIG", &kubeconfig)
            .env("STASH_NAMESPACE", OPERATOR_NAMESPACE)
            .env("STASH_POD_NAME", "stash-operator-bench")
            .env("STASH_METRICS_PORT", free_port()?.to_string())
            .env("STASH_PUSHGATEWAY_URL", "")
            .env("STASH_RESTIC", restic)
            .env("STASH_STATE_DIR", scratch.path().join("operator-state"))
            // As the chart's localRepositories.hostPaths would mount them.
            .env("STASH_LOCAL_REPOSITORY_ROOTS", &repos)
            .env("STASH_LOG_LEVEL", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("failed to start the operator")?,
    };
    let t = Instant::now();
    create_all(&client, configurations(&size)?).await?;
    let configs = wait_ready(&client, size.configs, &mut op, &log).await?;
    let ready_after = t.elapsed();
    let idle_after = wait_idle(&op).await?;
    let rss = op.memory_mib("VmRSS")?;

    let cpu_before = op.cpu_seconds()?;
    let own_before = cpu_seconds("self")?;
    let requests_before = sim.get()?.request_counts();
    let b = burst(&client, &size, &configs, &mut op, &log).await?;
    let cpu = op.cpu_seconds()? - cpu_before;
    let own_cpu = cpu_seconds("self")? - own_before;
    let requests = request_diff(&requests_before, &sim.get()?.request_counts());
    let rss_after_burst = op.memory_mib("VmRSS")?;
    let rss_peak = op.memory_mib("VmHWM")?;
    let warnings = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count();
    drop(op);
    drop(sim);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = ms(percentile(&b.from_send, 0.50));
    let p99 = ms(percentile(&b.from_send, 0.99));
    let per_1000 = 1000.0 / size.sessions as f64;
    let cpu_per_1000 = cpu * per_1000;
    let wall_per_1000 = b.wall.as_secs_f64() * per_1000;

    let mut notes = Map::new();
    notes.insert(
        "cluster".into(),
        format!(
            "kube-sim in the bench process; {} nodes with a Ready node-agent pod each, {} \
             BackupConfigurations (Deployment targets, one Running pod each) in {} namespaces, \
             one local Repository per namespace",
            size.nodes, size.configs, size.namespaces
        )
        .into(),
    );
    notes.insert("sessions_at_once".into(), size.sessions.into());
    notes.insert(
        "timed_from".into(),
        "the bench sending each BackupSession create (client clock; creationTimestamp has only \
         second resolution), to the bench's watch seeing its BackupAssignment"
            .into(),
    );
    let mut latency = notes.clone();
    latency.insert("p50_ms".into(), p50.into());
    latency.insert("p99_ms".into(), p99.into());
    latency.insert(
        "max_ms".into(),
        ms(b.from_send.last().copied().unwrap_or_default()).into(),
    );
    latency.insert(
        "p99_ms_from_create_response".into(),
        ms(percentile(&b.from_response, 0.99)).into(),
    );
    latency.insert("all_creates_returned_ms".into(), ms(b.creates).into());
    latency.insert("all_assignments_seen_ms".into(), ms(b.wall).into());
    latency.insert("operator_warnings_in_log".into(), warnings.into());
    // The bench's own requests are its creates and its one watch.
    let served: u64 = requests.values().sum();
    let operator_requests = served.saturating_sub(size.sessions as u64 + 1);
    latency.insert(
        "operator_requests_per_session".into(),
        (operator_requests as f64 / size.sessions as f64).into(),
    );
    latency.insert(
        "requests_during_burst".into(),
        Value::Object(
            requests
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(*v)))
                .collect(),
        ),
    );
    let mut p50_notes = latency.clone();
    p50_notes.insert(
        "ratio_meaning".into(),
        "p50 / the 1 s p99 goal (no baseline process; the goal stands in for it)".into(),
    );
    latency.insert(
        "ratio_meaning".into(),
        "p99 / 1 s goal (no baseline process; the goal stands in for it)".into(),
    );
    let mut rss_notes = notes.clone();
    rss_notes.insert(
        "ratio_meaning".into(),
        "VmRSS at rest / 100 MiB goal (no baseline process; the goal stands in for it)".into(),
    );
    rss_notes.insert(
        "measured".into(),
        format!(
            "after all {} configurations were Ready and the operator had used < 2% of a core \
             for 2 s",
            size.configs
        )
        .into(),
    );
    rss_notes.insert(
        "configs_ready_after_s".into(),
        ready_after.as_secs_f64().into(),
    );
    rss_notes.insert("idle_after_ready_s".into(), idle_after.as_secs_f64().into());
    rss_notes.insert("rss_after_burst_mib".into(), rss_after_burst.into());
    rss_notes.insert("rss_peak_mib".into(), rss_peak.into());
    let mut cpu_notes = notes;
    cpu_notes.insert(
        "ratio_meaning".into(),
        "CPU seconds / wall seconds of the burst: the cores the operator kept busy (no goal \
         and no baseline; informational)"
            .into(),
    );
    cpu_notes.insert("cpu_seconds_measured".into(), cpu.into());
    cpu_notes.insert("api_server_and_bench_cpu_seconds".into(), own_cpu.into());
    cpu_notes.insert(
        "measured".into(),
        "utime + stime from /proc/<pid>/stat, from before the first create until every \
         session's assignment was seen, scaled to 1,000 sessions"
            .into(),
    );
    cpu_notes.insert("seed_s".into(), seeded.as_secs_f64().into());
    cpu_notes.insert("scenario_s".into(), total.elapsed().as_secs_f64().into());

    Ok(vec![
        (
            "operator-session-to-assignments-p50",
            Outcome {
                ours: p50,
                baseline: P99_GOAL_MS,
                ratio: p50 / P99_GOAL_MS,
                unit: "ms (p50)",
                goal: "informational".into(),
                met: true,
                notes: p50_notes,
            },
        ),
        (
            "operator-session-to-assignments-p99",
            Outcome {
                ours: p99,
                baseline: P99_GOAL_MS,
                ratio: p99 / P99_GOAL_MS,
                unit: "ms (p99)",
                goal: "<= 1.0 (p99 under 1 s)".into(),
                met: p99 <= P99_GOAL_MS,
                notes: latency,
            },
        ),
        (
            "operator-memory-at-rest",
            Outcome {
                ours: rss,
                baseline: RSS_GOAL_MIB,
                ratio: rss / RSS_GOAL_MIB,
                unit: "MiB",
                goal: "<= 1.0 (under 100 MiB)".into(),
                met: rss <= RSS_GOAL_MIB,
                notes: rss_notes,
            },
        ),
        (
            "operator-cpu-per-1000-sessions",
            Outcome {
                ours: cpu_per_1000,
                baseline: wall_per_1000,
                ratio: cpu_per_1000 / wall_per_1000.max(f64::EPSILON),
                unit: "CPU s per 1,000 sessions",
                goal: "informational".into(),
                met: true,
                notes: cpu_notes,
            },
        ),
    ])
}
