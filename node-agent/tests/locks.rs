//! The agent removes only its own stale locks, against the real restic on real repositories:
//! the lock of a restic it started and that was killed goes; the lock of a live restic it did
//! not start stays, even when it looks old enough for `restic unlock` to take; the lock of a
//! restic started by an earlier agent instance (a replaced pod: another host name, another pid
//! namespace) goes; a corrupt journal is survived.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use restic_wrapper::{
    Backend, BackupOptions, Lock, NativeRepository, PruneOptions, Repository, Restic, Secrets,
};
use stash_node_agent::locks::{Identity, JOURNAL_FILE, Journal, remove_own_stale_locks};
use tokio::io::AsyncRead;

type Result<T = ()> = anyhow::Result<T>;

const PASSWORD: &str = "own locks only";

fn restic_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/restic");
    assert!(p.exists(), "restic is not installed: run `make setup`");
    p
}

/// A reader that never ends: a stdin backup then holds its lock until it is stopped.
struct Endless;

impl AsyncRead for Endless {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
}

/// A local repository in `dir/repo`, initialized, and a client that records its restic
/// processes in `journal`.
async fn repository(dir: &Path, journal: &Arc<Journal>) -> Result<Restic> {
    let repo = Repository::new(
        Backend::Local {
            path: dir.join("repo"),
        },
        Secrets::new().with("RESTIC_PASSWORD", PASSWORD),
        dir,
    )?;
    let restic = Restic::new(repo)
        .with_program(restic_bin())
        .with_tmp_dir(dir)
        .with_grace(Duration::from_secs(10))
        .with_spawn_observer(journal.clone());
    restic.init().await?;
    Ok(restic)
}

async fn native(restic: &Restic) -> Result<NativeRepository> {
    Ok(
        NativeRepository::open(restic.repository().backend(), restic.repository().secrets())
            .await?,
    )
}

/// A temp dir with a state directory, this instance's journal in it, an initialized
/// repository whose client records into the journal, and a native reader of it.
struct Setup {
    dir: tempfile::TempDir,
    state: std::path::PathBuf,
    journal: Arc<Journal>,
    restic: Restic,
    repo: NativeRepository,
}

async fn setup() -> Result<Setup> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state)?;
    let journal = Arc::new(Journal::new(&state, Identity::new_instance()));
    let restic = repository(dir.path(), &journal).await?;
    let repo = native(&restic).await?;
    Ok(Setup {
        dir,
        state,
        journal,
        restic,
        repo,
    })
}

/// Waits until the repository holds `n` locks. A deadline so a broken test fails instead of
/// hanging; not a performance threshold.
async fn wait_for_locks(repo: &NativeRepository, n: usize) -> Result<Vec<Lock>> {
    for _ in 0..300 {
        let locks = repo.locks().await?;
        if locks.len() == n {
            return Ok(locks);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("the repository never held {n} locks")
}

/// The pids of the journal's live entries that are not in `known`.
fn new_pids(journal: &Journal, known: &[u32]) -> Vec<u32> {
    journal
        .entries()
        .iter()
        .filter(|e| !e.exited && !known.contains(&e.pid))
        .map(|e| e.pid)
        .collect()
}

fn kill(signal: &str, pid: u32) -> Result {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill {signal} {pid} failed");
    Ok(())
}

/// Starts a stdin backup through the wrapper and kills it with SIGKILL once it holds its
/// lock, as an OOM kill or a node crash would: restic gets no chance to remove the lock.
/// Returns the killed pid.
async fn killed_backup(
    restic: &Restic,
    journal: &Journal,
    repo: &NativeRepository,
    locks_before: usize,
) -> Result<u32> {
    let known: Vec<u32> = journal.entries().iter().map(|e| e.pid).collect();
    let run = restic.backup_stdin("endless", Endless, &BackupOptions::default())?;
    wait_for_locks(repo, locks_before + 1).await?;
    let pids = new_pids(journal, &known);
    anyhow::ensure!(pids.len() == 1, "one new restic: {:?}", journal.entries());
    kill("-KILL", pids[0])?;
    // Reaps it; SIGINT comes too late to let restic clean up.
    run.cancel().await?;
    Ok(pids[0])
}

/// A restic started behind the agent's back: `backup --stdin` waiting on a pipe that stays
/// open. Killed on drop.
struct Foreign(std::process::Child);

impl Foreign {
    fn start(dir: &Path) -> Result<Foreign> {
        Ok(Foreign(
            Command::new(restic_bin())
                .args([
                    "backup",
                    "--stdin",
                    "--stdin-filename",
                    "foreign",
                    "--no-cache",
                ])
                .env_clear()
                .env("RESTIC_REPOSITORY", dir.join("repo"))
                .env("RESTIC_PASSWORD", PASSWORD)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn stock_restic(dir: &Path, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(restic_bin())
        .args(args)
        .arg("--no-cache")
        .env_clear()
        .env("RESTIC_REPOSITORY", dir.join("repo"))
        .env("RESTIC_PASSWORD", PASSWORD)
        .output()?)
}

#[tokio::test]
async fn the_stale_lock_of_a_killed_restic_is_removed_and_a_running_ones_kept() -> Result {
    // The temp dir is bound so it lives to the end of the test.
    let Setup {
        dir: _dir,
        journal,
        restic,
        repo,
        ..
    } = setup().await?;
    let killed = killed_backup(&restic, &journal, &repo, 0).await?;
    let entry = journal.entries();
    assert!(
        entry.len() == 1 && entry[0].pid == killed && entry[0].exited,
        "the kill is recorded: {entry:?}"
    );
    let stale = repo.locks().await?;
    assert_eq!(stale.len(), 1, "the killed restic left its lock");

    // A backup of this agent that is still running keeps its lock.
    let live = restic.backup_stdin("live", Endless, &BackupOptions::default())?;
    let locks = wait_for_locks(&repo, 2).await?;
    let live_lock = locks
        .into_iter()
        .find(|l| l.id != stale[0].id)
        .expect("the live lock");

    let removed = remove_own_stale_locks(&journal, restic.repository()).await?;
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert_eq!(
        (removed[0].id.as_str(), removed[0].pid),
        (stale[0].id.as_str(), i64::from(killed))
    );
    assert_eq!(repo.locks().await?, vec![live_lock.clone()]);
    // Dealt with, the killed process leaves the journal; the live one stays.
    let entries = journal.entries();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(i64::from(entries[0].pid), live_lock.pid);
    assert!(!entries[0].exited);
    // Nothing more to do while the live backup runs.
    assert!(
        remove_own_stale_locks(&journal, restic.repository())
            .await?
            .is_empty()
    );
    assert_eq!(repo.locks().await?.len(), 1);

    // Interrupted, restic removes its own lock and its entry goes: the journal is empty,
    // and an exclusive lock (prune) is possible again.
    live.cancel().await?;
    assert!(journal.entries().is_empty(), "{:?}", journal.entries());
    assert!(repo.locks().await?.is_empty());
    restic.prune(&PruneOptions::default()).await?;
    Ok(())
}

#[tokio::test]
async fn a_live_foreign_restics_lock_stays_even_when_it_looks_old() -> Result {
    let Setup {
        dir,
        journal,
        restic,
        repo,
        ..
    } = setup().await?;

    let foreign = Foreign::start(dir.path())?;
    let held = wait_for_locks(&repo, 1).await?.remove(0);
    assert_eq!(held.pid, i64::from(foreign.0.id()));
    // Made to look two hours old: the same holder, rewritten with an old time.
    let old_time = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(2);
    let old_id = repo
        .write_lock(&Lock {
            time: old_time.to_string(),
            ..held.clone()
        })
        .await?;
    repo.remove_lock(&held.id).await?;
    let old = repo.lock(&old_id).await?.expect("the old-looking lock");
    assert_eq!(old.pid, held.pid);

    // A stale lock of this agent is there too, so the removal reads every lock.
    let killed = killed_backup(&restic, &journal, &repo, 1).await?;
    let removed = remove_own_stale_locks(&journal, restic.repository()).await?;
    assert_eq!(
        removed.iter().map(|r| r.pid).collect::<Vec<_>>(),
        vec![i64::from(killed)]
    );
    assert_eq!(
        repo.locks().await?,
        vec![old.clone()],
        "the foreign lock stays"
    );

    // Stock `restic unlock` would have taken it: it really looks stale to restic.
    let unlock = stock_restic(dir.path(), &["unlock"])?;
    assert!(
        unlock.status.success(),
        "{}",
        String::from_utf8_lossy(&unlock.stderr)
    );
    assert!(repo.locks().await?.is_empty());
    drop(foreign);
    Ok(())
}

/// An agent pod that was replaced: its restic ran with the old pod's host name, in the old
/// container's pid namespace (where it was pid 1), and died with it. The new instance finds
/// the old one's journal entry and removes the lock, although pid 1 is alive here: an
/// earlier instance's pids say nothing about this namespace.
#[tokio::test]
async fn the_lock_of_a_restic_of_an_earlier_agent_instance_is_removed() -> Result {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let old = Identity {
        hostname: "stash-node-agent-old".into(),
        instance: "earlier-instance".into(),
        started: jiff::Timestamp::now(),
    };
    let old_journal = Arc::new(Journal::new(&state, old.clone()));
    let restic = repository(dir.path(), &old_journal).await?;
    let repo = native(&restic).await?;
    let name = restic.repository().display_name();

    // unshare's child gets SIGKILL when unshare dies (--kill-child): killing unshare kills
    // the old "pod" and its restic at once.
    let mut pod = Command::new("unshare")
        .args([
            "--uts",
            "--pid",
            "--fork",
            "--kill-child=SIGKILL",
            "sh",
            "-c",
        ])
        .arg(r#"hostname "$1" && exec "$0" backup --stdin --stdin-filename old --no-cache"#)
        .arg(restic_bin())
        .arg(&old.hostname)
        .env_clear()
        .env("RESTIC_REPOSITORY", dir.path().join("repo"))
        .env("RESTIC_PASSWORD", PASSWORD)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("this test needs unshare(1) and root: {e}"))?;
    old_journal.record_started(1, &name)?;
    let lock = match wait_for_locks(&repo, 1).await {
        Ok(mut locks) => locks.remove(0),
        Err(e) => {
            let _ = pod.kill();
            let out = pod.wait_with_output()?;
            anyhow::bail!("{e}: {}", String::from_utf8_lossy(&out.stderr));
        }
    };
    assert_eq!(
        (lock.hostname.as_str(), lock.pid),
        (old.hostname.as_str(), 1)
    );
    pod.kill()?;
    pod.wait()?;
    assert_eq!(
        repo.locks().await?,
        vec![lock.clone()],
        "the old pod left its lock"
    );

    // The old instance's view: its process 1 is alive (pid 1 here is this machine's init).
    assert!(stash_node_agent::locks::process_alive(1));
    let journal = Journal::new(&state, Identity::new_instance());
    let removed = remove_own_stale_locks(&journal, restic.repository()).await?;
    assert_eq!(
        removed
            .iter()
            .map(|r| (r.id.as_str(), r.hostname.as_str(), r.pid))
            .collect::<Vec<_>>(),
        vec![(lock.id.as_str(), old.hostname.as_str(), 1)]
    );
    assert!(repo.locks().await?.is_empty());
    assert!(journal.entries().is_empty(), "{:?}", journal.entries());
    Ok(())
}

#[tokio::test]
async fn a_corrupt_journal_is_survived() -> Result {
    let Setup {
        dir: _dir,
        state,
        journal,
        restic,
        repo,
    } = setup().await?;

    for garbage in [
        &b"{\"version\":1,\"entr"[..],
        b"",
        b"\x00\xff not json",
        b"[]",
    ] {
        std::fs::write(state.join(JOURNAL_FILE), garbage)?;
        assert!(journal.entries().is_empty());
        assert!(
            remove_own_stale_locks(&journal, restic.repository())
                .await?
                .is_empty()
        );
    }
    // The next restic rewrites it whole, and the agent finds its stale lock as ever.
    let killed = killed_backup(&restic, &journal, &repo, 0).await?;
    assert_eq!(journal.entries().len(), 1);
    let removed = remove_own_stale_locks(&journal, restic.repository()).await?;
    assert_eq!(
        removed.iter().map(|r| r.pid).collect::<Vec<_>>(),
        vec![i64::from(killed)]
    );
    assert!(repo.locks().await?.is_empty());
    Ok(())
}
