//! Scenario `snapshots-list-1000`: list a repository of 1,000 snapshots with the native
//! reader and with `restic snapshots --json`. Goal: the native reader at least 20× faster.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, ensure};
use restic_wrapper::{Backend, NativeRepository, Secrets};
use serde_json::{Map, Value};

use crate::{Outcome, alternate, median};

pub const SCENARIO: &str = "snapshots-list-1000";
const COUNT: usize = 1000;
pub const PASSWORD: &str = "bench password";
const GOAL: f64 = 20.0;

fn restic(restic_bin: &Path, repo: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(restic_bin)
        .args(args)
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", PASSWORD)
        .env("RESTIC_CACHE_DIR", repo.with_extension("cache"))
        .output()
        .with_context(|| format!("failed to run restic {args:?}"))?;
    ensure!(
        out.status.success(),
        "restic {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// The baseline: `restic snapshots --json` as Stash ran it for each request; the number of
/// snapshots it printed.
pub async fn stock_listing(restic_bin: &Path, repo: &Path) -> anyhow::Result<usize> {
    let out = tokio::process::Command::new(restic_bin)
        .args(["snapshots", "--json", "--no-lock"])
        .env("RESTIC_REPOSITORY", repo)
        .env("RESTIC_PASSWORD", PASSWORD)
        .env("RESTIC_CACHE_DIR", repo.with_extension("cache"))
        .output()
        .await?;
    ensure!(out.status.success());
    Ok(serde_json::from_slice::<Vec<Value>>(&out.stdout)?.len())
}

fn count(restic_bin: &Path, repo: &Path) -> anyhow::Result<usize> {
    let out = restic(restic_bin, repo, &["snapshots", "--json", "--no-lock"])?;
    let list: Vec<Value> = serde_json::from_slice(&out)?;
    Ok(list.len())
}

/// A repository of exactly 1,000 real restic snapshots, built once and reused: eight
/// backups from four hosts with different tags and paths, doubled by `restic rewrite
/// --new-host` until there are enough, then trimmed with `restic forget`.
pub fn dataset(restic_bin: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let repo = dir.join("snapshots-1000");
    if repo.join("config").exists() && count(restic_bin, &repo)? == COUNT {
        return Ok(repo);
    }
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(dir)?;
    restic(restic_bin, &repo, &["init"])?;
    let src = dir.join("snapshots-src");
    for i in 0..8 {
        let path = src.join(format!("volume-{}", i % 3));
        std::fs::create_dir_all(&path)?;
        std::fs::write(
            path.join(format!("file-{i}")),
            vec![i as u8; 4096 * (i + 1)],
        )?;
        let host = format!("host-{}", i % 4);
        let tag = if i % 2 == 0 {
            "daily"
        } else {
            "key=ns/app/vol"
        };
        let p = path.display().to_string();
        restic(
            restic_bin,
            &repo,
            &["backup", "-q", "--host", &host, "--tag", tag, &p],
        )?;
    }
    let mut round = 0;
    while count(restic_bin, &repo)? < COUNT {
        let host = format!("copy-{round}");
        restic(restic_bin, &repo, &["rewrite", "-q", "--new-host", &host])?;
        round += 1;
    }
    let list: Vec<Value> = serde_json::from_slice(&restic(
        restic_bin,
        &repo,
        &["snapshots", "--json", "--no-lock"],
    )?)?;
    let extra: Vec<String> = list
        .iter()
        .skip(COUNT)
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    if !extra.is_empty() {
        let mut args = vec!["forget", "-q"];
        args.extend(extra.iter().map(String::as_str));
        restic(restic_bin, &repo, &args)?;
    }
    ensure!(
        count(restic_bin, &repo)? == COUNT,
        "the dataset has the wrong size"
    );
    Ok(repo)
}

pub async fn run(restic_bin: &Path, data_dir: &Path, rounds: usize) -> anyhow::Result<Outcome> {
    let repo = dataset(restic_bin, data_dir)?;
    let backend = Backend::Local { path: repo.clone() };
    let secrets = Secrets::new().with("RESTIC_PASSWORD", PASSWORD);

    // Check once that both sides list the same thing before timing them.
    let native = NativeRepository::open(&backend, &secrets).await?;
    ensure!(
        native.snapshots().await?.len() == COUNT,
        "native listing is short"
    );

    // Ours: a new reader each time (every snapshot file read and decrypted again); the master
    // key is derived once per process, as in the operator.
    let ours = || {
        let (backend, secrets) = (backend.clone(), secrets.clone());
        async move {
            let repo = NativeRepository::open(&backend, &secrets).await?;
            ensure!(repo.snapshots().await?.len() == COUNT);
            Ok(())
        }
    };
    let baseline = || {
        let (bin, repo) = (restic_bin.to_path_buf(), repo.clone());
        async move {
            ensure!(stock_listing(&bin, &repo).await? == COUNT);
            Ok(())
        }
    };
    let (a, b) = alternate(rounds, ours, baseline).await?;

    // Also time a warm reader, as the Snapshot API serves repeated requests.
    let warm = {
        let mut samples = Vec::new();
        for _ in 0..rounds {
            let t = std::time::Instant::now();
            native.snapshots().await?;
            samples.push(t.elapsed());
        }
        median(&samples)
    };
    let (ours_ms, base_ms) = (
        median(&a).as_secs_f64() * 1e3,
        median(&b).as_secs_f64() * 1e3,
    );
    let ratio = base_ms / ours_ms;
    let mut notes = Map::new();
    notes.insert("snapshots".into(), COUNT.into());
    notes.insert("rounds".into(), rounds.into());
    notes.insert(
        "ratio_meaning".into(),
        "restic time / native reader time (speed-up)".into(),
    );
    notes.insert("warm_reader_ms".into(), (warm.as_secs_f64() * 1e3).into());
    notes.insert(
        "warm_ratio".into(),
        (base_ms / (warm.as_secs_f64() * 1e3)).into(),
    );
    Ok(Outcome {
        ours: ours_ms,
        baseline: base_ms,
        ratio,
        unit: "ms (median)",
        goal: format!(">= {GOAL}"),
        met: ratio >= GOAL,
        notes,
    })
}
