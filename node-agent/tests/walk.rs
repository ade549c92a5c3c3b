//! What the volume walk decides, checked in both read modes against the real restic: the
//! same files left out by excludes and `paths`, every change restic would see seen, and no
//! byte from outside the volume in any snapshot while a workload swaps entries for symlinks
//! and FIFOs.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[allow(dead_code)] // a test binary uses only part of the shared helpers
mod common;

use common::repo;
use restic_wrapper::{Restic, SnapshotFilter};
use stash_node_agent::engine::{self, AgentError, BackupRequest, ReadMode, RestoreRequest};
use stash_node_agent::stream::StreamError;

type Result<T = ()> = anyhow::Result<T>;

const MODES: [ReadMode; 2] = [ReadMode::Stream, ReadMode::Direct];

/// Not a timing threshold: a backup that takes this long has hung (a FIFO, say).
const HUNG: Duration = Duration::from_secs(300);

fn request(path: &Path, mode: ReadMode, key: &str) -> BackupRequest {
    BackupRequest {
        host: Some("host-0".into()),
        key: Some(key.into()),
        ..BackupRequest::new(path, mode)
    }
}

async fn backup(restic: &Restic, req: BackupRequest) -> Result<engine::BackupResult> {
    Ok(tokio::time::timeout(HUNG, engine::backup(restic, req)).await??)
}

async fn restore(restic: &Restic, snapshot: &str, target: &Path) -> Result {
    let req = RestoreRequest {
        snapshot: snapshot.into(),
        target: target.to_path_buf(),
        delete: false,
        include: vec![],
        exclude: vec![],
        budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
        owners: false,
    };
    engine::restore(restic, req).await?;
    Ok(())
}

/// Every entry beneath `root`, relative to it, directories with a trailing `/`.
fn entries(root: &Path) -> Result<BTreeSet<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) -> Result {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let rel = e.path().strip_prefix(root)?.display().to_string();
            if e.file_type()?.is_dir() {
                out.insert(format!("{rel}/"));
                walk(root, &e.path(), out)?;
            } else {
                out.insert(rel);
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

fn tree(root: &Path) -> Result {
    for f in [
        "a.log",
        "keep.log",
        "top.txt",
        "data/a.db",
        "data/b.txt",
        "data/cache/x",
        "sub/data/y",
        "cache/z",
        "logs/2024/app.log",
    ] {
        let p = root.join(f);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, f.as_bytes())?;
    }
    Ok(())
}

/// One table, both modes: the files each pattern list leaves out, and the two modes agree on
/// every entry (directories too).
#[tokio::test]
async fn excludes_leave_out_the_same_files_in_both_modes() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    let volume = dir.path().join("volume");
    tree(&volume)?;
    let all: BTreeSet<String> = entries(&volume)?
        .into_iter()
        .filter(|e| !e.ends_with('/'))
        .collect();
    let table: &[(&[&str], &[&str])] = &[
        (&["*.log"], &["a.log", "keep.log", "logs/2024/app.log"]),
        (&["*.log", "!keep.log"], &["a.log", "logs/2024/app.log"]),
        (&["/data"], &["data/a.db", "data/b.txt", "data/cache/x"]),
        (
            &["data"],
            &["data/a.db", "data/b.txt", "data/cache/x", "sub/data/y"],
        ),
        (&["cache"], &["data/cache/x", "cache/z"]),
        (&["/data/*.db"], &["data/a.db"]),
        (&["**/2024"], &["logs/2024/app.log"]),
        (&["./top.txt", "sub/"], &["top.txt", "sub/data/y"]),
        // Components of the host path above the volume match nothing.
        (&["volume", "tmp*"], &[]),
    ];
    for (i, (patterns, left_out)) in table.iter().enumerate() {
        let mut seen = Vec::new();
        for mode in MODES {
            let mut req = request(&volume, mode, &format!("excludes/{i}/{mode:?}"));
            req.excludes = patterns.iter().map(|p| p.to_string()).collect();
            let r = backup(&restic, req).await?;
            let id = r.snapshot_id.expect("a snapshot");
            let target = dir.path().join(format!("r-{i}-{mode:?}"));
            restore(&restic, &id, &target).await?;
            let got = entries(&target)?;
            let want: BTreeSet<String> = all
                .iter()
                .filter(|f| !left_out.contains(&f.as_str()))
                .cloned()
                .collect();
            let files: BTreeSet<String> =
                got.iter().filter(|e| !e.ends_with('/')).cloned().collect();
            assert_eq!(files, want, "{patterns:?} in {mode:?}");
            seen.push(got);
        }
        assert_eq!(seen[0], seen[1], "{patterns:?}: stream and direct differ");
    }
    // A pattern restic cannot parse fails the backup before anything is read.
    for mode in MODES {
        let mut req = request(&volume, mode, "bad");
        req.excludes = vec!["data/[".into()];
        let err = engine::backup(&restic, req).await;
        assert!(
            matches!(err, Err(AgentError::Pattern(_))),
            "{mode:?}: {err:?}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn paths_limit_the_backup_in_both_modes() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    let volume = dir.path().join("volume");
    tree(&volume)?;
    let mut seen = Vec::new();
    for mode in MODES {
        let mut req = request(&volume, mode, &format!("paths/{mode:?}"));
        req.paths = vec!["data".into(), "/logs".into()];
        req.excludes = vec!["cache".into()];
        let r = backup(&restic, req).await?;
        let target = dir.path().join(format!("r-{mode:?}"));
        restore(&restic, &r.snapshot_id.expect("a snapshot"), &target).await?;
        let got = entries(&target)?;
        let want: BTreeSet<String> = [
            "data/",
            "data/a.db",
            "data/b.txt",
            "logs/",
            "logs/2024/",
            "logs/2024/app.log",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        assert_eq!(got, want, "{mode:?}");
        seen.push(got);
    }
    // A nested path: the stream walks to it beneath the root; direct mode refuses it, as
    // restic would resolve it itself.
    let mut req = request(&volume, ReadMode::Stream, "paths/nested");
    req.paths = vec!["logs/2024".into()];
    let r = backup(&restic, req).await?;
    let target = dir.path().join("r-nested");
    restore(&restic, &r.snapshot_id.expect("a snapshot"), &target).await?;
    assert_eq!(
        entries(&target)?.into_iter().collect::<Vec<_>>(),
        ["logs/", "logs/2024/", "logs/2024/app.log"]
    );
    let mut req = request(&volume, ReadMode::Direct, "paths/nested");
    req.paths = vec!["logs/2024".into()];
    let err = engine::backup(&restic, req).await;
    assert!(
        matches!(err, Err(AgentError::Stream(StreamError::BadPath { .. }))),
        "{err:?}"
    );
    // Paths that leave the volume, are missing or are symlinks are refused in both modes.
    std::os::unix::fs::symlink(dir.path(), volume.join("up"))?;
    for bad in ["../volume", "missing", "up", "top.txt"] {
        for mode in MODES {
            let mut req = request(&volume, mode, "paths/bad");
            req.paths = vec![bad.into()];
            let err = engine::backup(&restic, req).await;
            assert!(
                matches!(err, Err(AgentError::Stream(StreamError::BadPath { .. }))),
                "{bad} in {mode:?}: {err:?}"
            );
        }
    }
    Ok(())
}

/// `cp -p`, `rsync -a`, `tar -x`: new content of the same size with the old mtime is a
/// change in both modes (ctime and the inode tell).
#[tokio::test]
async fn a_same_size_rewrite_with_the_old_mtime_is_backed_up_again() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    for mode in MODES {
        let volume = dir.path().join(format!("v-{mode:?}"));
        std::fs::create_dir_all(&volume)?;
        let f = volume.join("db");
        std::fs::write(&f, b"old content")?;
        let key = format!("rewrite/{mode:?}");
        let first = backup(&restic, request(&volume, mode, &key)).await?;
        let mtime = std::fs::metadata(&f)?.modified()?;
        std::fs::write(&f, b"new content")?;
        std::fs::File::options()
            .write(true)
            .open(&f)?
            .set_modified(mtime)?;
        assert_eq!(std::fs::metadata(&f)?.modified()?, mtime);
        let second = backup(&restic, request(&volume, mode, &key)).await?;
        assert!(!second.unchanged, "{mode:?}: {second:?}");
        assert_ne!(second.snapshot_id, first.snapshot_id, "{mode:?}");
        let target = dir.path().join(format!("r-{mode:?}"));
        restore(&restic, &second.snapshot_id.expect("a snapshot"), &target).await?;
        assert_eq!(
            std::fs::read(target.join("db"))?,
            b"new content",
            "{mode:?}"
        );
    }
    Ok(())
}

fn getcap(path: &Path) -> Result<String> {
    let out = std::process::Command::new("getcap").arg(path).output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An xattr alone, then a file capability alone: neither is `unchanged`, and the restore
/// has them.
#[tokio::test]
async fn xattr_and_capability_changes_are_changes() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    for mode in MODES {
        let volume = dir.path().join(format!("v-{mode:?}"));
        std::fs::create_dir_all(&volume)?;
        let f = volume.join("bin");
        std::fs::write(&f, b"#!/bin/true\n")?;
        let key = format!("meta/{mode:?}");
        backup(&restic, request(&volume, mode, &key)).await?;
        assert!(
            backup(&restic, request(&volume, mode, &key))
                .await?
                .unchanged
        );

        rustix::fs::setxattr(&f, "user.note", b"v1", rustix::fs::XattrFlags::empty())?;
        let r = backup(&restic, request(&volume, mode, &key)).await?;
        assert!(!r.unchanged, "{mode:?}: xattr change taken for unchanged");
        let target = dir.path().join(format!("x-{mode:?}"));
        restore(&restic, &r.snapshot_id.expect("a snapshot"), &target).await?;
        let mut value = [0u8; 16];
        let n = rustix::fs::getxattr(target.join("bin"), "user.note", &mut value)?;
        assert_eq!(&value[..n], b"v1", "{mode:?}");

        let set = std::process::Command::new("setcap")
            .arg("cap_net_raw+ep")
            .arg(&f)
            .status()?;
        anyhow::ensure!(set.success(), "setcap failed");
        let r = backup(&restic, request(&volume, mode, &key)).await?;
        assert!(
            !r.unchanged,
            "{mode:?}: capability change taken for unchanged"
        );
        let target = dir.path().join(format!("c-{mode:?}"));
        restore(&restic, &r.snapshot_id.expect("a snapshot"), &target).await?;
        assert!(
            getcap(&target.join("bin"))?.contains("cap_net_raw"),
            "{mode:?}: {}",
            getcap(&target.join("bin"))?
        );
    }
    Ok(())
}

const MARKER: &[u8] = b"MARKER-outside-the-volume-7f3a9c";

/// Swaps entries of the volume, round after round, until told to stop: files for symlinks
/// to a file outside holding the marker, directories for symlinks to the directory
/// outside, files for FIFOs, and back.
fn swapper(volume: PathBuf, outside: PathBuf, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) {
    const MAX_ROUNDS: u64 = 1_000_000;
    let secret = outside.join("secret");
    while !stop.load(Ordering::Relaxed) && rounds.load(Ordering::Relaxed) < MAX_ROUNDS {
        for i in 0..8 {
            let f = volume.join(format!("f{i}"));
            let d = volume.join(format!("d{i}"));
            let parked = volume.join(format!(".d{i}"));
            // Errors are expected: the reader holds or has just moved nothing, but a round
            // may find an entry in either state.
            let _ = std::fs::remove_file(&f);
            let _ = std::os::unix::fs::symlink(&secret, &f);
            let _ = std::fs::rename(&d, &parked);
            let _ = std::os::unix::fs::symlink(&outside, &d);
            let _ = std::fs::remove_file(&f);
            let _ = rustix::fs::mknodat(
                rustix::fs::CWD,
                &f,
                rustix::fs::FileType::Fifo,
                rustix::fs::Mode::from_raw_mode(0o644),
                0,
            );
            let _ = std::fs::remove_file(&d);
            let _ = std::fs::rename(&parked, &d);
            let _ = std::fs::remove_file(&f);
            let _ = std::fs::write(&f, b"inside");
            // An editor's save, log rotation: a new file renamed over the old.
            let tmp = volume.join(format!(".r{i}.tmp"));
            let _ = std::fs::write(&tmp, b"renamed over");
            let _ = std::fs::rename(&tmp, volume.join(format!("r{i}")));
        }
        rounds.fetch_add(1, Ordering::Relaxed);
    }
}

/// The attack of the confinement item: while a workload swaps entries as fast as it can,
/// stream and direct backups run; none hangs, no stream backup fails for it (a swapped or
/// renamed-over file is a changed file), and no snapshot in the repository holds a byte of
/// the file outside the volume. (Which entries a run catches mid-swap is up to the race;
/// the walk's own test swaps them deterministically and checks each is reported.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_swapped_for_symlinks_and_fifos_never_leak_or_hang() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    let volume = dir.path().join("volume");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    std::fs::write(outside.join("secret"), MARKER)?;
    for i in 0..8 {
        std::fs::create_dir_all(volume.join(format!("d{i}")))?;
        std::fs::write(volume.join(format!("d{i}/inner")), b"inner")?;
        std::fs::write(volume.join(format!("f{i}")), b"inside")?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let swapping = {
        let (v, o, s, r) = (
            volume.clone(),
            outside.clone(),
            stop.clone(),
            rounds.clone(),
        );
        std::thread::spawn(move || swapper(v, o, s, r))
    };
    let mut outcomes = Vec::new();
    for round in 0..4 {
        for mode in MODES {
            // Each its own key: never `unchanged`, every one reads the volume.
            let req = request(&volume, mode, &format!("swap/{round}/{mode:?}"));
            let outcome = tokio::time::timeout(HUNG, engine::backup(&restic, req)).await;
            let outcome = outcome.map_err(|_| anyhow::anyhow!("{mode:?} backup hung"));
            outcomes.push((mode, outcome?.map(|r| r.changed_during_read.len())));
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapping
        .join()
        .map_err(|_| anyhow::anyhow!("the swapper panicked"))?;
    eprintln!(
        "{} swap rounds; outcomes: {outcomes:?}",
        rounds.load(Ordering::Relaxed)
    );
    // A stream backup never fails for a swap: it reports it and goes on.
    for (mode, outcome) in &outcomes {
        if *mode == ReadMode::Stream {
            assert!(outcome.is_ok(), "{outcome:?}");
        }
    }
    let snapshots = restic.snapshots(&SnapshotFilter::default()).await?;
    assert!(!snapshots.is_empty());
    for snap in &snapshots {
        let out = dir.path().join(format!("dump-{}", snap.id));
        let file = tokio::fs::File::create(&out).await?;
        restic
            .dump(&snap.id, "/", &SnapshotFilter::default(), file)
            .await?;
        let bytes = std::fs::read(&out)?;
        assert!(!bytes.is_empty(), "{}: empty dump", snap.id);
        assert!(
            !bytes.windows(MARKER.len()).any(|w| w == MARKER),
            "snapshot {} ({:?}) holds the marker from outside the volume",
            snap.id,
            snap.tags
        );
    }
    // The volume is whole again, as the swapper leaves it: a final backup of each mode
    // holds every file.
    for mode in MODES {
        let r = backup(&restic, request(&volume, mode, &format!("after/{mode:?}"))).await?;
        let target = dir.path().join(format!("after-{mode:?}"));
        restore(&restic, &r.snapshot_id.expect("a snapshot"), &target).await?;
        for i in 0..8 {
            let f = target.join(format!("f{i}"));
            assert!(std::fs::symlink_metadata(&f)?.is_file(), "{mode:?} f{i}");
            assert_eq!(std::fs::read(&f)?, b"inside");
            assert!(
                std::fs::symlink_metadata(target.join(format!("d{i}/inner")))?.size() > 0,
                "{mode:?} d{i}"
            );
        }
    }
    Ok(())
}
