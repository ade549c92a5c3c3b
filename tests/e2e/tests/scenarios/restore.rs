//! The restore scenarios of the backup suite: RestoreSessions as Stash's guides write them,
//! restored in place by the node agents into running pods, checked from inside the
//! containers (what the application sees) and against what the workload first wrote.

use anyhow::{Result, bail, ensure};
use serde_json::Value;
use sha2::{Digest, Sha256};
use stash_e2e::manifests::restore_session;
use stash_e2e::{BackupConfig, Kind, Scenario, Source, Volume, Workload, expect};
use stash_test_support::pseudo_random;
use std::collections::BTreeMap;

use super::PASSWORD;

/// The SHA-256 of every file a volume should hold, as [`Scenario::digests`] reports them.
fn want(w: &Workload, v: &Volume, who: Option<&str>) -> BTreeMap<String, String> {
    w.expected_digests(v, who)
}

/// Backs the workload up once (Repository, BackupConfiguration, an instant session).
async fn backed_up_once(s: &Scenario<'_>, w: &Workload, bc: &BackupConfig) -> Result<Value> {
    s.s3_repository(&bc.repository, "s3-secret", PASSWORD)
        .await?;
    s.deploy(w).await?;
    s.backup_config(bc, w).await?;
    let session = s.create_session(&bc.name, w).await?;
    s.wait_session_succeeded(&session).await
}

fn pod_names(pods: &[Value]) -> Vec<String> {
    pods.iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

fn ensure_succeeded(rs: &Value) -> Result<()> {
    if rs["status"]["phase"] != "Succeeded" {
        bail!(
            "RestoreSession {} ended {}: {}",
            rs["metadata"]["name"],
            rs["status"]["phase"],
            serde_json::to_string_pretty(&rs["status"]).unwrap_or_default()
        );
    }
    Ok(())
}

/// Damages a volume as a bad deploy would: a file rewritten, a file deleted, a file added.
async fn damage(s: &Scenario<'_>, pod: &str, mount: &str) -> Result<()> {
    s.exec(
        pod,
        &format!(
            "set -e; cd '{mount}'; echo overwritten > a.txt; rm -f sub/b.bin; echo stray > stray.txt"
        ),
    )
    .await
    .map(drop)
}

/// A Deployment's PVC and emptyDir damaged in the running pod, then restored in place with
/// `--delete`: the same pod (same UID, no restart) sees exactly what was backed up; Stash's
/// restore metrics reach the pushgateway.
pub async fn restore_in_place(s: &Scenario<'_>) -> Result<()> {
    let w = Workload::new(
        Kind::Deployment,
        "app",
        vec![
            Volume::new("data", Source::Pvc, "/data")
                .with_file("a.txt", "alpha\n")
                .with_file("sub/b.bin", pseudo_random(300_000, 21)),
            Volume::new("cache", Source::EmptyDir, "/cache")
                .with_file("c.bin", pseudo_random(50_000, 22)),
        ],
    );
    let bc = BackupConfig::new("app-backup", "s3-repo");
    backed_up_once(s, &w, &bc).await?;
    let pod = pod_names(&s.pods(&w).await?)
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no pod"))?;
    damage(s, &pod, "/data").await?;
    s.exec(&pod, "rm -f /cache/c.bin").await?;
    for v in &w.volumes {
        let damaged = s.digests(&pod, &v.mount, &[]).await?;
        ensure!(
            damaged != want(&w, v, None),
            "the container does not see the damage to {}",
            v.mount
        );
    }
    let before = s.pods_snapshot(&w).await?;
    let rs = s
        .restore(
            &restore_session(
                "app-restore",
                &s.ns,
                "s3-repo",
                &w,
                "",
                "    args: [--delete]\n",
            ),
            "app-restore",
        )
        .await?;
    ensure_succeeded(&rs)?;
    let after = s.pods_snapshot(&w).await?;
    ensure!(
        before == after,
        "the restore touched the workload: {before:?} → {after:?}"
    );
    ensure!(
        after.pods.values().all(|(_, r)| r.iter().all(|n| *n == 0)),
        "a container restarted: {after:?}"
    );
    for v in &w.volumes {
        let got = s.digests(&pod, &v.mount, &[]).await?;
        ensure!(
            got == want(&w, v, None),
            "{} after the restore: {got:?}",
            v.mount
        );
    }
    let stats = rs["status"]["stats"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        stats.len() == 1 && stats[0]["hostname"] == expect::DEPLOYMENT_HOST,
        "stats {stats:?}"
    );
    let metrics = s.env.pushgateway_metrics().await?;
    let line = metrics.lines().find(|l| {
        l.starts_with(expect::RESTORE_SUCCESS_METRIC)
            && l.contains("invoker_name=\"app-restore\"")
            && l.contains(&format!("namespace=\"{}\"", s.ns))
    });
    ensure!(
        line.is_some_and(|l| l.trim_end().ends_with(" 1")),
        "no successful restore metric for app-restore: {line:?}"
    );
    Ok(())
}

/// A StatefulSet of three replicas: each restores its own host, then every replica the data
/// of one `sourceHost`.
pub async fn restore_statefulset(s: &Scenario<'_>) -> Result<()> {
    let w = Workload::new(
        Kind::StatefulSet { replicas: 3 },
        "db",
        vec![Volume::new("data", Source::Pvc, "/data").with_file("a.txt", "alpha\n")],
    );
    let bc = BackupConfig::new("db-backup", "s3-repo");
    backed_up_once(s, &w, &bc).await?;
    for i in 0..3 {
        let pod = format!("db-{i}");
        s.exec(&pod, "echo lost > /data/pod.txt; rm /data/a.txt")
            .await?;
        let damaged = s.digests(&pod, "/data", &[]).await?;
        ensure!(
            damaged.len() == 1 && damaged.contains_key("pod.txt"),
            "{pod} after the damage: {damaged:?}"
        );
    }
    let rs = s
        .restore(
            &restore_session("db-restore", &s.ns, "s3-repo", &w, "", ""),
            "db-restore",
        )
        .await?;
    ensure_succeeded(&rs)?;
    for i in 0..3 {
        let pod = format!("db-{i}");
        let got = s.digests(&pod, "/data", &[]).await?;
        ensure!(
            got == want(&w, &w.volumes[0], Some(&pod)),
            "{pod} after restoring its own host: {got:?}"
        );
    }
    let rs = s
        .restore(
            &restore_session(
                "db-from-host-1",
                &s.ns,
                "s3-repo",
                &w,
                "[{sourceHost: host-1}]",
                "",
            ),
            "db-from-host-1",
        )
        .await?;
    ensure_succeeded(&rs)?;
    for i in 0..3 {
        let pod = format!("db-{i}");
        let got = s.digests(&pod, "/data", &[]).await?;
        ensure!(
            got == want(&w, &w.volumes[0], Some("db-1")),
            "{pod} after restoring host-1 into every replica: {got:?}"
        );
    }
    Ok(())
}

/// Stash's guide: the backup restored into a freshly created Deployment
/// (`stash-recovered`). The RestoreSession comes first and waits, saying what for.
pub async fn restore_into_new_workload(s: &Scenario<'_>) -> Result<()> {
    let w = Workload::new(
        Kind::Deployment,
        "app",
        vec![
            Volume::new("data", Source::Pvc, "/data")
                .with_file("a.txt", "alpha\n")
                .with_file("sub/b.bin", pseudo_random(100_000, 23)),
        ],
    );
    let bc = BackupConfig::new("app-backup", "s3-repo");
    backed_up_once(s, &w, &bc).await?;
    let recovered = Workload::new(
        Kind::Deployment,
        "stash-recovered",
        vec![Volume::new("data", Source::Pvc, "/data")],
    );
    s.apply(&restore_session(
        "recover",
        &s.ns,
        "s3-repo",
        &recovered,
        "[{sourceHost: host-0, paths: [/data]}]",
        "",
    ))
    .await?;
    let waiting = stash_test_support::until(
        "the RestoreSession to wait for its target",
        stash_e2e::scenario::WAIT,
        || async {
            let v = s.json(&["get", "restoresession", "recover"]).await?;
            let conds = v["status"]["conditions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Ok(conds
                .into_iter()
                .find(|c| c["type"] == "RestoreTargetFound" && c["status"] == "False")
                .map(|c| (v["status"]["phase"].clone(), c["message"].clone())))
        },
    )
    .await?;
    ensure!(
        waiting.0 == "Pending"
            && waiting
                .1
                .as_str()
                .is_some_and(|m| m.contains("stash-recovered")),
        "while the target is missing: {waiting:?}"
    );
    s.deploy(&recovered).await?;
    let rs = s.wait_restore_final("recover").await?;
    ensure_succeeded(&rs)?;
    let pod = pod_names(&s.pods(&recovered).await?)
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no pod"))?;
    let got = s.digests(&pod, "/data", &[]).await?;
    ensure!(
        got == want(&w, &w.volumes[0], None),
        "the recovered volume: {got:?}"
    );
    Ok(())
}

/// Rules: a named snapshot (the first of two backups), a path inside the volume, exclude
/// patterns; a snapshot that does not exist and a rule set Stash refuses each fail with a
/// clear message and write nothing.
pub async fn restore_rules(s: &Scenario<'_>) -> Result<()> {
    let w = Workload::new(
        Kind::Deployment,
        "app",
        vec![
            Volume::new("data", Source::Pvc, "/data")
                .with_file("a.txt", "alpha\n")
                .with_file("sub/b.bin", pseudo_random(80_000, 24))
                .with_file("sub/c.txt", "gamma\n"),
        ],
    );
    let bc = BackupConfig::new("app-backup", "s3-repo");
    let first = backed_up_once(s, &w, &bc).await?;
    let first_id = Scenario::snapshot_names(&Scenario::host_stats(&first)[expect::DEPLOYMENT_HOST])
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the first backup names no snapshot"))?;
    let pod = pod_names(&s.pods(&w).await?)
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no pod"))?;
    // A second backup of changed data; the named snapshot is the first.
    s.exec(&pod, "echo second > /data/a.txt").await?;
    let second = s.create_session(&bc.name, &w).await?;
    s.wait_session_succeeded(&second).await?;
    damage(s, &pod, "/data").await?;
    let rule = format!("[{{snapshots: ['{first_id}']}}]");
    let rs = s
        .restore(
            &restore_session("named", &s.ns, "s3-repo", &w, &rule, ""),
            "named",
        )
        .await?;
    ensure_succeeded(&rs)?;
    let mut expected = want(&w, &w.volumes[0], None);
    expected.insert("stray.txt".into(), hex::encode(Sha256::digest(b"stray\n")));
    let got = s.digests(&pod, "/data", &[]).await?;
    ensure!(got == expected, "after the named snapshot: {got:?}");
    // Only a path inside the volume, from the latest backup: a.txt keeps what it has.
    s.exec(
        &pod,
        "echo changed > /data/a.txt; echo changed > /data/sub/c.txt",
    )
    .await?;
    let rs = s
        .restore(
            &restore_session(
                "sub-only",
                &s.ns,
                "s3-repo",
                &w,
                "[{paths: [/data/sub]}]",
                "",
            ),
            "sub-only",
        )
        .await?;
    ensure_succeeded(&rs)?;
    let got = s.digests(&pod, "/data", &[]).await?;
    ensure!(
        got.get("a.txt") == Some(&hex::encode(Sha256::digest(b"changed\n")))
            && got.get("sub/c.txt") == Some(&hex::encode(Sha256::digest(b"gamma\n"))),
        "after restoring /data/sub only: {got:?}"
    );
    // Exclude: everything but the excluded file comes back.
    s.exec(&pod, "echo changed > /data/sub/c.txt; rm /data/sub/b.bin")
        .await?;
    let rs = s
        .restore(
            &restore_session(
                "no-c",
                &s.ns,
                "s3-repo",
                &w,
                "[{exclude: ['/data/sub/c.txt']}]",
                "",
            ),
            "no-c",
        )
        .await?;
    ensure_succeeded(&rs)?;
    let got = s.digests(&pod, "/data", &[]).await?;
    ensure!(
        got.get("sub/c.txt") == Some(&hex::encode(Sha256::digest(b"changed\n")))
            && got.get("sub/b.bin") == want(&w, &w.volumes[0], None).get("sub/b.bin")
            && got.get("a.txt") == Some(&hex::encode(Sha256::digest(b"second\n"))),
        "after restoring with an exclude: {got:?}"
    );
    // A snapshot that does not exist: Failed, saying so, and nothing written.
    let before = s.digests(&pod, "/data", &[]).await?;
    let rs = s
        .restore(
            &restore_session(
                "missing",
                &s.ns,
                "s3-repo",
                &w,
                "[{snapshots: ['deadbeef']}]",
                "",
            ),
            "missing",
        )
        .await?;
    let error = rs["status"]["stats"][0]["error"]
        .as_str()
        .unwrap_or_default();
    ensure!(
        rs["status"]["phase"] == "Failed"
            && error.contains("deadbeef")
            && error.contains("does not exist"),
        "a missing snapshot: {}",
        rs["status"]
    );
    // A host in two rules: Stash's validation refuses it, with the reason.
    let rs = s
        .restore(
            &restore_session(
                "two-rules",
                &s.ns,
                "s3-repo",
                &w,
                "[{targetHosts: [host-0], paths: [/data]}, {targetHosts: [host-0], paths: [/data/sub]}]",
                "",
            ),
            "two-rules",
        )
        .await?;
    let conds = rs["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        rs["status"]["phase"] == "Invalid"
            && conds.iter().any(|c| c["type"] == "ValidationPassed"
                && c["status"] == "False"
                && c["message"].as_str().is_some_and(|m| m.contains("host-0"))),
        "a host in two rules: {}",
        rs["status"]
    );
    // Two catch-all rules: the API server refuses it at once (the CRD's validation).
    let refused = s
        .apply(&restore_session(
            "catch-all",
            &s.ns,
            "s3-repo",
            &w,
            "[{paths: [/data]}, {paths: [/data/sub]}]",
            "",
        ))
        .await;
    ensure!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("at most one rule")),
        "two rules without targetHosts: {refused:?}"
    );
    let after = s.digests(&pod, "/data", &[]).await?;
    ensure!(
        before == after,
        "a refused restore wrote: {before:?} → {after:?}"
    );
    Ok(())
}
