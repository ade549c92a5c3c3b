//! The assignment worker: watches this node's BackupAssignments and RestoreAssignments,
//! resolves each volume to its host path, backs it up (or restores it in place) through the
//! engine under the node's IO budget, and writes the assignment's status — running, progress
//! at most every few seconds, then the snapshot IDs or a clear error. An assignment left
//! Running by an agent that died is taken up again.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use restic_wrapper::{Cache, Repository, Restic};
use serde_json::json;
use stash_api::assignment::{
    AssignedVolume, AssignmentPhase, AssignmentStatus, BackupAssignment, RestoreAssignment,
    VolumePhase,
};
use stash_api::common::ObjectRef;
use stash_api::labels;
use tokio::sync::Semaphore;

use crate::budget::{IoBudget, Limits};
use crate::engine::{self, AgentError, BackupRequest, ReadMode, RestoreRequest};
use crate::hostpath;
use crate::locks::{Identity, Journal};
use crate::stream::Progress;

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
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

fn kube_err(action: &'static str) -> impl Fn(kube::Error) -> AgentError {
    move |e| AgentError::Other {
        action,
        reason: e.to_string(),
    }
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
    fn io_budget(&self) -> Option<&stash_api::common::IoBudget>;
    /// Backup or restore, with what this assignment asks for.
    fn operation(&self, cfg: &WorkerConfig) -> Operation;
}

/// What to do with each volume.
#[derive(Clone, Debug)]
pub enum Operation {
    Backup {
        mode: ReadMode,
        excludes: Vec<String>,
        on_unreadable: engine::UnreadablePolicy,
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
    fn io_budget(&self) -> Option<&stash_api::common::IoBudget> {
        self.spec.io_budget.as_ref()
    }
    fn operation(&self, cfg: &WorkerConfig) -> Operation {
        let mode = match self.spec.read_mode {
            Some(stash_api::common::ReadMode::Direct) => ReadMode::Direct,
            Some(stash_api::common::ReadMode::Stream) => ReadMode::Stream,
            None => cfg.default_mode,
        };
        Operation::Backup {
            mode,
            excludes: self.spec.exclude.clone().unwrap_or_default(),
            on_unreadable: self.spec.on_unreadable.unwrap_or_default(),
        }
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
    fn io_budget(&self) -> Option<&stash_api::common::IoBudget> {
        self.spec.io_budget.as_ref()
    }
    fn operation(&self, _: &WorkerConfig) -> Operation {
        Operation::Restore
    }
}

/// Whether this agent should work on an assignment: it is for this node and not finished.
/// Only one agent runs per node, so a Running assignment of another agent pod on this node
/// was left by a predecessor that died; it is taken up again.
pub fn should_take<K: Assignment>(a: &K, node: &str) -> bool {
    let phase = a.status().and_then(|s| s.phase);
    a.node() == node && !phase.is_some_and(AssignmentPhase::is_final)
}

/// Runs until the watches end or `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    cfg: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let volumes = Arc::new(Semaphore::new(cfg.max_volumes.max(1)));
    // A new instance on every start: what earlier ones left in the journal is theirs.
    let journal = Arc::new(Journal::new(&cfg.state_dir, Identity::new_instance()));
    tracing::info!(
        node = %cfg.node_name,
        hostname = %journal.identity().hostname,
        instance = %journal.identity().instance,
        "watching assignments"
    );
    tokio::select! {
        () = shutdown => Ok(()),
        () = watch::<BackupAssignment>(&client, &cfg, &journal, &in_flight, &volumes) => Ok(()),
        () = watch::<RestoreAssignment>(&client, &cfg, &journal, &in_flight, &volumes) => Ok(()),
    }
}

async fn watch<K: Assignment>(
    client: &kube::Client,
    cfg: &WorkerConfig,
    journal: &Arc<Journal>,
    in_flight: &Arc<Mutex<HashSet<String>>>,
    volumes: &Arc<Semaphore>,
) {
    let api: Api<K> = Api::all(client.clone());
    let selector = format!("{}={}", labels::NODE, cfg.node_name);
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
        let objects = match event {
            Ok(watcher::Event::Apply(a) | watcher::Event::InitApply(a)) => vec![a],
            Ok(_) => vec![],
            // The watcher retries on its own; a malformed object must not stop the agent.
            Err(e) => {
                tracing::warn!(error = %e, kind = K::WHAT, "assignment watch error");
                tokio::time::sleep(Duration::from_secs(1)).await;
                vec![]
            }
        };
        for a in objects {
            let uid = a.meta().uid.clone().unwrap_or_default();
            if !should_take(&a, &cfg.node_name) || !lock(in_flight).insert(uid.clone()) {
                continue;
            }
            let (client, cfg, journal, in_flight, volumes) = (
                client.clone(),
                cfg.clone(),
                journal.clone(),
                in_flight.clone(),
                volumes.clone(),
            );
            tasks.spawn(async move {
                let name = a.meta().name.clone().unwrap_or_default();
                if let Err(e) = process(&client, &cfg, &journal, a, volumes).await {
                    tracing::error!(assignment = %name, kind = K::WHAT, error = %e, "assignment failed");
                }
                lock(&in_flight).remove(&uid);
            });
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One volume's outcome, as written to status.
#[derive(Clone, Debug, Default)]
struct VolumeOutcome {
    phase: Option<VolumePhase>,
    snapshot_id: Option<String>,
    bytes: u64,
    files: u64,
    warnings: Vec<String>,
    error: Option<String>,
    started: Option<std::time::Instant>,
}

/// Seconds left at the rate so far, once there is a rate to go by.
fn eta_seconds(done: u64, total: u64, elapsed: Duration) -> Option<u64> {
    let rate = done as f64 / elapsed.as_secs_f64();
    (done > 0 && total >= done && rate > 0.0).then(|| ((total - done) as f64 / rate).ceil() as u64)
}

fn volume_status(v: &AssignedVolume, o: &VolumeOutcome, p: &Progress) -> serde_json::Value {
    let done = o
        .phase
        .is_some_and(|ph| ph != VolumePhase::Running && ph != VolumePhase::Pending);
    let (bytes, files) = if done {
        (o.bytes, o.files)
    } else {
        (
            p.bytes.load(Ordering::Relaxed),
            p.files.load(Ordering::Relaxed),
        )
    };
    let bytes_total = p.bytes_total.load(Ordering::Relaxed);
    let files_total = p.files_total.load(Ordering::Relaxed);
    let eta = match (done, o.started) {
        (false, Some(start)) => eta_seconds(bytes, bytes_total, start.elapsed()),
        _ => None,
    };
    json!({
        "podName": v.pod_name,
        "volumeName": v.volume_name,
        "phase": o.phase.unwrap_or(VolumePhase::Pending),
        "bytesDone": bytes,
        "filesDone": files,
        "bytesTotal": (bytes_total > 0).then_some(bytes_total),
        "filesTotal": (files_total > 0).then_some(files_total),
        "etaSeconds": eta,
        "snapshotId": o.snapshot_id,
        "warnings": if o.warnings.is_empty() { None } else { Some(&o.warnings) },
        "error": o.error,
    })
}

async fn patch_status<K: Assignment>(
    api: &Api<K>,
    name: &str,
    status: serde_json::Value,
) -> Result<(), AgentError> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .map(drop)
    .map_err(kube_err("write the assignment status"))
}

async fn process<K: Assignment>(
    client: &kube::Client,
    cfg: &WorkerConfig,
    journal: &Arc<Journal>,
    a: K,
    volumes: Arc<Semaphore>,
) -> Result<(), AgentError> {
    let ns = a.meta().namespace.clone().unwrap_or_default();
    let name = a.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let started = a
        .status()
        .and_then(|s| s.start_time.clone())
        .unwrap_or_else(now);
    patch_status(
        &api,
        &name,
        json!({
            "phase": AssignmentPhase::Running,
            "agent": cfg.pod_name,
            "startTime": started,
            "lastHeartbeatTime": now(),
            "observedGeneration": a.meta().generation,
        }),
    )
    .await?;

    let uid = a.meta().uid.clone().unwrap_or_default();
    let restic = match open_repository(client, cfg, journal, a.repository(), &ns, &uid).await {
        Ok(r) => r,
        Err(e) => {
            patch_status(
                &api,
                &name,
                json!({
                    "phase": AssignmentPhase::Failed,
                    "completionTime": now(),
                    "error": e.to_string(),
                }),
            )
            .await?;
            return Err(e);
        }
    };
    let operation = a.operation(cfg);
    let own = Limits {
        bytes_per_second: a
            .io_budget()
            .and_then(|b| b.bytes_per_second.as_ref())
            .and_then(|q| crate::cli::parse_bytes(&q.0).ok()),
        iops: a
            .io_budget()
            .and_then(|b| b.iops)
            .and_then(|n| u64::try_from(n).ok()),
    };
    let budget = cfg.budget.for_assignment(own);
    let specs = a.volumes();
    let progress: Vec<Arc<Progress>> = specs.iter().map(|_| Arc::default()).collect();
    let outcomes: Arc<Mutex<Vec<VolumeOutcome>>> =
        Arc::new(Mutex::new(vec![VolumeOutcome::default(); specs.len()]));

    let work = futures::future::join_all(specs.iter().enumerate().map(|(i, v)| {
        let (restic, budget, progress, outcomes, volumes, operation) = (
            &restic,
            budget.clone(),
            progress[i].clone(),
            outcomes.clone(),
            volumes.clone(),
            operation.clone(),
        );
        async move {
            let metrics = &cfg.metrics;
            metrics.queue_depth.inc();
            let _permit = volumes.acquire().await;
            metrics.queue_depth.dec();
            metrics.volumes_in_progress.inc();
            {
                let mut o = lock(&outcomes);
                o[i].phase = Some(VolumePhase::Running);
                o[i].started = Some(std::time::Instant::now());
            }
            let what = match operation {
                Operation::Backup { .. } => "backup",
                Operation::Restore => "restore",
            };
            let result =
                run_volume(client, cfg, restic, v, operation, budget, progress.clone()).await;
            metrics.volumes_in_progress.dec();
            metrics
                .read_bytes
                .inc_by(progress.bytes.load(Ordering::Relaxed));
            metrics
                .throttle_seconds
                .inc_by(progress.throttled_nanos.load(Ordering::Relaxed) as f64 / 1e9);
            let result_label = if result.is_ok() {
                "succeeded"
            } else {
                "failed"
            };
            metrics
                .volumes
                .get_or_create(&crate::metrics::VolumeLabels {
                    operation: what,
                    result: result_label,
                })
                .inc();
            if let Err(e) = &result {
                metrics
                    .failures
                    .get_or_create(&crate::metrics::FailureLabels {
                        category: e.category(),
                    })
                    .inc();
            }
            lock(&outcomes)[i] = match result {
                Ok(outcome) => outcome,
                Err(e) => VolumeOutcome {
                    phase: Some(VolumePhase::Failed),
                    error: Some(e.to_string()),
                    ..VolumeOutcome::default()
                },
            };
        }
    }));
    let mut work = std::pin::pin!(work);
    let statuses = |outcomes: &[VolumeOutcome]| -> Vec<serde_json::Value> {
        specs
            .iter()
            .zip(outcomes)
            .zip(&progress)
            .map(|((v, o), p)| volume_status(v, o, p))
            .collect()
    };
    // Progress while the volumes run; a heartbeat too, so a dead agent is noticed.
    loop {
        tokio::select! {
            _ = &mut work => break,
            () = tokio::time::sleep(cfg.progress_every) => {
                let vols = statuses(&lock(&outcomes));
                let _ = patch_status(&api, &name, json!({"lastHeartbeatTime": now(), "volumes": vols})).await;
            }
        }
    }
    let outcomes = lock(&outcomes).clone();
    let failed: Vec<String> = specs
        .iter()
        .zip(&outcomes)
        .filter_map(|(v, o)| {
            o.error
                .as_ref()
                .map(|e| format!("{}/{}: {e}", v.pod_name, v.volume_name))
        })
        .collect();
    patch_status(&api, &name, json!({
        "phase": if failed.is_empty() { AssignmentPhase::Succeeded } else { AssignmentPhase::Failed },
        "completionTime": now(),
        "lastHeartbeatTime": now(),
        "volumes": statuses(&outcomes),
        "error": if failed.is_empty() { None } else { Some(failed.join("; ")) },
    }))
    .await
}

/// One volume: resolved to its host path, then backed up or restored in place.
async fn run_volume(
    client: &kube::Client,
    cfg: &WorkerConfig,
    restic: &Restic,
    v: &AssignedVolume,
    operation: Operation,
    budget: crate::budget::AssignmentBudget,
    progress: Arc<Progress>,
) -> Result<VolumeOutcome, AgentError> {
    let path = resolve(client, cfg, v).await?;
    match operation {
        Operation::Backup {
            mode,
            excludes,
            on_unreadable,
        } => {
            let req = BackupRequest {
                path,
                mode,
                host: Some(v.host.clone()),
                tags: vec![],
                key: Some(v.snapshot_key.clone()),
                excludes,
                paths: vec![],
                budget,
                read_concurrency: cfg.read_concurrency,
                limit_upload_kib: cfg.limit_upload_kib,
                io_uring: cfg.io_uring,
                on_unreadable,
                progress,
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
            if v.exclude.as_ref().is_some_and(|e| !e.is_empty()) {
                return Err(AgentError::Other {
                    action: "restore the volume",
                    reason:
                        "exclude patterns are not supported for in-place restores yet; use include"
                            .into(),
                });
            }
            let snapshot = match v.snapshot.as_deref() {
                Some(id) if id != "latest" => id.to_owned(),
                _ => {
                    engine::latest(restic, &v.host, &v.snapshot_key)
                        .await
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
                owners: true,
            };
            let r = engine::restore(restic, req).await?;
            Ok(VolumeOutcome {
                phase: Some(VolumePhase::Succeeded),
                snapshot_id: Some(r.snapshot_id),
                bytes: r.bytes,
                files: r.files,
                ..VolumeOutcome::default()
            })
        }
    }
}

async fn open_repository(
    client: &kube::Client,
    cfg: &WorkerConfig,
    journal: &Arc<Journal>,
    repository: &ObjectRef,
    ns: &str,
    uid: &str,
) -> Result<Restic, AgentError> {
    let repo_ns = repository
        .namespace
        .clone()
        .unwrap_or_else(|| ns.to_owned());
    let repos: Api<stash_api::Repository> = Api::namespaced(client.clone(), &repo_ns);
    let repo = repos
        .get(&repository.name)
        .await
        .map_err(kube_err("read the Repository"))?;
    let secret_name = repo
        .spec
        .backend
        .storage_secret_name
        .clone()
        .ok_or_else(|| AgentError::Other {
            action: "use the repository",
            reason: "the repository names no storageSecretName".into(),
        })?;
    let secret = Api::<Secret>::namespaced(client.clone(), &repo_ns)
        .get(&secret_name)
        .await
        .map_err(kube_err("read the storage Secret"))?;
    let backend = crate::repository::backend(&repo.spec.backend)?;
    let scratch = cfg.state_dir.join("scratch").join(uid);
    std::fs::create_dir_all(&scratch).map_err(|e| AgentError::Other {
        action: "create the scratch directory",
        reason: e.to_string(),
    })?;
    let repository = Repository::new(backend, crate::repository::secrets(&secret), &scratch)?;
    let restic = Restic::new(repository)
        .with_program(&cfg.restic)
        .with_cache(Cache::Dir(cfg.state_dir.join("restic-cache")))
        .with_tmp_dir(&scratch)
        .with_spawn_observer(journal.clone());
    restic.ensure_initialized().await?;
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
        .map_err(kube_err("read the pod"))?;
    if pod.metadata.uid.as_deref() != Some(v.pod_uid.as_str()) {
        return Err(AgentError::Other {
            action: "resolve the volume",
            reason: format!(
                "pod {} was replaced since the assignment was made",
                v.pod_name
            ),
        });
    }
    let claims = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &v.pod_namespace)
        .list(&ListParams::default())
        .await
        .map_err(kube_err("list the claims"))?
        .items;
    let pvs = match &v.persistent_volume {
        Some(pv) => vec![
            Api::<PersistentVolume>::all(client.clone())
                .get(pv)
                .await
                .map_err(kube_err("read the persistent volume"))?,
        ],
        None => vec![],
    };
    let resolve_err = |e: hostpath::ResolveError| AgentError::Other {
        action: "resolve the volume",
        reason: e.to_string(),
    };
    let plan = hostpath::plan_volume(&pod, &v.volume_name, &claims, &pvs)
        .map_err(resolve_err)?
        .ok_or_else(|| AgentError::Other {
            action: "resolve the volume",
            reason: format!(
                "volume {} holds no data to back up (secret, configMap or projected)",
                v.volume_name
            ),
        })?;
    let path = hostpath::locate(&cfg.kubelet_root, &v.pod_uid, &plan).map_err(resolve_err)?;
    let mountinfo = std::fs::read_to_string(&cfg.mountinfo).unwrap_or_default();
    hostpath::check_mounted(&path, &plan, &hostpath::mount_points(&mountinfo))
        .map_err(resolve_err)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eta_follows_the_rate_so_far() {
        assert_eq!(eta_seconds(50, 100, Duration::from_secs(10)), Some(10));
        assert_eq!(eta_seconds(0, 100, Duration::from_secs(10)), None);
        assert_eq!(eta_seconds(100, 100, Duration::from_secs(10)), Some(0));
    }
}
