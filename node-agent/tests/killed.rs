//! The standalone agent SIGKILLed mid-backup, in both read modes, at points spread over the
//! whole read: its restic never outlives it, no snapshot in the repository restores to less
//! than the volume it was made of, the next backup is never "unchanged" against a cut-short
//! one (it leaves none behind), and `restic check` stays clean.

#[path = "common/kill.rs"]
mod kill;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kill::{Death, Ledger, ROUNDS, VOLUME_BYTES, kill_after_read};
use serde_json::Value;
use stash_node_agent::engine;

type Result<T = ()> = anyhow::Result<T>;

const PASSWORD: &str = "killed agent test";
const HOST: &str = "host-0";
const KEY: &str = "demo/app/data";

fn restic_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/restic");
    assert!(p.exists(), "restic is not installed: run `make setup`");
    p
}

/// A copy of the agent binary, so another build of the workspace cannot swap it mid-test.
fn agent_copy(dir: &Path) -> Result<PathBuf> {
    let agent = dir.join("stash-node-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_stash-node-agent"), &agent)?;
    Ok(agent)
}

/// The standalone agent running `args` against the test's repository, with nothing of this
/// process's environment but what it needs.
fn agent_command(agent: &Path, dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(agent);
    cmd.args(args)
        .arg("--repo")
        .arg(dir.join("repo"))
        .arg("--cache-dir")
        .arg(dir.join("cache"))
        .arg("--restic")
        .arg(restic_bin())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("RESTIC_PASSWORD", PASSWORD)
        .env("STASH_LOG_LEVEL", "warn")
        .stdin(Stdio::null());
    cmd
}

fn backup_command(agent: &Path, dir: &Path, volume: &Path, mode: &str) -> Command {
    let mut cmd = agent_command(
        agent,
        dir,
        &["backup", "--mode", mode, "--host", HOST, "--key", KEY],
    );
    cmd.arg("--path").arg(volume);
    cmd
}

async fn killed_standalone(mode: &str) -> Result {
    let dir = tempfile::tempdir()?;
    let agent = agent_copy(dir.path())?;
    let volume = dir.path().join("volume");
    let mut ledger = Ledger::new(
        &dir.path().join("repo"),
        dir.path(),
        &restic_bin(),
        PASSWORD,
    )?;
    let mut kills = 0;
    for round in 1..=ROUNDS {
        ledger.fill(&volume, round)?;
        let mut victim = backup_command(&agent, dir.path(), &volume, mode)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let threshold = VOLUME_BYTES as u64 * round / ROUNDS;
        match kill_after_read(&mut victim, threshold)? {
            Death::Killed { read, told } => {
                assert!(
                    told,
                    "{mode} round {round}: restic was not told of its agent's death"
                );
                assert!(read >= threshold);
                kills += 1;
            }
            Death::Finished => {}
        }
        // What a restore would take now holds a whole volume.
        if let Some(latest) = engine::latest(&ledger.restic, HOST, KEY).await? {
            ledger.restores_whole(&latest.id).await?;
        }

        // The next backup of the same volume: a new snapshot, or "unchanged" against one
        // that holds this very volume.
        let out = backup_command(&agent, dir.path(), &volume, mode).output()?;
        anyhow::ensure!(
            out.status.success(),
            "{mode} round {round}: the next backup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: Value = serde_json::from_slice(&out.stdout)?;
        let id = summary["snapshot_id"].as_str().unwrap_or_default();
        assert_eq!(
            ledger.restores_whole(id).await?,
            round,
            "{mode} round {round}: the next backup's snapshot is not of this volume: {summary}"
        );
        // And nothing cut short is left for anyone to use.
        ledger.all_whole().await?;
    }
    assert!(
        kills >= ROUNDS - 1,
        "{mode}: only {kills} of {ROUNDS} backups were killed mid-read"
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_stream_backup_leaves_no_snapshot_that_looks_complete() -> Result {
    killed_standalone("stream").await
}

#[tokio::test]
async fn a_killed_direct_backup_leaves_no_snapshot_that_looks_complete() -> Result {
    killed_standalone("direct").await
}

/// What a stream backup leaves where restic outlives its agent (no parent-death signal
/// reached it): restic's input fails instead of ending, so it saves a snapshot without the
/// stream's file (and exits 3), carrying the agent's tags. That snapshot is refused by a
/// restore, is not `latest`, is no "unchanged" reference, and the next backup deletes it.
#[tokio::test]
async fn a_stream_cut_short_is_saved_without_its_file_and_never_used() -> Result {
    use std::io::Write;
    let dir = tempfile::tempdir()?;
    let volume = dir.path().join("volume");
    let mut ledger = Ledger::new(
        &dir.path().join("repo"),
        dir.path(),
        &restic_bin(),
        PASSWORD,
    )?;
    ledger.restic.init().await?;
    ledger.fill(&volume, 1)?;
    let request = || engine::BackupRequest {
        host: Some(HOST.into()),
        key: Some(KEY.into()),
        ..engine::BackupRequest::new(&volume, engine::ReadMode::Stream)
    };
    let first = engine::backup(&ledger.restic, request()).await?;
    let first_id = first.snapshot_id.clone().unwrap_or_default();

    // The agent's side of restic's input, as `restic_wrapper` sets it up, dying mid-stream.
    let (mut ours, mut theirs) = std::os::unix::net::UnixStream::pair()?;
    theirs.write_all(b".")?;
    let opened = stash_node_agent::walk::Volume::open(
        &volume,
        &stash_node_agent::pattern::Patterns::default(),
        &[],
    )?;
    let unlimited = stash_node_agent::budget::AssignmentBudget::unlimited();
    let (digest, _, _) = engine::manifest_digest(&opened, &unlimited, false)?;
    let restic = Command::new(restic_bin())
        .args([
            "backup",
            "--json",
            "--stdin",
            "--stdin-filename",
            "volume.tar",
        ])
        .args([
            "--host",
            HOST,
            "--tag",
            &format!("{}{KEY}", engine::TAG_KEY_PREFIX),
        ])
        .args(["--tag", engine::TAG_STREAM])
        .args(["--tag", &format!("{}{digest}", engine::TAG_MANIFEST_PREFIX)])
        .arg("--no-cache")
        .env("RESTIC_REPOSITORY", &ledger.repo)
        .env("RESTIC_PASSWORD", PASSWORD)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    ours.write_all(&vec![7u8; 1 << 20])?;
    drop(ours);
    let out = restic.wait_with_output()?;
    assert_eq!(out.status.code(), Some(3), "restic took the cut for an end");
    let cut: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message_type"] == "summary")
        .ok_or_else(|| anyhow::anyhow!("restic printed no summary"))?;
    let cut_id = cut["snapshot_id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(cut["total_files_processed"], 0, "{cut}");

    let refused = engine::restore(
        &ledger.restic,
        engine::RestoreRequest {
            snapshot: cut_id.clone(),
            target: dir.path().join("target"),
            delete: false,
            include: vec![],
            exclude: vec![],
            budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
            owners: false,
        },
    )
    .await;
    assert!(
        matches!(refused, Err(engine::AgentError::IncompleteSnapshot(_))),
        "{refused:?}"
    );
    let latest = engine::latest(&ledger.restic, HOST, KEY)
        .await?
        .map(|s| s.id);
    assert_eq!(latest.as_deref(), Some(first_id.as_str()));

    // Same volume, same manifest as the cut snapshot: unchanged, but against the whole one.
    let next = engine::backup(&ledger.restic, request()).await?;
    assert!(next.unchanged, "{next:?}");
    assert_eq!(next.snapshot_id.as_deref(), Some(first_id.as_str()));
    let listed = ledger.stock(&["snapshots", "--json"])?;
    assert!(
        !String::from_utf8_lossy(&listed).contains(&cut_id),
        "the cut-short snapshot is still there"
    );
    ledger.all_whole().await
}

/// The names below `root` that an agent's restore gives its temporary entries.
fn leftovers(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(stash_node_agent::extract::TEMP_PREFIX)
            {
                out.push(path);
            } else if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path);
            }
        }
    }
    out
}

/// The standalone agent SIGKILLed while it restores in place, in both modes, the moment a
/// temporary entry of its restore appears in the volume: every live file is then its old
/// content or the snapshot's, never a mix, and the next restore takes the volume to the
/// snapshot exactly, leaving none of the killed one's temporary files behind.
async fn killed_restore(mode: &str) -> Result {
    let dir = tempfile::tempdir()?;
    let agent = agent_copy(dir.path())?;
    let volume = dir.path().join("volume");
    let ledger = Ledger::new(
        &dir.path().join("repo"),
        dir.path(),
        &restic_bin(),
        PASSWORD,
    )?;
    ledger.restic.init().await?;
    kill::fill(&volume, 1, 4 * VOLUME_BYTES)?;
    let out = backup_command(&agent, dir.path(), &volume, mode).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{mode}: the backup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout)?;
    let id = summary["snapshot_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let backed_up = kill::contents(&volume)?;
    // The workload moved on: every file differs from the snapshot.
    kill::fill(&volume, 2, 4 * VOLUME_BYTES)?;
    let moved_on = kill::contents(&volume)?;
    let target = volume.to_string_lossy().into_owned();
    let restore = || {
        let mut cmd = agent_command(
            &agent,
            dir.path(),
            &["restore", "--snapshot", &id, "--target", &target],
        );
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        cmd
    };
    let mut victim = restore().spawn()?;
    let started = std::time::Instant::now();
    let restics = loop {
        anyhow::ensure!(
            started.elapsed() < kill::HANG,
            "{mode}: the restore never wrote"
        );
        anyhow::ensure!(
            victim.try_wait()?.is_none(),
            "{mode}: the restore ended before it could be killed"
        );
        if !leftovers(&volume).is_empty() {
            let restics = kill::children(victim.id());
            victim.kill()?;
            victim.wait()?;
            break restics;
        }
    };
    // What restic may still be doing when its agent is gone ends with it.
    while restics.iter().any(|pid| !kill::gone(*pid)) {
        anyhow::ensure!(
            started.elapsed() < kill::HANG,
            "{mode}: restic outlived its agent"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    anyhow::ensure!(
        !leftovers(&volume).is_empty(),
        "{mode}: the killed restore left nothing to sweep, so this test shows nothing"
    );
    for (path, now) in kill::contents(&volume)? {
        if path.contains(stash_node_agent::extract::TEMP_PREFIX) {
            continue;
        }
        anyhow::ensure!(
            backed_up.get(&path) == Some(&now) || moved_on.get(&path) == Some(&now),
            "{mode}: {path} is neither its old content nor the snapshot's after the kill"
        );
    }

    let out = restore().stdout(Stdio::piped()).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{mode}: the restore after the kill failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(leftovers(&volume), Vec::<PathBuf>::new(), "{mode}");
    assert_eq!(kill::contents(&volume)?, backed_up, "{mode}");
    Ok(())
}

#[tokio::test]
async fn a_killed_stream_restore_leaves_old_or_new_files_and_nothing_behind() -> Result {
    killed_restore("stream").await
}

#[tokio::test]
async fn a_killed_direct_restore_leaves_old_or_new_files_and_nothing_behind() -> Result {
    killed_restore("direct").await
}
