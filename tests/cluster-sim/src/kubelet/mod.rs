//! One kubelet per simulated node: registers the Node and renews its Lease, lays out each
//! bound pod's volumes under `<node root>/var/lib/kubelet/pods/<uid>/`, runs containers of
//! known images as processes (others are reported Running without one), runs probes,
//! restarts with back-off per restartPolicy, and writes pod status.

pub mod mounts;
pub mod net;
pub mod node;
pub mod probe;
pub mod runtime;
pub mod server;
pub mod volumes;

use crate::error::{Error, Result};
use crate::util::{self, now};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use mounts::Mounts;
use net::{ClusterNet, Sandbox};
use runtime::{Image, Images, InitSpec, MountSpec};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Child;
use volumes::{HostVolume, Layout, SetupError, Tokens};

/// Restart back-off: 10 s doubling to 5 min, reset after 10 min of running.
const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const BACKOFF_RESET: Duration = Duration::from_secs(600);
const VOLUME_RESYNC: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct KubeletConfig {
    pub node_name: String,
    /// 0-based node number (picks its address range).
    pub index: u8,
    pub node_root: PathBuf,
    pub csi_root: PathBuf,
    pub driver: String,
    /// Where pods reach the API server (the `kubernetes` Service's endpoint).
    pub api_host: String,
    pub api_port: u16,
    pub images: Arc<Images>,
    /// This program, for `container-init`.
    pub exe: PathBuf,
}

pub struct Kubelet {
    pub cfg: KubeletConfig,
    client: Client,
    net: Arc<ClusterNet>,
    pub mounts: Arc<Mounts>,
    tokens: Tokens,
    pub node_ip: Ipv4Addr,
    live_logs: server::LiveLogs,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    Waiting {
        reason: String,
        message: String,
    },
    Running {
        started_at: Time,
    },
    Terminated {
        exit_code: i32,
        reason: String,
        started_at: Time,
        finished_at: Time,
    },
}

impl State {
    fn json(&self) -> Value {
        match self {
            Self::Waiting { reason, message } => {
                let mut w = json!({"reason": reason});
                if !message.is_empty() {
                    w["message"] = json!(message);
                }
                json!({"waiting": w})
            }
            Self::Running { started_at } => json!({"running": {"startedAt": started_at}}),
            Self::Terminated {
                exit_code,
                reason,
                started_at,
                finished_at,
            } => json!({"terminated": {
                "exitCode": exit_code, "reason": reason, "startedAt": started_at, "finishedAt": finished_at,
            }}),
        }
    }
}

#[derive(Debug)]
struct Proc {
    child: Child,
    /// The container's process as the host sees it (pid 1 of its PID namespace).
    host_pid: Option<u32>,
    /// Marks this run's log as still written, for `kubectl logs -f`, until the process goes.
    _log: server::LiveLog,
}

#[derive(Debug)]
struct Ctr {
    spec: Container,
    init: bool,
    image: Option<Image>,
    id: String,
    state: State,
    last: Option<State>,
    restarts: i32,
    ready: bool,
    started: bool,
    proc: Option<Proc>,
    next_start: Option<Instant>,
    backoff: Duration,
    running_since: Option<Instant>,
    ready_ok: i32,
    ready_fail: i32,
    live_fail: i32,
    startup_ok: bool,
    last_probe: Option<Instant>,
    /// When a container told to stop (failed liveness) is killed outright.
    kill_at: Option<Instant>,
}

impl Ctr {
    fn new(spec: &Container, init: bool, images: &Images) -> Self {
        Self {
            image: images.resolve(spec.image.as_deref().unwrap_or_default()),
            spec: spec.clone(),
            init,
            id: String::new(),
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last: None,
            restarts: 0,
            ready: false,
            started: false,
            proc: None,
            next_start: None,
            backoff: BACKOFF_START,
            running_since: None,
            ready_ok: 0,
            ready_fail: 0,
            live_fail: 0,
            startup_ok: false,
            last_probe: None,
            kill_at: None,
        }
    }

    fn is_done_ok(&self) -> bool {
        matches!(self.state, State::Terminated { exit_code: 0, .. })
    }
}

#[derive(Debug)]
struct PodRec {
    ip: Ipv4Addr,
    sandbox: Option<Sandbox>,
    start_time: Time,
    volumes: Option<BTreeMap<String, HostVolume>>,
    globals: Vec<PathBuf>,
    volume_synced: Option<Instant>,
    waiting: Option<String>,
    ctrs: Vec<Ctr>,
}

fn random_id() -> String {
    let mut h = sha2::Sha256::new();
    use sha2::Digest;
    h.update(crate::hash::random_suffix(32).as_bytes());
    h.update(jiff::Timestamp::now().as_nanosecond().to_le_bytes());
    hex::encode(h.finalize())
}

impl Kubelet {
    pub async fn new(
        client: Client,
        cfg: KubeletConfig,
        net: Arc<ClusterNet>,
    ) -> Result<Arc<Self>> {
        let node_ip = net.node_ip(cfg.index)?;
        let k = Arc::new(Self {
            cfg,
            client,
            net,
            mounts: Arc::new(Mounts::default()),
            tokens: Tokens::default(),
            live_logs: server::LiveLogs::default(),
            node_ip,
        });
        for d in [
            "pods",
            "plugins",
            "plugins_registry",
            "pod-resources",
            "checkpoints",
        ] {
            let p = k.kubelet_root().join(d);
            std::fs::create_dir_all(&p).map_err(Error::io("create", p))?;
        }
        k.mounts.make_rshared(&k.kubelet_root())?;
        // A node has a cgroup filesystem, which a hostPath volume can name (a node agent
        // that manages cgroups beneath its own does): the host's, as the node's processes
        // are the host's.
        let cgroup = Path::new("/sys/fs/cgroup");
        if cgroup.is_dir() {
            k.mounts
                .bind_recursive(cgroup, &k.cfg.node_root.join("sys/fs/cgroup"))?;
        }
        node::register(&k.client, &k.cfg.node_name, node_ip).await?;
        node::renew_lease(&k.client, &k.cfg.node_name).await?;
        Ok(k)
    }

    pub fn kubelet_root(&self) -> PathBuf {
        self.cfg.node_root.join("var/lib/kubelet")
    }

    fn layout<'a>(&'a self, root: &'a Path) -> Layout<'a> {
        Layout {
            client: &self.client,
            node_name: &self.cfg.node_name,
            node_root: &self.cfg.node_root,
            kubelet_root: root,
            csi_root: &self.cfg.csi_root,
            driver: &self.cfg.driver,
            mounts: &self.mounts,
        }
    }

    /// The kubelet's loops: pod sync every second (and on pod changes), the Lease every
    /// 10 s, the node status every 5 minutes.
    pub async fn run(self: Arc<Self>, nudge: Arc<tokio::sync::Notify>) {
        let mut pods: BTreeMap<String, PodRec> = BTreeMap::new();
        let mut next_lease = Instant::now() + Duration::from_secs(10);
        let mut next_status = Instant::now() + Duration::from_secs(300);
        let mut next_ip: u8 = 2;
        // Held for as long as this loop runs: the API server reads container logs from it.
        let _serving = match server::serve(
            self.node_ip,
            self.cfg.node_root.clone(),
            self.live_logs.clone(),
        )
        .await
        {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::warn!(node = self.cfg.node_name, %error, "the kubelet's endpoint is not served");
                None
            }
        };
        loop {
            if Instant::now() >= next_lease {
                if let Err(error) = node::renew_lease(&self.client, &self.cfg.node_name).await {
                    tracing::debug!(%error, "lease renewal failed");
                }
                if let Err(error) =
                    node::repost_if_not_ready(&self.client, &self.cfg.node_name, self.node_ip).await
                {
                    tracing::debug!(%error, "node status failed");
                }
                next_lease = Instant::now() + Duration::from_secs(10);
            }
            if Instant::now() >= next_status {
                if let Err(error) = node::heartbeat(&self.client, &self.cfg.node_name).await {
                    tracing::debug!(%error, "node status failed");
                }
                next_status = Instant::now() + Duration::from_secs(300);
            }
            if let Err(error) = self.sync_pods(&mut pods, &mut next_ip).await {
                tracing::debug!(node = self.cfg.node_name, %error, "pod sync failed");
            }
            tokio::select! {
                _ = nudge.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn sync_pods(&self, recs: &mut BTreeMap<String, PodRec>, next_ip: &mut u8) -> Result<()> {
        let api: Api<Pod> = Api::all(self.client.clone());
        let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.cfg.node_name));
        let pods = api
            .list(&lp)
            .await
            .map_err(Error::kube(format!(
                "list the pods of {}",
                self.cfg.node_name
            )))?
            .items;
        let live: BTreeMap<String, &Pod> =
            pods.iter().filter_map(|p| Some((p.uid()?, p))).collect();
        // Pods gone from the API, or being deleted: stop and clean up.
        let gone: Vec<String> = recs
            .keys()
            .filter(|u| live.get(*u).is_none_or(|p| util::is_deleting(*p)))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(rec) = recs.remove(&uid) {
                if let Some(p) = live.get(&uid) {
                    self.finish_deleted(p, rec).await;
                } else {
                    self.teardown(&uid, rec, recs);
                }
            }
        }
        for pod in pods.iter().filter(|p| !util::is_deleting(*p)) {
            let uid = pod.uid().unwrap_or_default();
            if util::pod_is_terminal(pod) && !recs.contains_key(&uid) {
                continue;
            }
            if !recs.contains_key(&uid) {
                let ip = self.net.pod_ip(self.cfg.index, *next_ip);
                *next_ip = if *next_ip >= 254 { 2 } else { *next_ip + 1 };
                let spec = pod.spec.clone().unwrap_or_default();
                let ctrs = spec
                    .init_containers
                    .iter()
                    .flatten()
                    .map(|c| Ctr::new(c, true, &self.cfg.images))
                    .chain(
                        spec.containers
                            .iter()
                            .map(|c| Ctr::new(c, false, &self.cfg.images)),
                    )
                    .collect();
                recs.insert(
                    uid.clone(),
                    PodRec {
                        ip,
                        sandbox: None,
                        start_time: now(),
                        volumes: None,
                        globals: Vec::new(),
                        volume_synced: None,
                        waiting: None,
                        ctrs,
                    },
                );
            }
            let Some(rec) = recs.get_mut(&uid) else {
                continue;
            };
            if let Err(e) = self.sync_pod(pod, rec).await {
                crate::controllers::log_failure(
                    "Pod",
                    &pod.namespace().unwrap_or_default(),
                    &pod.name_any(),
                    &e,
                );
            }
        }
        Ok(())
    }

    /// A pod with a deletionTimestamp (finalizers keep it): stop it and report it terminal.
    async fn finish_deleted(&self, pod: &Pod, mut rec: PodRec) {
        for c in rec.ctrs.iter_mut() {
            stop(c, grace(pod)).await;
        }
        let uid = pod.uid().unwrap_or_default();
        let others = BTreeMap::new();
        self.teardown(&uid, rec, &others);
        if !util::pod_is_terminal(pod) {
            let api: Api<Pod> =
                Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            let _ = util::patch_status(
                &api,
                &pod.name_any(),
                json!({"phase": "Failed"}),
                "a deleted pod",
            )
            .await;
        }
    }

    fn teardown(&self, uid: &str, rec: PodRec, others: &BTreeMap<String, PodRec>) {
        let PodRec {
            sandbox,
            ctrs,
            globals,
            ..
        } = rec;
        drop(ctrs);
        drop(sandbox);
        self.tokens.forget(uid);
        let root = self.kubelet_root();
        let still_used = |g: &Path| others.values().any(|r| r.globals.iter().any(|x| x == g));
        self.layout(&root).teardown(uid, &globals, &still_used);
        let rootfs = self
            .cfg
            .node_root
            .join("run/containerd/io.containerd.runtime.v2.task/k8s.io");
        for entry in std::fs::read_dir(&rootfs).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(uid)
                && !volumes::mounted_under(&entry.path())
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    async fn sync_pod(&self, pod: &Pod, rec: &mut PodRec) -> Result<()> {
        let root = self.kubelet_root();
        let resync = rec
            .volume_synced
            .is_none_or(|t| t.elapsed() >= VOLUME_RESYNC);
        if rec.volumes.is_none() || resync {
            let mut globals = Vec::new();
            match self
                .layout(&root)
                .setup(pod, &self.tokens, &mut globals)
                .await
            {
                Ok(v) => {
                    rec.volumes = Some(v);
                    rec.globals = globals;
                    rec.waiting = None;
                    rec.volume_synced = Some(Instant::now());
                }
                Err(SetupError::NotReady(m)) => {
                    rec.globals.extend(globals);
                    if rec.volumes.is_none() {
                        rec.waiting = Some(m.0);
                    }
                }
                Err(SetupError::Failed(e)) => {
                    rec.globals.extend(globals);
                    if rec.volumes.is_none() {
                        rec.waiting = Some(e.to_string());
                    }
                }
            }
        }
        if rec.volumes.is_some() {
            self.write_etc_hosts(pod, rec)?;
            if rec.sandbox.is_none() && rec.ctrs.iter().any(|c| c.image.is_some()) {
                let host_if = format!(
                    "cs{}n{}p{}",
                    self.net.id,
                    self.cfg.index,
                    rec.ip.octets()[3]
                );
                rec.sandbox = Some(Sandbox::create(&self.net, rec.ip, host_if).await?);
            }
            self.step_containers(pod, rec).await;
        }
        self.write_status(pod, rec).await
    }

    fn write_etc_hosts(&self, pod: &Pod, rec: &PodRec) -> Result<()> {
        let dir = volumes::pod_dir(&self.kubelet_root(), &pod.uid().unwrap_or_default());
        let (host, fqdn) = hostname(pod);
        let names = if fqdn != host {
            format!("{fqdn}\t{host}")
        } else {
            host
        };
        let text = format!(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n{}\t{names}\n",
            rec.ip
        );
        let p = dir.join("etc-hosts");
        if std::fs::read_to_string(&p).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&p, text).map_err(Error::io("write", p))?;
        }
        Ok(())
    }

    async fn step_containers(&self, pod: &Pod, rec: &mut PodRec) {
        let policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let n_init = rec.ctrs.iter().filter(|c| c.init).count();
        // Init containers one at a time, in order; the app containers once all succeeded.
        let mut i = 0;
        while i < n_init {
            let ready_to_move = rec.ctrs[i].is_done_ok();
            if !ready_to_move {
                break;
            }
            i += 1;
        }
        let range: Vec<usize> = if i < n_init {
            vec![i]
        } else {
            (n_init..rec.ctrs.len()).collect()
        };
        for idx in range {
            let init = rec.ctrs[idx].init;
            let c_policy = if init && policy == "Always" {
                "OnFailure".to_owned()
            } else {
                policy.clone()
            };
            self.step_one(pod, rec, idx, &c_policy).await;
            let _ = init;
        }
    }

    async fn step_one(&self, pod: &Pod, rec: &mut PodRec, idx: usize, policy: &str) {
        let ip = rec.ip;
        let netns = rec.sandbox.as_ref().map(|s| s.netns_path());
        let c = &mut rec.ctrs[idx];
        if c.kill_at.is_some_and(|t| Instant::now() >= t)
            && let Some(p) = c.proc.as_mut()
        {
            let _ = p.child.start_kill();
            c.kill_at = None;
        }
        // An exited process.
        if let Some(p) = c.proc.as_mut()
            && let Ok(Some(status)) = p.child.try_wait()
        {
            let code = status.code().unwrap_or(137);
            let started_at = match &c.state {
                State::Running { started_at } => started_at.clone(),
                _ => now(),
            };
            c.state = State::Terminated {
                exit_code: code,
                reason: if code == 0 {
                    "Completed".into()
                } else {
                    "Error".into()
                },
                started_at,
                finished_at: now(),
            };
            c.proc = None;
            c.ready = false;
            c.started = false;
            if c.running_since
                .is_some_and(|t| t.elapsed() >= BACKOFF_RESET)
            {
                c.backoff = BACKOFF_START;
            }
            c.running_since = None;
        }
        let restart = match (&c.state, policy) {
            (State::Terminated { .. }, "Always") => true,
            (State::Terminated { exit_code, .. }, "OnFailure") => *exit_code != 0,
            _ => false,
        };
        if restart {
            let delay = c.backoff;
            c.backoff = (c.backoff * 2).min(BACKOFF_MAX);
            c.last = Some(c.state.clone());
            c.restarts += 1;
            c.next_start = Some(Instant::now() + delay);
            c.state = State::Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!(
                    "back-off {}s restarting failed container={} pod={}_{}({})",
                    delay.as_secs(),
                    c.spec.name,
                    pod.name_any(),
                    pod.namespace().unwrap_or_default(),
                    pod.uid().unwrap_or_default()
                ),
            };
        }
        let may_start = matches!(c.state, State::Waiting { .. })
            && c.next_start.is_none_or(|t| Instant::now() >= t);
        if may_start {
            match &c.image {
                None => {
                    // No process: the container is reported as the runtime would report one
                    // that runs (init containers as having succeeded).
                    c.id = random_id();
                    c.state = if c.init {
                        State::Terminated {
                            exit_code: 0,
                            reason: "Completed".into(),
                            started_at: now(),
                            finished_at: now(),
                        }
                    } else {
                        State::Running { started_at: now() }
                    };
                    c.ready = !c.init;
                    c.started = !c.init;
                }
                Some(image) => {
                    let image = image.clone();
                    match self.start(pod, rec, idx, &image, netns.as_deref()).await {
                        Ok(()) => {}
                        Err((reason, message)) => {
                            let c = &mut rec.ctrs[idx];
                            c.state = State::Waiting { reason, message };
                            c.next_start = Some(Instant::now() + c.backoff);
                        }
                    }
                }
            }
            return;
        }
        // Probes of a running process.
        let c = &mut rec.ctrs[idx];
        // A container already told to stop is not probed again: a new failure would push its
        // kill back by another grace period, for ever.
        if c.proc.is_none() || !matches!(c.state, State::Running { .. }) || c.kill_at.is_some() {
            return;
        }
        let since = c.running_since.map_or(Duration::ZERO, |t| t.elapsed());
        let pid = c.proc.as_ref().and_then(|p| p.host_pid);
        let due = |p: &k8s_openapi::api::core::v1::Probe, last: Option<Instant>| {
            since
                >= Duration::from_secs(
                    u64::try_from(p.initial_delay_seconds.unwrap_or(0)).unwrap_or(0),
                )
                && last.is_none_or(|l| {
                    l.elapsed()
                        >= Duration::from_secs(
                            u64::try_from(p.period_seconds.unwrap_or(10).max(1)).unwrap_or(10),
                        )
                })
        };
        // Probes run at most once a second per container; each uses its own period.
        if c.last_probe
            .is_some_and(|l| l.elapsed() < Duration::from_millis(900))
        {
            return;
        }
        c.last_probe = Some(Instant::now());
        if let Some(sp) = c.spec.startup_probe.clone().filter(|_| !c.startup_ok) {
            if due(&sp, None) {
                match probe::run(&sp, &c.spec, ip, pid).await {
                    Ok(()) => c.startup_ok = true,
                    Err(_) => {
                        c.live_fail += 1;
                        if c.live_fail >= sp.failure_threshold.unwrap_or(3) {
                            kill(c);
                            c.kill_at = Some(Instant::now() + probe_grace(&sp, pod));
                        }
                    }
                }
            }
            return;
        }
        c.started = true;
        if let Some(lp) = c.spec.liveness_probe.clone()
            && due(&lp, None)
        {
            match probe::run(&lp, &c.spec, ip, pid).await {
                Ok(()) => c.live_fail = 0,
                Err(message) => {
                    c.live_fail += 1;
                    tracing::debug!(container = c.spec.name, %message, "liveness probe failed");
                    if c.live_fail >= lp.failure_threshold.unwrap_or(3) {
                        kill(c);
                        c.kill_at = Some(Instant::now() + probe_grace(&lp, pod));
                        return;
                    }
                }
            }
        }
        match c.spec.readiness_probe.clone() {
            None => c.ready = true,
            Some(rp) if due(&rp, None) => match probe::run(&rp, &c.spec, ip, pid).await {
                Ok(()) => {
                    c.ready_fail = 0;
                    c.ready_ok += 1;
                    if c.ready_ok >= rp.success_threshold.unwrap_or(1) {
                        c.ready = true;
                    }
                }
                Err(message) => {
                    c.ready_ok = 0;
                    c.ready_fail += 1;
                    tracing::debug!(container = c.spec.name, %message, "readiness probe failed");
                    if c.ready_fail >= rp.failure_threshold.unwrap_or(3) {
                        c.ready = false;
                    }
                }
            },
            Some(_) => {}
        }
    }

    /// Starts the container's process; `Err` is the waiting reason and message.
    async fn start(
        &self,
        pod: &Pod,
        rec: &mut PodRec,
        idx: usize,
        image: &Image,
        netns: Option<&Path>,
    ) -> std::result::Result<(), (String, String)> {
        let spec = rec.ctrs[idx].spec.clone();
        let env = self.env(pod, &spec, rec.ip, image).await?;
        let envmap: BTreeMap<String, String> = env.iter().cloned().collect();
        let mut argv: Vec<String> = match &spec.command {
            Some(c) if !c.is_empty() => c.iter().map(|s| runtime::expand(s, &envmap)).collect(),
            _ => image.entrypoint.clone(),
        };
        match &spec.args {
            Some(a) => argv.extend(a.iter().map(|s| runtime::expand(s, &envmap))),
            None if spec.command.as_ref().is_none_or(|c| c.is_empty()) => {
                argv.extend(image.cmd.clone())
            }
            None => {}
        }
        let vols = rec.volumes.clone().unwrap_or_default();
        let mut mounts = Vec::new();
        for m in spec.volume_mounts.iter().flatten() {
            let Some(v) = vols.get(&m.name) else { continue };
            let mut source = v.path.clone();
            if let Some(sp) = m.sub_path.as_ref().filter(|s| !s.is_empty()) {
                source = source.join(sp);
                if !source.exists() {
                    std::fs::create_dir_all(&source)
                        .map_err(|e| ("CreateContainerConfigError".to_owned(), e.to_string()))?;
                }
            }
            mounts.push(MountSpec {
                source,
                target: m.mount_path.clone(),
                read_only: m.read_only == Some(true),
                propagation: m.mount_propagation.clone().unwrap_or_else(|| "None".into()),
            });
        }
        for d in spec.volume_devices.iter().flatten() {
            if let Some(v) = vols.get(&d.name).filter(|v| v.block) {
                mounts.push(MountSpec {
                    source: v.path.clone(),
                    target: d.device_path.clone(),
                    read_only: false,
                    propagation: "None".into(),
                });
            }
        }
        let uid = pod.uid().unwrap_or_default();
        let c = &mut rec.ctrs[idx];
        c.id = random_id();
        let task_dir = self
            .cfg
            .node_root
            .join("run/containerd/io.containerd.runtime.v2.task/k8s.io")
            .join(format!("{uid}-{}", c.id));
        let (host, _) = hostname(pod);
        let init = InitSpec {
            rootfs: task_dir.join("rootfs"),
            hostname: host,
            etc_hosts: volumes::pod_dir(&self.kubelet_root(), &uid).join("etc-hosts"),
            image_files: image.files.clone(),
            mounts,
            working_dir: spec.working_dir.clone(),
            env,
            argv,
        };
        let fail = |e: std::io::Error| ("RunContainerError".to_owned(), e.to_string());
        std::fs::create_dir_all(&task_dir).map_err(fail)?;
        let spec_path = task_dir.join("config.json");
        std::fs::write(&spec_path, serde_json::to_vec(&init).unwrap_or_default()).map_err(fail)?;
        let log_dir = self
            .cfg
            .node_root
            .join("var/log/pods")
            .join(format!(
                "{}_{}_{uid}",
                pod.namespace().unwrap_or_default(),
                pod.name_any()
            ))
            .join(&c.spec.name);
        std::fs::create_dir_all(&log_dir).map_err(fail)?;
        let log_path = log_dir.join(format!("{}.log", c.restarts));
        let log = std::fs::File::create(&log_path).map_err(fail)?;
        let log2 = log.try_clone().map_err(fail)?;
        let mut cmd = tokio::process::Command::new("nsenter");
        if let Some(ns) = netns {
            cmd.arg(format!("--net={}", ns.display()));
        }
        cmd.args([
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "--uts",
            "--pid",
            "--fork",
            "--kill-child",
            "--",
        ])
        .arg(&self.cfg.exe)
        .arg("container-init")
        .arg(&spec_path)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .kill_on_drop(true);
        let child = cmd.spawn().map_err(fail)?;
        let host_pid = child.id().and_then(first_child);
        c.proc = Some(Proc {
            child,
            host_pid,
            _log: server::LiveLog::new(&self.live_logs, log_path),
        });
        c.state = State::Running { started_at: now() };
        c.running_since = Some(Instant::now());
        c.ready = false;
        c.started = false;
        c.ready_ok = 0;
        c.ready_fail = 0;
        c.live_fail = 0;
        c.startup_ok = false;
        c.last_probe = None;
        c.kill_at = None;
        Ok(())
    }

    /// The container's environment: the image's, the `kubernetes` Service's variables, then
    /// envFrom and env in order, with `$(VAR)` references expanded.
    async fn env(
        &self,
        pod: &Pod,
        c: &Container,
        ip: Ipv4Addr,
        image: &Image,
    ) -> std::result::Result<Vec<(String, String)>, (String, String)> {
        let ns = pod.namespace().unwrap_or_default();
        let cfg_err = |m: String| ("CreateContainerConfigError".to_owned(), m);
        let (host, _) = hostname(pod);
        let mut env: Vec<(String, String)> = vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOSTNAME".into(), host),
        ];
        env.extend(image.env.clone());
        let (h, p) = (self.cfg.api_host.clone(), self.cfg.api_port.to_string());
        env.extend([
            ("KUBERNETES_SERVICE_HOST".into(), h.clone()),
            ("KUBERNETES_SERVICE_PORT".into(), p.clone()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".into(), p.clone()),
            ("KUBERNETES_PORT".into(), format!("tcp://{h}:{p}")),
            (format!("KUBERNETES_PORT_{p}_TCP"), format!("tcp://{h}:{p}")),
            (format!("KUBERNETES_PORT_{p}_TCP_PROTO"), "tcp".into()),
            (format!("KUBERNETES_PORT_{p}_TCP_PORT"), p.clone()),
            (format!("KUBERNETES_PORT_{p}_TCP_ADDR"), h.clone()),
        ]);
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| {
            env.retain(|(x, _)| *x != k);
            env.push((k, v));
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        for from in c.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.config_map_ref {
                match cms.get_opt(&r.name).await {
                    Ok(Some(cm)) => {
                        for (k, v) in cm.data.unwrap_or_default() {
                            set(&mut env, format!("{prefix}{k}"), v);
                        }
                    }
                    Ok(None) if r.optional == Some(true) => {}
                    Ok(None) => return Err(cfg_err(format!("configmap \"{}\" not found", r.name))),
                    Err(e) => return Err(cfg_err(e.to_string())),
                }
            }
            if let Some(r) = &from.secret_ref {
                match secrets.get_opt(&r.name).await {
                    Ok(Some(s)) => {
                        for (k, v) in s.data.unwrap_or_default() {
                            set(
                                &mut env,
                                format!("{prefix}{k}"),
                                String::from_utf8_lossy(&v.0).into_owned(),
                            );
                        }
                    }
                    Ok(None) if r.optional == Some(true) => {}
                    Ok(None) => return Err(cfg_err(format!("secret \"{}\" not found", r.name))),
                    Err(e) => return Err(cfg_err(e.to_string())),
                }
            }
        }
        let mut status_pod = pod.clone();
        let st = status_pod.status.get_or_insert_with(Default::default);
        st.pod_ip = Some(ip.to_string());
        st.host_ip = Some(self.node_ip.to_string());
        for e in c.env.iter().flatten() {
            let map: BTreeMap<String, String> = env.iter().cloned().collect();
            let v = if let Some(v) = &e.value {
                runtime::expand(v, &map)
            } else if let Some(src) = &e.value_from {
                if let Some(f) = &src.field_ref {
                    volumes::field_value(&status_pod, &f.field_path).unwrap_or_default()
                } else if let Some(r) = &src.resource_field_ref {
                    volumes::resource_value(
                        pod,
                        r.container_name.as_deref().or(Some(&c.name)),
                        &r.resource,
                        r.divisor.as_ref().map(|d| d.0.as_str()),
                    )
                } else if let Some(k) = &src.secret_key_ref {
                    match secrets.get_opt(&k.name).await {
                        Ok(Some(s)) => match s.data.unwrap_or_default().get(&k.key) {
                            Some(b) => String::from_utf8_lossy(&b.0).into_owned(),
                            None if k.optional == Some(true) => continue,
                            None => {
                                return Err(cfg_err(format!(
                                    "couldn't find key {} in Secret {ns}/{}",
                                    k.key, k.name
                                )));
                            }
                        },
                        Ok(None) if k.optional == Some(true) => continue,
                        Ok(None) => {
                            return Err(cfg_err(format!("secret \"{}\" not found", k.name)));
                        }
                        Err(e) => return Err(cfg_err(e.to_string())),
                    }
                } else if let Some(k) = &src.config_map_key_ref {
                    match cms.get_opt(&k.name).await {
                        Ok(Some(cm)) => match cm.data.unwrap_or_default().get(&k.key) {
                            Some(v) => v.clone(),
                            None if k.optional == Some(true) => continue,
                            None => {
                                return Err(cfg_err(format!(
                                    "couldn't find key {} in ConfigMap {ns}/{}",
                                    k.key, k.name
                                )));
                            }
                        },
                        Ok(None) if k.optional == Some(true) => continue,
                        Ok(None) => {
                            return Err(cfg_err(format!("configmap \"{}\" not found", k.name)));
                        }
                        Err(e) => return Err(cfg_err(e.to_string())),
                    }
                } else {
                    String::new()
                }
            } else {
                String::new()
            };
            set(&mut env, e.name.clone(), v);
        }
        if !env.iter().any(|(k, _)| k == "HOME") {
            env.push(("HOME".into(), "/root".into()));
        }
        Ok(env)
    }

    async fn write_status(&self, pod: &Pod, rec: &PodRec) -> Result<()> {
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let policy = pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let status_of = |c: &Ctr| {
            let mut s = json!({
                "name": c.spec.name,
                "image": c.spec.image,
                "imageID": if c.id.is_empty() { String::new() } else { format!("{}@sha256:{}", c.spec.image.clone().unwrap_or_default(), hex::encode(<sha2::Sha256 as sha2::Digest>::digest(c.spec.image.clone().unwrap_or_default()))) },
                "state": match (&rec.waiting, &c.state) {
                    (Some(_), State::Waiting { .. }) => json!({"waiting": {"reason": "ContainerCreating"}}),
                    _ => c.state.json(),
                },
                "lastState": c.last.as_ref().map_or(json!({}), State::json),
                "ready": c.ready,
                "restartCount": c.restarts,
                "started": c.started,
            });
            if !c.id.is_empty() {
                s["containerID"] = json!(format!("containerd://{}", c.id));
            }
            s
        };
        let inits: Vec<&Ctr> = rec.ctrs.iter().filter(|c| c.init).collect();
        let apps: Vec<&Ctr> = rec.ctrs.iter().filter(|c| !c.init).collect();
        let init_done = inits.iter().all(|c| c.is_done_ok());
        let init_failed = policy == "Never"
            && inits
                .iter()
                .any(|c| matches!(c.state, State::Terminated { exit_code, .. } if exit_code != 0));
        let all_terminated = apps
            .iter()
            .all(|c| matches!(c.state, State::Terminated { .. }));
        let phase = if init_failed {
            "Failed"
        } else if !init_done || rec.volumes.is_none() {
            "Pending"
        } else if all_terminated && policy != "Always" {
            if apps.iter().all(|c| c.is_done_ok()) {
                "Succeeded"
            } else if policy == "Never" {
                "Failed"
            } else {
                "Running"
            }
        } else if apps
            .iter()
            .any(|c| matches!(c.state, State::Running { .. }) || c.restarts > 0)
        {
            "Running"
        } else {
            "Pending"
        };
        let current = serde_json::to_value(&pod.status).unwrap_or_default();
        let mut conditions = util::conditions_of(Some(&current));
        let unready: Vec<String> = apps
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.spec.name.clone())
            .collect();
        let incomplete: Vec<String> = inits
            .iter()
            .filter(|c| !c.is_done_ok())
            .map(|c| c.spec.name.clone())
            .collect();
        let terminal = matches!(phase, "Succeeded" | "Failed");
        util::set_condition(
            &mut conditions,
            "PodReadyToStartContainers",
            if terminal { "False" } else { "True" },
            "",
            "",
        );
        if incomplete.is_empty() {
            util::set_condition(&mut conditions, "Initialized", "True", "", "");
        } else {
            util::set_condition(
                &mut conditions,
                "Initialized",
                "False",
                "ContainersNotInitialized",
                &format!(
                    "containers with incomplete status: [{}]",
                    incomplete.join(" ")
                ),
            );
        }
        let gates_ok = pod
            .spec
            .iter()
            .flat_map(|s| s.readiness_gates.iter().flatten())
            .all(|g| {
                current["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == g.condition_type && c["status"] == "True")
                })
            });
        for t in ["ContainersReady", "Ready"] {
            if terminal {
                let reason = if phase == "Succeeded" {
                    "PodCompleted"
                } else {
                    "PodFailed"
                };
                util::set_condition(&mut conditions, t, "False", reason, "");
            } else if !unready.is_empty() {
                util::set_condition(
                    &mut conditions,
                    t,
                    "False",
                    "ContainersNotReady",
                    &format!("containers with unready status: [{}]", unready.join(" ")),
                );
            } else if t == "Ready" && !gates_ok {
                util::set_condition(
                    &mut conditions,
                    t,
                    "False",
                    "ReadinessGatesNotReady",
                    "the status of pod readiness gate is not \"True\"",
                );
            } else {
                util::set_condition(&mut conditions, t, "True", "", "");
            }
        }
        util::set_condition(&mut conditions, "PodScheduled", "True", "", "");
        let order = [
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
        ];
        conditions.sort_by_key(|c| {
            order
                .iter()
                .position(|o| c["type"] == *o)
                .unwrap_or(order.len())
        });
        for c in conditions.iter_mut() {
            if let Some(m) = c.as_object_mut() {
                m.retain(|k, v| !(matches!(k.as_str(), "reason" | "message") && v == ""));
                m.entry("lastProbeTime").or_insert(Value::Null);
            }
        }
        let qos = qos_class(pod);
        let mut status = json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.node_ip.to_string(),
            "hostIPs": [{"ip": self.node_ip.to_string()}],
            "podIP": rec.ip.to_string(),
            "podIPs": [{"ip": rec.ip.to_string()}],
            "startTime": rec.start_time,
            "qosClass": qos,
            "containerStatuses": apps.iter().map(|c| status_of(c)).collect::<Vec<_>>(),
        });
        if !inits.is_empty() {
            status["initContainerStatuses"] =
                json!(inits.iter().map(|c| status_of(c)).collect::<Vec<_>>());
        }
        let keys = [
            "phase",
            "conditions",
            "hostIP",
            "podIP",
            "containerStatuses",
            "initContainerStatuses",
            "qosClass",
        ];
        let differs = keys.iter().any(|k| {
            let a = current.get(*k).cloned().unwrap_or(Value::Null);
            let b = status.get(*k).cloned().unwrap_or(Value::Null);
            strip_times(&a) != strip_times(&b)
        }) || current.get("startTime").is_none_or(Value::is_null);
        if differs && !util::pod_is_terminal(pod) {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
            util::patch_status(&api, &name, status, &format!("pod {ns}/{name}")).await?;
        }
        Ok(())
    }
}

/// Compares statuses without the timestamps a rewrite would move.
fn strip_times(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "lastProbeTime" | "lastTransitionTime"))
                .map(|(k, v)| (k.clone(), strip_times(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_times).collect()),
        other => other.clone(),
    }
}

fn grace(pod: &Pod) -> Duration {
    let s = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(s).unwrap_or(30))
}

/// The grace period of a kill for a failed liveness or startup probe: the probe's own
/// `terminationGracePeriodSeconds`, else the pod's [api: core/v1 `Probe`].
fn probe_grace(probe: &k8s_openapi::api::core::v1::Probe, pod: &Pod) -> Duration {
    probe
        .termination_grace_period_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or_else(|| grace(pod), Duration::from_secs)
}

/// `GeneratePodHostNameAndDomain`: the hostname and the FQDN.
fn hostname(pod: &Pod) -> (String, String) {
    let spec = pod.spec.as_ref();
    let mut host: String = spec
        .and_then(|s| s.hostname.clone())
        .unwrap_or_else(|| pod.name_any());
    host.truncate(63);
    let host = host.trim_end_matches(['-', '.']).to_owned();
    match spec
        .and_then(|s| s.subdomain.clone())
        .filter(|s| !s.is_empty())
    {
        Some(sub) => {
            let fqdn = format!(
                "{host}.{sub}.{}.svc.cluster.local",
                pod.namespace().unwrap_or_default()
            );
            (host, fqdn)
        }
        None => (host.clone(), host),
    }
}

/// `GetPodQOS`.
fn qos_class(pod: &Pod) -> &'static str {
    let ctrs: Vec<&Container> = pod
        .spec
        .iter()
        .flat_map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .collect();
    let any = ctrs.iter().any(|c| {
        c.resources.as_ref().is_some_and(|r| {
            r.requests.as_ref().is_some_and(|m| !m.is_empty())
                || r.limits.as_ref().is_some_and(|m| !m.is_empty())
        })
    });
    if !any {
        return "BestEffort";
    }
    let guaranteed = ctrs.iter().all(|c| {
        let r = c.resources.clone().unwrap_or_default();
        let limits = r.limits.unwrap_or_default();
        let requests = r.requests.unwrap_or_default();
        ["cpu", "memory"].iter().all(|k| {
            limits.contains_key(*k) && requests.get(*k).is_none_or(|q| Some(q) == limits.get(*k))
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// The pid of `unshare --fork`'s child (the container's init), once it exists.
fn first_child(pid: u32) -> Option<u32> {
    for _ in 0..2000 {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            && let Some(c) = s.split_whitespace().next().and_then(|c| c.parse().ok())
        {
            return Some(c);
        }
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// SIGTERM to the container's process; the kill-on-drop of its `unshare` is the SIGKILL.
fn kill(c: &mut Ctr) {
    if let Some(p) = &c.proc
        && let Some(pid) = p
            .host_pid
            .and_then(|p| rustix::process::Pid::from_raw(i32::try_from(p).ok()?))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

/// Stops a container: SIGTERM, up to its grace period, then SIGKILL.
async fn stop(c: &mut Ctr, grace: Duration) {
    kill(c);
    if let Some(mut p) = c.proc.take()
        && tokio::time::timeout(grace, p.child.wait()).await.is_err()
    {
        let _ = p.child.start_kill();
        let _ = p.child.wait().await;
    }
}

impl std::fmt::Debug for Kubelet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubelet")
            .field("node", &self.cfg.node_name)
            .field("ip", &self.node_ip)
            .finish()
    }
}
