//! The assignment worker: watches this node's BackupAssignments and RestoreAssignments, checks
//! what each asks for, resolves each volume to its host path, backs it up (or restores it in
//! place) through the engine under the node's IO budget, retries what may pass with a growing
//! delay, and writes the assignment's whole status with server-side apply. It holds a
//! finalizer while it works, so a deleted or canceled assignment stops restic, leaves no
//! snapshot or lock, and ends `Canceled`. An assignment left Running by an agent that died is
//! taken up again; one that cannot be read is reported on itself and skipped.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use restic_wrapper::{Cache, Repository, Restic, SpawnObserver, SpawnedProcess};
use serde_json::json;
use stash_api::assignment::{
    AssignedVolume, AssignmentPhase, AssignmentStatus, BackupAssignment, RestoreAssignment,
    VolumePhase,
};
use stash_api::common::ObjectRef;
use stash_api::labels;
use tokio::sync::{Notify, Semaphore, watch};

use crate::budget::{IoBudget, Limits};
use crate::engine::{self, BackupRequest, ReadMode, RestoreRequest, mount_tag};
use crate::error::AgentError;
use crate::hostpath;
use crate::locks::{Identity, Journal};
use crate::spec;
use crate::status::{Context, ProgressSnapshot, Stage, VolumeOutcome, build_status};
use crate::stream::Progress;

/// The one field manager of everything the agent writes: status and its finalizer.
pub const FIELD_MANAGER: &str = "stash-node-agent";

/// How retryable failures are tried again: the delay doubles from `initial` up to `max`,
/// until `deadline` after the agent took the assignment; then the volume fails.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            deadline: Duration::from_secs(30 * 60),
        }
    }
}

/// What the worker needs to know about its node.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub node_name: String,
    pub pod_name: String,
    pub kubelet_root: PathBuf,
    /// Where restic's persistent cache and scratch files live.
    pub state_dir: PathBuf,
    pub restic: PathBuf,
    pub budget: IoBudget,
    pub max_volumes: usize,
    pub default_mode: ReadMode,
    pub io_uring: bool,
    /// The mount table consulted to refuse unmounted volumes.
    pub mountinfo: PathBuf,
    pub progress_every: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Direct mode: restic's own upload limit (KiB/s) and read parallelism.
    pub limit_upload_kib: Option<u64>,
    pub read_concurrency: Option<u32>,
    pub retry: RetryPolicy,
    /// The deadline of every restic command; one that runs longer is stopped (a timeout is
    /// retryable).
    pub restic_timeout: Duration,
    /// The host directories mounted here under which local repositories may live.
    pub local_roots: Vec<PathBuf>,
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// A volume's start or end, to the microsecond.
fn now_micro() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// What the worker needs of either assignment kind.
pub trait Assignment:
    kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    const WHAT: &'static str;
    fn node(&self) -> &str;
    fn status(&self) -> Option<&AssignmentStatus>;
    fn repository(&self) -> &ObjectRef;
    fn volumes(&self) -> &[AssignedVolume];
    /// What this assignment asks for, checked: every field is used or refused here.
    fn plan(&self, cfg: &WorkerConfig) -> Result<Plan, AgentError>;
}

/// An assignment's spec, checked and turned into what the engine does.
#[derive(Clone, Debug)]
pub struct Plan {
    pub operation: Operation,
    /// The assignment's own IO limits, on top of the node's.
    pub own: Limits,
}

/// What to do with each volume.
#[derive(Clone, Debug)]
pub enum Operation {
    Backup {
        mode: ReadMode,
        /// Whether the assignment named the mode (otherwise it is the agent's default).
        chosen: bool,
        excludes: Vec<String>,
        on_unreadable: engine::UnreadablePolicy,
        restic_args: Vec<String>,
    },
    Restore,
}

impl Assignment for BackupAssignment {
    const WHAT: &'static str = "backup";
    fn node(&self) -> &str {
        &self.spec.node_name
    }
    fn status(&self) -> Option<&AssignmentStatus> {
        self.status.as_ref()
    }
    fn repository(&self) -> &ObjectRef {
        &self.spec.repository
    }
    fn volumes(&self) -> &[AssignedVolume] {
        &self.spec.volumes
    }
    fn plan(&self, cfg: &WorkerConfig) -> Result<Plan, AgentError> {
        let mode = match self.spec.read_mode {
            Some(stash_api::common::ReadMode::Direct) => ReadMode::Direct,
            Some(stash_api::common::ReadMode::Stream) => ReadMode::Stream,
            None => cfg.default_mode,
        };
        let restic_args = spec::restic_args(self.spec.args.as_deref().unwrap_or_default(), mode)?;
        let own = spec::limits(self.spec.io_budget.as_ref())?;
        for v in &self.spec.volumes {
            spec::volume_fields(v, true)?;
            spec::paths(v)?;
        }
        Ok(Plan {
            operation: Operation::Backup {
                mode,
                chosen: self.spec.read_mode.is_some(),
                excludes: self.spec.exclude.clone().unwrap_or_default(),
                on_unreadable: self.spec.on_unreadable.unwrap_or_default(),
                restic_args,
            },
            own,
        })
    }
}

impl Assignment for RestoreAssignment {
    const WHAT: &'static str = "restore";
    fn node(&self) -> &str {
        &self.spec.node_name
    }
    fn status(&self) -> Option<&AssignmentStatus> {
        self.status.as_ref()
    }
    fn repository(&self) -> &ObjectRef {
        &self.spec.repository
    }
    fn volumes(&self) -> &[AssignedVolume] {
        &self.spec.volumes
    }
    fn plan(&self, _: &WorkerConfig) -> Result<Plan, AgentError> {
        let own = spec::limits(self.spec.io_budget.as_ref())?;
        for v in &self.spec.volumes {
            spec::volume_fields(v, false)?;
        }
        Ok(Plan {
            operation: Operation::Restore,
            own,
        })
    }
}

/// Whether this agent should work on an assignment: it is for this node and not finished.
/// Only one agent runs per node, so a Running assignment of another agent pod on this node
/// was left by a predecessor that died; it is taken up again.
pub fn should_take<K: Assignment>(a: &K, node: &str) -> bool {
    let phase = a.status().and_then(|s| s.phase);
    a.node() == node && !phase.is_some_and(AssignmentPhase::is_final)
}

/// Why an assignment must stop, if it must: deleted, or canceled through its annotation.
pub fn cancel_reason(meta: &kube::core::ObjectMeta) -> Option<String> {
    if meta.deletion_timestamp.is_some() {
        return Some("the assignment was deleted".into());
    }
    let canceled = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(labels::CANCEL))
        .is_some_and(|v| v == "true");
    canceled.then(|| format!("canceled through the annotation {}", labels::CANCEL))
}

fn holds_finalizer(meta: &kube::core::ObjectMeta) -> bool {
    meta.finalizers
        .iter()
        .flatten()
        .any(|f| f == labels::AGENT_FINALIZER)
}

/// `restic version` against the supported floor, before any work is taken.
async fn check_restic(cfg: &WorkerConfig) -> Result<(), AgentError> {
    // `version` opens no repository; the client only needs one to exist.
    let placeholder = Repository::new(
        restic_wrapper::Backend::Local {
            path: cfg.state_dir.join("no-repository"),
        },
        restic_wrapper::Secrets::new().with("RESTIC_PASSWORD", "unused"),
        &cfg.state_dir,
    )?;
    let version = Restic::new(placeholder)
        .with_program(&cfg.restic)
        .with_timeout(Duration::from_secs(60))
        .version()
        .await?;
    tracing::info!(%version, "restic is supported");
    Ok(())
}

/// What the watch loops share.
struct Shared {
    client: kube::Client,
    cfg: WorkerConfig,
    journal: Arc<Journal>,
    volumes: Arc<Semaphore>,
    recorder: Recorder,
    /// Assignments being worked on, by UID, with the signal that cancels them.
    in_flight: Mutex<HashMap<String, watch::Sender<Option<String>>>>,
    /// Malformed assignments already reported, by UID and generation.
    reported: Mutex<HashSet<(String, Option<i64>)>>,
}

/// Runs until the watches end or `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    cfg: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    check_restic(&cfg).await?;
    // A new instance on every start: what earlier ones left in the journal is theirs.
    let journal = Arc::new(Journal::new(&cfg.state_dir, Identity::new_instance()));
    tracing::info!(
        node = %cfg.node_name,
        hostname = %journal.identity().hostname,
        instance = %journal.identity().instance,
        "watching assignments"
    );
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(cfg.pod_name.clone()),
        },
    );
    let shared = Arc::new(Shared {
        volumes: Arc::new(Semaphore::new(cfg.max_volumes.max(1))),
        client,
        cfg,
        journal,
        recorder,
        in_flight: Mutex::default(),
        reported: Mutex::default(),
    });
    tokio::select! {
        () = shutdown => Ok(()),
        () = watch_kind::<BackupAssignment>(&shared) => Ok(()),
        () = watch_kind::<RestoreAssignment>(&shared) => Ok(()),
    }
}

async fn watch_kind<K: Assignment>(shared: &Arc<Shared>) {
    // Each object is deserialized on its own: one that does not fit the agent's types (a
    // newer CRD, a hand-written object) is reported on itself, and the others go on.
    let api: Api<DeserializeGuard<K>> = Api::all(shared.client.clone());
    let selector = format!("{}={}", labels::NODE, shared.cfg.node_name);
    let stream = watcher(api, watcher::Config::default().labels(&selector));
    let mut stream = std::pin::pin!(stream);
    // The work belongs to this loop: when the agent stops (SIGTERM, or the loop is dropped),
    // the tasks are dropped with it, which interrupts their restic processes so they release
    // their locks, and the next agent takes the Running assignments up.
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let event = tokio::select! {
            e = stream.next() => e,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let Some(event) = event else { return };
        match event {
            Ok(watcher::Event::Apply(a) | watcher::Event::InitApply(a)) => match a.0 {
                Ok(a) => on_assignment(shared, a, &mut tasks),
                Err(invalid) => {
                    let shared = shared.clone();
                    tasks.spawn(async move { report_invalid::<K>(&shared, invalid).await });
                }
            },
            // Without the finalizer (a foreign removal, or one never added): stop the work.
            Ok(watcher::Event::Delete(a)) => {
                let meta = match &a.0 {
                    Ok(a) => a.meta().clone(),
                    Err(invalid) => invalid.metadata.clone(),
                };
                if let Some(tx) = lock(&shared.in_flight).get(meta.uid.as_deref().unwrap_or("")) {
                    tx.send_replace(Some("the assignment was deleted".into()));
                }
            }
            Ok(_) => {}
            // The watcher retries on its own.
            Err(e) => {
                tracing::warn!(error = %e, kind = K::WHAT, "assignment watch error");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn on_assignment<K: Assignment>(shared: &Arc<Shared>, a: K, tasks: &mut tokio::task::JoinSet<()>) {
    let uid = a.meta().uid.clone().unwrap_or_default();
    let why = cancel_reason(a.meta());
    if let Some(tx) = lock(&shared.in_flight).get(&uid) {
        if let Some(why) = why {
            tx.send_replace(Some(why));
        }
        return;
    }
    if a.node() != shared.cfg.node_name {
        return;
    }
    let finished = a
        .status()
        .and_then(|s| s.phase)
        .is_some_and(AssignmentPhase::is_final);
    let ours = holds_finalizer(a.meta());
    if finished && !ours {
        return;
    }
    let (tx, rx) = watch::channel(None);
    lock(&shared.in_flight).insert(uid.clone(), tx);
    let shared = shared.clone();
    tasks.spawn(async move {
        let name = a.meta().name.clone().unwrap_or_default();
        let result = if finished {
            // A predecessor ended the work but died before letting the object go.
            release::<K>(&shared, &a).await
        } else if let Some(why) = why {
            // Deleted or canceled while no agent worked on it (a predecessor died mid-work,
            // or it was canceled before it started).
            conclude_canceled(&shared, &a, why).await
        } else {
            process(&shared, a, rx).await
        };
        if let Err(e) = result {
            tracing::error!(assignment = %name, kind = K::WHAT, error = %e, category = e.category(), "assignment failed");
        }
        lock(&shared.in_flight).remove(&uid);
    });
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes the status of an assignment whole, under the agent's field manager: what it no
/// longer says (an error that passed) goes from the object too.
struct StatusWriter<K: Assignment> {
    api: Api<K>,
    name: String,
    generation: Option<i64>,
    agent: String,
    previous: Mutex<Option<AssignmentStatus>>,
}

impl<K: Assignment> StatusWriter<K> {
    fn new(shared: &Shared, a: &K) -> Self {
        let ns = a.meta().namespace.clone().unwrap_or_default();
        StatusWriter {
            api: Api::namespaced(shared.client.clone(), &ns),
            name: a.meta().name.clone().unwrap_or_default(),
            generation: a.meta().generation,
            agent: shared.cfg.pod_name.clone(),
            previous: Mutex::new(a.status().cloned()),
        }
    }

    async fn write(
        &self,
        volumes: &[AssignedVolume],
        outcomes: &[VolumeOutcome],
        progress: &[ProgressSnapshot],
        stage: &Stage,
    ) -> Result<(), AgentError> {
        let status = {
            let previous = lock(&self.previous);
            build_status(
                volumes,
                outcomes,
                progress,
                stage,
                &Context {
                    generation: self.generation,
                    agent: &self.agent,
                    previous: previous.as_ref(),
                    now: now(),
                },
            )
        };
        apply_status(&self.api, &self.name, &status).await?;
        *lock(&self.previous) = Some(status);
        Ok(())
    }
}

async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    status: &AssignmentStatus,
) -> Result<(), AgentError>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map(drop)
    .map_err(AgentError::kube("write the assignment status"))
}

/// Holds (`true`) or lets go of (`false`) the agent's finalizer on an assignment.
async fn apply_finalizer<K: Assignment>(
    api: &Api<K>,
    name: &str,
    hold: bool,
) -> Result<(), AgentError> {
    let finalizers: Vec<&str> = if hold {
        vec![labels::AGENT_FINALIZER]
    } else {
        vec![]
    };
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name, "finalizers": finalizers},
    });
    match api
        .patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        Ok(_) => Ok(()),
        // Letting go of an object already gone is done.
        Err(kube::Error::Api(s)) if !hold && s.is_not_found() => Ok(()),
        Err(e) => Err(AgentError::kube(if hold {
            "hold the assignment's finalizer"
        } else {
            "release the assignment's finalizer"
        })(e)),
    }
}

async fn release<K: Assignment>(shared: &Shared, a: &K) -> Result<(), AgentError> {
    let ns = a.meta().namespace.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(shared.client.clone(), &ns);
    apply_finalizer(&api, a.meta().name.as_deref().unwrap_or_default(), false).await
}

/// Reports an assignment the agent cannot read, on the object itself, once per generation.
async fn report_invalid<K: Assignment>(
    shared: &Shared,
    invalid: kube::core::error_boundary::InvalidObject,
) {
    let meta = &invalid.metadata;
    let key = (meta.uid.clone().unwrap_or_default(), meta.generation);
    if !lock(&shared.reported).insert(key) {
        return;
    }
    let name = meta.name.clone().unwrap_or_default();
    let reason = format!(
        "failed to read the {} assignment: {}",
        K::WHAT,
        invalid.error
    );
    tracing::error!(assignment = %name, kind = K::WHAT, %reason, "skipping a malformed assignment");
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(
        shared.client.clone(),
        meta.namespace.as_deref().unwrap_or_default(),
        &resource,
    );
    let status = build_status(
        &[],
        &[],
        &[],
        &Stage::Invalid { reason },
        &Context {
            generation: meta.generation,
            agent: &shared.cfg.pod_name,
            previous: None,
            now: now(),
        },
    );
    let body = json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "status": status,
    });
    let written = api
        .patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await;
    if let Err(error) = written {
        // The status itself may be what does not fit the schema; the log says why.
        tracing::warn!(assignment = %name, %error, "cannot report the malformed assignment in its status");
    }
}

/// Tells the journal of every restic process, and counts this assignment's live ones, so
/// that a cancellation can wait until restic has exited and removed its lock.
#[derive(Debug)]
struct Processes {
    journal: Arc<Journal>,
    live: watch::Sender<usize>,
}

impl SpawnObserver for Processes {
    fn started(&self, process: &SpawnedProcess) {
        self.journal.started(process);
        self.live.send_modify(|n| *n += 1);
    }
    fn exited(&self, process: &SpawnedProcess, status: std::process::ExitStatus) {
        self.journal.exited(process, status);
        self.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Processes {
    /// Until every restic of this assignment has exited (interrupted restic gets a grace
    /// period, then SIGKILL, so this ends).
    async fn idle(&self) {
        let mut rx = self.live.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// The per-assignment state the volume tasks update and the status is built from.
struct WorkState {
    outcomes: Mutex<Vec<VolumeOutcome>>,
    progress: Vec<Arc<Progress>>,
    started: Mutex<Vec<Option<Instant>>>,
    /// Retryable failures being waited out, by what failed.
    retrying: Mutex<BTreeMap<String, String>>,
    opened: AtomicBool,
    restic: OnceLock<Restic>,
    /// Something worth writing at once happened (the repository opened, a volume ended).
    changed: Notify,
}

impl WorkState {
    fn snapshot(&self) -> (Vec<VolumeOutcome>, Vec<ProgressSnapshot>, Stage) {
        let outcomes = lock(&self.outcomes).clone();
        let started = lock(&self.started).clone();
        let progress = self
            .progress
            .iter()
            .zip(started)
            .map(|(p, start)| ProgressSnapshot {
                bytes: p.bytes.load(Ordering::Relaxed),
                files: p.files.load(Ordering::Relaxed),
                bytes_total: p.bytes_total.load(Ordering::Relaxed),
                files_total: p.files_total.load(Ordering::Relaxed),
                elapsed: start.map(|s| s.elapsed()),
            })
            .collect();
        let stage = if self.opened.load(Ordering::Relaxed) {
            Stage::Running {
                retrying: lock(&self.retrying).values().cloned().collect(),
            }
        } else {
            Stage::Accepted
        };
        (outcomes, progress, stage)
    }
}

/// Runs `attempt` until it succeeds, fails for good, or the deadline would pass; while it
/// waits, `note` says why. Returns the error with the number of attempts made.
async fn retrying<T, F, Fut>(
    policy: RetryPolicy,
    deadline: Instant,
    note: impl Fn(Option<String>),
    mut attempt: F,
) -> Result<T, (AgentError, u32)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, AgentError>>,
{
    let mut delay = policy.initial;
    let mut attempts = 1;
    loop {
        match attempt().await {
            Ok(v) => {
                note(None);
                return Ok(v);
            }
            Err(e) if e.is_retryable() && Instant::now() + delay < deadline => {
                tracing::warn!(error = %e, category = e.category(), attempts, delay = ?delay, "retrying");
                note(Some(format!(
                    "{e} (attempt {attempts}, next in {}s)",
                    delay.as_secs_f64().ceil()
                )));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(policy.max);
                attempts += 1;
            }
            Err(e) => {
                note(None);
                return Err((e, attempts));
            }
        }
    }
}

fn failed(e: &AgentError, attempts: u32) -> VolumeOutcome {
    let tries = if attempts > 1 {
        format!(" (gave up after {attempts} attempts)")
    } else {
        String::new()
    };
    VolumeOutcome {
        phase: Some(VolumePhase::Failed),
        error: Some(format!("{e}{tries}")),
        reason: Some(e.category()),
        completion_time: Some(now_micro()),
        ..VolumeOutcome::default()
    }
}

async fn process<K: Assignment>(
    shared: &Arc<Shared>,
    a: K,
    mut cancel: watch::Receiver<Option<String>>,
) -> Result<(), AgentError> {
    let cfg = &shared.cfg;
    let writer = StatusWriter::new(shared, &a);
    let specs = a.volumes().to_vec();
    let plan = match a.plan(cfg) {
        Ok(p) => p,
        Err(e) => {
            writer
                .write(
                    &[],
                    &[],
                    &[],
                    &Stage::Invalid {
                        reason: e.to_string(),
                    },
                )
                .await?;
            return Err(e);
        }
    };
    let deadline = Instant::now() + cfg.retry.deadline;
    // Held while the work runs: a deletion then waits until restic is stopped and cleaned up.
    // An API server that does not answer is waited for, as any retryable failure.
    retrying(
        cfg.retry,
        deadline,
        |_| {},
        || apply_finalizer(&writer.api, &writer.name, true),
    )
    .await
    .map_err(|(e, _)| e)?;
    let state = Arc::new(WorkState {
        outcomes: Mutex::new(vec![VolumeOutcome::default(); specs.len()]),
        progress: specs.iter().map(|_| Arc::default()).collect(),
        started: Mutex::new(vec![None; specs.len()]),
        retrying: Mutex::default(),
        opened: AtomicBool::new(false),
        restic: OnceLock::new(),
        changed: Notify::new(),
    });
    retrying(
        cfg.retry,
        deadline,
        |_| {},
        || writer.write(&specs, &[], &[], &Stage::Accepted),
    )
    .await
    .map_err(|(e, _)| e)?;

    let ns = a.meta().namespace.clone().unwrap_or_default();
    let uid = a.meta().uid.clone().unwrap_or_default();
    let (live, _) = watch::channel(0);
    let processes = Arc::new(Processes {
        journal: shared.journal.clone(),
        live,
    });
    let budget = cfg.budget.for_assignment(plan.own);
    let work = {
        let (state, processes, specs) = (state.clone(), processes.clone(), specs.clone());
        let shared = shared.clone();
        let repository = a.repository().clone();
        let operation = plan.operation.clone();
        async move {
            let cfg = &shared.cfg;
            let note = |what: &str| {
                let state = state.clone();
                let what = what.to_owned();
                move |m: Option<String>| {
                    let mut r = lock(&state.retrying);
                    match m {
                        Some(m) => r.insert(what.clone(), format!("{what}: {m}")),
                        None => r.remove(&what),
                    };
                    drop(r);
                    state.changed.notify_one();
                }
            };
            let opened = retrying(cfg.retry, deadline, note("repository"), || {
                open_repository(&shared, &repository, &ns, &uid, processes.clone())
            })
            .await;
            let restic = match opened {
                Ok(r) => r,
                Err((e, attempts)) => {
                    *lock(&state.outcomes) = vec![failed(&e, attempts); specs.len()];
                    return;
                }
            };
            let restic = state.restic.get_or_init(|| restic);
            state.opened.store(true, Ordering::Relaxed);
            state.changed.notify_one();
            let shared = &shared;
            futures::future::join_all(specs.iter().enumerate().map(|(i, v)| {
                let (state, budget, operation, volumes) = (
                    state.clone(),
                    budget.clone(),
                    operation.clone(),
                    shared.volumes.clone(),
                );
                let note = note(&format!("{}/{}", v.pod_name, v.volume_name));
                async move {
                    let metrics = &cfg.metrics;
                    metrics.queue_depth.inc();
                    let _permit = volumes.acquire().await;
                    metrics.queue_depth.dec();
                    metrics.volumes_in_progress.inc();
                    let progress = state.progress[i].clone();
                    lock(&state.outcomes)[i] = VolumeOutcome {
                        phase: Some(VolumePhase::Running),
                        start_time: Some(now_micro()),
                        ..VolumeOutcome::default()
                    };
                    lock(&state.started)[i] = Some(Instant::now());
                    let what = match operation {
                        Operation::Backup { .. } => "backup",
                        Operation::Restore => "restore",
                    };
                    let result = retrying(cfg.retry, deadline, note, || {
                        // Each attempt counts from zero.
                        for c in [
                            &progress.bytes,
                            &progress.files,
                            &progress.bytes_total,
                            &progress.files_total,
                        ] {
                            c.store(0, Ordering::Relaxed);
                        }
                        run_volume(
                            shared,
                            restic,
                            v,
                            operation.clone(),
                            budget.clone(),
                            progress.clone(),
                        )
                    })
                    .await;
                    metrics.volumes_in_progress.dec();
                    metrics
                        .read_bytes
                        .inc_by(progress.bytes.load(Ordering::Relaxed));
                    metrics
                        .throttle_seconds
                        .inc_by(progress.throttled_nanos.load(Ordering::Relaxed) as f64 / 1e9);
                    metrics
                        .volumes
                        .get_or_create(&crate::metrics::VolumeLabels {
                            operation: what,
                            result: if result.is_ok() {
                                "succeeded"
                            } else {
                                "failed"
                            },
                        })
                        .inc();
                    if let Err((e, _)) = &result {
                        metrics
                            .failures
                            .get_or_create(&crate::metrics::FailureLabels {
                                category: e.category(),
                            })
                            .inc();
                    }
                    let start_time = lock(&state.outcomes)[i].start_time.clone();
                    lock(&state.outcomes)[i] = match result {
                        Ok(outcome) => VolumeOutcome {
                            start_time,
                            completion_time: Some(now_micro()),
                            ..outcome
                        },
                        Err((e, attempts)) => VolumeOutcome {
                            start_time,
                            ..failed(&e, attempts)
                        },
                    };
                    state.changed.notify_one();
                }
            }))
            .await;
        }
    };
    let mut work = Box::pin(work);
    // Progress while the volumes run; a heartbeat too, so a dead agent is noticed.
    let why = loop {
        tokio::select! {
            () = &mut work => break None,
            () = tokio::time::sleep(cfg.progress_every) => {}
            () = state.changed.notified() => {}
            why = canceled(&mut cancel) => break Some(why),
        }
        let (outcomes, progress, stage) = state.snapshot();
        if let Err(error) = writer.write(&specs, &outcomes, &progress, &stage).await {
            tracing::warn!(%error, assignment = %writer.name, "cannot report progress");
        }
    };
    let Some(why) = why else {
        let (outcomes, progress, _) = state.snapshot();
        // The result must reach the object: an API server that does not answer is waited
        // for (a later deadline: the work itself is done).
        let last = Instant::now() + cfg.retry.deadline;
        retrying(
            cfg.retry,
            last,
            |_| {},
            || writer.write(&specs, &outcomes, &progress, &Stage::Finished),
        )
        .await
        .map_err(|(e, _)| e)?;
        return retrying(
            cfg.retry,
            last,
            |_| {},
            || apply_finalizer(&writer.api, &writer.name, false),
        )
        .await
        .map_err(|(e, _)| e);
    };
    // Dropping the work interrupts every restic it runs (SIGINT, so restic removes its lock
    // and saves nothing); wait until they are gone before saying so.
    let (outcomes, progress, _) = state.snapshot();
    drop(work);
    tracing::info!(assignment = %writer.name, %why, "canceling");
    // restic gets its grace period after SIGINT, then SIGKILL: this ends, but never wait
    // forever on it.
    if tokio::time::timeout(Duration::from_secs(300), processes.idle())
        .await
        .is_err()
    {
        tracing::error!(assignment = %writer.name, "restic did not exit after the interrupt");
    }
    if let (Some(restic), Operation::Backup { .. }) = (state.restic.get(), &plan.operation) {
        remove_partial_snapshots(restic, &specs, &outcomes).await;
    }
    let canceled = Stage::Canceled { why: why.clone() };
    // The object may be gone already if someone removed the finalizer.
    if let Err(error) = writer.write(&specs, &outcomes, &progress, &canceled).await {
        tracing::warn!(%error, assignment = %writer.name, "cannot record the cancellation");
    }
    publish_canceled(shared, &a, &why).await;
    apply_finalizer(&writer.api, &writer.name, false).await
}

/// Resolves with the reason once the assignment is canceled; never, if it is not.
async fn canceled(rx: &mut watch::Receiver<Option<String>>) -> String {
    let why = match rx.wait_for(Option::is_some).await {
        Ok(why) => why.clone(),
        Err(_) => None,
    };
    match why {
        Some(why) => why,
        None => std::future::pending().await,
    }
}

/// A snapshot restic committed for a volume that was still running when it was interrupted
/// (restic saw the end of its input just before the interrupt) holds part of the volume:
/// removed, so nothing partial stays behind a cancellation.
async fn remove_partial_snapshots(
    restic: &Restic,
    specs: &[AssignedVolume],
    outcomes: &[VolumeOutcome],
) {
    for (v, o) in specs.iter().zip(outcomes) {
        let Some(started) = o
            .start_time
            .as_ref()
            .filter(|_| !o.phase.is_some_and(VolumePhase::is_final))
        else {
            continue;
        };
        let filter = restic_wrapper::SnapshotFilter {
            hosts: vec![v.host.clone()],
            tags: vec![engine::key_tag(&v.snapshot_key)],
            paths: vec![],
        };
        let partial: Vec<String> = match restic.snapshots(&filter).await {
            Ok(list) => list
                .into_iter()
                .filter(|s| {
                    s.time
                        .parse::<k8s_openapi::jiff::Timestamp>()
                        .is_ok_and(|t| t >= started.0)
                })
                .map(|s| s.id)
                .collect(),
            Err(error) => {
                tracing::warn!(%error, volume = %v.volume_name, "cannot check for a partial snapshot after the cancellation");
                continue;
            }
        };
        if partial.is_empty() {
            continue;
        }
        tracing::warn!(snapshots = ?partial, volume = %v.volume_name, "removing a snapshot of an interrupted backup");
        if let Err(error) = restic.forget_snapshots(&partial, false).await {
            tracing::warn!(%error, "cannot remove the snapshot of an interrupted backup");
        }
    }
}

/// An Event on the assignment: once the finalizer is gone the object is too, and the Event
/// is what is left to say what happened.
async fn publish_canceled<K: Assignment>(shared: &Shared, a: &K, why: &str) {
    let event = KubeEvent {
        type_: EventType::Normal,
        reason: stash_api::assignment::condition_reasons::CANCELED.into(),
        note: Some(format!(
            "{} interrupted on node {}: {why}; no snapshot or lock left behind",
            K::WHAT,
            shared.cfg.node_name
        )),
        action: "Cancel".into(),
        secondary: None,
    };
    if let Err(error) = shared.recorder.publish(&event, &a.object_ref(&())).await {
        tracing::warn!(%error, "cannot publish the cancellation Event");
    }
}

/// Ends an assignment that must stop while no agent works on it.
async fn conclude_canceled<K: Assignment>(
    shared: &Arc<Shared>,
    a: &K,
    why: String,
) -> Result<(), AgentError> {
    let writer = StatusWriter::new(shared, a);
    // A predecessor's killed restic may have left a lock; opening the repository removes
    // the locks this node's agents left (and only those).
    let (live, _) = watch::channel(0);
    let processes = Arc::new(Processes {
        journal: shared.journal.clone(),
        live,
    });
    let ns = a.meta().namespace.clone().unwrap_or_default();
    let uid = a.meta().uid.clone().unwrap_or_default();
    if holds_finalizer(a.meta())
        && let Err(error) = open_repository(shared, a.repository(), &ns, &uid, processes).await
    {
        tracing::warn!(%error, "cannot open the repository of a canceled assignment");
    }
    let outcomes: Vec<VolumeOutcome> = a
        .status()
        .and_then(|s| s.volumes.as_ref())
        .map(|vs| {
            vs.iter()
                .map(|v| VolumeOutcome {
                    phase: v.phase,
                    snapshot_id: v.snapshot_id.clone(),
                    ..VolumeOutcome::default()
                })
                .collect()
        })
        .unwrap_or_default();
    if let Err(error) = writer
        .write(
            a.volumes(),
            &outcomes,
            &[],
            &Stage::Canceled { why: why.clone() },
        )
        .await
    {
        tracing::warn!(%error, assignment = %writer.name, "cannot record the cancellation");
    }
    publish_canceled(shared, a, &why).await;
    if holds_finalizer(a.meta()) {
        apply_finalizer(&writer.api, &writer.name, false).await?;
    }
    Ok(())
}

/// One volume: resolved to its host path, then backed up or restored in place.
async fn run_volume(
    shared: &Shared,
    restic: &Restic,
    v: &AssignedVolume,
    operation: Operation,
    budget: crate::budget::AssignmentBudget,
    progress: Arc<Progress>,
) -> Result<VolumeOutcome, AgentError> {
    let cfg = &shared.cfg;
    let path = resolve(&shared.client, cfg, v).await?;
    match operation {
        Operation::Backup {
            mode,
            chosen,
            excludes,
            on_unreadable,
            restic_args,
        } => {
            // A raw block volume can only be streamed: the agent's default is for
            // filesystems, and only an assignment that names direct mode is refused for it.
            let mode = if !chosen && engine::is_block_device(&path) {
                ReadMode::Stream
            } else {
                mode
            };
            let req = BackupRequest {
                path,
                mode,
                host: Some(v.host.clone()),
                // Where the volume was mounted: a restore finds the snapshot by that path.
                tags: v.mount_path.as_deref().map(mount_tag).into_iter().collect(),
                key: Some(v.snapshot_key.clone()),
                excludes,
                paths: spec::paths(v)?,
                restic_args,
                budget,
                read_concurrency: cfg.read_concurrency,
                limit_upload_kib: cfg.limit_upload_kib,
                io_uring: cfg.io_uring,
                on_unreadable,
                progress,
                pending_dir: Some(cfg.state_dir.join("pending")),
            };
            let r = engine::backup(restic, req).await?;
            let warnings = r
                .changed_during_read
                .iter()
                .map(|f| format!("changed during the read: {f}"))
                .chain(
                    r.vanished_during_read
                        .iter()
                        .map(|f| format!("vanished during the read: {f}")),
                )
                .chain(
                    r.unreadable
                        .iter()
                        .map(|f| format!("left out, not permitted to read: {f}")),
                )
                .chain(r.mode_note.clone())
                .collect();
            Ok(VolumeOutcome {
                phase: Some(if r.unchanged {
                    VolumePhase::Unchanged
                } else {
                    VolumePhase::Succeeded
                }),
                snapshot_id: r.snapshot_id,
                bytes: r.bytes,
                files: r.files,
                warnings,
                ..VolumeOutcome::default()
            })
        }
        Operation::Restore => {
            let snapshot = match v.snapshot.as_deref() {
                Some(id) if id != "latest" => id.to_owned(),
                _ => {
                    engine::latest(restic, &v.host, &v.snapshot_key)
                        .await?
                        .ok_or_else(|| {
                            AgentError::NoSnapshot(format!(
                                "latest of {} on {}",
                                v.snapshot_key, v.host
                            ))
                        })?
                        .id
                }
            };
            let req = RestoreRequest {
                snapshot,
                target: path,
                delete: v.delete_extraneous.unwrap_or(false),
                include: v.include.clone().unwrap_or_default(),
                exclude: v.exclude.clone().unwrap_or_default(),
                owners: true,
                budget: budget.clone(),
            };
            let r = engine::restore(restic, req).await?;
            let unpaced = (r.mode == Some(ReadMode::Direct)
                && budget.limits() != Limits::default())
            .then(|| {
                "the IO budget does not apply to direct-mode snapshots: restic wrote the files \
                 unpaced"
                    .to_owned()
            });
            Ok(VolumeOutcome {
                phase: Some(VolumePhase::Succeeded),
                snapshot_id: Some(r.snapshot_id),
                bytes: r.bytes,
                files: r.files,
                warnings: unpaced.into_iter().collect(),
                ..VolumeOutcome::default()
            })
        }
    }
}

async fn open_repository(
    shared: &Shared,
    repository: &ObjectRef,
    ns: &str,
    uid: &str,
    processes: Arc<Processes>,
) -> Result<Restic, AgentError> {
    let (client, cfg, journal) = (&shared.client, &shared.cfg, &shared.journal);
    let repo_ns = repository
        .namespace
        .clone()
        .unwrap_or_else(|| ns.to_owned());
    let repos: Api<stash_api::Repository> = Api::namespaced(client.clone(), &repo_ns);
    let repo = repos
        .get(&repository.name)
        .await
        .map_err(AgentError::kube("read the Repository"))?;
    let invalid = |e: stash_rules::repository::InvalidRepository| AgentError::InvalidRepository {
        reason: format!("Repository {repo_ns}/{}: {e}", repository.name),
    };
    let secret_name = stash_rules::repository::secret_name(&repo.spec.backend).map_err(invalid)?;
    let secret = Api::<Secret>::namespaced(client.clone(), &repo_ns)
        .get(secret_name)
        .await
        .map_err(AgentError::kube("read the storage Secret"))?;
    let backend = stash_rules::repository::backend(&repo.spec.backend).map_err(invalid)?;
    stash_rules::repository::check_reachable(&backend, &cfg.local_roots).map_err(invalid)?;
    let scratch = cfg.state_dir.join("scratch").join(uid);
    std::fs::create_dir_all(&scratch).map_err(|source| AgentError::Io {
        action: "create the scratch directory",
        source,
    })?;
    let repository = Repository::new(backend, stash_rules::repository::secrets(&secret), &scratch)?;
    let restic = Restic::new(repository)
        .with_program(&cfg.restic)
        .with_cache(Cache::Dir(cfg.state_dir.join("restic-cache")))
        .with_tmp_dir(&scratch)
        .with_timeout(cfg.restic_timeout)
        .with_spawn_observer(processes);
    // The operator initialises every repository before it assigns work into it; two agents
    // initialising one repository at once would leave it unreadable, so the agent never does.
    if !restic.exists().await? {
        return Err(AgentError::InvalidRepository {
            reason: format!(
                "the repository {} is not initialised; the operator initialises it before \
                 assigning a backup, so check the Repository's status",
                restic.repository().display_name()
            ),
        });
    }
    // Only this agent's own stale locks: a lock of anyone else stays, however old it looks.
    // Not fatal: a repository that cannot be read fails the work that follows with restic's
    // own, clearer error, and the journal keeps what was not removed for the next attempt.
    match crate::locks::remove_own_stale_locks(journal, restic.repository()).await {
        Ok(removed) => {
            for lock in removed {
                tracing::info!(
                    lock = %lock.id,
                    hostname = %lock.hostname,
                    pid = lock.pid,
                    repository = %restic.repository().display_name(),
                    "removed a stale lock of this agent's restic"
                );
            }
        }
        Err(error) => {
            tracing::warn!(%error, "cannot remove this agent's stale locks; trying again before the next work on the repository");
        }
    }
    Ok(restic)
}

/// The host path of one assigned volume, checked to be the mounted volume.
async fn resolve(
    client: &kube::Client,
    cfg: &WorkerConfig,
    v: &AssignedVolume,
) -> Result<PathBuf, AgentError> {
    let pod = Api::<Pod>::namespaced(client.clone(), &v.pod_namespace)
        .get(&v.pod_name)
        .await
        .map_err(AgentError::kube("read the pod"))?;
    if pod.metadata.uid.as_deref() != Some(v.pod_uid.as_str()) {
        return Err(AgentError::invalid(
            "assignment",
            format!(
                "pod {} was replaced since the assignment was made",
                v.pod_name
            ),
        ));
    }
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &v.pod_namespace)
        .list(&ListParams::default())
        .await
        .map_err(AgentError::kube("list the claims"))?
        .items;
    let pvs = match &v.persistent_volume {
        Some(pv) => vec![
            Api::<PersistentVolume>::all(client.clone())
                .get(pv)
                .await
                .map_err(AgentError::kube("read the persistent volume"))?,
        ],
        None => vec![],
    };
    let plan = hostpath::plan_volume(&pod, &v.volume_name, &claims, &pvs)?.ok_or_else(|| {
        AgentError::invalid(
            "assignment",
            format!(
                "volume {} holds no data to back up (secret, configMap or projected)",
                v.volume_name
            ),
        )
    })?;
    // The controller resolved the kind when it planned; the pod as it is now decides the
    // path. A difference means the pod changed, and the plan no longer holds.
    if plan.kind != v.source_kind {
        return Err(AgentError::invalid(
            "assignment",
            format!(
                "volume {} of pod {} is a {:?} volume on the node, but the assignment says \
                 sourceKind {:?}",
                v.volume_name, v.pod_name, plan.kind, v.source_kind
            ),
        ));
    }
    let path = hostpath::locate(&cfg.kubelet_root, &v.pod_uid, &plan)?;
    let mountinfo = std::fs::read_to_string(&cfg.mountinfo).unwrap_or_default();
    hostpath::check_mounted(&path, &plan, &hostpath::mount_points(&mountinfo))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deletion_and_the_cancel_annotation_stop_the_work() {
        let mut meta = kube::core::ObjectMeta::default();
        assert_eq!(cancel_reason(&meta), None);
        meta.annotations = Some([(labels::CANCEL.to_owned(), "false".to_owned())].into());
        assert_eq!(cancel_reason(&meta), None);
        meta.annotations = Some([(labels::CANCEL.to_owned(), "true".to_owned())].into());
        assert!(cancel_reason(&meta).is_some_and(|w| w.contains("annotation")));
        meta.deletion_timestamp = Some(now());
        assert_eq!(
            cancel_reason(&meta).as_deref(),
            Some("the assignment was deleted")
        );
    }

    #[tokio::test]
    async fn retryable_failures_back_off_until_the_deadline() {
        let policy = RetryPolicy {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(4),
            deadline: Duration::from_secs(3600),
        };
        let locked = || {
            AgentError::Restic(restic_wrapper::Error::Locked {
                action: "back up",
                holder: None,
                message: String::new(),
            })
        };
        // A lock that goes away after a few tries: success, and the note is cleared.
        let notes = Mutex::new(Vec::new());
        let calls = std::sync::atomic::AtomicU32::new(0);
        let far = Instant::now() + policy.deadline;
        let r = retrying(
            policy,
            far,
            |n| lock(&notes).push(n),
            || {
                let n = calls.fetch_add(1, Ordering::Relaxed);
                async move { if n < 3 { Err(locked()) } else { Ok(n) } }
            },
        )
        .await;
        assert_eq!(r.ok(), Some(3));
        let notes = lock(&notes).clone();
        assert_eq!(notes.len(), 4, "{notes:?}");
        assert!(
            notes[0]
                .as_deref()
                .is_some_and(|n| n.contains("locked") && n.contains("attempt 1"))
        );
        assert!(notes[2].as_deref().is_some_and(|n| n.contains("attempt 3")));
        assert_eq!(notes[3], None);

        // A permanent failure is not tried again.
        let calls = std::sync::atomic::AtomicU32::new(0);
        let r: Result<(), _> = retrying(
            policy,
            far,
            |_| {},
            || {
                calls.fetch_add(1, Ordering::Relaxed);
                async {
                    Err(AgentError::Restic(restic_wrapper::Error::WrongPassword {
                        action: "back up",
                    }))
                }
            },
        )
        .await;
        let (e, attempts) = r.expect_err("fails");
        assert_eq!((e.category(), attempts), ("wrong-password", 1));
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        // Past the deadline, a retryable failure fails too.
        let r: Result<(), _> =
            retrying(policy, Instant::now(), |_| {}, || async { Err(locked()) }).await;
        assert_eq!(r.expect_err("deadline").1, 1);
    }
}
