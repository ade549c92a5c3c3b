//! The assignment worker against kube-sim: assignments for this node are taken, the pod's
//! volume is found in a kubelet-like tree and backed up with the real restic, status reports
//! the snapshot; other nodes' assignments are left alone; a volume that cannot be resolved
//! fails its assignment with a reason; an assignment a dead agent left Running is finished,
//! and the stale lock of the restic killed with that agent is removed by its replacement.

#[path = "common/kill.rs"]
mod kill;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::json;
use stash_api::assignment::RestoreAssignment;
use stash_api::assignment::{AssignmentPhase, BackupAssignment, VolumePhase};
use stash_node_agent::budget::{IoBudget, Limits};
use stash_node_agent::engine::ReadMode;
use stash_node_agent::locks::{Identity, JOURNAL_FILE, Journal, process_alive};
use stash_node_agent::worker::{Assignment, RetryPolicy, WorkerConfig, run};

type Result<T = ()> = anyhow::Result<T>;

fn restic_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/restic");
    assert!(p.exists(), "restic is not installed: run `make setup`");
    p
}

/// Stock restic on the test repository, to check what the agent wrote.
fn stock_restic(repo: &Path, password: &str, args: &[&str]) -> Result<std::process::Output> {
    Ok(std::process::Command::new(restic_bin())
        .args(args)
        .arg("--no-cache")
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", password)
        .output()?)
}

async fn create<K>(api: &Api<K>, value: serde_json::Value) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    Ok(api
        .create(&PostParams::default(), &serde_json::from_value(value)?)
        .await?)
}

async fn install_crds(client: &kube::Client) -> Result {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in stash_api::crds() {
        crds.create(&PostParams::default(), &crd).await?;
    }
    // The resources are served once the API server has established them.
    for crd in stash_api::crds() {
        let name = crd.metadata.name.unwrap_or_default();
        for _ in 0..100 {
            let c = crds.get(&name).await?;
            let established = c
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn assignment(name: &str, node: &str, pod: &str, uid: &str) -> serde_json::Value {
    json!({
        "apiVersion": "stash.appscode.com/v1beta1",
        "kind": "BackupAssignment",
        "metadata": {"name": name, "namespace": "demo", "labels": {"stash.appscode.com/node": node}},
        "spec": {
            "backupSession": "app-backup-1",
            "nodeName": node,
            "repository": {"name": "local-repo"},
            "volumes": [{
                "podNamespace": "demo", "podName": pod, "podUid": uid, "volumeName": "data",
                "sourceKind": "EmptyDir", "host": "host-0", "snapshotKey": "demo/app/data"
            }]
        }
    })
}

async fn wait_final<K: Assignment>(api: &Api<K>, name: &str) -> Result<K> {
    // A deadline so a broken worker fails the test instead of hanging it; not a performance
    // threshold.
    for _ in 0..600 {
        let a = api.get(name).await?;
        if a.status()
            .and_then(|s| s.phase)
            .is_some_and(AssignmentPhase::is_final)
        {
            return Ok(a);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("assignment {name} did not finish")
}

/// A kube-sim with the CRDs, namespace `demo`, a local Repository on a host path with its
/// Secret, and pod `app-0` on node-a whose emptyDir `data` exists in a kubelet-like tree.
struct Cluster {
    sim: kube_sim::KubeSim,
    client: kube::Client,
    dir: tempfile::TempDir,
    repo_path: PathBuf,
    kubelet: PathBuf,
    uid: String,
    volume: PathBuf,
}

impl Cluster {
    /// The cluster with its repository initialised, as the operator leaves it before it
    /// assigns any work (the agent never initialises one).
    async fn start(password: &str) -> Result<Cluster> {
        let c = Self::start_uninitialised(password).await?;
        init_repository(&c.repo_path, password)?;
        Ok(c)
    }

    async fn start_uninitialised(password: &str) -> Result<Cluster> {
        let sim = kube_sim::KubeSim::start(kube_sim::Options::default()).await?;
        let client = sim.client().await?;
        install_crds(&client).await?;
        let dir = tempfile::tempdir()?;
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({"metadata": {"name": "demo"}}),
        )
        .await?;
        create(
            &Api::<Secret>::namespaced(client.clone(), "demo"),
            json!({"metadata": {"name": "repo-secret"}, "stringData": {"RESTIC_PASSWORD": password}}),
        )
        .await?;
        let repo_path = dir.path().join("repository");
        create(
            &Api::<stash_api::Repository>::namespaced(client.clone(), "demo"),
            json!({
                "apiVersion": "stash.appscode.com/v1alpha1", "kind": "Repository",
                "metadata": {"name": "local-repo"},
                "spec": {"backend": {"storageSecretName": "repo-secret",
                    "local": {"hostPath": {"path": repo_path}, "mountPath": "/repo"}}}
            }),
        )
        .await?;
        let pod = create(
            &Api::<Pod>::namespaced(client.clone(), "demo"),
            json!({
                "metadata": {"name": "app-0"},
                "spec": {"nodeName": "node-a", "containers": [{"name": "app", "image": "busybox"}],
                    "volumes": [{"name": "data", "emptyDir": {}}]}
            }),
        )
        .await?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let kubelet = dir.path().join("kubelet");
        let volume = kubelet
            .join("pods")
            .join(&uid)
            .join("volumes/kubernetes.io~empty-dir/data");
        std::fs::create_dir_all(&volume)?;
        std::fs::write(dir.path().join("mountinfo"), "")?;
        Ok(Cluster {
            sim,
            client,
            dir,
            repo_path,
            kubelet,
            uid,
            volume,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_backs_up_assigned_volumes_and_reports_status() -> Result {
    let Cluster {
        sim,
        client,
        dir,
        repo_path,
        kubelet,
        uid,
        volume,
    } = Cluster::start("worker test").await?;
    std::fs::create_dir_all(volume.join("db"))?;
    std::fs::write(volume.join("db/table"), vec![7u8; 300_000])?;

    let assignments: Api<BackupAssignment> = Api::namespaced(client.clone(), "demo");
    create(
        &assignments,
        assignment("app-backup-1-node-a", "node-a", "app-0", &uid),
    )
    .await?;
    create(
        &assignments,
        assignment("app-backup-1-node-b", "node-b", "app-0", &uid),
    )
    .await?;
    create(
        &assignments,
        assignment("replaced-pod", "node-a", "app-0", "an-old-uid"),
    )
    .await?;
    // Left Running by an agent pod that died.
    let orphan = create(&assignments, assignment("orphan", "node-a", "app-0", &uid)).await?;
    assignments
        .patch_status(
            orphan.metadata.name.as_deref().unwrap_or_default(),
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"phase": "Running", "agent": "stash-node-agent-dead"}}),
            ),
        )
        .await?;

    // A journal of restic processes left corrupt (a disk error, a hand edit): the agent works
    // on, and writes a sound one.
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state)?;
    std::fs::write(
        state.join(JOURNAL_FILE),
        b"{\"version\": 1, \"entries\": [{\"pid",
    )?;

    let metrics = std::sync::Arc::new(stash_node_agent::metrics::Metrics::default());
    let cfg = WorkerConfig {
        node_name: "node-a".into(),
        pod_name: "stash-node-agent-x1".into(),
        kubelet_root: kubelet.clone(),
        state_dir: dir.path().join("state"),
        restic: restic_bin(),
        budget: IoBudget::new(Limits::default()),
        max_volumes: 2,
        default_mode: ReadMode::Stream,
        io_uring: true,
        mountinfo: dir.path().join("mountinfo"),
        progress_every: Duration::from_millis(500),
        metrics: metrics.clone(),
        limit_upload_kib: None,
        read_concurrency: None,
        retry: RetryPolicy::default(),
        restic_timeout: Duration::from_secs(600),
        // The repository's directory stands for the chart's local repository root.
        local_roots: vec![dir.path().join("repository")],
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(run(client.clone(), cfg, async move {
        let _ = stopped.await;
    }));

    let done = wait_final(&assignments, "app-backup-1-node-a").await?;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(status.phase, Some(AssignmentPhase::Succeeded), "{status:?}");
    assert_eq!(status.agent.as_deref(), Some("stash-node-agent-x1"));
    let vol = &status.volumes.clone().unwrap_or_default()[0];
    assert_eq!(vol.phase, Some(VolumePhase::Succeeded), "{vol:?}");
    assert_eq!(vol.bytes_done, Some(300_000));
    assert_eq!((vol.bytes_total, vol.files_total), (Some(300_000), Some(1)));
    let snapshot = vol.snapshot_id.clone().expect("a snapshot id");
    assert!(status.start_time.is_some() && status.completion_time.is_some());
    assert_eq!(status.observed_generation, done.metadata.generation);
    for type_ in ["Accepted", "Completed"] {
        let c = condition(&status, type_).expect(type_);
        assert!(c.is_true(), "{c:?}");
        assert_eq!(c.observed_generation, done.metadata.generation);
    }
    assert_eq!(
        condition(&status, "Completed").and_then(|c| c.reason.as_deref()),
        Some("Succeeded")
    );
    assert!(
        done.metadata.finalizers.as_ref().is_none_or(Vec::is_empty),
        "let go of once done"
    );
    // One field manager owns the status.
    let managers: Vec<_> = done
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(
        managers,
        vec!["stash-node-agent".to_owned()],
        "{managers:?}"
    );

    let replaced = wait_final(&assignments, "replaced-pod").await?;
    let rs = replaced.status.unwrap_or_default();
    assert_eq!(rs.phase, Some(AssignmentPhase::Failed));
    assert!(
        rs.error.unwrap_or_default().contains("was replaced"),
        "a reason is given"
    );

    let orphan = wait_final(&assignments, "orphan").await?;
    let os = orphan.status.unwrap_or_default();
    assert_eq!(
        os.phase,
        Some(AssignmentPhase::Succeeded),
        "taken up again: {os:?}"
    );
    assert_eq!(os.agent.as_deref(), Some("stash-node-agent-x1"));
    let ov = &os.volumes.unwrap_or_default()[0];
    let orphan_snapshot = ov.snapshot_id.clone().expect("a snapshot id");

    // Another node's assignment is not touched.
    let other = assignments.get("app-backup-1-node-b").await?;
    assert!(other.status.is_none(), "{:?}", other.status);

    // The snapshot is in the repository, as stock restic sees it.
    let out = stock_restic(&repo_path, "worker test", &["snapshots", "--json"])?;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains(&snapshot) && listed.contains(&orphan_snapshot));

    // The pod keeps running and breaks its data; a RestoreAssignment puts the latest snapshot
    // back in place, removing what the snapshot does not have.
    std::fs::write(volume.join("db/table"), b"corrupted")?;
    std::fs::write(volume.join("stray"), b"not in the snapshot")?;
    let restores: Api<RestoreAssignment> = Api::namespaced(client.clone(), "demo");
    create(
        &restores,
        json!({
            "apiVersion": "stash.appscode.com/v1beta1",
            "kind": "RestoreAssignment",
            "metadata": {"name": "app-restore-1-node-a", "namespace": "demo",
                "labels": {"stash.appscode.com/node": "node-a"}},
            "spec": {
                "restoreSession": "app-restore-1",
                "nodeName": "node-a",
                "repository": {"name": "local-repo"},
                "volumes": [{
                    "podNamespace": "demo", "podName": "app-0", "podUid": uid, "volumeName": "data",
                    "sourceKind": "EmptyDir", "host": "host-0", "snapshotKey": "demo/app/data",
                    "snapshot": "latest", "deleteExtraneous": true
                }]
            }
        }),
    )
    .await?;
    let restored = wait_final(&restores, "app-restore-1-node-a").await?;
    let rs = restored.status.unwrap_or_default();
    assert_eq!(rs.phase, Some(AssignmentPhase::Succeeded), "{rs:?}");
    assert_eq!(std::fs::read(volume.join("db/table"))?, vec![7u8; 300_000]);
    assert!(!volume.join("stray").exists());

    // Every volume was counted, by operation and result, and the failure by its category.
    let text = metrics.encode();
    assert!(
        text.contains(r#"stash_agent_volumes_total{operation="backup",result="succeeded"} 2"#),
        "{text}"
    );
    assert!(
        text.contains(r#"stash_agent_volumes_total{operation="restore",result="succeeded"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"stash_agent_failures_total{category="invalid-spec"} 1"#),
        "{text}"
    );
    assert!(text.contains("stash_agent_volumes_in_progress 0"), "{text}");

    let _ = stop.send(());
    worker.await??;
    let journal: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join(JOURNAL_FILE))?)?;
    assert_eq!(journal["entries"], json!([]), "every restic ended normally");
    sim.shutdown();
    Ok(())
}

/// The repository's lock ids, as stock restic lists them.
fn locks(repo: &Path, password: &str) -> Result<Vec<String>> {
    let out = stock_restic(repo, password, &["list", "locks", "--no-lock"])?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

fn kill(signal: &str, pid: u32) -> Result {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_backup_is_replaced_and_the_work_finishes() -> Result {
    let Cluster {
        sim,
        client,
        dir,
        repo_path,
        kubelet,
        uid,
        volume,
    } = Cluster::start("restart test").await?;
    std::fs::write(volume.join("big"), vec![3u8; 16 << 20])?;
    let assignments: Api<BackupAssignment> = Api::namespaced(client.clone(), "demo");
    create(&assignments, assignment("slow", "node-a", "app-0", &uid)).await?;

    let config = |pod: &str, budget: Option<u64>| WorkerConfig {
        node_name: "node-a".into(),
        pod_name: pod.into(),
        kubelet_root: kubelet.clone(),
        state_dir: dir.path().join("state"),
        restic: restic_bin(),
        budget: IoBudget::new(Limits {
            bytes_per_second: budget,
            iops: None,
        }),
        max_volumes: 1,
        default_mode: ReadMode::Stream,
        io_uring: true,
        mountinfo: dir.path().join("mountinfo"),
        progress_every: Duration::from_millis(200),
        metrics: Default::default(),
        limit_upload_kib: None,
        read_concurrency: None,
        retry: RetryPolicy::default(),
        restic_timeout: Duration::from_secs(600),
        // The repository's directory stands for the chart's local repository root.
        local_roots: vec![dir.path().join("repository")],
    };
    // The first agent reads at 2 MiB/s, so it is surely mid-volume when it dies.
    let first = tokio::spawn(run(
        client.clone(),
        config("agent-1", Some(2 << 20)),
        std::future::pending(),
    ));
    let mut running = false;
    for _ in 0..300 {
        let a = assignments.get("slow").await?;
        let st = a.status.unwrap_or_default();
        if st.phase == Some(AssignmentPhase::Running)
            && st
                .volumes
                .unwrap_or_default()
                .first()
                .and_then(|v| v.bytes_done)
                .unwrap_or(0)
                > 0
        {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(running, "the first agent started reading");
    // Its restic holds its lock (a deadline, not a performance threshold).
    let mut held = Vec::new();
    for _ in 0..300 {
        held = locks(&repo_path, "restart test")?;
        if !held.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held.len(), 1, "the first agent's restic holds a lock");
    // Killed as a container is, restic with it: no chance to remove its lock. The journal
    // names the first agent's restic; stopped first, it cannot act on the SIGINT that
    // dropping the agent's tasks sends, and then it is killed.
    let state = dir.path().join("state");
    let restics: Vec<u32> = Journal::new(&state, Identity::new_instance())
        .entries()
        .iter()
        .filter(|e| !e.exited && process_alive(e.pid))
        .map(|e| e.pid)
        .collect();
    assert_eq!(restics.len(), 1, "the backup's restic is in the journal");
    kill("-STOP", restics[0])?;
    first.abort();
    let _ = first.await;
    kill("-KILL", restics[0])?;
    assert_eq!(
        locks(&repo_path, "restart test")?,
        held,
        "the killed restic left its lock"
    );

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let second = tokio::spawn(run(client.clone(), config("agent-2", None), async move {
        let _ = stopped.await;
    }));
    let done = wait_final(&assignments, "slow").await?;
    let st = done.status.unwrap_or_default();
    assert_eq!(st.phase, Some(AssignmentPhase::Succeeded), "{st:?}");
    assert_eq!(st.agent.as_deref(), Some("agent-2"));
    // One snapshot: the killed read left none behind, and the work was not done twice.
    let out = stock_restic(&repo_path, "restart test", &["snapshots", "--json"])?;
    let snaps: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    let check = stock_restic(&repo_path, "restart test", &["check"])?;
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    // The replacement removed the dead restic's lock before its own backup.
    assert_eq!(locks(&repo_path, "restart test")?, Vec::<String>::new());
    let _ = stop.send(());
    second.await??;
    sim.shutdown();
    Ok(())
}

impl Cluster {
    /// An agent on node-a with a node budget (bytes/s) and a retry policy.
    fn config(&self, pod: &str, budget: Option<u64>, retry: RetryPolicy) -> WorkerConfig {
        WorkerConfig {
            node_name: "node-a".into(),
            pod_name: pod.into(),
            kubelet_root: self.kubelet.clone(),
            state_dir: self.dir.path().join("state"),
            restic: restic_bin(),
            budget: IoBudget::new(Limits {
                bytes_per_second: budget,
                iops: None,
            }),
            max_volumes: 2,
            default_mode: ReadMode::Stream,
            io_uring: true,
            mountinfo: self.dir.path().join("mountinfo"),
            progress_every: Duration::from_millis(200),
            metrics: Default::default(),
            limit_upload_kib: None,
            read_concurrency: None,
            retry,
            restic_timeout: Duration::from_secs(600),
            // The repository's directory stands for the chart's local repository root.
            local_roots: vec![self.dir.path().join("repository")],
        }
    }

    /// Starts an agent; the sender stops it.
    fn agent(&self, cfg: WorkerConfig) -> Agent {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn(run(self.client.clone(), cfg, async move {
            let _ = stopped.await;
        }));
        (stop, worker)
    }
}

fn snapshots(repo: &Path, password: &str) -> Result<Vec<serde_json::Value>> {
    let out = stock_restic(repo, password, &["snapshots", "--json"])?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn check_clean(repo: &Path, password: &str) -> Result {
    let check = stock_restic(repo, password, &["check"])?;
    anyhow::ensure!(
        check.status.success(),
        "restic check: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    Ok(())
}

fn condition<'a>(
    status: &'a stash_api::assignment::AssignmentStatus,
    type_: &str,
) -> Option<&'a stash_api::conditions::Condition> {
    stash_api::conditions::find_condition(status.conditions.as_deref().unwrap_or_default(), type_)
}

/// Polls until `ready` holds for the assignment (a deadline so a broken worker fails the
/// test instead of hanging it; not a performance threshold).
async fn wait_for(
    api: &Api<BackupAssignment>,
    name: &str,
    what: &str,
    ready: impl Fn(&BackupAssignment) -> bool,
) -> Result<BackupAssignment> {
    for _ in 0..1200 {
        let a = api.get(name).await?;
        if ready(&a) {
            return Ok(a);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("assignment {name}: {what} never happened")
}

/// A 16 MiB volume, an assignment for it and an agent reading at 2 MiB/s: returned once the
/// agent has read some of it, so whatever the test does next happens mid-backup.
async fn reading(
    c: &Cluster,
    name: &str,
) -> Result<(Api<BackupAssignment>, Agent, BackupAssignment)> {
    std::fs::write(c.volume.join("big"), vec![5u8; 16 << 20])?;
    let assignments: Api<BackupAssignment> = Api::namespaced(c.client.clone(), "demo");
    create(&assignments, assignment(name, "node-a", "app-0", &c.uid)).await?;
    let agent = c.agent(c.config("agent-1", Some(2 << 20), RetryPolicy::default()));
    let running = wait_for(&assignments, name, "reading", |a| {
        a.status
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .and_then(|v| v.first())
            .and_then(|v| v.bytes_done)
            .is_some_and(|b| b > 0)
    })
    .await?;
    Ok((assignments, agent, running))
}

/// What a user checks after an interrupted backup: no snapshot, no lock, a sound repository.
fn nothing_left(repo: &Path, password: &str) -> Result {
    assert_eq!(snapshots(repo, password)?, Vec::<serde_json::Value>::new());
    assert_eq!(locks(repo, password)?, Vec::<String>::new());
    check_clean(repo, password)
}

fn init_repository(repo: &Path, password: &str) -> Result {
    let init = stock_restic(repo, password, &["init"])?;
    anyhow::ensure!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    Ok(())
}

/// A running agent: its stop signal and its task.
type Agent = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::result::Result<(), stash_node_agent::error::AgentError>>,
);

async fn finish(c: Cluster, (stop, worker): Agent) -> Result {
    let _ = stop.send(());
    worker.await??;
    c.sim.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_deleted_mid_backup_is_canceled_and_leaves_no_snapshot_or_lock() -> Result {
    let password = "cancel test";
    let c = Cluster::start(password).await?;
    // Every state the object goes through, as a watch delivers it.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorder = {
        let api: Api<BackupAssignment> = Api::namespaced(c.client.clone(), "demo");
        let seen = seen.clone();
        tokio::spawn(async move {
            use futures::StreamExt;
            let stream = kube::runtime::watcher(api, Default::default());
            let mut stream = std::pin::pin!(stream);
            // The watcher resumes by itself after an error.
            while let Some(e) = stream.next().await {
                if let Ok(kube::runtime::watcher::Event::Apply(a)) = e {
                    seen.lock().unwrap().push(a);
                }
            }
        })
    };
    // Deleted once it has read something, long before it is done.
    let (assignments, agent, running) = reading(&c, "doomed").await?;
    assert_eq!(
        running.metadata.finalizers,
        Some(vec![stash_api::labels::AGENT_FINALIZER.to_owned()]),
        "held while restic runs"
    );
    let st = running.status.clone().unwrap_or_default();
    assert_eq!(st.phase, Some(AssignmentPhase::Running));
    assert!(condition(&st, "Accepted").is_some_and(|c| c.is_true()));
    assert!(condition(&st, "Progressing").is_some_and(|c| c.is_true()));
    assert_eq!(st.observed_generation, running.metadata.generation);
    assert!(
        !locks(&c.repo_path, password)?.is_empty(),
        "restic holds its lock"
    );

    assignments
        .delete("doomed", &kube::api::DeleteParams::default())
        .await?;
    // The object goes once the agent has cleaned up and let go of it.
    let mut gone = false;
    for _ in 0..1200 {
        if assignments.get_opt("doomed").await?.is_none() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gone, "the agent released its finalizer");
    tokio::time::sleep(Duration::from_millis(200)).await;
    recorder.abort();
    let seen = seen.lock().unwrap().clone();
    let phases: Vec<_> = seen
        .iter()
        .filter_map(|a| a.status.as_ref().and_then(|s| s.phase))
        .collect();
    let first = |p| phases.iter().position(|x| *x == p);
    let (accepted, running) = (
        first(AssignmentPhase::Accepted),
        first(AssignmentPhase::Running),
    );
    assert!(
        accepted.is_some() && accepted < running,
        "Accepted when taken, then Running: {phases:?}"
    );
    let canceled = seen
        .iter()
        .filter_map(|a| a.status.clone())
        .find(|s| s.phase == Some(AssignmentPhase::Canceled))
        .expect("Canceled was recorded before the object went");
    let volume = &canceled.volumes.clone().unwrap_or_default()[0];
    assert_eq!(volume.phase, Some(VolumePhase::Canceled), "{canceled:?}");
    assert_eq!(volume.snapshot_id, None);
    let done = condition(&canceled, "Completed").expect("Completed");
    assert!(done.is_true());
    assert_eq!(done.reason.as_deref(), Some("Canceled"));
    assert!(
        done.message
            .as_deref()
            .unwrap_or_default()
            .contains("deleted")
    );
    // What stays after the object: an Event on it.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(c.client.clone(), "demo");
    let events = events.list(&Default::default()).await?.items;
    assert!(
        events
            .iter()
            .any(|e| e.reason.as_deref() == Some("Canceled")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("doomed")),
        "{events:?}"
    );
    // restic was interrupted: no snapshot, no lock, a sound repository.
    nothing_left(&c.repo_path, password)?;
    let journal: serde_json::Value = serde_json::from_slice(&std::fs::read(
        c.dir.path().join("state").join(JOURNAL_FILE),
    )?)?;
    assert_eq!(journal["entries"], json!([]), "every restic ended");
    finish(c, agent).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canceled_assignment_stops_and_stays_canceled() -> Result {
    let password = "annotation test";
    let c = Cluster::start(password).await?;
    let (assignments, agent, _) = reading(&c, "stopped").await?;
    // What the operator does when the session is canceled.
    assignments
        .patch(
            "stopped",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {stash_api::labels::CANCEL: "true"}}}),
            ),
        )
        .await?;
    let done = wait_final(&assignments, "stopped").await?;
    let st = done.status.clone().unwrap_or_default();
    assert_eq!(st.phase, Some(AssignmentPhase::Canceled), "{st:?}");
    assert!(st.completion_time.is_some());
    // The status is written first, then the finalizer goes.
    let released = wait_for(&assignments, "stopped", "the finalizer released", |a| {
        a.metadata.finalizers.as_ref().is_none_or(Vec::is_empty)
    })
    .await?;
    assert_eq!(released.status, done.status, "letting go kept the status");
    nothing_left(&c.repo_path, password)?;
    finish(c, agent).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_locked_by_a_live_foreign_restic_is_waited_for() -> Result {
    let password = "lock test";
    let c = Cluster::start(password).await?;
    std::fs::write(c.volume.join("data"), vec![8u8; 100_000])?;
    // `restic key passwd` takes the repository's exclusive lock and then waits for the new
    // password on stdin: a live restic that holds the lock as long as its stdin stays open.
    let mut foreign = std::process::Command::new(restic_bin())
        .args(["key", "passwd", "--no-cache"])
        .env("RESTIC_REPOSITORY", &c.repo_path)
        .env("RESTIC_PASSWORD", password)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let mut held = Vec::new();
    for _ in 0..600 {
        held = locks(&c.repo_path, password)?;
        if !held.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(held.len(), 1, "the foreign restic holds the lock");
    let locked_at = std::time::Instant::now();

    let assignments: Api<BackupAssignment> = Api::namespaced(c.client.clone(), "demo");
    create(
        &assignments,
        assignment("patient", "node-a", "app-0", &c.uid),
    )
    .await?;
    let retry = RetryPolicy {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(4),
        deadline: Duration::from_secs(600),
    };
    let agent = c.agent(c.config("agent-1", None, retry));
    let waiting = wait_for(&assignments, "patient", "a retry", |a| {
        a.status
            .as_ref()
            .and_then(|s| condition(s, "Progressing"))
            .is_some_and(|c| c.reason.as_deref() == Some("Retrying"))
    })
    .await?;
    let st = waiting.status.unwrap_or_default();
    let message = condition(&st, "Progressing")
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("locked"), "{message}");
    assert_eq!(st.phase, Some(AssignmentPhase::Running));
    // The foreign restic keeps its lock for 20 s; the assignment waits all along.
    let hold = Duration::from_secs(20).saturating_sub(locked_at.elapsed());
    tokio::time::sleep(hold).await;
    let still = assignments.get("patient").await?.status.unwrap_or_default();
    assert_eq!(still.phase, Some(AssignmentPhase::Running), "{still:?}");
    assert_eq!(
        locks(&c.repo_path, password)?,
        held,
        "no one touched the foreign lock"
    );
    // The foreign restic ends (no new password: it gives up and removes its lock).
    drop(foreign.stdin.take());
    foreign.wait()?;

    let done = wait_final(&assignments, "patient").await?;
    let st = done.status.unwrap_or_default();
    assert_eq!(st.phase, Some(AssignmentPhase::Succeeded), "{st:?}");
    let p = condition(&st, "Progressing").expect("Progressing");
    assert_eq!(p.reason.as_deref(), Some("Succeeded"));
    assert_eq!(snapshots(&c.repo_path, password)?.len(), 1);
    check_clean(&c.repo_path, password)?;
    finish(c, agent).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_at_once_with_a_permanent_reason() -> Result {
    let c = Cluster::start_uninitialised("not the password").await?;
    std::fs::write(c.volume.join("data"), vec![8u8; 1000])?;
    init_repository(&c.repo_path, "the password")?;
    let assignments: Api<BackupAssignment> = Api::namespaced(c.client.clone(), "demo");
    create(&assignments, assignment("wrong", "node-a", "app-0", &c.uid)).await?;
    // A retry policy that would wait for an hour: a permanent failure must not use it.
    let retry = RetryPolicy {
        initial: Duration::from_secs(3600),
        max: Duration::from_secs(3600),
        deadline: Duration::from_secs(7200),
    };
    let agent = c.agent(c.config("agent-1", None, retry));
    let done = wait_final(&assignments, "wrong").await?;
    let st = done.status.unwrap_or_default();
    assert_eq!(st.phase, Some(AssignmentPhase::Failed));
    let v = &st.volumes.clone().unwrap_or_default()[0];
    assert_eq!(v.reason.as_deref(), Some("wrong-password"), "{v:?}");
    let error = v.error.clone().unwrap_or_default();
    assert!(error.contains("wrong password"), "{error}");
    assert!(!error.contains("gave up after"), "tried once: {error}");
    let completed = condition(&st, "Completed").expect("Completed");
    assert_eq!(completed.reason.as_deref(), Some("Failed"));
    assert!(
        completed
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("wrong password")
    );
    finish(c, agent).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_refused_assignments_fail_alone_and_the_good_ones_run() -> Result {
    let password = "spec test";
    let c = Cluster::start(password).await?;
    std::fs::write(c.volume.join("small"), b"small")?;
    std::fs::write(c.volume.join("large"), vec![1u8; 100_000])?;
    // A newer CRD (an upgrade rolls the CRDs first, then the agents) knows a source kind
    // this agent does not.
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let name = "backupassignments.stash.appscode.com";
    let mut crd = serde_json::to_value(crds.get(name).await?)?;
    let kinds = crd
        .pointer_mut("/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/volumes/items/properties/sourceKind/enum")
        .and_then(|e| e.as_array_mut())
        .expect("the sourceKind enum");
    kinds.push(json!("Image"));
    crds.replace(name, &PostParams::default(), &serde_json::from_value(crd)?)
        .await?;
    let assignments: Api<BackupAssignment> = Api::namespaced(c.client.clone(), "demo");
    let mut newer = assignment("newer", "node-a", "app-0", &c.uid);
    newer["spec"]["volumes"][0]["sourceKind"] = json!("Image");
    create(
        &Api::<DynamicObject>::namespaced_with(
            c.client.clone(),
            "demo",
            &ApiResource::erase::<BackupAssignment>(&()),
        ),
        newer,
    )
    .await?;
    // Flags restic must not get from a spec, and a budget that is not a quantity.
    let mut unsafe_args = assignment("unsafe-args", "node-a", "app-0", &c.uid);
    unsafe_args["spec"]["readMode"] = json!("direct");
    unsafe_args["spec"]["args"] = json!(["--password-command=sh -c id"]);
    create(&assignments, unsafe_args).await?;
    let mut bad_budget = assignment("bad-budget", "node-a", "app-0", &c.uid);
    bad_budget["spec"]["ioBudget"] = json!({"bytesPerSecond": "fast"});
    create(&assignments, bad_budget).await?;
    // A known flag is passed as written: restic leaves out the file larger than 1 KiB.
    let mut good = assignment("good", "node-a", "app-0", &c.uid);
    good["spec"]["readMode"] = json!("direct");
    good["spec"]["args"] = json!(["--exclude-larger-than=1k"]);
    create(&assignments, good).await?;

    let agent = c.agent(c.config("agent-1", None, RetryPolicy::default()));
    let done = wait_final(&assignments, "good").await?;
    let st = done.status.unwrap_or_default();
    assert_eq!(st.phase, Some(AssignmentPhase::Succeeded), "{st:?}");
    let snapshot = st.volumes.unwrap_or_default()[0]
        .snapshot_id
        .clone()
        .expect("a snapshot");
    let ls = stock_restic(&c.repo_path, password, &["ls", &snapshot])?;
    let listed = String::from_utf8_lossy(&ls.stdout);
    assert!(
        listed.contains("/small") && !listed.contains("/large"),
        "{listed}"
    );

    for (name, says) in [
        (
            "unsafe-args",
            "\"--password-command=sh -c id\" is not a restic flag the agent passes on",
        ),
        ("bad-budget", "ioBudget.bytesPerSecond"),
    ] {
        let refused = wait_final(&assignments, name).await?;
        let st = refused.status.unwrap_or_default();
        assert_eq!(st.phase, Some(AssignmentPhase::Failed));
        assert!(
            st.error.as_deref().unwrap_or_default().contains(says),
            "{name}: {st:?}"
        );
        let accepted = condition(&st, "Accepted").expect("Accepted");
        assert!(!accepted.is_true());
        assert_eq!(accepted.reason.as_deref(), Some("InvalidAssignment"));
    }
    // The one the agent cannot read carries the reason in its status.
    let dynamic: Api<DynamicObject> = Api::namespaced_with(
        c.client.clone(),
        "demo",
        &ApiResource::erase::<BackupAssignment>(&()),
    );
    let mut reported = None;
    for _ in 0..600 {
        let o = dynamic.get("newer").await?;
        if o.data.pointer("/status/phase").is_some() {
            reported = Some(o);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reported = reported.expect("the malformed assignment was reported");
    assert_eq!(
        reported.data.pointer("/status/phase"),
        Some(&json!("Failed"))
    );
    let error = reported
        .data
        .pointer("/status/error")
        .and_then(|e| e.as_str())
        .unwrap_or_default();
    assert!(
        error.contains("failed to read the backup assignment") && error.contains("Image"),
        "{error}"
    );
    assert_eq!(
        snapshots(&c.repo_path, password)?.len(),
        1,
        "only the good one ran"
    );
    finish(c, agent).await
}

/// An agent process, killed and reaped if the test ends early.
struct AgentProcess(std::process::Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `stash-node-agent run` against the cluster, killed mid-backup round after round at points
/// spread over the read; each time its replacement takes the assignment up. restic never
/// outlives the agent, every snapshot in the repository restores whole, the replacement's
/// snapshot holds the volume as it is (never "unchanged" against a cut-short one), and
/// `restic check` stays clean.
async fn killed_worker(mode: &str) -> Result {
    const PASSWORD: &str = "killed worker test";
    let Cluster {
        sim,
        client,
        dir,
        repo_path,
        kubelet,
        uid,
        volume,
    } = Cluster::start(PASSWORD).await?;
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig)?;
    // A copy, so another build of the workspace cannot swap the binary mid-test.
    let agent_bin = dir.path().join("stash-node-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_stash-node-agent"), &agent_bin)?;
    let start_agent = |n: u64| -> Result<AgentProcess> {
        let child = std::process::Command::new(&agent_bin)
            .args(["run", "--node-name", "node-a", "--read-mode", mode])
            .args(["--pod-name", &format!("agent-{n}")])
            .args(["--metrics-port", "0", "--progress-seconds", "1"])
            .arg("--kubelet-root")
            .arg(&kubelet)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--restic")
            .arg(restic_bin())
            .arg("--mountinfo")
            .arg(dir.path().join("mountinfo"))
            // As the chart's localRepositories.hostPaths would pass it.
            .arg("--local-repository-roots")
            .arg(&repo_path)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("KUBECONFIG", &kubeconfig)
            .env("STASH_LOG_LEVEL", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(AgentProcess(child))
    };
    let assignments: Api<BackupAssignment> = Api::namespaced(client.clone(), "demo");
    let mut ledger = kill::Ledger::new(&repo_path, dir.path(), &restic_bin(), PASSWORD)?;
    let mut agent = start_agent(0)?;
    let mut kills = 0;
    for round in 1..=kill::ROUNDS {
        ledger.fill(&volume, round)?;
        let name = format!("round-{round}");
        create(&assignments, assignment(&name, "node-a", "app-0", &uid)).await?;
        let threshold = kill::VOLUME_BYTES as u64 * round / kill::ROUNDS;
        let (victim, death) = tokio::task::spawn_blocking(move || {
            let death = kill::kill_after_read(&mut agent.0, threshold);
            (agent, death)
        })
        .await?;
        drop(victim);
        if let kill::Death::Killed { told, .. } = death? {
            assert!(
                told,
                "{mode} round {round}: restic was not told of its agent's death"
            );
            kills += 1;
        }
        agent = start_agent(round)?;
        let done = wait_final(&assignments, &name).await?;
        let status = done.status.unwrap_or_default();
        assert_eq!(status.phase, Some(AssignmentPhase::Succeeded), "{status:?}");
        let vol = &status.volumes.clone().unwrap_or_default()[0];
        let id = vol
            .snapshot_id
            .clone()
            .ok_or_else(|| anyhow::anyhow!("{mode} round {round}: no snapshot: {vol:?}"))?;
        assert_eq!(
            ledger.restores_whole(&id).await?,
            round,
            "{mode} round {round}: the assignment's snapshot is not of this volume: {vol:?}"
        );
        ledger.all_whole().await?;
    }
    assert!(
        kills >= kill::ROUNDS - 1,
        "{mode}: only {kills} of {} backups were killed mid-read",
        kill::ROUNDS
    );
    kill("-TERM", agent.0.id())?;
    agent.0.wait()?;
    sim.shutdown();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_backup_leaves_no_snapshot_that_looks_complete() -> Result {
    killed_worker("stream").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_direct_backup_leaves_no_snapshot_that_looks_complete() -> Result {
    killed_worker("direct").await
}
