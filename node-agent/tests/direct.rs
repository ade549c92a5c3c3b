//! Direct mode under the node's rules, against the real restic and the real kernel: restic's
//! reads are counted and charged to the node's IO budget, what they bring into the page cache
//! leaves when restic is done while what a workload kept hot stays, and a budget that the
//! volume's disk cannot enforce makes the agent read the volume itself.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[allow(dead_code)] // a test binary uses only part of the shared helpers
mod common;

use common::repo;
use stash_node_agent::budget::{AssignmentBudget, Clock, IoBudget, Limits};
use stash_node_agent::engine::{self, BackupRequest, ReadMode, RestoreRequest};
use stash_node_agent::residency::resident_pages;

type Result<T = ()> = anyhow::Result<T>;

const MIB: usize = 1 << 20;

fn request(path: &Path) -> BackupRequest {
    BackupRequest {
        host: Some("host-0".into()),
        key: Some("demo/app/data".into()),
        ..BackupRequest::new(path, ReadMode::Direct)
    }
}

/// cgroups are root's to create: elsewhere these tests have nothing to exercise.
fn root() -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("skipped: direct mode's cgroups need root");
    }
    root
}

/// Under target/: a disk filesystem, where /tmp may be memory.
fn disk_dir() -> Result<tempfile::TempDir> {
    Ok(tempfile::tempdir_in(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target"
    ))?)
}

fn resident(path: &Path) -> Result<(usize, usize)> {
    let f = File::open(path)?;
    let len = f.metadata()?.len();
    let pages = resident_pages(&f, 0, len).ok_or_else(|| anyhow::anyhow!("mincore failed"))?;
    Ok((pages.iter().filter(|r| **r).count(), pages.len()))
}

/// Restores a whole snapshot into `target`, in place.
async fn restore(
    restic: &restic_wrapper::Restic,
    snapshot: String,
    target: &Path,
) -> Result<engine::RestoreResult> {
    Ok(engine::restore(
        restic,
        RestoreRequest {
            snapshot,
            target: target.to_path_buf(),
            delete: false,
            include: vec![],
            exclude: vec![],
            budget: AssignmentBudget::unlimited(),
            owners: true,
        },
    )
    .await?)
}

/// An empty volume directory on a disk filesystem, in a directory of its own.
fn disk_volume() -> Result<(tempfile::TempDir, std::path::PathBuf)> {
    let dir = disk_dir()?;
    let volume = dir.path().join("volume");
    std::fs::create_dir(&volume)?;
    Ok((dir, volume))
}

/// Writes `path` to disk and drops it from the page cache.
fn cold(path: &Path, len: usize) -> Result {
    let mut f = File::create(path)?;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    f.write_all(&data)?;
    f.sync_all()?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
    anyhow::ensure!(
        resident(path)?.0 == 0,
        "{} stays cached after POSIX_FADV_DONTNEED: run the tests on a disk filesystem",
        path.display()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_backup_leaves_the_page_cache_as_it_found_it() -> Result {
    if !root() {
        return Ok(());
    }
    let (dir, volume) = disk_volume()?;
    cold(&volume.join("hot"), 16 * MIB)?;
    cold(&volume.join("cold"), 24 * MIB)?;
    // A control outside the volume, as hot: what the machine's own reclaim takes meanwhile
    // (a compiler linking beside the tests can make it take a lot) is not the backup's doing.
    let control = dir.path().join("control");
    cold(&control, 16 * MIB)?;
    // What a workload keeps hot: read through twice, so it is cached on the active list, and
    // charged to this (the test's) cgroup.
    for _ in 0..2 {
        for file in [volume.join("hot"), control.clone()] {
            std::io::copy(&mut File::open(file)?, &mut std::io::sink())?;
        }
    }
    let (hot_before, hot_pages) = resident(&volume.join("hot"))?;
    assert_eq!(hot_before, hot_pages, "the hot file is cached");
    let restic = repo(dir.path()).await?;

    let r = engine::backup(&restic, request(&volume)).await?;
    assert_eq!(r.mode, Some(ReadMode::Direct));
    let read = r
        .storage_read_bytes
        .expect("the kernel counted restic's reads");
    assert!(
        read >= 24 * MIB as u64,
        "restic read the cold file from disk: {read} bytes counted"
    );

    let (hot_after, _) = resident(&volume.join("hot"))?;
    let (control_after, _) = resident(&control)?;
    let (cold_after, cold_pages) = resident(&volume.join("cold"))?;
    // Beyond what reclaim took from the control, not a hundredth.
    let reclaimed = hot_pages - control_after.min(hot_pages);
    assert!(
        (hot_after + reclaimed) * 100 >= hot_pages * 99,
        "hot pages dropped: {hot_after} of {hot_pages} left ({control_after} of the control's)"
    );
    assert!(
        cold_after * 100 <= cold_pages,
        "pages restic brought in stayed: {cold_after} of {cold_pages}"
    );
    // And the snapshot is whole.
    let restored = dir.path().join("restored");
    std::fs::create_dir(&restored)?;
    restore(&restic, r.snapshot_id.expect("a snapshot"), &restored).await?;
    for name in ["hot", "cold"] {
        assert!(
            std::fs::read(restored.join(name))? == std::fs::read(volume.join(name))?,
            "{name} restored as it was"
        );
    }
    Ok(())
}

/// A clock that never moves: what is charged to a budget stays as its debt, to be read back.
#[derive(Debug)]
struct Frozen(Instant);

impl Clock for Frozen {
    fn now(&self) -> Instant {
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restic_reads_are_charged_to_the_node_budget() -> Result {
    if !root() {
        return Ok(());
    }
    let (dir, volume) = disk_volume()?;
    cold(&volume.join("data"), 32 * MIB)?;
    let restic = repo(dir.path()).await?;
    // Fast enough to take a moment, slow enough that the kernel paces restic.
    let rate = 256 * MIB as u64;
    let node = IoBudget::with_clock(
        Limits {
            bytes_per_second: Some(rate),
            iops: None,
        },
        Arc::new(Frozen(Instant::now())),
    );
    let budget = node.for_assignment(Limits::default());
    let r = engine::backup(
        &restic,
        BackupRequest {
            budget: budget.clone(),
            ..request(&volume)
        },
    )
    .await?;
    assert_eq!(r.mode, Some(ReadMode::Direct), "{:?}", r.mode_note);
    let read = r.storage_read_bytes.expect("counted");
    // The node's bucket holds the debt of everything charged to it: its wait, at the rate.
    let charged = (budget.charge(0, 0).as_secs_f64() * rate as f64) as u64;
    assert!(
        charged >= 32 * MIB as u64 && charged <= read + MIB as u64,
        "charged {charged} bytes to the budget, restic read {read}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_the_disk_cannot_enforce_is_kept_by_the_agent_reader() -> Result {
    if !root() {
        return Ok(());
    }
    // /dev/shm is memory: no block device to limit reads on.
    let dir = tempfile::tempdir_in("/dev/shm")?;
    let volume = dir.path().join("volume");
    std::fs::create_dir(&volume)?;
    std::fs::write(volume.join("a"), vec![1u8; MIB])?;
    let repo_dir = disk_dir()?;
    let restic = repo(repo_dir.path()).await?;
    let budget = IoBudget::new(Limits {
        bytes_per_second: Some(64 * MIB as u64),
        iops: None,
    })
    .for_assignment(Limits::default());
    let r = engine::backup(
        &restic,
        BackupRequest {
            budget,
            ..request(&volume)
        },
    )
    .await?;
    assert_eq!(r.mode, Some(ReadMode::Stream));
    let note = r.mode_note.unwrap_or_default();
    assert!(note.contains("stream mode"), "{note}");
    // restic's own flags cannot follow it there: refused, not dropped.
    let err = engine::backup(
        &restic,
        BackupRequest {
            budget: IoBudget::new(Limits {
                bytes_per_second: Some(64 * MIB as u64),
                iops: None,
            })
            .for_assignment(Limits::default()),
            restic_args: vec!["--exclude-caches".into()],
            ..request(&volume)
        },
    )
    .await
    .expect_err("args without direct mode");
    assert!(err.to_string().contains("need direct mode"), "{err}");
    // Unbudgeted, direct mode stays direct there (nothing to limit).
    let r = engine::backup(&restic, request(&volume)).await?;
    assert_eq!(r.mode, Some(ReadMode::Direct));
    assert_eq!(r.mode_note, None);
    Ok(())
}

/// A file that changed in place but kept its size (a database page rewritten) comes back as
/// the snapshot has it, and a file that did not change is left alone, same inode. restic
/// 0.18, restoring over a hard-linked copy of such a file, leaves holes in it: the restore's
/// mirror must never hand it one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_size_change_is_restored_in_place_from_a_direct_snapshot() -> Result {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let (dir, volume) = disk_volume()?;
    // Data that does not repeat, so restic's chunks are all different.
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let random: Vec<u8> = (0..8 * MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(volume.join("db"), &random)?;
    std::fs::write(volume.join("same"), &random[..3 * MIB])?;
    let restic = repo(dir.path()).await?;
    let r = engine::backup(&restic, request(&volume)).await?;
    let snapshot = r.snapshot_id.expect("a snapshot");
    let db = std::fs::read(volume.join("db"))?;
    let same_inode = std::fs::metadata(volume.join("same"))?.ino();

    // One MiB rewritten in the middle, the size kept.
    File::options()
        .write(true)
        .open(volume.join("db"))?
        .write_all_at(&vec![0xa5u8; MIB], 3 * MIB as u64)?;
    assert!(std::fs::read(volume.join("db"))? != db);
    let done = restore(&restic, snapshot, &volume).await?;
    assert!(
        std::fs::read(volume.join("db"))? == db,
        "db restored as the snapshot has it: {done:?}"
    );
    assert_eq!(
        std::fs::metadata(volume.join("same"))?.ino(),
        same_inode,
        "the unchanged file was left alone"
    );
    Ok(())
}
