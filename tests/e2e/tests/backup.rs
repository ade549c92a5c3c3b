//! The backup suite: what a user does with Stash on a healthy cluster — backups and in-place
//! restores — typed with kubectl and checked with stock restic and from inside the pods. The scenarios share one cluster, each in its own namespace,
//! and run at the same time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use stash_e2e::restic::HostRepo;
use stash_e2e::scenario::WAIT;
use stash_e2e::{BackupConfig, Kind, Scenario, Source, Volume, Workload, expect, scenario};
use stash_test_support::{pseudo_random, until};
use std::collections::BTreeSet;
use std::time::Duration;

const PASSWORD: &str = "e2e correct horse battery staple";

#[path = "scenarios/restore.rs"]
mod restore;
use restore::{restore_in_place, restore_into_new_workload, restore_rules, restore_statefulset};

#[path = "scenarios/snapshots.rs"]
mod snapshots;
use snapshots::snapshot_api;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_suite() -> Result<()> {
    stash_e2e::runner::run(
        "backup",
        &[&[
            scenario!(environment),
            scenario!(deployment_backup),
            scenario!(statefulset_backup),
            scenario!(daemonset_backup),
            scenario!(pause_and_resume),
            scenario!(schedule_fires),
            scenario!(retention_keep_last),
            scenario!(wrong_password),
            scenario!(missing_secret),
            scenario!(pushgateway_metrics),
            scenario!(restore_in_place),
            scenario!(restore_statefulset),
            scenario!(restore_into_new_workload),
            scenario!(restore_rules),
            scenario!(local_repository),
            scenario!(snapshot_api),
        ]],
    )
    .await
}

/// A small workload with one emptyDir, for scenarios about the control flow.
fn small(kind: Kind, name: &str) -> Workload {
    Workload::new(
        kind,
        name,
        vec![
            Volume::new("scratch", Source::EmptyDir, "/scratch").with_file("hello.txt", "hello\n"),
        ],
    )
}

/// Sets up a Repository (with its Secret), the workload and a BackupConfiguration Ready.
async fn backed_up(s: &Scenario<'_>, w: &Workload, bc: &BackupConfig) -> Result<HostRepo> {
    let repo = s
        .s3_repository(&bc.repository, "s3-secret", PASSWORD)
        .await?;
    s.deploy(w).await?;
    s.backup_config(bc, w).await?;
    Ok(repo)
}

/// The harness itself: an agent Ready on every node, the operator pod's containers
/// (operator and pushgateway) all Ready, the pushgateway answering, and the S3 endpoint
/// reachable from a pod.
async fn environment(s: &Scenario<'_>) -> Result<()> {
    let env = s.env;
    let agents = env
        .kube
        .json(&[
            "get",
            "pods",
            "-n",
            &env.stash_namespace,
            "-l",
            stash_e2e::env::AGENT_SELECTOR,
        ])
        .await?;
    let nodes: BTreeSet<&str> = agents["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| stash_e2e::scenario::is_ready(p))
        .filter_map(|p| p["spec"]["nodeName"].as_str())
        .collect();
    ensure!(
        nodes.len() == env.node_count().await?,
        "Ready agents on {nodes:?}"
    );
    let operators = env.operator_pods().await?;
    ensure!(!operators.is_empty(), "no Running operator pod");
    for p in &operators {
        let statuses = p["status"]["containerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let names: BTreeSet<&str> = statuses.iter().filter_map(|c| c["name"].as_str()).collect();
        ensure!(
            names.contains("pushgateway"),
            "operator pod containers: {names:?}"
        );
        ensure!(
            statuses.iter().all(|c| c["ready"] == true),
            "operator pod not {}/{} Ready: {statuses:?}",
            statuses.len(),
            statuses.len()
        );
    }
    let metrics = env.pushgateway_metrics().await?;
    ensure!(
        metrics.contains("pushgateway_build_info"),
        "not a pushgateway: {metrics:.200}"
    );
    // Any HTTP answer (an anonymous request is refused) shows the endpoint is reachable.
    let job = format!(
        "apiVersion: batch/v1\nkind: Job\nmetadata: {{name: s3-reachable, namespace: {ns}}}\nspec:\n  backoffLimit: 0\n  template:\n    spec:\n\
         \x20     restartPolicy: Never\n      containers:\n      - name: wget\n        image: busybox:1.36\n\
         \x20       command: [sh, -c, {cmd}]\n",
        ns = s.ns,
        cmd = serde_json::to_string(&format!(
            "wget -S -T 10 -t 1 -O /dev/null {}/ 2>&1 | grep -q 'HTTP/'",
            env.s3.endpoint
        ))?
    );
    s.apply(&job).await?;
    s.env
        .kube
        .wait_for("job/s3-reachable", &s.ns, "condition=Complete", WAIT)
        .await
        .context("a pod could not reach the S3 endpoint")?;
    Ok(())
}

/// a. A Deployment's PVC and emptyDir backed up by an instant session, without touching the
/// workload; stock restic reads back exactly the bytes written.
async fn deployment_backup(s: &Scenario<'_>) -> Result<()> {
    let w = Workload::new(
        Kind::Deployment,
        "app",
        vec![
            Volume::new("data", Source::Pvc, "/data")
                .with_file("a.txt", "alpha\n")
                .with_file("sub/b.bin", pseudo_random(300_000, 7)),
            Volume::new("cache", Source::EmptyDir, "/cache")
                .with_file("c.bin", pseudo_random(100_000, 8))
                .with_file("deep/er/note.txt", "in the emptyDir\n"),
        ],
    );
    let bc = BackupConfig::new("app-backup", "s3-repo");
    let repo = backed_up(s, &w, &bc).await?;
    let before = s.pods_snapshot(&w).await?;
    let session = s.create_session(&bc.name, &w).await?;
    let done = s.wait_session_succeeded(&session).await?;
    let after = s.pods_snapshot(&w).await?;
    ensure!(
        before == after,
        "the workload changed: {before:?} → {after:?}"
    );
    ensure!(
        after.pods.values().all(|(_, r)| r.iter().all(|n| *n == 0)),
        "a container restarted: {after:?}"
    );
    let hosts: Vec<String> = Scenario::host_stats(&done).into_keys().collect();
    ensure!(hosts == [expect::DEPLOYMENT_HOST], "hosts {hosts:?}");
    s.verify_host_snapshots(&repo, &done, expect::DEPLOYMENT_HOST, &w, None)
        .await
}

/// b. A StatefulSet of three replicas over two nodes, backed up as host-0..host-2, each
/// host's snapshot holding that replica's own volume.
async fn statefulset_backup(s: &Scenario<'_>) -> Result<()> {
    let w = Workload::new(
        Kind::StatefulSet { replicas: 3 },
        "db",
        vec![
            Volume::new("data", Source::Pvc, "/data")
                .with_file("table.bin", pseudo_random(200_000, 9)),
        ],
    );
    let bc = BackupConfig::new("db-backup", "s3-repo");
    let repo = s
        .s3_repository(&bc.repository, "s3-secret", PASSWORD)
        .await?;
    let pods = s.deploy(&w).await?;
    let nodes: BTreeSet<&str> = pods
        .iter()
        .filter_map(|p| p["spec"]["nodeName"].as_str())
        .collect();
    ensure!(
        nodes.len() == 2,
        "the replicas are not spread over both nodes: {nodes:?}"
    );
    s.backup_config(&bc, &w).await?;
    let session = s.create_session(&bc.name, &w).await?;
    let done = s.wait_session_succeeded(&session).await?;
    let want: BTreeSet<String> = (0..3).map(expect::statefulset_host).collect();
    let got: BTreeSet<String> = Scenario::host_stats(&done).into_keys().collect();
    ensure!(got == want, "hosts {got:?}, expected {want:?}");
    ensure!(
        done["status"]["targets"][0]["totalHosts"] == 3,
        "{}",
        done["status"]
    );
    for i in 0..3 {
        let host = expect::statefulset_host(i);
        s.verify_host_snapshots(&repo, &done, &host, &w, Some(&format!("db-{i}")))
            .await?;
    }
    let hostnames: BTreeSet<String> = repo
        .snapshots()
        .await?
        .into_iter()
        .map(|x| x.hostname)
        .collect();
    ensure!(
        hostnames == want,
        "restic --host of the snapshots: {hostnames:?}"
    );
    // `kubectl get events` names each host that succeeded, not one host three times.
    let events = s.json(&["get", "events"]).await?;
    let notes: BTreeSet<String> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["involvedObject"]["name"] == session.as_str())
        .filter(|e| e["reason"] == "HostBackupSucceeded")
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        want.iter()
            .all(|h| notes.iter().any(|n| n.contains(&format!("host {h} "))))
            && notes.len() == want.len(),
        "HostBackupSucceeded events: {notes:?}"
    );
    // One assignment per node, never one per pod.
    let assignments = s.assignments(&session).await?;
    let per_node: BTreeSet<&str> = assignments
        .iter()
        .filter_map(|a| a["metadata"]["labels"][expect::ASSIGNMENT_NODE_LABEL].as_str())
        .collect();
    ensure!(
        assignments.len() == nodes.len() && per_node == nodes,
        "assignments {:?} for pods on {nodes:?}",
        assignments
            .iter()
            .map(|a| &a["metadata"]["name"])
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// c. A DaemonSet: one host per node, named after the node.
async fn daemonset_backup(s: &Scenario<'_>) -> Result<()> {
    let w = Workload::new(
        Kind::DaemonSet,
        "logs",
        vec![Volume::new("spool", Source::EmptyDir, "/spool").with_file("x.log", "line\n")],
    );
    let bc = BackupConfig::new("logs-backup", "s3-repo");
    let repo = s
        .s3_repository(&bc.repository, "s3-secret", PASSWORD)
        .await?;
    let pods = s.deploy(&w).await?;
    s.backup_config(&bc, &w).await?;
    let session = s.create_session(&bc.name, &w).await?;
    let done = s.wait_session_succeeded(&session).await?;
    let nodes: BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p["spec"]["nodeName"].as_str().map(str::to_owned))
        .collect();
    let got: BTreeSet<String> = Scenario::host_stats(&done).into_keys().collect();
    ensure!(got == nodes, "hosts {got:?}, expected the nodes {nodes:?}");
    for node in &nodes {
        s.verify_host_snapshots(&repo, &done, node, &w, Some(node))
            .await?;
    }
    Ok(())
}

/// `spec.suspend` of the trigger CronJob (absent means false).
async fn cronjob_suspended(s: &Scenario<'_>, bc: &str) -> Result<Option<bool>> {
    let cj = s
        .env
        .kube
        .get(&["cronjob", &expect::trigger_cronjob(bc), "-n", &s.ns])
        .await?;
    Ok(cj.map(|c| c["spec"]["suspend"].as_bool().unwrap_or(false)))
}

/// `kubectl patch backupconfiguration <bc> --type=merge -p '{"spec":{"paused":…}}'`, then
/// the trigger CronJob's `suspend` following it.
async fn set_paused(s: &Scenario<'_>, bc: &str, paused: bool) -> Result<()> {
    let patch = format!(r#"{{"spec":{{"paused":{paused}}}}}"#);
    s.kubectl(&[
        "patch",
        "backupconfiguration",
        bc,
        "--type=merge",
        "-p",
        &patch,
    ])
    .await?;
    until(
        &format!("the CronJob's suspend to be {paused}"),
        WAIT,
        || async { Ok((cronjob_suspended(s, bc).await? == Some(paused)).then_some(())) },
    )
    .await
}

/// d. `paused: true` suspends the trigger CronJob, without touching the workload, and an
/// instant backup still runs; `paused: false` resumes it.
async fn pause_and_resume(s: &Scenario<'_>) -> Result<()> {
    let w = small(Kind::Deployment, "web");
    let mut bc = BackupConfig::new("web-backup", "s3-repo");
    bc.schedule = "*/30 * * * *".into();
    backed_up(s, &w, &bc).await?;
    let cj_name = expect::trigger_cronjob(&bc.name);
    let cj = s.json(&["get", "cronjob", &cj_name]).await?;
    ensure!(
        cj["spec"]["schedule"] == bc.schedule.as_str(),
        "{}",
        cj["spec"]
    );
    let bc_obj = s.json(&["get", "backupconfiguration", &bc.name]).await?;
    let owned = cj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["kind"] == "BackupConfiguration" && o["uid"] == bc_obj["metadata"]["uid"]);
    ensure!(
        owned,
        "the CronJob is not owned by the BackupConfiguration: {}",
        cj["metadata"]
    );
    ensure!(
        cronjob_suspended(s, &bc.name).await? == Some(false),
        "suspended before pausing"
    );
    let before = s.pods_snapshot(&w).await?;

    set_paused(s, &bc.name, true).await?;
    // Paused stops the schedule only: an instant backup still runs.
    let session = s.create_session(&bc.name, &w).await?;
    s.wait_session_succeeded(&session).await?;

    set_paused(s, &bc.name, false).await?;
    let after = s.pods_snapshot(&w).await?;
    ensure!(
        before == after,
        "pausing touched the workload: {before:?} → {after:?}"
    );
    Ok(())
}

/// e. A schedule that fires: the CronJob's pod creates `<bc>-<unix seconds>` with Stash's
/// labels and the BackupConfiguration as owner, and it backs up.
async fn schedule_fires(s: &Scenario<'_>) -> Result<()> {
    let w = small(Kind::Deployment, "cron");
    let mut bc = BackupConfig::new("cron-backup", "s3-repo");
    bc.schedule = "*/1 * * * *".into();
    backed_up(s, &w, &bc).await?;
    let bc_obj = s.json(&["get", "backupconfiguration", &bc.name]).await?;
    // A minute at most until the schedule fires, then the Job's pod; generous on a loaded machine.
    let session: Value = until("the schedule to create a BackupSession", WAIT, || async {
        let v = s.json(&["get", "backupsessions"]).await?;
        Ok(v["items"].as_array().and_then(|i| i.first().cloned()))
    })
    .await?;
    // One run is enough; no more sessions while the rest is checked.
    set_paused(s, &bc.name, true).await?;
    let name = session["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(
        expect::is_triggered_session_name(&bc.name, &name),
        "session name {name}"
    );
    let labels = &session["metadata"]["labels"];
    for (k, v) in expect::session_labels(&bc.name)
        .into_iter()
        .chain(expect::session_target_labels("Deployment", &w.name, &s.ns))
    {
        ensure!(
            labels[k] == v.as_str(),
            "label {k} is {}, expected {v}",
            labels[k]
        );
    }
    let owner = session["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|o| o["kind"] == "BackupConfiguration")
        .cloned()
        .context("the session has no BackupConfiguration owner")?;
    ensure!(
        owner["name"] == bc.name.as_str() && owner["uid"] == bc_obj["metadata"]["uid"],
        "owner {owner}"
    );
    ensure!(
        session["spec"]["invoker"]["kind"] == "BackupConfiguration"
            && session["spec"]["invoker"]["name"] == bc.name.as_str(),
        "invoker {}",
        session["spec"]
    );
    // The trigger ran as a Job of the CronJob.
    let jobs = s.json(&["get", "jobs"]).await?;
    let from_cron = jobs["items"].as_array().into_iter().flatten().any(|j| {
        j["metadata"]["ownerReferences"][0]["name"] == expect::trigger_cronjob(&bc.name).as_str()
    });
    ensure!(from_cron, "no Job of the trigger CronJob");
    s.wait_session_succeeded(&name).await?;
    Ok(())
}

/// f. `keepLast: 2` after four sessions of a changing volume: two snapshots remain, as stock
/// restic lists them, and the Repository's status counts them.
async fn retention_keep_last(s: &Scenario<'_>) -> Result<()> {
    let w = small(Kind::Deployment, "keep").ticking();
    let mut bc = BackupConfig::new("keep-backup", "s3-repo");
    bc.keep_last = 2;
    let repo = backed_up(s, &w, &bc).await?;
    let mut last = Value::Null;
    for _ in 0..4 {
        let session = s.create_session(&bc.name, &w).await?;
        last = s.wait_session_succeeded(&session).await?;
    }
    let retention = last["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "RetentionPolicyApplied")
        .cloned();
    ensure!(
        retention.as_ref().is_some_and(|c| c["status"] == "True"),
        "RetentionPolicyApplied: {retention:?}"
    );
    let snaps = repo.snapshots().await?;
    let host0 = snaps
        .iter()
        .filter(|x| x.hostname == expect::DEPLOYMENT_HOST)
        .count();
    ensure!(snaps.len() == 2 && host0 == 2, "restic lists {snaps:?}");
    until("the Repository to count 2 snapshots", WAIT, || async {
        let r = s.json(&["get", "repository", &bc.repository]).await?;
        Ok((r["status"]["snapshotCount"] == 2).then_some(()))
    })
    .await?;
    // What is kept restores whole (the newest is the last session's).
    s.verify_host_snapshots(&repo, &last, expect::DEPLOYMENT_HOST, &w, None)
        .await
}

fn mentions_any(v: &Value, words: &[String]) -> bool {
    let text = v.to_string().to_lowercase();
    words.iter().any(|w| text.contains(&w.to_lowercase()))
}

/// The chart's pods restarted no more than `before` says.
async fn nothing_crash_loops(
    s: &Scenario<'_>,
    before: &std::collections::BTreeMap<String, i64>,
) -> Result<()> {
    let after = s.stash_restarts().await?;
    for (pod, n) in &after {
        if let Some(b) = before.get(pod) {
            ensure!(n == b, "{pod} restarted ({b} → {n})");
        }
    }
    Ok(())
}

/// g. A Repository opened with the wrong password: the session fails with restic's reason
/// and nothing crash-loops.
async fn wrong_password(s: &Scenario<'_>) -> Result<()> {
    let restarts = s.stash_restarts().await?;
    let bc = BackupConfig::new("locked-backup", "s3-repo");
    // A repository that exists, with another password than the Secret's.
    let right = HostRepo::new(&s.env.s3, &s.prefix(&bc.repository), "the right password");
    right.init().await?;
    s.s3_repository(&bc.repository, "s3-secret", "not the password")
        .await?;
    let w = small(Kind::Deployment, "locked");
    s.deploy(&w).await?;
    // The Repository and its Secret exist, so the configuration is Ready: the password is
    // only found wrong when the repository is opened.
    s.backup_config(&bc, &w).await?;
    let session = s.create_session(&bc.name, &w).await?;
    let done = s.wait_session_final(&session).await?;
    ensure!(
        done["status"]["phase"] == "Failed",
        "phase {}",
        done["status"]
    );
    let hosts = Scenario::host_stats(&done);
    ensure!(!hosts.is_empty(), "no host stats: {}", done["status"]);
    for (host, stats) in hosts {
        let error = stats["error"].as_str().unwrap_or_default();
        ensure!(
            stats["phase"] == "Failed" && expect::blames_the_password(error),
            "{host} does not say the password is wrong: {stats}"
        );
    }
    ensure!(
        right.snapshots().await?.is_empty(),
        "a snapshot was written"
    );
    nothing_crash_loops(s, &restarts).await
}

/// g. A Repository whose Secret does not exist: the BackupConfiguration says so in
/// `BackendSecretFound` and stays NotReady, an instant session does not back up, nothing
/// crash-loops; once the Secret is created, backups work.
async fn missing_secret(s: &Scenario<'_>) -> Result<()> {
    let restarts = s.stash_restarts().await?;
    let bc = BackupConfig::new("nosecret-backup", "s3-repo");
    s.s3_repository_only(&bc.repository, "absent-secret")
        .await?;
    let w = small(Kind::Deployment, "nosecret");
    s.deploy(&w).await?;
    s.apply(&bc.manifest(&s.ns, &w)).await?;
    let obj = s.wait_bc_phase(&bc.name, expect::BC_NOT_READY).await?;
    let cond = until("the BackendSecretFound condition", WAIT, || async {
        let v = s.json(&["get", "backupconfiguration", &bc.name]).await?;
        Ok(v["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == expect::SECRET_FOUND)
            .cloned())
    })
    .await?;
    ensure!(
        cond["status"] == "False" && cond["reason"] == expect::SECRET_NOT_AVAILABLE,
        "{cond}"
    );
    ensure!(
        mentions_any(
            &cond["message"],
            &expect::missing_secret_words("absent-secret")
        ),
        "the message does not name the Secret: {cond} ({})",
        obj["status"]
    );
    let session = s.create_session(&bc.name, &w).await?;
    let done = s.wait_session_final(&session).await?;
    ensure!(
        done["status"]["phase"] != "Succeeded",
        "backed up without a Secret: {}",
        done["status"]
    );
    nothing_crash_loops(s, &restarts).await?;

    // The user creates the Secret: the configuration becomes Ready and backs up.
    s.apply(&stash_e2e::manifests::s3_secret(
        "absent-secret",
        &s.ns,
        &s.env.s3,
        PASSWORD,
    ))
    .await?;
    s.wait_bc_phase(&bc.name, expect::BC_READY).await?;
    let session = s.create_session(&bc.name, &w).await?;
    s.wait_session_succeeded(&session).await?;
    Ok(())
}

/// j. The pushgateway (the operator pod's second container) holds the session's metrics
/// with the invoker's labels.
async fn pushgateway_metrics(s: &Scenario<'_>) -> Result<()> {
    let w = small(Kind::Deployment, "metered");
    let bc = BackupConfig::new("metered-backup", "s3-repo");
    backed_up(s, &w, &bc).await?;
    let session = s.create_session(&bc.name, &w).await?;
    s.wait_session_succeeded(&session).await?;
    let labels = expect::session_metric_labels(&bc.name, &s.ns);
    let job = expect::pushgateway_job(&bc.name, &s.ns);
    // The push precedes the final phase; the scrape may still race the pushgateway's own
    // bookkeeping, so it is retried for a moment.
    let line = until("the session's metrics on the pushgateway", WAIT, || async {
        let text = s.env.pushgateway_metrics().await?;
        Ok(text
            .lines()
            .find(|l| {
                l.starts_with(&format!("{}{{", expect::SESSION_SUCCESS_METRIC))
                    && labels
                        .iter()
                        .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .map(str::to_owned))
    })
    .await?;
    ensure!(
        line.contains(&format!("job=\"{job}\"")),
        "pushed under another job: {line}"
    );
    // `name{labels} value [timestamp]`
    let value = line
        .rsplit_once('}')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .unwrap_or_default();
    if value.parse::<f64>().ok() != Some(1.0) {
        bail!("the session is not reported a success: {line}");
    }
    // The post-backup actions ran once: the reconciles that follow the final phase (a
    // requeue a second later, the assignments' last updates) neither push again nor
    // rewrite the status, whose duration once grew by the second push's delay.
    let push_time = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("push_time_seconds{") && l.contains(&format!("job=\"{job}\"")))
            .map(str::to_owned)
    };
    let final_status = s.json(&["get", "backupsession", &session]).await?["status"].clone();
    let pushed = push_time(&s.env.pushgateway_metrics().await?);
    ensure!(pushed.is_some(), "no push_time_seconds for job {job}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = s.json(&["get", "backupsession", &session]).await?["status"].clone();
    ensure!(
        later == final_status,
        "the final status changed: {final_status} became {later}"
    );
    let pushed_later = push_time(&s.env.pushgateway_metrics().await?);
    ensure!(
        pushed_later == pushed,
        "the metrics were pushed again: {pushed:?} then {pushed_later:?}"
    );
    Ok(())
}

/// A condition of an object, by type.
fn condition(obj: &Value, type_: &str) -> Option<Value> {
    obj["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// k. A Deployment backed up into a local (hostPath) repository, as Stash users write one.
/// A hostPath is a directory of one node, so the workload runs on the operator's node (the
/// one whose directory the operator initialises and prunes); stock restic reads the
/// snapshot back from that node's directory with identical bytes, after retention ran. A
/// workload on the other node is refused with a reason, and a Repository outside the
/// chart's `localRepositories.hostPaths` gets a condition, not a repository nobody sees.
async fn local_repository(s: &Scenario<'_>) -> Result<()> {
    let env = s.env;
    if !env.is_simulated() {
        // Stock restic here cannot read a node's directory of a real cluster.
        eprintln!(
            "[backup] local_repository: skipped (reads the node's directory; simulated cluster only)"
        );
        return Ok(());
    }
    let operators = env.operator_pods().await?;
    let op_node = operators
        .first()
        .and_then(|p| p["spec"]["nodeName"].as_str())
        .context("no Running operator pod")?
        .to_owned();
    let nodes = env.sim_nodes();
    let node_root = |name: &str| {
        nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.root.clone())
            .with_context(|| format!("node {name} is not among {nodes:?}"))
    };
    let other_node = nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| *n != op_node)
        .context("the cluster has one node")?;
    let dir = format!("{}/{}", stash_e2e::env::LOCAL_REPOSITORY_ROOT, s.ns);
    s.apply(&format!(
        "{}---\n{}",
        stash_e2e::manifests::password_secret("local-secret", &s.ns, PASSWORD),
        stash_e2e::manifests::local_repository("local-repo", &s.ns, "local-secret", &dir, "app")
    ))
    .await?;
    let w = Workload::new(
        Kind::Deployment,
        "here",
        vec![
            Volume::new("data", Source::Pvc, "/data")
                .with_file("a.txt", "alpha\n")
                .with_file("sub/b.bin", pseudo_random(200_000, 11)),
        ],
    )
    .on_node(&op_node)
    .ticking();
    let mut bc = BackupConfig::new("here-backup", "local-repo");
    bc.keep_last = 1;
    s.deploy(&w).await?;
    s.backup_config(&bc, &w).await?;
    let repo = HostRepo::local(
        &node_root(&op_node)?.join(format!("{}/app", dir.trim_start_matches('/'))),
        PASSWORD,
    );
    let mut last = Value::Null;
    for _ in 0..2 {
        let session = s.create_session(&bc.name, &w).await?;
        last = s.wait_session_succeeded(&session).await?;
    }
    let retention = condition(&last, expect::RETENTION_APPLIED);
    ensure!(
        retention.as_ref().is_some_and(|c| c["status"] == "True"),
        "{}: {retention:?}",
        expect::RETENTION_APPLIED
    );
    let snaps = repo.snapshots().await?;
    ensure!(snaps.len() == 1, "keepLast 1 left {snaps:?}");
    s.verify_host_snapshots(&repo, &last, expect::DEPLOYMENT_HOST, &w, None)
        .await?;
    // The operator lists it natively: the count in the Repository's status.
    until("the Repository to count 1 snapshot", WAIT, || async {
        let r = s.json(&["get", "repository", "local-repo"]).await?;
        let ok = r["status"]["snapshotCount"] == 1
            && condition(&r, expect::REPOSITORY_INITIALIZED).is_some_and(|c| c["status"] == "True");
        Ok(ok.then_some(()))
    })
    .await?;

    // The same repository from the other node: another directory of the same path.
    let away = small(Kind::Deployment, "away").on_node(&other_node);
    let away_bc = BackupConfig::new("away-backup", "local-repo");
    s.deploy(&away).await?;
    s.backup_config(&away_bc, &away).await?;
    let session = s.create_session(&away_bc.name, &away).await?;
    let done = s.wait_session_final(&session).await?;
    ensure!(done["status"]["phase"] == "Failed", "{}", done["status"]);
    let host = Scenario::host_stats(&done)
        .remove(expect::DEPLOYMENT_HOST)
        .with_context(|| format!("no host stats: {}", done["status"]))?;
    let error = host["error"].as_str().unwrap_or_default();
    ensure!(
        error.contains(&other_node) && error.contains(&op_node) && error.contains("every node"),
        "the reason does not name the nodes: {error}"
    );
    // No agent was given work: the target says so, rather than "0 BackupAssignment(s)".
    let executor = done["status"]["targets"][0]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "BackupExecutorEnsured"))
        .cloned()
        .unwrap_or_default();
    ensure!(
        executor["status"] == "False" && executor["reason"] == "FailedToEnsureBackupExecutor",
        "BackupExecutorEnsured of a session no agent ran: {executor}"
    );
    ensure!(
        !node_root(&other_node)?
            .join(format!("{}/app", dir.trim_start_matches('/')))
            .exists(),
        "something was written into the other node's directory"
    );

    // Outside the mounted directories: a condition, and nothing initialised anywhere.
    let outside = format!("/srv/stash-e2e-unmounted/{}", s.ns);
    s.apply(&stash_e2e::manifests::local_repository(
        "outside-repo",
        &s.ns,
        "local-secret",
        &outside,
        "",
    ))
    .await?;
    let cond = until("the outside Repository's condition", WAIT, || async {
        let r = s.json(&["get", "repository", "outside-repo"]).await?;
        Ok(condition(&r, expect::REPOSITORY_INITIALIZED))
    })
    .await?;
    let message = cond["message"].as_str().unwrap_or_default();
    ensure!(
        cond["status"] == "False" && message.contains("localRepositories.hostPaths"),
        "{cond}"
    );
    for n in &nodes {
        ensure!(
            !n.root.join(outside.trim_start_matches('/')).exists(),
            "{outside} was created on node {}",
            n.name
        );
    }
    Ok(())
}
