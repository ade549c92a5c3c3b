//! The disruption suite: Stash's own pods deleted in the middle of its work (backups and
//! restores), as a node drain or a rollout does. It has a cluster of its own, so the kills never reach the
//! backup suite's scenarios, and its scenarios run one after the other, so each kill is
//! the only disturbance its scenario sees.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Result, bail, ensure};
use serde_json::Value;
use stash_e2e::env::{AGENT_SELECTOR, OPERATOR_SELECTOR};
use stash_e2e::scenario::WAIT;
use stash_e2e::{BackupConfig, Kind, Scenario, Source, Volume, Workload, expect, scenario};
use stash_test_support::until;
use std::collections::BTreeMap;

const PASSWORD: &str = "e2e disruption password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disruption_suite() -> Result<()> {
    stash_e2e::runner::run(
        "disruption",
        &[
            &[scenario!(agent_killed_during_backup)],
            &[scenario!(agent_killed_during_restore)],
            &[scenario!(operator_killed_during_reconciles)],
        ],
    )
    .await
}

/// The assignments of a session with a phase, as (name, node, phase).
async fn assignment_phases(
    s: &Scenario<'_>,
    session: &str,
) -> Result<Vec<(String, String, String)>> {
    Ok(s.assignments(session)
        .await?
        .iter()
        .map(|a| {
            (
                a["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                a["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                a["status"]["phase"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

/// `kubectl delete pod` of the node agent on `node`, as a drain does.
async fn delete_agent_on(s: &Scenario<'_>, node: &str) -> Result<()> {
    let agents = s
        .env
        .kube
        .json(&[
            "get",
            "pods",
            "-n",
            &s.env.stash_namespace,
            "-l",
            AGENT_SELECTOR,
        ])
        .await?;
    let agent = agents["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["spec"]["nodeName"] == node)
        .and_then(|p| p["metadata"]["name"].as_str())
        .map(str::to_owned);
    let Some(agent) = agent else {
        bail!("no agent pod on {node}");
    };
    s.env
        .kube
        .kubectl(&["delete", "pod", &agent, "-n", &s.env.stash_namespace])
        .await
        .map(drop)
}

/// h. The node agent's pod deleted while it backs up a slow (IO-budgeted) volume: the
/// session fails that host with a reason or the replacement agent finishes it; the next
/// session succeeds; every snapshot left in the repository restores whole.
async fn agent_killed_during_backup(s: &Scenario<'_>) -> Result<()> {
    // ~27 MiB read at 1 MiB/s: half a minute in which to delete the agent.
    let w = Workload::new(
        Kind::Deployment,
        "slow",
        vec![
            Volume::new("data", Source::Pvc, "/data")
                .with_seq(3_700_000)
                .with_file("small.txt", "small\n"),
        ],
    );
    let mut bc = BackupConfig::new("slow-backup", "s3-repo");
    bc.io_budget = Some("1Mi".into());
    let repo = s
        .s3_repository(&bc.repository, "s3-secret", PASSWORD)
        .await?;
    s.deploy(&w).await?;
    s.backup_config(&bc, &w).await?;

    let first = s.create_session(&bc.name, &w).await?;
    let node = until("the assignment to be Running", WAIT, || async {
        let running = assignment_phases(s, &first).await?;
        Ok(running
            .into_iter()
            .find(|(_, _, phase)| phase == "Running")
            .map(|(_, node, _)| node))
    })
    .await?;
    delete_agent_on(s, &node).await?;

    let done = s.wait_session_final(&first).await?;
    // Which of the two allowed endings happened, for whoever reads the log.
    eprintln!(
        "[disruption] the session whose agent was deleted ended {}: {}",
        done["status"]["phase"],
        Scenario::host_stats(&done)
            .get(expect::DEPLOYMENT_HOST)
            .map(|h| h["error"].to_string())
            .unwrap_or_default()
    );
    match done["status"]["phase"].as_str() {
        Some("Succeeded") => {}
        Some("Failed") => {
            let hosts = Scenario::host_stats(&done);
            let h = hosts.get(expect::DEPLOYMENT_HOST);
            ensure!(
                h.is_some_and(|h| h["phase"] == "Failed"
                    && h["error"].as_str().is_some_and(|e| !e.trim().is_empty())),
                "the failed host gives no reason: {}",
                done["status"]
            );
        }
        other => bail!(
            "the interrupted session ended {other:?}: {}",
            done["status"]
        ),
    }

    s.env.wait_agents().await?;
    let second = s.create_session(&bc.name, &w).await?;
    let done = s.wait_session_succeeded(&second).await?;
    s.verify_host_snapshots(&repo, &done, expect::DEPLOYMENT_HOST, &w, None)
        .await?;
    // Nothing partial survives: every snapshot holds the whole volume.
    let expected = w.expected(&w.volumes[0], None);
    for snap in repo.snapshots().await? {
        let diff = stash_e2e::restic::tree_diff(&repo.files(&snap).await?, &expected, &[]);
        ensure!(
            diff.is_empty(),
            "snapshot {} is not whole: {diff:?}",
            snap.short_id
        );
    }
    Ok(())
}

/// j. The node agent's pod deleted during an in-place restore: the session either succeeds
/// (the replacement agent finishes the assignment) or fails that host with a reason; the
/// next restore succeeds and the container sees exactly what was backed up, with no
/// half-written file or temporary name left behind.
async fn agent_killed_during_restore(s: &Scenario<'_>) -> Result<()> {
    let w = Workload::new(
        Kind::Deployment,
        "big",
        vec![
            Volume::new("data", Source::Pvc, "/data")
                .with_seq(3_700_000)
                .with_file("small.txt", "small\n"),
        ],
    );
    let bc = BackupConfig::new("big-backup", "s3-repo");
    s.s3_repository(&bc.repository, "s3-secret", PASSWORD)
        .await?;
    s.deploy(&w).await?;
    s.backup_config(&bc, &w).await?;
    let session = s.create_session(&bc.name, &w).await?;
    s.wait_session_succeeded(&session).await?;
    let pod = s.pods(&w).await?[0]["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    s.exec(&pod, "rm /data/big.txt; echo damaged > /data/small.txt")
        .await?;
    // ~27 MiB written at 2 MiB/s: a quarter of a minute in which to delete the agent.
    let restore = |name: &str| {
        format!(
            "{}  ioBudget: {{bytesPerSecond: 2Mi}}\n",
            stash_e2e::manifests::restore_session(name, &s.ns, &bc.repository, &w, "", "")
        )
    };
    s.apply(&restore("first")).await?;
    let node = until("the RestoreAssignment to be Running", WAIT, || async {
        let v = s
            .json(&[
                "get",
                "restoreassignments",
                "-l",
                &format!("{}=first", expect::ASSIGNMENT_SESSION_LABEL),
            ])
            .await?;
        let a = &v["items"][0];
        Ok((a["status"]["phase"] == "Running")
            .then(|| a["spec"]["nodeName"].as_str().map(str::to_owned))
            .flatten())
    })
    .await?;
    delete_agent_on(s, &node).await?;
    let done = s.wait_restore_final("first").await?;
    eprintln!(
        "[disruption] the restore whose agent was deleted ended {}: {}",
        done["status"]["phase"], done["status"]["stats"]
    );
    match done["status"]["phase"].as_str() {
        Some("Succeeded") => {}
        Some("Failed") => ensure!(
            done["status"]["stats"][0]["error"]
                .as_str()
                .is_some_and(|e| !e.trim().is_empty()),
            "the failed host gives no reason: {}",
            done["status"]
        ),
        other => bail!(
            "the interrupted restore ended {other:?}: {}",
            done["status"]
        ),
    }
    s.env.wait_agents().await?;
    let again = s.restore(&restore("second"), "second").await?;
    ensure!(
        again["status"]["phase"] == "Succeeded",
        "the restore after the agent came back: {}",
        again["status"]
    );
    let got = s.digests(&pod, "/data", &[]).await?;
    let want = w.expected_digests(&w.volumes[0], None);
    ensure!(got == want, "the volume after the second restore: {got:?}");
    Ok(())
}

/// `kubectl delete pod -l <operator>` without waiting: the Deployment replaces it.
async fn kill_operator(s: &Scenario<'_>) -> Result<()> {
    s.env
        .kube
        .kubectl(&[
            "delete",
            "pod",
            "-n",
            &s.env.stash_namespace,
            "-l",
            OPERATOR_SELECTOR,
            "--wait=false",
        ])
        .await
        .map(drop)
}

/// i. The operator's pod deleted again and again while sessions are reconciled: every
/// session reaches a final phase, none fails, no session gets two assignments for a node
/// (their names are deterministic), and no backup ran twice.
async fn operator_killed_during_reconciles(s: &Scenario<'_>) -> Result<()> {
    let w = Workload::new(
        Kind::Deployment,
        "busy",
        vec![Volume::new("state", Source::EmptyDir, "/state").with_file("seed.txt", "seed\n")],
    )
    .ticking();
    let bc = BackupConfig::new("busy-backup", "s3-repo");
    let repo = s
        .s3_repository(&bc.repository, "s3-secret", PASSWORD)
        .await?;
    s.deploy(&w).await?;
    s.backup_config(&bc, &w).await?;

    let mut sessions = Vec::new();
    // Kills at three points of a session's reconcile: before the operator saw it, once it
    // wrote status, once it created the assignment.
    for point in ["created", "status", "assigned"] {
        let name = s.create_session(&bc.name, &w).await?;
        match point {
            "status" => {
                until(
                    "the operator to write the session's status",
                    WAIT,
                    || async {
                        let v = s.json(&["get", "backupsession", &name]).await?;
                        Ok((!v["status"].is_null()).then_some(()))
                    },
                )
                .await?;
            }
            "assigned" => {
                until("the session's assignment", WAIT, || async {
                    Ok((!s.assignments(&name).await?.is_empty()).then_some(()))
                })
                .await?;
            }
            _ => {}
        }
        kill_operator(s).await?;
        s.wait_session_final(&name).await?;
        sessions.push(name);
    }
    // A burst while the operator is killed twice more.
    for _ in 0..2 {
        sessions.push(s.create_session(&bc.name, &w).await?);
        kill_operator(s).await?;
    }
    s.env.wait_operator().await?;

    let mut succeeded = Vec::new();
    for name in &sessions {
        let done = s.wait_session_final(name).await?;
        let phase = done["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let assignments = assignment_phases(s, name).await?;
        let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, node, _) in &assignments {
            *per_node.entry(node.as_str()).or_default() += 1;
        }
        ensure!(
            per_node.values().all(|n| *n == 1),
            "{name}: more than one assignment for a node: {assignments:?}"
        );
        match phase.as_str() {
            "Succeeded" => {
                ensure!(
                    assignments.len() == 1,
                    "{name} succeeded with assignments {assignments:?}"
                );
                succeeded.push(done);
            }
            // Stash skips a session while another of its invoker runs; such a session does
            // no work.
            "Skipped" => ensure!(
                assignments.is_empty(),
                "{name} was skipped but assigned: {assignments:?}"
            ),
            _ => bail!("{name} ended {phase}: {}", done["status"]),
        }
    }
    eprintln!(
        "[disruption] {} sessions with the operator deleted 5 times: {} succeeded, the rest skipped",
        sessions.len(),
        succeeded.len()
    );
    ensure!(!succeeded.is_empty(), "no session succeeded");
    // A backup that ran twice would leave more snapshots than successful sessions.
    let snaps = repo.snapshots().await?;
    ensure!(
        snaps.len() <= succeeded.len(),
        "{} snapshots for {} successful sessions",
        snaps.len(),
        succeeded.len()
    );
    let last: &Value = succeeded.last().expect("one succeeded");
    s.verify_host_snapshots(&repo, last, expect::DEPLOYMENT_HOST, &w, None)
        .await
}
