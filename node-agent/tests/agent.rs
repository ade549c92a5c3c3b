//! The agent's data path against the real restic and real files: every file type through a
//! stream backup and an in-place restore, sparse files, direct mode, unchanged volumes, files
//! changing during the read, and tar entries that try to leave the target.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

mod common;

use common::{repo, restic_bin, set_mtime};
use stash_node_agent::engine::{self, BackupRequest, ReadMode, RestoreRequest};
use stash_node_agent::extract::{ExtractOptions, ExtractReport, extract};
use stash_node_agent::stream::StreamError;
use stash_node_agent::tar::{Entry, Kind, TarWriter};

type Result<T = ()> = anyhow::Result<T>;

fn request(path: &Path, mode: ReadMode) -> BackupRequest {
    BackupRequest {
        host: Some("host-0".into()),
        key: Some("demo/app/data".into()),
        ..BackupRequest::new(path, mode)
    }
}

/// A volume with every kind of entry the stream must carry.
fn every_file_type(root: &Path) -> Result<PathBuf> {
    let v = root.join("volume");
    std::fs::create_dir_all(v.join("dir/nested"))?;
    std::fs::write(v.join("dir/nested/data.bin"), pattern(2_500_000))?;
    std::fs::write(v.join("empty"), b"")?;
    std::fs::write(v.join("dir/owned"), b"owned by someone else")?;
    std::os::unix::fs::chown(v.join("dir/owned"), Some(1234), Some(5678))?;
    std::fs::set_permissions(v.join("dir/owned"), PermissionsExt::from_mode(0o640))?;
    std::fs::write(v.join("setuid"), b"x")?;
    std::fs::set_permissions(v.join("setuid"), PermissionsExt::from_mode(0o4755))?;
    std::os::unix::fs::symlink("dir/nested/data.bin", v.join("link"))?;
    std::os::unix::fs::symlink("/etc/passwd", v.join("absolute-link"))?;
    std::fs::hard_link(v.join("dir/nested/data.bin"), v.join("hardlink"))?;
    rustix::fs::mknodat(
        rustix::fs::CWD,
        v.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )?;
    let binary_name = OsStr::from_bytes(b"caf\xe9-\xff");
    std::fs::write(v.join(binary_name), b"latin-1 name")?;
    let long = "l".repeat(90);
    std::fs::create_dir_all(v.join(&long).join(&long))?;
    std::fs::write(v.join(&long).join(&long).join("deep.txt"), b"deep")?;
    // A sparse file: stored as its one data segment, restored with the same content.
    let sparse = std::fs::File::create(v.join("sparse"))?;
    sparse.set_len(8 << 20)?;
    std::os::unix::fs::FileExt::write_at(&sparse, b"tail", (8 << 20) - 4)?;
    let _ = rustix::fs::setxattr(
        v.join("dir/owned"),
        "user.stash.test",
        b"value",
        rustix::fs::XattrFlags::empty(),
    );
    for (p, s, n) in [
        ("dir/nested/data.bin", 1_600_000_000, 123_456_789),
        ("link", 1_600_000_001, 5),
        ("fifo", 1_600_000_002, 0),
        ("dir", 1_600_000_003, 999_999_999),
    ] {
        set_mtime(&v.join(p), s, n)?;
    }
    Ok(v)
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Everything a restore must preserve, per relative path.
fn describe(root: &Path) -> Result<BTreeMap<Vec<u8>, String>> {
    fn walk(
        root: &Path,
        dir: &Path,
        out: &mut BTreeMap<Vec<u8>, String>,
        inodes: &mut BTreeMap<u64, Vec<u8>>,
    ) -> Result {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let rel = path.strip_prefix(root)?.as_os_str().as_bytes().to_vec();
            let m = std::fs::symlink_metadata(&path)?;
            let ft = m.file_type();
            let mut xattrs = String::new();
            if let Ok(n) = rustix::fs::lgetxattr(&path, "user.stash.test", &mut [0u8; 64]) {
                xattrs = format!(" xattr={n}");
            }
            let what = if ft.is_symlink() {
                format!("symlink -> {:?}", std::fs::read_link(&path)?)
            } else if ft.is_dir() {
                "dir".to_owned()
            } else if ft.is_file() {
                let data = std::fs::read(&path)?;
                let link = if m.nlink() > 1 {
                    let first = inodes.entry(m.ino()).or_insert_with(|| rel.clone());
                    format!(" linked-with={:?}", String::from_utf8_lossy(first))
                } else {
                    String::new()
                };
                format!(
                    "file {} bytes sum={}{link}",
                    data.len(),
                    data.iter().map(|b| u64::from(*b)).sum::<u64>()
                )
            } else {
                format!("special {:o}", m.mode() & 0o170000)
            };
            // Directory mtimes change as their contents are written; compare the rest.
            let time = if ft.is_dir() {
                String::new()
            } else {
                format!(" mtime={}.{:09}", m.mtime(), m.mtime_nsec())
            };
            out.insert(
                rel,
                format!(
                    "{what} mode={:o} owner={}:{}{time}{xattrs}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid()
                ),
            );
            if ft.is_dir() {
                walk(root, &path, out, inodes)?;
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out, &mut BTreeMap::new())?;
    Ok(out)
}

#[tokio::test]
async fn every_file_type_round_trips_through_a_stream_backup() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    let volume = every_file_type(dir.path())?;
    let result = engine::backup(&restic, request(&volume, ReadMode::Stream)).await?;
    let id = result.snapshot_id.clone().expect("a snapshot");
    assert!(!result.unchanged);
    // Seven regular files; the hard link is stored as a link to the first name.
    assert_eq!(result.files, 7, "{result:?}");

    let target = dir.path().join("restored");
    let restored = engine::restore(
        &restic,
        RestoreRequest {
            snapshot: id[..8].to_owned(),
            target: target.clone(),
            delete: false,
            include: vec![],
            exclude: vec![],
            budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
            owners: true,
        },
    )
    .await?;
    assert_eq!(restored.mode, Some(ReadMode::Stream));
    let (want, got) = (describe(&volume)?, describe(&target)?);
    for (path, what) in &want {
        assert_eq!(
            got.get(path),
            Some(what),
            "{}",
            String::from_utf8_lossy(path)
        );
    }
    assert_eq!(want.len(), got.len());
    // Stock restic sees a tar it can dump, and a sound repository.
    assert_eq!(restic.check(None).await?.num_errors, 0);
    let (_, nodes) = restic.ls(&id).await?;
    assert!(nodes.iter().any(|n| n.path == "/volume.tar"));
    Ok(())
}

#[tokio::test]
async fn restore_in_place_overwrites_changes_and_deletes_extraneous_files() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    let volume = every_file_type(dir.path())?;
    for mode in [ReadMode::Stream, ReadMode::Direct] {
        let id = engine::backup(&restic, request(&volume, mode))
            .await?
            .snapshot_id
            .expect("snapshot");
        let live = dir.path().join(format!("live-{mode:?}"));
        engine::restore(
            &restic,
            RestoreRequest {
                snapshot: id.clone(),
                target: live.clone(),
                delete: false,
                include: vec![],
                exclude: vec![],
                budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
                owners: true,
            },
        )
        .await?;
        // The "pod" keeps running and changes its volume; then we restore in place.
        std::fs::write(live.join("dir/nested/data.bin"), b"corrupted")?;
        std::fs::write(live.join("stray"), b"not in the snapshot")?;
        std::fs::remove_file(live.join("empty"))?;
        engine::restore(
            &restic,
            RestoreRequest {
                snapshot: id,
                target: live.clone(),
                delete: true,
                include: vec![],
                exclude: vec![],
                budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
                owners: true,
            },
        )
        .await?;
        assert!(!live.join("stray").exists(), "{mode:?}");
        assert!(live.join("empty").exists(), "{mode:?}");
        assert_eq!(
            std::fs::read(live.join("dir/nested/data.bin"))?,
            pattern(2_500_000),
            "{mode:?}"
        );
        if mode == ReadMode::Stream {
            assert_eq!(describe(&live)?, describe(&volume)?);
        }
    }
    Ok(())
}

#[tokio::test]
async fn an_unchanged_volume_is_recognised_without_reading_it() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    let volume = every_file_type(dir.path())?;
    for mode in [ReadMode::Stream, ReadMode::Direct] {
        let first = engine::backup(&restic, request(&volume, mode)).await?;
        let second = engine::backup(&restic, request(&volume, mode)).await?;
        assert!(second.unchanged, "{mode:?}: {second:?}");
        assert_eq!(second.snapshot_id, first.snapshot_id, "{mode:?}");
        // A different key is a different volume: not unchanged.
        let mut other = request(&volume, mode);
        other.key = Some("demo/other/data".into());
        assert!(!engine::backup(&restic, other).await?.unchanged, "{mode:?}");
    }
    std::fs::write(volume.join("empty"), b"now with data")?;
    let third = engine::backup(&restic, request(&volume, ReadMode::Stream)).await?;
    assert!(!third.unchanged);
    Ok(())
}

/// A file of `size` bytes with the pattern at each `(offset, len)` and holes elsewhere.
fn holey(path: &Path, size: u64, data: &[(u64, usize)]) -> Result<u64> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    for (offset, len) in data {
        std::os::unix::fs::FileExt::write_all_at(&f, &pattern(*len), *offset)?;
    }
    f.sync_all()?;
    Ok(data.iter().map(|(_, len)| *len as u64).sum())
}

/// Bytes a file occupies on disk.
fn allocated(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path)?.blocks() * 512)
}

#[tokio::test]
async fn sparse_files_round_trip_through_restic_and_gnu_tar() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    let volume = dir.path().join("sparse-volume");
    std::fs::create_dir_all(&volume)?;
    let size = 64 << 20;
    // Block-aligned segments, so the filesystem's map is exactly what was written.
    let mut data = holey(
        &volume.join("disk.img"),
        size,
        &[
            (0, 4096),
            (10 << 20, 65536),
            (40 << 20, 8192),
            (size - 4096, 4096),
        ],
    )?;
    data += holey(&volume.join("ends-in-a-hole"), size, &[(1 << 20, 65536)])?;
    data += holey(&volume.join("only-holes"), 16 << 20, &[])?;
    std::fs::write(volume.join("dense"), pattern(2 << 20))?;
    let dense = 2 << 20;
    let sparse = ["disk.img", "ends-in-a-hole", "only-holes"];

    let req = request(&volume, ReadMode::Stream);
    let progress = req.progress.clone();
    let result = engine::backup(&restic, req).await?;
    let id = result.snapshot_id.clone().expect("a snapshot");
    assert_eq!(result.files, 4, "{result:?}");
    assert_eq!(result.bytes, 2 * size + (16 << 20) + dense, "{result:?}");
    assert!(result.changed_during_read.is_empty(), "{result:?}");
    // The holes were never read.
    assert_eq!(
        progress.bytes.load(std::sync::atomic::Ordering::Relaxed),
        data + dense
    );

    let target = dir.path().join("restored");
    engine::restore(
        &restic,
        RestoreRequest {
            snapshot: id.clone(),
            target: target.clone(),
            delete: false,
            include: vec![],
            exclude: vec![],
            budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
            owners: true,
        },
    )
    .await?;
    assert_eq!(describe(&target)?, describe(&volume)?);
    for name in sparse {
        let (a, b) = (volume.join(name), target.join(name));
        assert!(std::fs::read(&a)? == std::fs::read(&b)?, "{name} differs");
        assert!(allocated(&b)? < 1 << 20, "{name} was restored dense");
    }

    // The stream restic holds carries no zeros, and GNU tar restores it with its holes.
    let dump = std::process::Command::new(restic_bin())
        .args(["dump", &id, "/volume.tar"])
        .env("RESTIC_REPOSITORY", dir.path().join("repo"))
        .env("RESTIC_PASSWORD", "agent test")
        .env("RESTIC_CACHE_DIR", dir.path().join("cache"))
        .output()?;
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    assert!(dump.stdout.len() < 4 << 20, "{} bytes", dump.stdout.len());
    let by_gnu = dir.path().join("gnu-tar");
    std::fs::create_dir_all(&by_gnu)?;
    let mut tar = std::process::Command::new("tar")
        .args(["--sparse", "-x", "-C"])
        .arg(&by_gnu)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut tar.stdin.take().expect("stdin"), &dump.stdout)?;
    assert!(tar.wait()?.success());
    assert_eq!(describe(&by_gnu)?, describe(&volume)?);
    for name in sparse {
        let (a, b) = (volume.join(name), by_gnu.join(name));
        assert!(std::fs::read(&a)? == std::fs::read(&b)?, "{name} differs");
        assert!(allocated(&b)? < 1 << 20, "{name} dense from GNU tar");
    }
    Ok(())
}

fn tar_with(entries: &[(Entry, &[u8])]) -> Result<Vec<u8>> {
    let mut w = TarWriter::new(Vec::new());
    for (e, data) in entries {
        w.append_header(e)?;
        if e.size() > 0 {
            w.data(data)?;
            w.finish_entry(e.size())?;
        }
    }
    Ok(w.finish()?)
}

fn file(path: &[u8], data: &[u8]) -> Entry {
    Entry {
        path: path.to_vec(),
        kind: Kind::File {
            size: data.len() as u64,
        },
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_secs: 1_700_000_000,
        mtime_nanos: 0,
        xattrs: vec![],
    }
}

#[test]
fn path_traversal_entries_are_refused() -> Result {
    let dir = tempfile::tempdir()?;
    let target = dir.path().join("target");
    for evil in [
        &b"../escaped"[..],
        b"/tmp/absolute",
        b"a/../../escaped",
        b"",
    ] {
        let tar = tar_with(&[(file(b"fine", b"ok"), b"ok"), (file(evil, b"x"), b"x")])?;
        let err = extract(&tar[..], &target, &ExtractOptions::default());
        assert!(
            matches!(err, Err(StreamError::Unsafe { .. })),
            "{evil:?}: {err:?}"
        );
    }
    assert!(!dir.path().join("escaped").exists());
    Ok(())
}

/// The extraction stopped, or reported the entry as not restored.
fn refused(done: &std::result::Result<ExtractReport, StreamError>) -> bool {
    done.as_ref().map_or(true, |r| !r.failed.is_empty())
}

#[test]
fn symlinks_cannot_carry_writes_out_of_the_target() -> Result {
    let dir = tempfile::tempdir()?;
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside)?;
    let target = dir.path().join("target");

    // A symlink in the stream, then a file "through" it.
    let link = Entry {
        kind: Kind::Symlink {
            target: outside.as_os_str().as_bytes().to_vec(),
        },
        ..file(b"escape", b"")
    };
    let tar = tar_with(&[(link, b""), (file(b"escape/pwned", b"x"), b"x")])?;
    let done = extract(&tar[..], &target, &ExtractOptions::default());
    assert!(
        refused(&done),
        "writing through a symlink must fail: {done:?}"
    );
    assert!(!outside.join("pwned").exists());

    // A symlink already in the live volume (the pod made it), then a file through it.
    let target2 = dir.path().join("target2");
    std::fs::create_dir_all(&target2)?;
    std::os::unix::fs::symlink(&outside, target2.join("data"))?;
    let tar = tar_with(&[(file(b"data/pwned", b"x"), b"x")])?;
    assert!(refused(&extract(
        &tar[..],
        &target2,
        &ExtractOptions::default()
    )));
    assert!(!outside.join("pwned").exists());

    // A hard link whose source lies outside is refused too.
    let hard = Entry {
        kind: Kind::HardLink {
            target: b"../outside/secret".to_vec(),
        },
        ..file(b"h", b"")
    };
    let tar = tar_with(&[(hard, b"")])?;
    assert!(matches!(
        extract(&tar[..], &target, &ExtractOptions::default()),
        Err(StreamError::Unsafe { .. })
    ));
    Ok(())
}

#[tokio::test]
async fn the_standalone_commands_write_snapshots_stock_restic_reads() -> Result {
    let dir = tempfile::tempdir()?;
    let volume = every_file_type(dir.path())?;
    let repo = dir.path().join("cli-repo");
    let run = |args: Vec<String>| -> Result<serde_json::Value> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_stash-node-agent"))
            .args(&args)
            .env("RESTIC_PASSWORD", "cli test")
            .env("STASH_RESTIC", restic_bin())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = String::from_utf8(out.stdout)?;
        anyhow::ensure!(line.lines().count() == 1, "one summary line: {line}");
        Ok(serde_json::from_str(&line)?)
    };
    let s = |x: &str| x.to_owned();
    let mut ids = BTreeMap::new();
    for mode in ["stream", "direct"] {
        let mut args = vec![
            s("backup"),
            s("--repo"),
            repo.display().to_string(),
            s("--path"),
            volume.display().to_string(),
            s("--mode"),
            s(mode),
            s("--host"),
            s("host-0"),
            s("--tag"),
            s("demo"),
        ];
        // The budget paces the agent's reader; direct mode refuses it.
        if mode == "stream" {
            args.extend([s("--io-budget"), s("200Mi")]);
        }
        let summary = run(args)?;
        for field in [
            "snapshot_id",
            "bytes",
            "files",
            "duration_seconds",
            "mode",
            "unchanged",
        ] {
            assert!(summary.get(field).is_some(), "{field} missing in {summary}");
        }
        assert_eq!(summary["mode"], mode);
        ids.insert(
            mode,
            summary["snapshot_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    let restic = |args: &[&str]| -> Result<std::process::Output> {
        Ok(std::process::Command::new(restic_bin())
            .args(args)
            .env("RESTIC_REPOSITORY", &repo)
            .env("RESTIC_PASSWORD", "cli test")
            .env("RESTIC_CACHE_DIR", dir.path().join("cache"))
            .output()?)
    };
    assert!(restic(&["check"])?.status.success());
    assert!(restic(&["ls", &ids["direct"]])?.status.success());
    // `restic dump` of a stream snapshot yields the tar, which GNU tar lists.
    let dump = restic(&["dump", &ids["stream"], "/volume.tar"])?;
    assert!(dump.status.success());
    let tar_list = std::process::Command::new("tar")
        .arg("-t")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(&dump.stdout)?;
            child.wait_with_output()
        })?;
    assert!(tar_list.status.success());
    assert!(String::from_utf8_lossy(&tar_list.stdout).contains("dir/nested/data.bin"));
    // A direct snapshot restores with stock restic, contents at the target's root.
    let stock = dir.path().join("stock");
    assert!(
        restic(&[
            "restore",
            &ids["direct"],
            "--target",
            stock.to_str().unwrap_or_default()
        ])?
        .status
        .success()
    );
    assert_eq!(
        std::fs::read(stock.join("dir/nested/data.bin"))?,
        pattern(2_500_000)
    );

    let restored = run(vec![
        s("restore"),
        s("--repo"),
        repo.display().to_string(),
        s("--snapshot"),
        ids["stream"].clone(),
        s("--target"),
        dir.path().join("cli-restore").display().to_string(),
    ])?;
    assert_eq!(restored["mode"], "stream");
    assert_eq!(
        std::fs::read(dir.path().join("cli-restore/dir/nested/data.bin"))?,
        pattern(2_500_000)
    );
    Ok(())
}

/// A loop device over an image file, detached on drop.
struct Loop(PathBuf);

impl Loop {
    fn attach(image: &Path) -> Result<Loop> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Loop(PathBuf::from(String::from_utf8(out.stdout)?.trim())))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_block_volume_is_streamed_as_one_image_and_restored_onto_a_device() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    let (src_img, dst_img) = (dir.path().join("src.img"), dir.path().join("dst.img"));
    let data = pattern(8 << 20);
    std::fs::write(&src_img, &data)?;
    std::fs::write(&dst_img, vec![0u8; 8 << 20])?;
    let (src, dst) = (Loop::attach(&src_img)?, Loop::attach(&dst_img)?);

    let result = engine::backup(&restic, request(&src.0, ReadMode::Stream)).await?;
    assert_eq!((result.bytes, result.files), (8 << 20, 1), "{result:?}");
    let direct = engine::backup(&restic, request(&src.0, ReadMode::Direct)).await;
    assert!(direct.is_err(), "direct mode refuses a block device");

    engine::restore(
        &restic,
        RestoreRequest {
            snapshot: result.snapshot_id.clone().expect("snapshot"),
            target: dst.0.clone(),
            delete: false,
            include: vec![],
            exclude: vec![],
            budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
            owners: false,
        },
    )
    .await?;
    drop((src, dst));
    assert!(
        std::fs::read(&dst_img)? == data,
        "the device holds the image"
    );
    Ok(())
}

/// An agent that dies after restic saved a direct snapshot but before judging it (a partial
/// snapshot, exit code 3, is forgotten only then) leaves its record behind: the next direct
/// backup of the key forgets every direct snapshot taken since, so a partial one never
/// becomes the parent or `latest`, and the new snapshot holds the whole volume.
#[tokio::test]
async fn a_direct_snapshot_no_agent_judged_is_forgotten_by_the_next_backup() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = repo(dir.path()).await?;
    let volume = dir.path().join("volume");
    std::fs::create_dir_all(volume.join("a"))?;
    std::fs::create_dir_all(volume.join("b"))?;
    std::fs::write(volume.join("a/one"), pattern(10_000))?;
    std::fs::write(volume.join("b/two"), pattern(20_000))?;
    let pending = dir.path().join("pending");
    let with_record = || BackupRequest {
        pending_dir: Some(pending.clone()),
        ..request(&volume, ReadMode::Direct)
    };
    let first = engine::backup(&restic, with_record()).await?;
    assert!(
        std::fs::read_dir(&pending)?.next().is_none(),
        "a judged backup leaves no record"
    );
    // The dead agent: its record is written, then restic saves a snapshot that lacks `b`.
    let record = stash_node_agent::pending::path(
        &pending,
        &restic.repository().display_name(),
        "host-0",
        "demo/app/data",
    );
    stash_node_agent::pending::write(
        &record,
        &stash_node_agent::pending::Record {
            started: jiff::Timestamp::now(),
            repository: restic.repository().display_name(),
            host: "host-0".into(),
            key: "demo/app/data".into(),
        },
    )?;
    std::fs::write(volume.join("a/one"), pattern(11_000))?;
    let partial = engine::backup(
        &restic,
        BackupRequest {
            paths: vec![PathBuf::from("a")],
            ..request(&volume, ReadMode::Direct)
        },
    )
    .await?;
    let partial_id = partial.snapshot_id.clone().unwrap_or_default();
    assert_ne!(Some(&partial_id), first.snapshot_id.as_ref());
    // The next agent.
    let next = engine::backup(&restic, with_record()).await?;
    assert!(!next.unchanged, "{next:?}");
    let ids: Vec<String> = restic
        .snapshots(&Default::default())
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert!(
        !ids.contains(&partial_id),
        "the unjudged snapshot is gone: {ids:?}"
    );
    assert!(!record.exists(), "the record goes with it");
    let latest = engine::latest(&restic, "host-0", "demo/app/data")
        .await?
        .ok_or_else(|| anyhow::anyhow!("no latest snapshot"))?;
    assert_eq!(Some(latest.id.clone()), next.snapshot_id);
    let out = dir.path().join("restored");
    engine::restore(
        &restic,
        RestoreRequest {
            snapshot: latest.id,
            target: out.clone(),
            delete: false,
            include: vec![],
            exclude: vec![],
            budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
            owners: true,
        },
    )
    .await?;
    assert_eq!(std::fs::read(out.join("b/two"))?, pattern(20_000));
    assert_eq!(std::fs::read(out.join("a/one"))?, pattern(11_000));
    Ok(())
}
