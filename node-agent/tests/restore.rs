//! In-place restores against the real restic, in both modes, checked against what stock
//! `restic restore` makes of the same snapshot: identical files left alone, changed ones
//! replaced whole, hard links, include patterns and `--delete`, owners, capabilities, ACLs,
//! large and odd xattrs, extreme mtimes, immutable files, full filesystems, deep trees, a
//! stream cut short, and a reader that must never see a half-written file.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use restic_wrapper::{Backend, Repository, Restic, Secrets};
use sha2::{Digest, Sha256};
use stash_node_agent::engine::{self, AgentError, BackupRequest, ReadMode, RestoreRequest};
use stash_node_agent::extract::{ExtractOptions, extract};
use stash_node_agent::tar::{Entry, Kind, TarWriter};

type Result<T = ()> = anyhow::Result<T>;

#[allow(dead_code)] // a test binary uses only part of the shared helpers
mod common;

use common::{restic_bin, set_mtime};

const PASSWORD: &str = "restore test";
const MODES: [ReadMode; 2] = [ReadMode::Stream, ReadMode::Direct];

/// A tmpfs mounted for one test (large xattrs, `chattr +i`, a size limit), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs> {
        std::fs::create_dir_all(path)?;
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()?;
        anyhow::ensure!(status.success(), "mount tmpfs (the tests run as root)");
        Ok(Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

struct World {
    // Unmounted before the directory is removed: `remove_dir_all` recurses once per level,
    // and the deep-tree tests leave trees thousands of directories deep in it.
    fs: Tmpfs,
    dir: tempfile::TempDir,
    restic: Restic,
}

fn request(
    id: &str,
    target: &Path,
    include: &[&str],
    exclude: &[&str],
    delete: bool,
) -> RestoreRequest {
    let strings = |p: &[&str]| p.iter().map(|s| s.to_string()).collect();
    RestoreRequest {
        snapshot: id.to_owned(),
        target: target.to_path_buf(),
        delete,
        include: strings(include),
        exclude: strings(exclude),
        budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
        owners: true,
    }
}

impl World {
    async fn new(size: &str) -> Result<World> {
        let dir = tempfile::tempdir()?;
        let fs = Tmpfs::mount(&dir.path().join("fs"), size)?;
        let repo = Repository::new(
            Backend::Local {
                path: dir.path().join("repo"),
            },
            Secrets::new().with("RESTIC_PASSWORD", PASSWORD),
            dir.path(),
        )?;
        let restic = Restic::new(repo).with_program(restic_bin());
        restic.init().await?;
        Ok(World { dir, fs, restic })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.fs.0.join(name)
    }

    async fn backup(&self, source: &Path, mode: ReadMode) -> Result<String> {
        let req = BackupRequest {
            host: Some("host-0".into()),
            key: Some(format!("{}", source.display())),
            ..BackupRequest::new(source, mode)
        };
        engine::backup(&self.restic, req)
            .await?
            .snapshot_id
            .ok_or_else(|| anyhow::anyhow!("no snapshot"))
    }

    async fn ours(
        &self,
        id: &str,
        target: &Path,
        include: &[&str],
        delete: bool,
    ) -> std::result::Result<engine::RestoreResult, AgentError> {
        self.ours_excluding(id, target, include, &[], delete).await
    }

    async fn ours_excluding(
        &self,
        id: &str,
        target: &Path,
        include: &[&str],
        exclude: &[&str],
        delete: bool,
    ) -> std::result::Result<engine::RestoreResult, AgentError> {
        engine::restore(&self.restic, request(id, target, include, exclude, delete)).await
    }

    /// Stock `restic restore` of a snapshot: the reference.
    fn stock(&self, id: &str, target: &Path, include: &[&str], delete: bool) -> Result {
        self.stock_excluding(id, target, include, &[], delete)
    }

    fn stock_excluding(
        &self,
        id: &str,
        target: &Path,
        include: &[&str],
        exclude: &[&str],
        delete: bool,
    ) -> Result {
        let mut cmd = std::process::Command::new(restic_bin());
        cmd.args(["restore", "--no-cache", id, "--target"])
            .arg(target)
            .env("RESTIC_REPOSITORY", self.dir.path().join("repo"))
            .env("RESTIC_PASSWORD", PASSWORD);
        for i in include {
            cmd.args(["--include", i]);
        }
        for e in exclude {
            cmd.args(["--exclude", e]);
        }
        if delete {
            cmd.arg("--delete");
        }
        let out = cmd.output()?;
        anyhow::ensure!(
            out.status.success(),
            "stock restic restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The stream of a stream snapshot, as `restic dump` gives it.
    fn dump(&self, id: &str) -> Result<Vec<u8>> {
        let out = std::process::Command::new(restic_bin())
            .args(["dump", "--no-cache", id, "/volume.tar"])
            .env("RESTIC_REPOSITORY", self.dir.path().join("repo"))
            .env("RESTIC_PASSWORD", PASSWORD)
            .output()?;
        anyhow::ensure!(out.status.success(), "restic dump");
        Ok(out.stdout)
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

fn setxattr(path: &Path, name: &str, value: &[u8]) -> Result {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())?;
    Ok(())
}

/// A file capability: cap_net_raw, effective (VFS_CAP_REVISION_2).
fn capability() -> Vec<u8> {
    let mut v = 0x0200_0001u32.to_le_bytes().to_vec();
    for word in [1u32 << 13, 0, 0, 0] {
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}

/// A POSIX access ACL (user rw, user 1000 r, group r, mask r, other none), as the kernel
/// stores it in `system.posix_acl_access`.
fn acl() -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 6u16, u32::MAX),
        (0x02, 4, 1000),
        (0x04, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 0, u32::MAX),
    ] {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// The source volume every case restores.
fn source(root: &Path) -> Result {
    let w = |rel: &str, data: &[u8]| -> Result {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap_or(root))?;
        std::fs::write(p, data)?;
        Ok(())
    };
    w("data/a.db", &pattern(3 << 20, 1))?;
    w("data/b.db", &pattern(70_000, 2))?;
    w("data/c.txt", b"notes")?;
    w("data/sub/a.db", &pattern(5000, 3))?;
    w("x/f", &pattern(200_000, 4))?;
    std::fs::create_dir_all(root.join("y"))?;
    std::fs::hard_link(root.join("x/f"), root.join("y/g"))?;
    w("y/other", b"other")?;
    w("empty", b"")?;
    w("owned", b"someone else's")?;
    std::os::unix::fs::chown(root.join("owned"), Some(1234), Some(5678))?;
    std::fs::set_permissions(
        root.join("owned"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )?;
    w("caps/ping", b"#!/bin/true\n")?;
    std::os::unix::fs::chown(root.join("caps/ping"), Some(1234), Some(5678))?;
    std::fs::set_permissions(
        root.join("caps/ping"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    setxattr(
        &root.join("caps/ping"),
        "security.capability",
        &capability(),
    )?;
    w("acl/file", b"acl")?;
    std::fs::set_permissions(
        root.join("acl/file"),
        std::os::unix::fs::PermissionsExt::from_mode(0o640),
    )?;
    setxattr(&root.join("acl/file"), "system.posix_acl_access", &acl())?;
    w("xattrs/many", b"many")?;
    for i in 0..300 {
        let value = pattern(65536, 100 + i);
        setxattr(&root.join("xattrs/many"), &format!("user.k{i:03}"), &value)?;
    }
    w("xattrs/odd", b"odd")?;
    setxattr(&root.join("xattrs/odd"), "user.key=part", b"value")?;
    // 2250: past ustar's 2242, within restic's (nanoseconds in an i64: 2262).
    w("times/future", b"2250")?;
    set_mtime(&root.join("times/future"), 8_835_955_200, 5)?;
    w("times/past", b"1969")?;
    set_mtime(&root.join("times/past"), -31_536_000, 250_000_000)?;
    w("times/just-before", b"1969")?;
    set_mtime(&root.join("times/just-before"), -1, 500_000_000)?;
    std::os::unix::fs::symlink("data/a.db", root.join("link"))?;
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )?;
    Ok(())
}

fn digest(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Everything a restore must get right, per path (directory mtimes aside: writing into a
/// directory changes them).
fn describe(root: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for path in names {
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            let m = std::fs::symlink_metadata(&path)?;
            let ft = m.file_type();
            let what = if ft.is_symlink() {
                format!("symlink -> {:?}", std::fs::read_link(&path)?)
            } else if ft.is_dir() {
                todo.push(path.clone());
                "dir".to_owned()
            } else if ft.is_file() {
                let link = if m.nlink() > 1 {
                    let first = inodes.entry(m.ino()).or_insert_with(|| rel.clone());
                    format!(" linked-with={first}")
                } else {
                    String::new()
                };
                format!("file {} {}{link}", m.len(), digest(&std::fs::read(&path)?))
            } else {
                format!("special {:o}", m.mode() & 0o170000)
            };
            let time = if ft.is_dir() {
                String::new()
            } else {
                format!(" mtime={}.{:09}", m.mtime(), m.mtime_nsec())
            };
            out.insert(
                rel,
                format!(
                    "{what} mode={:o} owner={}:{}{time}{}",
                    m.mode() & 0o7777,
                    m.uid(),
                    m.gid(),
                    xattrs(&path)?
                ),
            );
        }
    }
    Ok(out)
}

fn xattrs(path: &Path) -> Result<String> {
    let mut names = vec![0u8; 1 << 16];
    let n = match rustix::fs::llistxattr(path, &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP | rustix::io::Errno::PERM) => return Ok(String::new()),
        Err(e) => return Err(e.into()),
    };
    let mut list: Vec<&[u8]> = names[..n]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .collect();
    list.sort();
    let mut out = String::new();
    for name in list {
        let mut value = vec![0u8; 1 << 16];
        let len = rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut value[..])?;
        out.push_str(&format!(
            " {}={}",
            String::from_utf8_lossy(name),
            digest(&value[..len])
        ));
    }
    Ok(out)
}

/// The inode of every regular file.
fn inodes(root: &Path) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir)? {
            let path = e?.path();
            let m = std::fs::symlink_metadata(&path)?;
            if m.is_dir() {
                todo.push(path);
            } else if m.is_file() {
                out.insert(path.strip_prefix(root)?.display().to_string(), m.ino());
            }
        }
    }
    Ok(out)
}

/// Differences between two descriptions, one line each.
fn diff(want: &BTreeMap<String, String>, got: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in want {
        match got.get(k) {
            Some(g) if g == v => {}
            Some(g) => out.push(format!("{k}: want {v}\n      got  {g}")),
            None => out.push(format!("{k}: missing")),
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        out.push(format!("{k}: extra ({})", got[k]));
    }
    out
}

/// Changes a live copy the way a running workload might.
fn change_live(live: &Path) -> Result {
    std::fs::write(live.join("data/a.db"), pattern(3 << 20, 99))?;
    std::fs::write(live.join("data/b.db"), b"shorter")?;
    std::fs::remove_file(live.join("x/f"))?;
    std::fs::write(live.join("x/f"), b"unrelated new data")?;
    std::fs::remove_file(live.join("link"))?;
    std::os::unix::fs::symlink("elsewhere", live.join("link"))?;
    std::fs::write(live.join("data/extra"), b"not in the snapshot")?;
    std::fs::create_dir_all(live.join("other/deeper"))?;
    std::fs::write(live.join("other/deeper/extra"), b"not in the snapshot")?;
    std::fs::remove_file(live.join("empty"))?;
    // restic cannot put a file where a non-empty directory is; an empty one it replaces.
    std::fs::create_dir_all(live.join("empty"))?;
    rustix::fs::lremovexattr(live.join("caps/ping"), "security.capability")?;
    std::os::unix::fs::chown(live.join("owned"), Some(1), Some(1))?;
    // Fixed times, so that two copies changed at different moments are alike.
    for p in [
        "data/a.db",
        "data/b.db",
        "x/f",
        "link",
        "data/extra",
        "other/deeper/extra",
    ] {
        set_mtime(&live.join(p), 1_650_000_000, 0)?;
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Live {
    Empty,
    Identical,
    Changed,
}

struct Case {
    name: &'static str,
    live: Live,
    include: &'static [&'static str],
    exclude: &'static [&'static str],
    delete: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "into an empty directory",
        live: Live::Empty,
        include: &[],
        exclude: &[],
        delete: false,
    },
    Case {
        name: "in place over identical files",
        live: Live::Identical,
        include: &[],
        exclude: &[],
        delete: true,
    },
    Case {
        name: "in place over changed files, with --delete",
        live: Live::Changed,
        include: &[],
        exclude: &[],
        delete: true,
    },
    Case {
        name: "in place over changed files, without --delete",
        live: Live::Changed,
        include: &[],
        exclude: &[],
        delete: false,
    },
    Case {
        name: "include a glob",
        live: Live::Changed,
        include: &["data/*.db"],
        exclude: &[],
        delete: false,
    },
    Case {
        name: "include ** at any depth",
        live: Live::Changed,
        include: &["**/a.db"],
        exclude: &[],
        delete: false,
    },
    Case {
        name: "include ./data with --delete",
        live: Live::Changed,
        include: &["./data"],
        exclude: &[],
        delete: true,
    },
    Case {
        name: "include a directory with --delete",
        live: Live::Changed,
        include: &["data"],
        exclude: &[],
        delete: true,
    },
    Case {
        name: "include the second name of a hard link only",
        live: Live::Empty,
        include: &["y"],
        exclude: &[],
        delete: false,
    },
    Case {
        name: "include one hard link name over a changed first name",
        live: Live::Changed,
        include: &["y/g"],
        exclude: &[],
        delete: false,
    },
    Case {
        name: "include both hard link names",
        live: Live::Empty,
        include: &["x", "y"],
        exclude: &[],
        delete: false,
    },
    Case {
        name: "exclude a glob with --delete",
        live: Live::Changed,
        include: &[],
        exclude: &["*.db"],
        delete: true,
    },
    Case {
        name: "exclude a directory",
        live: Live::Changed,
        include: &[],
        exclude: &["data"],
        delete: false,
    },
];

/// Brings `live` into the state a case starts from (the same for ours and for stock).
fn prepare(w: &World, direct_id: &str, live: &Path, state: Live) -> Result {
    std::fs::create_dir_all(live)?;
    match state {
        Live::Empty => {}
        Live::Identical => w.stock(direct_id, live, &[], false)?,
        Live::Changed => {
            w.stock(direct_id, live, &[], false)?;
            change_live(live)?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn every_case_restores_as_stock_restic_does_in_both_modes() -> Result {
    let w = World::new("256m").await?;
    let src = w.path("source");
    source(&src)?;
    let mut ids = BTreeMap::new();
    for mode in MODES {
        ids.insert(format!("{mode:?}"), w.backup(&src, mode).await?);
    }
    let direct = ids["Direct"].clone();
    let mut problems = Vec::new();
    for (n, case) in CASES.iter().enumerate() {
        let reference = w.path(&format!("stock-{n}"));
        prepare(&w, &direct, &reference, case.live)?;
        w.stock_excluding(&direct, &reference, case.include, case.exclude, case.delete)?;
        let want = describe(&reference)?;
        // Direct snapshots twice: read by the agent, and through restic as for the backends
        // the agent's reader cannot open.
        for (way, mode, through_restic) in [
            ("stream", ReadMode::Stream, false),
            ("direct", ReadMode::Direct, false),
            ("direct through restic", ReadMode::Direct, true),
        ] {
            let live = w.path(&format!("live-{n}-{mode:?}"));
            prepare(&w, &direct, &live, case.live)?;
            let before = inodes(&live)?;
            let id = &ids[&format!("{mode:?}")];
            let req = request(id, &live, case.include, case.exclude, case.delete);
            let done = if through_restic {
                engine::restore_through_restic(&w.restic, req).await
            } else {
                engine::restore(&w.restic, req).await
            };
            let label = format!("{} ({way})", case.name);
            match done {
                Ok(r) => {
                    if matches!(case.live, Live::Identical) {
                        if r.files != 0 {
                            problems.push(format!("{label}: rewrote {} files", r.files));
                        }
                        if inodes(&live)? != before {
                            problems.push(format!("{label}: inodes changed"));
                        }
                    }
                }
                Err(e) => problems.push(format!("{label}: {e}")),
            }
            for d in diff(&want, &describe(&live)?) {
                problems.push(format!("{label}: {d}"));
            }
            std::fs::remove_dir_all(&live)?;
        }
        std::fs::remove_dir_all(&reference)?;
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

#[tokio::test]
async fn owners_are_restored_by_default_and_left_with_no_owners() -> Result {
    let w = World::new("64m").await?;
    let src = w.path("source");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("owned"), b"x")?;
    std::os::unix::fs::chown(src.join("owned"), Some(1234), Some(5678))?;
    for mode in MODES {
        let id = w.backup(&src, mode).await?;
        let target = w.path(&format!("owners-{mode:?}"));
        w.ours(&id, &target, &[], false).await?;
        let m = std::fs::metadata(target.join("owned"))?;
        assert_eq!((m.uid(), m.gid()), (1234, 5678), "{mode:?}");
        let target = w.path(&format!("no-owners-{mode:?}"));
        engine::restore(
            &w.restic,
            RestoreRequest {
                snapshot: id,
                target: target.clone(),
                delete: false,
                include: vec![],
                exclude: vec![],
                budget: stash_node_agent::budget::AssignmentBudget::unlimited(),
                owners: false,
            },
        )
        .await?;
        let m = std::fs::metadata(target.join("owned"))?;
        assert_eq!((m.uid(), m.gid()), (0, 0), "{mode:?}");
    }
    Ok(())
}

#[tokio::test]
async fn patterns_that_match_nothing_are_refused_and_nothing_is_written() -> Result {
    let w = World::new("64m").await?;
    let src = w.path("source");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("a"), b"a")?;
    for mode in MODES {
        let id = w.backup(&src, mode).await?;
        let target = w.path(&format!("t-{mode:?}"));
        for include in [&["../a"][..], &["no-such-file"]] {
            let err = w.ours(&id, &target, include, true).await;
            assert!(
                matches!(
                    err,
                    Err(AgentError::Pattern(_) | AgentError::NothingMatched { .. })
                ),
                "{mode:?} {include:?}: {err:?}"
            );
        }
        assert!(std::fs::read_dir(&target).map_or(true, |mut d| d.next().is_none()));
    }
    Ok(())
}

#[tokio::test]
async fn an_immutable_file_is_reported_and_everything_else_is_restored() -> Result {
    let w = World::new("256m").await?;
    let src = w.path("source");
    source(&src)?;
    let direct = w.backup(&src, ReadMode::Direct).await?;
    for mode in MODES {
        let id = w.backup(&src, mode).await?;
        let live = w.path(&format!("live-{mode:?}"));
        w.stock(&direct, &live, &[], false)?;
        change_live(&live)?;
        std::fs::write(live.join("data/c.txt"), b"changed, then made immutable")?;
        let chattr = |flag: &str, path: &Path| {
            std::process::Command::new("chattr")
                .arg(flag)
                .arg(path)
                .status()
        };
        assert!(chattr("+i", &live.join("data/c.txt"))?.success());
        let err = w.ours(&id, &live, &[], true).await;
        assert!(chattr("-i", &live.join("data/c.txt"))?.success());
        match err {
            Err(AgentError::RestoreIncomplete { failed }) => {
                assert_eq!(failed.len(), 1, "{mode:?}: {failed:?}");
                assert_eq!(failed[0].path, "data/c.txt", "{mode:?}");
            }
            other => panic!("{mode:?}: {other:?}"),
        }
        assert_eq!(
            std::fs::read(live.join("data/c.txt"))?,
            b"changed, then made immutable"
        );
        let mut want = describe(&src)?;
        let mut got = describe(&live)?;
        want.remove("data/c.txt");
        got.remove("data/c.txt");
        assert!(
            diff(&want, &got).is_empty(),
            "{mode:?}: {:?}",
            diff(&want, &got)
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_nearly_full_filesystem_loses_nothing() -> Result {
    let w = World::new("24m").await?;
    let src = w.dir.path().join("source");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("db"), pattern(8 << 20, 7))?;
    std::fs::hard_link(src.join("db"), src.join("db-link"))?;
    std::fs::write(src.join("log"), pattern(2 << 20, 8))?;
    let direct = w.backup(&src, ReadMode::Direct).await?;
    for mode in MODES {
        let id = w.backup(&src, mode).await?;
        let live = w.path("live");
        w.stock(&direct, &live, &[], false)?;
        // Fill the filesystem to its last few blocks.
        let filler = w.path("filler");
        let mut f = std::fs::File::create(&filler)?;
        let block = vec![1u8; 64 << 10];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
        drop(f);
        let before = (describe(&live)?, inodes(&live)?);
        let identical = w.ours(&id, &live, &[], false).await;
        assert_eq!(before, (describe(&live)?, inodes(&live)?), "{mode:?}");
        assert_eq!(identical?.files, 0, "{mode:?}");
        // A changed file needs room for its new copy: not there, so the old one stays.
        std::fs::write(live.join("log"), b"changed")?;
        let before = describe(&live)?;
        let changed = w.ours(&id, &live, &[], false).await;
        assert!(changed.is_err(), "{mode:?}: {changed:?}");
        assert_eq!(before, describe(&live)?, "{mode:?}");
        std::fs::remove_dir_all(&live)?;
        std::fs::remove_file(&filler)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_file_held_open_keeps_its_old_content_and_the_path_gets_the_new() -> Result {
    let w = World::new("64m").await?;
    let src = w.path("source");
    std::fs::create_dir_all(&src)?;
    let new = pattern(4 << 20, 11);
    std::fs::write(src.join("db"), &new)?;
    for mode in MODES {
        let id = w.backup(&src, mode).await?;
        let live = w.path(&format!("live-{mode:?}"));
        std::fs::create_dir_all(&live)?;
        let old = pattern(4 << 20, 12);
        std::fs::write(live.join("db"), &old)?;
        let mut held = std::fs::File::open(live.join("db"))?;
        w.ours(&id, &live, &[], false).await?;
        let mut seen = Vec::new();
        held.read_to_end(&mut seen)?;
        assert!(
            seen == old,
            "{mode:?}: the open file changed under its reader"
        );
        assert!(std::fs::read(live.join("db"))? == new, "{mode:?}");
    }
    Ok(())
}

fn open_dir(
    at: impl rustix::fd::AsFd,
    name: impl rustix::path::Arg,
) -> Result<rustix::fd::OwnedFd> {
    Ok(rustix::fs::openat(
        at,
        name,
        rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::RDONLY,
        rustix::fs::Mode::empty(),
    )?)
}

/// Creates `depth` nested directories named `d` below `base`, one `openat` at a time
/// (the path is longer than PATH_MAX).
fn deep_chain(base: &Path, depth: usize) -> Result {
    let mut fd = open_dir(rustix::fs::CWD, base)?;
    for _ in 0..depth {
        rustix::fs::mkdirat(&fd, "d", rustix::fs::Mode::from_raw_mode(0o755))?;
        fd = open_dir(&fd, "d")?;
    }
    rustix::fs::openat(
        &fd,
        "leaf",
        rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
        rustix::fs::Mode::from_raw_mode(0o644),
    )?;
    Ok(())
}

/// How deep the chain of `d` directories below `base` goes.
fn chain_depth(base: &Path) -> Result<usize> {
    let mut fd = open_dir(rustix::fs::CWD, base)?;
    let mut depth = 0;
    while let Ok(next) = open_dir(&fd, "d") {
        fd = next;
        depth += 1;
    }
    Ok(depth)
}

#[tokio::test]
async fn deep_trees_restore_and_delete_without_recursion() -> Result {
    let w = World::new("256m").await?;
    let src = w.path("source");
    std::fs::create_dir_all(src.join("chain"))?;
    deep_chain(&src.join("chain"), 2000)?;
    // Direct mode from restic's snapshot; stream mode from the same tree as a tar (the
    // stream backup's own walk is not what this tests).
    let mut entries = vec![];
    let mut path = String::from("chain");
    for _ in 0..=2000 {
        entries.push((
            Entry {
                kind: Kind::Dir,
                mode: 0o755,
                ..file_entry(&path, 0)
            },
            vec![],
        ));
        path.push_str("/d");
    }
    path.truncate(path.len() - 2);
    path.push_str("/leaf");
    entries.push((file_entry(&path, 0), vec![]));
    let stream = tar_of(&entries)?;
    let id = w.backup(&src, ReadMode::Direct).await?;
    for mode in MODES {
        let live = w.path(&format!("live-{mode:?}"));
        std::fs::create_dir_all(live.join("extra"))?;
        // A tenant's tree far deeper than the snapshot's, to be deleted.
        deep_chain(&live.join("extra"), 5000)?;
        match mode {
            ReadMode::Direct => {
                w.ours(&id, &live, &[], true).await?;
            }
            ReadMode::Stream => {
                let opts = ExtractOptions {
                    delete_extraneous: true,
                    ..ExtractOptions::default()
                };
                let report = extract(&stream[..], &live, &opts)?;
                assert!(report.failed.is_empty(), "{report:?}");
            }
        }
        assert_eq!(chain_depth(&live.join("chain"))?, 2000, "{mode:?}");
        assert!(!live.join("extra").exists(), "{mode:?}");
    }
    Ok(())
}

/// Creates a chain of `depth` directories named `d` below `base`, each holding a file `e`
/// (named after `d`, so the walk comes back to every level after the chain below it) with
/// its depth in it, and files `leaf` and `skip.log` at the bottom.
fn deep_chain_with_files(base: &Path, depth: usize) -> Result {
    let create = |at: &rustix::fd::OwnedFd, name: &str, data: &[u8]| -> Result {
        let fd = rustix::fs::openat(
            at,
            name,
            rustix::fs::OFlags::CREATE | rustix::fs::OFlags::WRONLY,
            rustix::fs::Mode::from_raw_mode(0o644),
        )?;
        std::io::Write::write_all(&mut std::fs::File::from(fd), data)?;
        Ok(())
    };
    let mut fd = open_dir(rustix::fs::CWD, base)?;
    for level in 0..depth {
        rustix::fs::mkdirat(&fd, "d", rustix::fs::Mode::from_raw_mode(0o755))?;
        create(&fd, "e", format!("level {level}").as_bytes())?;
        fd = open_dir(&fd, "d")?;
    }
    create(&fd, "leaf", &pattern(100_000, depth as u64))?;
    create(&fd, "skip.log", b"excluded")
}

/// The names in one directory, each with its bytes (none for a directory).
type Level = Vec<(String, Vec<u8>)>;

/// Every level of a chain below `base` (the walk goes one `openat` at a time: the paths are
/// longer than PATH_MAX).
fn chain_contents(base: &Path) -> Result<Vec<Level>> {
    let mut levels = Vec::new();
    let mut fd = open_dir(rustix::fs::CWD, base)?;
    loop {
        let mut level = Vec::new();
        let mut dir = rustix::fs::Dir::read_from(&fd)?;
        let mut names = Vec::new();
        while let Some(entry) = dir.read() {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        names.sort();
        for name in names {
            let data = if name == "d" {
                vec![]
            } else {
                let f = rustix::fs::openat(
                    &fd,
                    name.as_str(),
                    rustix::fs::OFlags::RDONLY,
                    rustix::fs::Mode::empty(),
                )?;
                let mut data = Vec::new();
                std::fs::File::from(f).read_to_end(&mut data)?;
                data
            };
            level.push((name, data));
        }
        levels.push(level);
        match open_dir(&fd, "d") {
            Ok(next) => fd = next,
            Err(_) => return Ok(levels),
        }
    }
}

/// Chains 2,000 and 5,000 directories deep, a file at each level and one excluded at the
/// bottom, backed up and restored into an empty volume: every byte where it was in stream
/// mode. Direct mode restores the 2,000-deep chain; the 5,000-deep one is past what restic
/// itself can read (it opens whole paths, longer than PATH_MAX there), and the backup says
/// so instead of keeping a snapshot without it. All of it runs as the worker runs an
/// assignment, a task on a runtime's worker thread, here with a quarter of tokio's default
/// stack (the blocking pool's threads too): nothing may take stack in proportion to depth.
#[test]
fn deep_chains_back_up_and_restore_in_both_modes() -> Result {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_stack_size(512 << 10)
        .enable_all()
        .build()?;
    rt.block_on(async { rt.spawn(deep_chains()).await? })
}

async fn deep_chains() -> Result {
    let w = World::new("256m").await?;
    for mode in MODES {
        let src = w.path(&format!("source-{mode:?}"));
        for depth in [2000, 5000] {
            let chain = src.join(format!("chain-{depth}"));
            std::fs::create_dir_all(&chain)?;
            deep_chain_with_files(&chain, depth)?;
        }
        let backup = |src: &Path, key: &str| {
            let req = BackupRequest {
                host: Some("host-0".into()),
                key: Some(key.into()),
                excludes: vec!["*.log".into()],
                ..BackupRequest::new(src, mode)
            };
            engine::backup(&w.restic, req)
        };
        let depths: &[usize] = match mode {
            ReadMode::Stream => &[2000, 5000],
            ReadMode::Direct => {
                let all = backup(&src, "direct-5000").await;
                match all {
                    Err(AgentError::Restic(restic_wrapper::Error::IncompleteBackup {
                        snapshot_id: None,
                        unreadable,
                    })) if unreadable.iter().all(|u| u.starts_with("chain-5000/")) => {}
                    other => panic!("direct mode at 5,000 deep: {other:?}"),
                }
                std::fs::rename(src.join("chain-5000"), w.path("out-of-the-way"))?;
                &[2000]
            }
        };
        let r = backup(&src, &format!("{mode:?}")).await?;
        assert!(r.changed_during_read.is_empty(), "{mode:?}: {r:?}");
        let id = r
            .snapshot_id
            .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
        let live = w.path(&format!("live-{mode:?}"));
        std::fs::create_dir_all(&live)?;
        w.ours(&id, &live, &[], false).await?;
        for depth in depths {
            let name = format!("chain-{depth}");
            let mut want = chain_contents(&src.join(&name))?;
            assert_eq!(want.len(), depth + 1, "{mode:?}: the source chain");
            let bottom = want.last_mut().map(|l| {
                let before = l.len();
                l.retain(|(name, _)| name != "skip.log");
                before - l.len()
            });
            assert_eq!(
                bottom,
                Some(1),
                "{mode:?}: the excluded file was in the source"
            );
            let got = chain_contents(&live.join(&name))?;
            assert_eq!(got.len(), want.len(), "{mode:?}: levels of {name}");
            let wrong = want.iter().zip(&got).position(|(w, g)| w != g);
            assert_eq!(wrong, None, "{mode:?}: first level of {name} that differs");
        }
    }
    Ok(())
}

/// Whether every regular file of `live` holds either its content in `a` or in `b`.
fn each_file_is_one_of(live: &Path, a: &Path, b: &Path) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    for (rel, _) in inodes(live)? {
        let got = std::fs::read(live.join(&rel))?;
        let is = |root: &Path| std::fs::read(root.join(&rel)).is_ok_and(|d| d == got);
        if !is(a) && !is(b) {
            bad.push(rel);
        }
    }
    Ok(bad)
}

#[tokio::test]
async fn a_stream_cut_short_leaves_every_live_file_old_or_new() -> Result {
    let w = World::new("256m").await?;
    let src = w.path("source");
    source(&src)?;
    let id = w.backup(&src, ReadMode::Stream).await?;
    let stream = w.dump(&id)?;
    let complete = w.path("complete");
    w.stock(
        &w.backup(&src, ReadMode::Direct).await?,
        &complete,
        &[],
        false,
    )?;
    let changed = w.path("changed");
    std::fs::create_dir_all(&changed)?;
    w.stock(
        &w.backup(&src, ReadMode::Direct).await?,
        &changed,
        &[],
        false,
    )?;
    change_live(&changed)?;
    let changed_copy = w.path("changed-copy");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&changed)
        .arg(&changed_copy)
        .status()?;
    assert!(status.success());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let cut = (x % (stream.len() as u64 - 1024)) as usize + 1;
        let before = (describe(&complete)?, inodes(&complete)?);
        let done = extract(&stream[..cut], &complete, &ExtractOptions::default());
        assert!(done.is_err(), "round {round}: cut at {cut} went unnoticed");
        let changes = diff(&before.0, &describe(&complete)?);
        assert!(changes.is_empty(), "round {round}: {changes:?}");
        assert_eq!(before.1, inodes(&complete)?, "round {round}");
        let done = extract(&stream[..cut], &changed, &ExtractOptions::default());
        assert!(done.is_err(), "round {round}");
        let bad = each_file_is_one_of(&changed, &changed_copy, &src)?;
        assert!(bad.is_empty(), "round {round}, cut at {cut}: mixed {bad:?}");
    }
    Ok(())
}

/// A stream reader that stops once, after `at` bytes, until the test lets it go on.
struct Hook<'a> {
    data: &'a [u8],
    pos: usize,
    at: usize,
    reached: Option<std::sync::mpsc::Sender<()>>,
    resume: std::sync::mpsc::Receiver<()>,
}

impl Read for Hook<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.at
            && let Some(tx) = self.reached.take()
        {
            let _ = tx.send(());
            let _ = self.resume.recv();
        }
        let end = if self.pos < self.at {
            self.at.min(self.pos + buf.len())
        } else {
            self.data.len().min(self.pos + buf.len())
        };
        let n = end - self.pos;
        buf[..n].copy_from_slice(&self.data[self.pos..end]);
        self.pos = end;
        Ok(n)
    }
}

fn tar_of(entries: &[(Entry, Vec<u8>)]) -> Result<Vec<u8>> {
    let mut w = TarWriter::new(Vec::new());
    for (e, data) in entries {
        w.append_header(e)?;
        w.data(data)?;
        w.finish_entry(data.len() as u64)?;
    }
    Ok(w.finish()?)
}

fn file_entry(path: &str, len: usize) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind: Kind::File { size: len as u64 },
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_secs: 1_700_000_000,
        mtime_nanos: 0,
        xattrs: vec![],
    }
}

#[test]
fn a_reader_during_the_restore_sees_the_old_file_or_the_new_never_a_mix() -> Result {
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live)?;
    let (old, new) = (pattern(8 << 20, 21), pattern(8 << 20, 22));
    std::fs::write(live.join("db"), &old)?;
    let stream = tar_of(&[(file_entry("db", new.len()), new.clone())])?;
    let (reached_tx, reached) = std::sync::mpsc::channel();
    let (resume_tx, resume) = std::sync::mpsc::channel();
    let hook = Hook {
        data: &stream,
        pos: 0,
        // Halfway through the file's data: its first half is written somewhere by now.
        at: 512 + (4 << 20),
        reached: Some(reached_tx),
        resume,
    };
    std::thread::scope(|s| -> Result {
        let restore = s.spawn(|| extract(hook, &live, &ExtractOptions::default()));
        reached.recv()?;
        // The extractor is stopped in the middle of the file: the reader reads it whole.
        let during = std::fs::read(live.join("db"))?;
        assert!(during == old, "a reader saw a half-written file");
        resume_tx.send(())?;
        let report = restore
            .join()
            .map_err(|_| anyhow::anyhow!("extractor panicked"))??;
        assert_eq!(report.files, 1);
        Ok(())
    })?;
    assert!(std::fs::read(live.join("db"))? == new);
    Ok(())
}

#[test]
fn a_hard_link_whose_first_name_is_missing_never_links_to_live_data() -> Result {
    let dir = tempfile::tempdir()?;
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live)?;
    std::fs::write(live.join("a"), b"unrelated live data")?;
    // The snapshot left `a` out (unreadable) but kept `b` as a link to it.
    let link = Entry {
        kind: Kind::HardLink {
            target: b"a".to_vec(),
        },
        ..file_entry("b", 0)
    };
    let mut w = TarWriter::new(Vec::new());
    w.append_header(&link)?;
    w.append_header(&file_entry("c", 1))?;
    w.data(b"c")?;
    w.finish_entry(1)?;
    let stream = w.finish()?;
    let report = extract(&stream[..], &live, &ExtractOptions::default())?;
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].path, "b");
    assert!(!live.join("b").exists());
    assert_eq!(std::fs::read(live.join("c"))?, b"c", "the rest is restored");
    assert_eq!(std::fs::metadata(live.join("a"))?.nlink(), 1);
    Ok(())
}

/// A stream snapshot whose tar the extractor refuses part-way (a `..` entry), with more
/// data after it than a pipe holds: the restore fails with the extractor's reason, and
/// `restic dump` is not left blocked on a pipe nobody reads.
#[tokio::test]
async fn a_stream_refused_part_way_ends_its_dump() -> Result {
    let w = World::new("64m").await?;
    let after = pattern(8 << 20, 7);
    let stream = tar_of(&[
        (file_entry("first", 5), b"first".to_vec()),
        (file_entry("../escape", 5), b"evil!".to_vec()),
        (file_entry("after", after.len()), after),
    ])?;
    let mut restic = std::process::Command::new(restic_bin())
        .args([
            "backup",
            "--no-cache",
            "--json",
            "--stdin",
            "--stdin-filename",
        ])
        .args([
            engine::STREAM_FILE,
            "--tag",
            engine::TAG_STREAM,
            "--host",
            "host-0",
        ])
        .env("RESTIC_REPOSITORY", w.dir.path().join("repo"))
        .env("RESTIC_PASSWORD", PASSWORD)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = restic.stdin.take() {
        std::io::Write::write_all(&mut stdin, &stream)?;
    }
    let out = restic.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "restic backup --stdin");
    let id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["snapshot_id"].as_str().map(str::to_owned))
        .ok_or_else(|| anyhow::anyhow!("no snapshot id"))?;
    let live = w.path("live");
    let done = w.ours(&id, &live, &[], false).await;
    assert!(
        matches!(
            done,
            Err(AgentError::Stream(
                stash_node_agent::stream::StreamError::Unsafe { .. }
            ))
        ),
        "{done:?}"
    );
    Ok(())
}

/// The pack files of the repository, largest first: with one kind of blob per pack, a few
/// MiB of file data lands in the largest ones, the trees in the smallest.
fn packs_by_size(repo: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut packs = Vec::new();
    for sub in std::fs::read_dir(repo.join("data"))? {
        for pack in std::fs::read_dir(sub?.path())? {
            let pack = pack?;
            packs.push((pack.metadata()?.len(), pack.path()));
        }
    }
    packs.sort_by(|a, b| b.cmp(a));
    Ok(packs)
}

/// Live files that differ from the snapshot, so a restore must fetch every one.
fn changed_copy(src: &Path, live: &Path) -> Result {
    std::fs::create_dir_all(live)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        let mut data = std::fs::read(e.path())?;
        data.iter_mut().for_each(|b| *b ^= 0x5a);
        std::fs::write(live.join(e.file_name()), &data)?;
    }
    Ok(())
}

#[tokio::test]
async fn a_damaged_or_lost_pack_fails_the_restore_and_leaves_the_live_files() -> Result {
    for damage in ["corrupt", "lost"] {
        let w = World::new("64m").await?;
        let src = w.path("source");
        std::fs::create_dir_all(&src)?;
        for i in 0..4 {
            std::fs::write(src.join(format!("f{i}")), pattern(1 << 20, 2 * i + 1))?;
        }
        let id = w.backup(&src, ReadMode::Direct).await?;
        let (live, old) = (w.path("live"), w.path("old"));
        changed_copy(&src, &live)?;
        changed_copy(&src, &old)?;
        let (_, pack) = packs_by_size(&w.dir.path().join("repo"))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no pack"))?;
        if damage == "corrupt" {
            let mut bytes = std::fs::read(&pack)?;
            let middle = bytes.len() / 2;
            bytes[middle..middle + 64]
                .iter_mut()
                .for_each(|b| *b ^= 0xff);
            std::fs::write(&pack, &bytes)?;
        } else {
            std::fs::remove_file(&pack)?;
        }
        let err = w
            .ours(&id, &live, &[], false)
            .await
            .err()
            .ok_or_else(|| anyhow::anyhow!("{damage}: the restore succeeded"))?;
        assert!(
            matches!(err, AgentError::ReadSnapshot(_)),
            "{damage}: {err:?}"
        );
        assert!(
            err.to_string()
                .starts_with("failed to read the snapshot from the repository"),
            "{damage}: {err}"
        );
        // Every live file old or new, at least the one the damage is in old, and nothing of
        // the restore left beside them.
        assert_eq!(
            each_file_is_one_of(&live, &old, &src)?,
            Vec::<String>::new()
        );
        assert_eq!(
            describe(&live)?.keys().collect::<Vec<_>>(),
            ["f0", "f1", "f2", "f3"]
        );
        let old_ones = (0..4)
            .filter(|i| {
                let name = format!("f{i}");
                std::fs::read(live.join(&name)).ok() == std::fs::read(old.join(&name)).ok()
            })
            .count();
        assert!(old_ones > 0, "{damage}: every file was restored");
    }
    Ok(())
}

#[tokio::test]
async fn an_in_place_restore_over_a_cp_a_copy_replaces_only_the_changed_files() -> Result {
    let w = World::new("128m").await?;
    let src = w.path("source");
    std::fs::create_dir_all(&src)?;
    for i in 0..20 {
        std::fs::write(src.join(format!("f{i:02}")), pattern(1 << 20, 2 * i + 1))?;
    }
    let id = w.backup(&src, ReadMode::Direct).await?;
    // A copy as `cp -a` makes it (mtimes kept, every inode new), then two files rewritten.
    let live = w.path("live");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&live)
        .status()?;
    anyhow::ensure!(status.success(), "cp -a");
    std::fs::write(live.join("f03"), pattern(1 << 20, 103))?;
    std::fs::write(live.join("f07"), pattern(1 << 19, 107))?;
    let before = inodes(&live)?;
    let r = w.ours(&id, &live, &[], false).await?;
    assert_eq!((r.files, r.unchanged, r.bytes), (2, 18, 2 << 20), "{r:?}");
    assert_eq!(describe(&live)?, describe(&src)?);
    let after = inodes(&live)?;
    for (name, ino) in &before {
        if name != "f03" && name != "f07" {
            assert_eq!(after.get(name), Some(ino), "{name} was replaced");
        }
    }
    Ok(())
}
