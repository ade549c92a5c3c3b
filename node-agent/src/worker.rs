//! The assignment worker: watches the BackupAssignments of this node, resolves each volume to
//! its host path, backs it up through the engine under the node's IO budget, and writes the
//! assignment's status — accepted, progress at most every few seconds, then the snapshot IDs
//! or a clear error. An assignment left Running by an agent that died is taken up again.

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
use stash_api::assignment::{AssignedVolume, AssignmentPhase, BackupAssignment, VolumePhase};
use stash_api::labels;
use tokio::sync::Semaphore;

use crate::budget::{IoBudget, Limits};
use crate::engine::{self, AgentError, BackupRequest, ReadMode};
use crate::hostpath;
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

/// Whether this agent should work on an assignment: it is for this node and not finished.
/// Only one agent runs per node, so a Running assignment of another agent pod on this node
/// was left by a predecessor that died; it is taken up again.
pub fn should_take(a: &BackupAssignment, node: &str) -> bool {
    let phase = a.status.as_ref().and_then(|s| s.phase);
    a.spec.node_name == node && !phase.is_some_and(AssignmentPhase::is_final)
}

/// Runs until the watch ends or `shutdown` resolves.
pub async fn run(
    client: kube::Client,
    cfg: WorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let api: Api<BackupAssignment> = Api::all(client.clone());
    let selector = format!("{}={}", labels::NODE, cfg.node_name);
    let stream = watcher(api, watcher::Config::default().labels(&selector));
    let mut stream = std::pin::pin!(stream);
    let mut shutdown = std::pin::pin!(shutdown);
    let in_flight: Arc<Mutex<HashSet<String>>> = Arc::default();
    let volumes = Arc::new(Semaphore::new(cfg.max_volumes.max(1)));
    tracing::info!(node = %cfg.node_name, "watching backup assignments");
    loop {
        let event = tokio::select! {
            () = &mut shutdown => return Ok(()),
            e = stream.next() => e,
        };
        let Some(event) = event else { return Ok(()) };
        let objects = match event {
            Ok(watcher::Event::Apply(a) | watcher::Event::InitApply(a)) => vec![a],
            Ok(_) => vec![],
            // The watcher retries on its own; a malformed object must not stop the agent.
            Err(e) => {
                tracing::warn!(error = %e, "assignment watch error");
                tokio::time::sleep(Duration::from_secs(1)).await;
                vec![]
            }
        };
        for a in objects {
            let uid = a.metadata.uid.clone().unwrap_or_default();
            if !should_take(&a, &cfg.node_name) || !lock(&in_flight).insert(uid.clone()) {
                continue;
            }
            let (client, cfg, in_flight, volumes) = (
                client.clone(),
                cfg.clone(),
                in_flight.clone(),
                volumes.clone(),
            );
            tokio::spawn(async move {
                let name = a.metadata.name.clone().unwrap_or_default();
                if let Err(e) = process(&client, &cfg, a, volumes).await {
                    tracing::error!(assignment = %name, error = %e, "backup assignment failed");
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

async fn patch_status(
    api: &Api<BackupAssignment>,
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

async fn process(
    client: &kube::Client,
    cfg: &WorkerConfig,
    a: BackupAssignment,
    volumes: Arc<Semaphore>,
) -> Result<(), AgentError> {
    let ns = a.metadata.namespace.clone().unwrap_or_default();
    let name = a.metadata.name.clone().unwrap_or_default();
    let api: Api<BackupAssignment> = Api::namespaced(client.clone(), &ns);
    let started = a
        .status
        .as_ref()
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
            "observedGeneration": a.metadata.generation,
        }),
    )
    .await?;

    let restic = match open_repository(client, cfg, &a, &ns).await {
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
    let mode = match a.spec.read_mode {
        Some(stash_api::common::ReadMode::Direct) => ReadMode::Direct,
        Some(stash_api::common::ReadMode::Stream) => ReadMode::Stream,
        None => cfg.default_mode,
    };
    let own = Limits {
        bytes_per_second: a
            .spec
            .io_budget
            .as_ref()
            .and_then(|b| b.bytes_per_second.as_ref())
            .and_then(|q| crate::cli::parse_bytes(&q.0).ok()),
        iops: a
            .spec
            .io_budget
            .as_ref()
            .and_then(|b| b.iops)
            .and_then(|n| u64::try_from(n).ok()),
    };
    let budget = cfg.budget.for_assignment(own);
    let progress: Vec<Arc<Progress>> = a.spec.volumes.iter().map(|_| Arc::default()).collect();
    let outcomes: Arc<Mutex<Vec<VolumeOutcome>>> = Arc::new(Mutex::new(vec![
        VolumeOutcome::default(
        );
        a.spec.volumes.len()
    ]));

    let work = futures::future::join_all(a.spec.volumes.iter().enumerate().map(|(i, v)| {
        let (restic, budget, progress, outcomes, volumes) = (
            &restic,
            budget.clone(),
            progress[i].clone(),
            outcomes.clone(),
            volumes.clone(),
        );
        let (excludes, cfg) = (a.spec.exclude.clone().unwrap_or_default(), cfg);
        async move {
            let _permit = volumes.acquire().await;
            {
                let mut o = lock(&outcomes);
                o[i].phase = Some(VolumePhase::Running);
                o[i].started = Some(std::time::Instant::now());
            }
            let result = async {
                let path = resolve(client, cfg, v).await?;
                let req = BackupRequest {
                    path,
                    mode,
                    host: Some(v.host.clone()),
                    tags: vec![],
                    key: Some(v.snapshot_key.clone()),
                    excludes,
                    budget,
                    read_concurrency: None,
                    limit_upload_kib: None,
                    io_uring: cfg.io_uring,
                    progress,
                };
                engine::backup(restic, req).await
            }
            .await;
            let mut o = lock(&outcomes);
            o[i] = match result {
                Ok(r) => VolumeOutcome {
                    phase: Some(if r.unchanged {
                        VolumePhase::Unchanged
                    } else {
                        VolumePhase::Succeeded
                    }),
                    snapshot_id: r.snapshot_id,
                    bytes: r.bytes,
                    files: r.files,
                    warnings: r
                        .changed_during_read
                        .iter()
                        .map(|f| format!("changed during the read: {f}"))
                        .chain(
                            r.vanished_during_read
                                .iter()
                                .map(|f| format!("vanished during the read: {f}")),
                        )
                        .collect(),
                    error: None,
                    started: None,
                },
                Err(e) => VolumeOutcome {
                    phase: Some(VolumePhase::Failed),
                    error: Some(e.to_string()),
                    ..VolumeOutcome::default()
                },
            };
        }
    }));
    let mut work = std::pin::pin!(work);
    // Progress while the volumes run; a heartbeat too, so a dead agent is noticed.
    loop {
        tokio::select! {
            _ = &mut work => break,
            () = tokio::time::sleep(cfg.progress_every) => {
                let vols: Vec<_> = {
                    let o = lock(&outcomes);
                    a.spec.volumes.iter().zip(o.iter()).zip(&progress).map(|((v, o), p)| volume_status(v, o, p)).collect()
                };
                let _ = patch_status(&api, &name, json!({"lastHeartbeatTime": now(), "volumes": vols})).await;
            }
        }
    }
    let outcomes = lock(&outcomes).clone();
    let failed: Vec<String> = a
        .spec
        .volumes
        .iter()
        .zip(&outcomes)
        .filter_map(|(v, o)| {
            o.error
                .as_ref()
                .map(|e| format!("{}/{}: {e}", v.pod_name, v.volume_name))
        })
        .collect();
    let vols: Vec<_> = a
        .spec
        .volumes
        .iter()
        .zip(&outcomes)
        .zip(&progress)
        .map(|((v, o), p)| volume_status(v, o, p))
        .collect();
    patch_status(&api, &name, json!({
        "phase": if failed.is_empty() { AssignmentPhase::Succeeded } else { AssignmentPhase::Failed },
        "completionTime": now(),
        "lastHeartbeatTime": now(),
        "volumes": vols,
        "error": if failed.is_empty() { None } else { Some(failed.join("; ")) },
    }))
    .await
}

async fn open_repository(
    client: &kube::Client,
    cfg: &WorkerConfig,
    a: &BackupAssignment,
    ns: &str,
) -> Result<Restic, AgentError> {
    let repo_ns = a
        .spec
        .repository
        .namespace
        .clone()
        .unwrap_or_else(|| ns.to_owned());
    let repos: Api<stash_api::Repository> = Api::namespaced(client.clone(), &repo_ns);
    let repo = repos
        .get(&a.spec.repository.name)
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
    let scratch = cfg
        .state_dir
        .join("scratch")
        .join(a.metadata.uid.as_deref().unwrap_or("unknown"));
    std::fs::create_dir_all(&scratch).map_err(|e| AgentError::Other {
        action: "create the scratch directory",
        reason: e.to_string(),
    })?;
    let repository = Repository::new(backend, crate::repository::secrets(&secret), &scratch)?;
    let restic = Restic::new(repository)
        .with_program(&cfg.restic)
        .with_cache(Cache::Dir(cfg.state_dir.join("restic-cache")))
        .with_tmp_dir(&scratch);
    restic.ensure_initialized().await?;
    // Only locks of processes that are gone: a live backup elsewhere keeps its lock.
    restic.unlock().await?;
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
