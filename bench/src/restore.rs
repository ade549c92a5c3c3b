//! The agent's in-place restore against stock `restic restore`, on one generated volume of
//! about 1 GiB of mixed files (40 × 16 MiB, 200 × 1 MiB, 3,000 × 64 KiB): a full restore into
//! an empty directory, an in-place restore where 90 % of the files already match (restic with
//! `--overwrite if-changed`, its cheapest in-place mode), and how many files a restore of an
//! identical volume rewrites. The headline figures restore a snapshot of the default read mode
//! (direct); a stream snapshot's figures are in the notes. `make bench SCENARIOS=agent-restore`
//! runs these alone.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::ensure;
use restic_wrapper::{Backend, Repository, Restic, Secrets};
use serde_json::{Map, Value};
use stash_node_agent::engine::{self, BackupRequest, ReadMode, RestoreRequest, RestoreResult};

use crate::agent::{outcome, restic_bin, xorshift_fill};
use crate::{Outcome, median};

pub const SCENARIO: &str = "agent-restore";
const PASSWORD: &str = "bench password";

/// The regular files of the volume, in a fixed order.
fn files(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    crate::agent::files(root, &mut out)?;
    out.sort();
    Ok(out)
}

/// Generated once: `large/` 40 × 16 MiB, `medium/` 200 × 1 MiB, `small/` 3,000 × 64 KiB
/// in 30 directories.
pub(crate) fn dataset(data: &Path) -> anyhow::Result<PathBuf> {
    let root = data.join("restore-volume-1g");
    if root.join(".complete").exists() {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&root);
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let groups: [(&str, usize, usize, usize); 3] = [
        ("large", 40, 16 << 20, 40),
        ("medium", 200, 1 << 20, 50),
        ("small", 3000, 64 << 10, 100),
    ];
    for (name, count, size, per_dir) in groups {
        let mut buf = vec![0u8; size];
        for i in 0..count {
            let d = root.join(format!("{name}/{:02}", i / per_dir));
            std::fs::create_dir_all(&d)?;
            xorshift_fill(&mut buf, &mut seed);
            std::fs::write(d.join(format!("f{i}")), &buf)?;
        }
    }
    std::fs::write(root.join(".complete"), b"")?;
    Ok(root)
}

/// A copy of the volume in `target` with every tenth file rewritten (same size, new
/// content and mtime): what a workload leaves after running past its last backup.
fn ninety_percent_identical(volume: &Path, target: &Path) -> anyhow::Result<usize> {
    let _ = std::fs::remove_dir_all(target);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(volume)
        .arg(target)
        .status()?;
    ensure!(status.success(), "cp -a");
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut changed = 0;
    for (i, f) in files(target)?.iter().enumerate() {
        if i % 10 != 0 || f.ends_with(".complete") {
            continue;
        }
        let mut data = std::fs::read(f)?;
        xorshift_fill(&mut data, &mut seed);
        std::fs::write(f, &data)?;
        changed += 1;
    }
    Ok(changed)
}

async fn stock_restore(
    repo: &Path,
    id: &str,
    target: &Path,
    if_changed: bool,
) -> anyhow::Result<(Duration, Value)> {
    let mut cmd = tokio::process::Command::new(restic_bin());
    cmd.args(["restore", "--json", "--no-cache", id, "--target"])
        .arg(target)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", PASSWORD);
    if if_changed {
        cmd.args(["--overwrite", "if-changed"]);
    }
    let t = Instant::now();
    let out = cmd.output().await?;
    let elapsed = t.elapsed();
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message_type"] == "summary")
        .unwrap_or_default();
    Ok((elapsed, summary))
}

async fn ours(
    restic: &Restic,
    id: &str,
    target: &Path,
) -> anyhow::Result<(Duration, RestoreResult)> {
    let t = Instant::now();
    let r = engine::restore(
        restic,
        RestoreRequest {
            snapshot: id.to_owned(),
            target: target.to_path_buf(),
            delete: false,
            include: vec![],
            exclude: vec![],
            budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
            owners: true,
        },
    )
    .await?;
    Ok((t.elapsed(), r))
}

/// The three restore scenarios.
pub async fn run(data: &Path, rounds: usize) -> anyhow::Result<Vec<(&'static str, Outcome)>> {
    let volume = dataset(data)?;
    // Repositories in memory where there is a tmpfs, as the backup scenarios keep theirs.
    let shm = Path::new("/dev/shm");
    let scratch = if shm.is_dir() {
        shm.join("stash-bench-restore")
    } else {
        data.join("restore-scratch")
    };
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let repo_path = scratch.join("repo");
    let restic = Restic::new(Repository::new(
        Backend::Local {
            path: repo_path.clone(),
        },
        Secrets::new().with("RESTIC_PASSWORD", PASSWORD),
        &scratch,
    )?)
    .with_program(restic_bin());
    restic.init().await?;
    let mut ids = Vec::new();
    for mode in [ReadMode::Stream, ReadMode::Direct] {
        let req = BackupRequest {
            host: Some("host-0".into()),
            key: Some(format!("bench/restore/{mode:?}")),
            ..BackupRequest::new(&volume, mode)
        };
        let r = engine::backup(&restic, req).await?;
        ids.push(
            r.snapshot_id
                .ok_or_else(|| anyhow::anyhow!("no snapshot"))?,
        );
    }
    let (stream_id, direct_id) = (ids[0].clone(), ids[1].clone());
    // The live directories sit beside the volume, on the same disk.
    let (a, b) = (
        data.join("restore-live-ours"),
        data.join("restore-live-stock"),
    );
    let (mut empty_ours, mut empty_stock, mut empty_stream) = (vec![], vec![], vec![]);
    let (mut inplace_ours, mut inplace_stock, mut inplace_stream) = (vec![], vec![], vec![]);
    // Files rewritten over an identical volume: ours (direct snapshot), stream snapshot, restic.
    let mut rewritten = (0u64, 0u64, 0u64);
    let mut changed = 0;
    for _ in 0..rounds {
        // Into an empty directory; ours and restic alternate.
        let _ = std::fs::remove_dir_all(&a);
        empty_ours.push(ours(&restic, &direct_id, &a).await?.0);
        let _ = std::fs::remove_dir_all(&b);
        empty_stock.push(stock_restore(&repo_path, &direct_id, &b, false).await?.0);
        let _ = std::fs::remove_dir_all(&a);
        empty_stream.push(ours(&restic, &stream_id, &a).await?.0);

        // In place, 90 % identical.
        changed = ninety_percent_identical(&volume, &a)?;
        inplace_ours.push(ours(&restic, &direct_id, &a).await?.0);
        ninety_percent_identical(&volume, &b)?;
        inplace_stock.push(stock_restore(&repo_path, &direct_id, &b, true).await?.0);
        ninety_percent_identical(&volume, &a)?;
        inplace_stream.push(ours(&restic, &stream_id, &a).await?.0);

        // An identical volume (the one just restored): what gets rewritten.
        rewritten.1 = rewritten
            .1
            .max(ours(&restic, &stream_id, &a).await?.1.files);
        rewritten.0 = rewritten
            .0
            .max(ours(&restic, &direct_id, &a).await?.1.files);
        let (_, summary) = stock_restore(&repo_path, &direct_id, &a, true).await?;
        rewritten.2 = rewritten
            .2
            .max(summary["files_restored"].as_u64().unwrap_or(0));
    }
    for dir in [&a, &b] {
        let _ = std::fs::remove_dir_all(dir);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    let secs = |d: &[Duration]| median(d).as_secs_f64();
    let mut results = Vec::new();

    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "agent restore of a direct snapshot (the default mode) into an empty directory / restic restore of the same snapshot (median)".into(),
    );
    notes.insert("stream_snapshot_seconds".into(), secs(&empty_stream).into());
    notes.insert(
        "stream_snapshot_ratio".into(),
        (secs(&empty_stream) / secs(&empty_stock)).into(),
    );
    notes.insert("rounds".into(), rounds.into());
    notes.insert(
        "dataset".into(),
        "1.03 GiB: 40 x 16 MiB + 200 x 1 MiB + 3,000 x 64 KiB".into(),
    );
    let ratio = secs(&empty_ours) / secs(&empty_stock);
    results.push((
        "agent-restore-full-into-empty",
        outcome(
            secs(&empty_ours),
            secs(&empty_stock),
            ratio,
            "s (median)",
            "<= 1.1",
            ratio <= 1.1,
            notes,
        ),
    ));

    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "agent in-place restore of a direct snapshot (the default mode) / restic restore --overwrite if-changed of it into the same directory (median)".into(),
    );
    notes.insert("files_changed".into(), changed.into());
    notes.insert(
        "stream_snapshot_seconds".into(),
        secs(&inplace_stream).into(),
    );
    notes.insert(
        "stream_snapshot_ratio".into(),
        (secs(&inplace_stream) / secs(&inplace_stock)).into(),
    );
    notes.insert("rounds".into(), rounds.into());
    let ratio = secs(&inplace_ours) / secs(&inplace_stock);
    results.push((
        "agent-restore-in-place-90-percent-identical",
        outcome(
            secs(&inplace_ours),
            secs(&inplace_stock),
            ratio,
            "s (median)",
            "<= 1.0",
            ratio <= 1.0,
            notes,
        ),
    ));

    let mut notes = Map::new();
    notes.insert(
        "ratio_meaning".into(),
        "files the agent rewrites restoring a snapshot over an identical volume, both snapshot kinds (baseline: restic if-changed's files_restored)".into(),
    );
    notes.insert("stream_snapshot_files".into(), rewritten.1.into());
    results.push((
        "agent-restore-identical-rewrites",
        outcome(
            rewritten.0 as f64,
            rewritten.2 as f64,
            (rewritten.0 + rewritten.1) as f64,
            "files",
            "0",
            rewritten.0 == 0 && rewritten.1 == 0,
            notes,
        ),
    ));
    Ok(results)
}
