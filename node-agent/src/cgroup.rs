//! Direct mode under the node's rules. In direct mode restic reads the volume itself, so the
//! agent can neither pace its reads nor drop what they bring into the page cache, as its own
//! reader does. The kernel can: each direct backup's restic runs in cgroups of its own
//! (`ReadGroup`), joined before restic's first instruction (`BackupOptions::join_cgroups`).
//!
//! * **Pacing.** The block-IO controller limits the group's reads from the volume's disk to
//!   the budget (`blkio.throttle.read_bps_device` / `read_iops_device` on cgroup v1, `io.max`
//!   on v2). It counts what reaches the disk: page-cache hits are free (they cost the disk
//!   nothing) and restic's metadata and cache reads on that disk count like file data. The
//!   node's budget is shared: runs at once split it evenly (`rebalance`), and what they read
//!   is charged to the agent's own buckets, so the stream reader yields to them.
//! * **Page cache.** A page is charged to the memory cgroup that first brought it in. Pages a
//!   workload had cached stay charged to the workload; the ones restic's reads brought in are
//!   the group's, and are reclaimed when restic is done (`memory.force_empty` on v1,
//!   `memory.reclaim` on v2) — what was hot stays hot, and nothing restic read stays behind.
//!
//! A volume without a block device of its own (tmpfs, overlay, NFS, btrfs subvolumes) cannot
//! be limited this way: `ReadGroup::paced` says so, and the engine then reads in stream mode.

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::budget::Limits;
use crate::hostpath::unescape_octal;

/// Where a controller's hierarchy is: the directory of this process's own cgroup in it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Layout {
    /// cgroup v1: one directory per controller.
    V1 {
        blkio: Option<PathBuf>,
        memory: Option<PathBuf>,
    },
    /// cgroup v2: one directory, with the controllers its `cgroup.controllers` lists.
    V2 { own: PathBuf },
}

/// A cgroup filesystem mount of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CgroupMount {
    v2: bool,
    /// The path of the hierarchy mounted (in this cgroup namespace).
    root: String,
    mount_point: PathBuf,
    /// v1: the controllers bound to it, from the super options.
    controllers: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let options = right.next().unwrap_or_default();
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(CgroupMount {
                v2,
                root: unescape_octal(left.get(3)?),
                mount_point: PathBuf::from(unescape_octal(left.get(4)?)),
                controllers: options.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// `/proc/self/cgroup`: hierarchy id, controllers (empty for v2), path.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            Some((controllers, path.to_owned()))
        })
        .collect()
}

/// The directory of a cgroup `path` under a mount of hierarchy `root`, or `None` when the
/// process's cgroup is not beneath what is mounted.
fn beneath(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path
    } else {
        path.strip_prefix(mount.root.as_str())?
    };
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(rel)
    })
}

fn layout(mountinfo: &str, proc_cgroup: &str) -> Option<Layout> {
    let mounts = parse_mountinfo(mountinfo);
    let cgroups = parse_proc_cgroup(proc_cgroup);
    let v1 = |controller: &str| {
        let (_, path) = cgroups
            .iter()
            .find(|(c, _)| c.iter().any(|c| c == controller))?;
        let mount = mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller))?;
        beneath(mount, path)
    };
    let (blkio, memory) = (v1("blkio"), v1("memory"));
    if blkio.is_some() || memory.is_some() {
        return Some(Layout::V1 { blkio, memory });
    }
    let (_, path) = cgroups.iter().find(|(c, _)| c.is_empty())?;
    let mount = mounts.iter().find(|m| m.v2)?;
    Some(Layout::V2 {
        own: beneath(mount, path)?,
    })
}

/// The whole disk a filesystem on `dev` (a `st_dev`) lives on, as `major:minor`: limits are
/// set on disks, not partitions. `None` for an anonymous device (tmpfs, overlay, NFS, btrfs)
/// or one sysfs does not know.
pub fn whole_disk(dev: u64) -> Option<String> {
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    if major == 0 {
        return None;
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let sys = std::fs::canonicalize(sys).ok()?;
    if !sys.join("partition").exists() {
        return Some(format!("{major}:{minor}"));
    }
    let disk = std::fs::read_to_string(sys.parent()?.join("dev")).ok()?;
    Some(disk.trim().to_owned())
}

/// A failure to set up a run's cgroups; the run then goes without them.
#[derive(Debug, thiserror::Error)]
#[error("failed to {action}: {reason}")]
pub struct GroupError {
    action: &'static str,
    reason: String,
}

fn io_error(action: &'static str) -> impl FnOnce(std::io::Error) -> GroupError {
    move |e| GroupError {
        action,
        reason: e.to_string(),
    }
}

/// One run's share of the node's budget, recomputed as runs start and end.
#[derive(Debug)]
struct Active {
    id: u64,
    io_dir: PathBuf,
    v2: bool,
    disk: String,
    effective: Limits,
    node: Limits,
}

/// The runs with an IO limit, node-wide: they split the node's budget.
static ACTIVE: Mutex<Vec<Active>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// Each run's limit: its own (the assignment's, never above the node's), and at most an even
/// share of the node's budget among the runs at once.
fn share(effective: Limits, node: Limits, runs: u64) -> Limits {
    let part = |n: Option<u64>| n.map(|n| (n / runs.max(1)).max(1));
    effective.min(Limits {
        bytes_per_second: part(node.bytes_per_second),
        iops: part(node.iops),
    })
}

/// The limit files' lines for one run's `limits` on `disk`: (file, content) pairs. Zero
/// removes a v1 limit; `max` a v2 one.
fn limit_lines(v2: bool, disk: &str, limits: Limits) -> Vec<(&'static str, String)> {
    if v2 {
        let v = |n: Option<u64>| n.map_or_else(|| "max".to_owned(), |n| n.to_string());
        vec![(
            "io.max",
            format!(
                "{disk} rbps={} riops={}",
                v(limits.bytes_per_second),
                v(limits.iops)
            ),
        )]
    } else {
        vec![
            (
                "blkio.throttle.read_bps_device",
                format!("{disk} {}", limits.bytes_per_second.unwrap_or(0)),
            ),
            (
                "blkio.throttle.read_iops_device",
                format!("{disk} {}", limits.iops.unwrap_or(0)),
            ),
        ]
    }
}

fn rebalance(active: &[Active]) -> Result<(), GroupError> {
    let runs = active.len() as u64;
    let mut result = Ok(());
    for run in active {
        let limits = share(run.effective, run.node, runs);
        for (file, line) in limit_lines(run.v2, &run.disk, limits) {
            if let Err(e) = std::fs::write(run.io_dir.join(file), line) {
                result = Err(io_error("limit restic's reads")(e));
            }
        }
    }
    result
}

/// The node's byte rate changed (an adaptive budget, `pressure`): every limited run takes
/// its new share at once.
pub fn set_node_rate(bytes_per_second: Option<u64>) {
    let mut active = lock_active();
    for run in active.iter_mut() {
        run.node.bytes_per_second = bytes_per_second;
    }
    if let Err(e) = rebalance(&active) {
        tracing::warn!(error = %e, "restic's reads keep their earlier limit");
    }
}

fn lock_active() -> std::sync::MutexGuard<'static, Vec<Active>> {
    ACTIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Bytes and operations the group read from its disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCount {
    pub bytes: u64,
    pub ops: u64,
}

fn parse_v1_stat(text: &str, disk: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == disk && f.next()? == "Read").then(|| f.next()?.parse().ok())?
    })
}

fn parse_v2_stat(text: &str, disk: &str) -> Option<ReadCount> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some(disk))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    Some(ReadCount {
        bytes: field("rbytes").unwrap_or(0),
        ops: field("rios").unwrap_or(0),
    })
}

/// The cgroups of one direct-mode restic.
#[derive(Debug)]
pub struct ReadGroup {
    id: u64,
    v2: bool,
    /// Where the block-IO files are (and the limit was set, when `paced`).
    io_dir: Option<PathBuf>,
    memory_dir: Option<PathBuf>,
    disk: Option<String>,
    paced: bool,
    /// Each directory restic joins, with its `cgroup.procs` open for writing.
    procs: Mutex<Vec<(PathBuf, Arc<OwnedFd>)>>,
    done: AtomicBool,
}

const PREFIX: &str = "stash-restic-";

/// Whose runs' cgroups these are: the node, for the agent of a node (set once, at start);
/// otherwise this process.
static OWNER: OnceLock<String> = OnceLock::new();

/// Names this process's runs' cgroups after `owner` (the node's name): a later agent of the
/// same node then removes what one killed before it left behind.
pub fn use_owner(owner: &str) -> bool {
    let safe: String = owner
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    OWNER.set(safe).is_ok()
}

/// The owner part of the names, and this process's own part after it. Not the pid alone:
/// agents in PID namespaces of their own (every container) share pid 1, and may share a
/// parent cgroup.
fn names() -> &'static (String, String) {
    static NAMES: OnceLock<(String, String)> = OnceLock::new();
    NAMES.get_or_init(|| {
        let uuid = std::fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap_or_default();
        let random: String = uuid
            .chars()
            .filter(char::is_ascii_hexdigit)
            .take(12)
            .collect();
        let owner = OWNER.get().cloned().unwrap_or_else(|| {
            let pid = std::process::id();
            format!("pid{pid}.{}", start_time(pid).unwrap_or(0))
        });
        (
            format!("{PREFIX}{owner}-"),
            format!("{PREFIX}{owner}-{random}-"),
        )
    })
}

/// When process `pid` started (`/proc/<pid>/stat` field 22): with the pid, it names a
/// process for good, where a pid alone is handed out again.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count from the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process a `pid<pid>.<start>-` owner part names is gone.
fn owner_gone(name: &str) -> bool {
    let Some(owner) = name
        .strip_prefix(PREFIX)
        .and_then(|n| n.strip_prefix("pid"))
        .and_then(|n| n.split('-').next())
    else {
        return false;
    };
    let Some((pid, start)) = owner.split_once('.') else {
        return false;
    };
    match (pid.parse::<u32>(), start.parse::<u64>()) {
        (Ok(pid), Ok(start)) => start_time(pid) != Some(start),
        _ => false,
    }
}

/// How long a run's cgroup is left before it is taken for one a killed agent left behind,
/// when another process owns it: an agent of the same node (it may still be running: two
/// run at once while a DaemonSet surges or a pod is replaced as the old one terminates, and
/// agents of different clusters share one cgroup where containers get none of their own),
/// or a process that looks gone (a process in another PID namespace would see a live owner
/// as gone). A live run's cgroup is empty from its creation until restic joins it, while its
/// agent lists the repository's snapshots: seconds, minutes with a slow backend.
const OWNER_GONE: std::time::Duration = std::time::Duration::from_secs(600);

/// How long anyone's empty run cgroup is left: a run's cgroup is empty only before restic
/// starts and after it exits.
const LEFT_BEHIND: std::time::Duration = std::time::Duration::from_secs(3600);

/// Directories that agents killed before they could remove them left: an agent of this
/// node's, a standalone agent's once it is gone, and anyone's once empty for long; none
/// before it has stood for [`OWNER_GONE`], since its owner may be live and about to start
/// restic in it. A removal of a busy cgroup fails, so a cgroup with restic in it stays.
/// Whatever is removed too early, [`ReadGroup::procs`] makes again.
fn sweep(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let (owner, own) = names();
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with(PREFIX) || name.starts_with(own.as_str()) {
            continue;
        }
        let predecessor = name.starts_with(owner.as_str());
        let age = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if age > LEFT_BEHIND || (age > OWNER_GONE && (predecessor || owner_gone(&name))) {
            // Busy (a restic still in it) or already gone: both fine.
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

fn make_dir(parent: &Path, name: &str) -> Result<PathBuf, GroupError> {
    sweep(parent);
    let dir = parent.join(name);
    std::fs::create_dir(&dir).map_err(io_error("create restic's cgroup"))?;
    Ok(dir)
}

fn open_procs(dir: &Path) -> Result<Arc<OwnedFd>, GroupError> {
    let f = OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .map_err(io_error("open restic's cgroup"))?;
    Ok(Arc::new(OwnedFd::from(f)))
}

/// On v2 a cgroup with processes cannot give controllers to children (the "no internal
/// processes" rule), so the agent first moves itself into a leaf of its own cgroup, then
/// enables `io` and `memory` for the children.
fn v2_parent(own: &Path) -> Result<PathBuf, GroupError> {
    let available = std::fs::read_to_string(own.join("cgroup.controllers"))
        .map_err(io_error("read the cgroup's controllers"))?;
    let wanted: Vec<&str> = ["io", "memory"]
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .collect();
    if wanted.is_empty() {
        return Err(GroupError {
            action: "use cgroup v2",
            reason: "neither the io nor the memory controller is available".into(),
        });
    }
    let enabled = std::fs::read_to_string(own.join("cgroup.subtree_control")).unwrap_or_default();
    if wanted
        .iter()
        .all(|c| enabled.split_whitespace().any(|e| e == *c))
    {
        return Ok(own.to_path_buf());
    }
    let leaf = own.join("stash-agent");
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error("create the agent's cgroup")(e)),
    }
    let procs = std::fs::read_to_string(own.join("cgroup.procs"))
        .map_err(io_error("list the cgroup's processes"))?;
    for pid in procs.split_whitespace() {
        // A process that ended meanwhile cannot be moved, and need not be.
        let _ = std::fs::write(leaf.join("cgroup.procs"), pid);
    }
    let line: Vec<String> = wanted.iter().map(|c| format!("+{c}")).collect();
    std::fs::write(own.join("cgroup.subtree_control"), line.join(" "))
        .map_err(io_error("enable the io and memory controllers"))?;
    Ok(own.to_path_buf())
}

/// Where the host's cgroup filesystem is mounted when this process's own `/sys/fs/cgroup`
/// cannot be written (a container that is not privileged gets it read-only): set once, at
/// start (`--cgroup-root`).
static HOST_ROOT: OnceLock<PathBuf> = OnceLock::new();

/// Finds the cgroups beneath `root` (a mount of the host's `/sys/fs/cgroup`) from now on.
pub fn use_host_root(root: PathBuf) -> bool {
    HOST_ROOT.set(root).is_ok()
}

/// The directory beneath `dir` whose `cgroup.procs` lists `pid` (as this process's PID
/// namespace numbers it: the kernel translates), breadth first, at most `depth` levels down.
fn find_pid(dir: &Path, pid: &str, depth: usize) -> Option<PathBuf> {
    let mut level = vec![dir.to_path_buf()];
    for _ in 0..=depth {
        let mut next = Vec::new();
        for d in level {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            if procs.lines().any(|l| l.trim() == pid) {
                return Some(d);
            }
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir())
                    && !e.file_name().to_string_lossy().starts_with(PREFIX)
                {
                    next.push(e.path());
                }
            }
        }
        level = next;
    }
    None
}

/// The layout beneath a mount of the host's cgroup filesystem: v2 where the root has
/// `cgroup.controllers`, otherwise v1's per-controller directories; this process's own
/// cgroup found by its pid (its `/proc/self/cgroup` names paths in its own cgroup namespace,
/// which need not be the host's).
fn host_layout(root: &Path, pid: u32) -> Option<Layout> {
    let pid = pid.to_string();
    // Kubernetes nests pods a few levels down (kubepods.slice/…/cri-containerd-….scope).
    const DEPTH: usize = 8;
    if root.join("cgroup.controllers").exists() {
        return Some(Layout::V2 {
            own: find_pid(root, &pid, DEPTH)?,
        });
    }
    let blkio = find_pid(&root.join("blkio"), &pid, DEPTH);
    let memory = find_pid(&root.join("memory"), &pid, DEPTH);
    (blkio.is_some() || memory.is_some()).then_some(Layout::V1 { blkio, memory })
}

/// This process's cgroups, found once.
fn own_layout() -> Result<Layout, GroupError> {
    static LAYOUT: OnceLock<Result<Layout, String>> = OnceLock::new();
    LAYOUT
        .get_or_init(|| match HOST_ROOT.get() {
            Some(root) => host_layout(root, std::process::id()).ok_or_else(|| {
                format!(
                    "this process is in no cgroup beneath {} with the blkio, io or memory \
                     controller",
                    root.display()
                )
            }),
            None => {
                let read = |p: &str| std::fs::read_to_string(p).map_err(|e| e.to_string());
                layout(&read("/proc/self/mountinfo")?, &read("/proc/self/cgroup")?).ok_or_else(
                    || "no cgroup filesystem with the blkio, io or memory controller".to_owned(),
                )
            }
        })
        .clone()
        .map_err(|reason| GroupError {
            action: "find this process's cgroups",
            reason,
        })
}

impl ReadGroup {
    /// The cgroups for one restic reading a volume on `dev` (the volume's `st_dev`), limited
    /// to `effective` (the assignment's budget, within the node's) and to its share of
    /// `node`. Parts the machine does not offer are left out: `paced`, `drops_page_cache` and
    /// `read_count` say.
    pub fn create(dev: u64, effective: Limits, node: Limits) -> Result<ReadGroup, GroupError> {
        let layout = own_layout()?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}{id}", names().1);
        let mut group = ReadGroup {
            id,
            v2: false,
            io_dir: None,
            memory_dir: None,
            disk: whole_disk(dev),
            paced: false,
            procs: Mutex::new(Vec::new()),
            done: AtomicBool::new(false),
        };
        let mut procs = Vec::new();
        match layout {
            Layout::V1 { blkio, memory } => {
                if let Some(parent) = blkio {
                    let dir = make_dir(&parent, &name)?;
                    group.io_dir = Some(dir.clone());
                    procs.push((dir.clone(), open_procs(&dir)?));
                }
                if let Some(parent) = memory {
                    let dir = make_dir(&parent, &name)?;
                    group.memory_dir = Some(dir.clone());
                    procs.push((dir.clone(), open_procs(&dir)?));
                }
            }
            Layout::V2 { own } => {
                let parent = v2_parent(&own)?;
                let dir = make_dir(&parent, &name)?;
                group.v2 = true;
                let controllers =
                    std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                let has = |c: &str| controllers.split_whitespace().any(|a| a == c);
                group.io_dir = has("io").then(|| dir.clone());
                group.memory_dir = has("memory").then(|| dir.clone());
                procs.push((dir.clone(), open_procs(&dir)?));
            }
        }
        group.procs = Mutex::new(procs);
        if let (Some(io_dir), Some(disk)) = (&group.io_dir, &group.disk) {
            let mut active = lock_active();
            active.push(Active {
                id,
                io_dir: io_dir.clone(),
                v2: group.v2,
                disk: disk.clone(),
                effective,
                node,
            });
            match rebalance(&active) {
                Ok(()) => group.paced = true,
                Err(e) => {
                    active.retain(|a| a.id != id);
                    tracing::warn!(error = %e, "restic's reads cannot be limited");
                }
            }
        }
        Ok(group)
    }

    /// Whether the group's reads from the volume's disk are limited to the budget.
    pub fn paced(&self) -> bool {
        self.paced
    }

    /// Whether what restic brings into the page cache is dropped when it is done.
    pub fn drops_page_cache(&self) -> bool {
        self.memory_dir.is_some()
    }

    /// The `cgroup.procs` files restic joins: call just before restic starts. A directory
    /// that is gone (removed by hand, or by another agent's sweep while this run listed its
    /// snapshots) is made again, with its limit: a descriptor of a removed cgroup fails
    /// restic's start (`ENODEV`), and restic must never run outside its group.
    pub fn procs(&self) -> Result<Vec<Arc<OwnedFd>>, GroupError> {
        let mut procs = self
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut remade = false;
        for (dir, fd) in procs.iter_mut() {
            if dir.is_dir() {
                continue;
            }
            match std::fs::create_dir(&*dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error("make restic's cgroup again")(e)),
            }
            *fd = open_procs(dir)?;
            remade = true;
        }
        if remade && self.paced {
            rebalance(&lock_active())?;
        }
        Ok(procs.iter().map(|(_, fd)| fd.clone()).collect())
    }

    /// What the group has read from the volume's disk so far, where the kernel counts it.
    pub fn read_count(&self) -> Option<ReadCount> {
        let (dir, disk) = (self.io_dir.as_ref()?, self.disk.as_deref()?);
        if self.v2 {
            parse_v2_stat(&std::fs::read_to_string(dir.join("io.stat")).ok()?, disk)
        } else {
            let stat = |f: &str| parse_v1_stat(&std::fs::read_to_string(dir.join(f)).ok()?, disk);
            Some(ReadCount {
                bytes: stat("blkio.throttle.io_service_bytes")?,
                ops: stat("blkio.throttle.io_serviced").unwrap_or(0),
            })
        }
    }

    /// Drops the page cache the group's reads brought in and removes its cgroups; call once
    /// restic has exited. Returns the bytes of page cache dropped.
    pub fn finish(&self) -> u64 {
        if self.done.swap(true, Ordering::AcqRel) {
            return 0;
        }
        {
            let mut active = lock_active();
            let before = active.len();
            active.retain(|a| a.id != self.id);
            if active.len() != before
                && let Err(e) = rebalance(&active)
            {
                tracing::warn!(error = %e, "failed to share the IO budget anew");
            }
        }
        let dropped = self
            .memory_dir
            .as_deref()
            .map_or(0, |d| reclaim(d, self.v2));
        for dir in [&self.io_dir, &self.memory_dir].into_iter().flatten() {
            // On v2 both are one directory: the second removal finds it gone.
            if let Err(e) = std::fs::remove_dir(dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %dir.display(), error = %e, "failed to remove restic's cgroup; the next run removes it");
            }
        }
        dropped
    }
}

impl Drop for ReadGroup {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The memory charged to a cgroup, in bytes.
fn usage(dir: &Path, v2: bool) -> u64 {
    let file = if v2 {
        "memory.current"
    } else {
        "memory.usage_in_bytes"
    };
    std::fs::read_to_string(dir.join(file))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Reclaims what is charged to a cgroup whose processes have exited: the page cache their
/// reads brought in. Returns the bytes it freed.
fn reclaim(dir: &Path, v2: bool) -> u64 {
    let before = usage(dir, v2);
    if v2 {
        // memory.reclaim gives up (EAGAIN) when it frees less than asked; a few rounds take
        // what a busy machine's LRU lists did not give the first time.
        for _ in 0..8 {
            let left = usage(dir, v2);
            if left < 1 << 16
                || std::fs::write(dir.join("memory.reclaim"), left.to_string()).is_err()
            {
                break;
            }
        }
    } else if let Err(e) = std::fs::write(dir.join("memory.force_empty"), "0") {
        tracing::warn!(error = %e, "failed to drop the page cache restic brought in");
    }
    before.saturating_sub(usage(dir, v2))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO_V1: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const CGROUP_V1: &str = "\
7:blkio:/
4:memory:/process_api/abc
0::/
";

    #[test]
    fn v1_controllers_are_found_beneath_their_mounts() {
        assert_eq!(
            layout(MOUNTINFO_V1, CGROUP_V1),
            Some(Layout::V1 {
                blkio: Some("/sys/fs/cgroup/blkio".into()),
                memory: Some("/sys/fs/cgroup/memory/process_api/abc".into()),
            })
        );
    }

    #[test]
    fn v2_is_found_beneath_a_mount_of_part_of_the_hierarchy() {
        // A container without a cgroup namespace sees its part of the host's hierarchy.
        let mountinfo = "50 40 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let cgroup = "0::/kubepods/pod1/agent\n";
        assert_eq!(
            layout(mountinfo, cgroup),
            Some(Layout::V2 {
                own: "/sys/fs/cgroup/agent".into()
            })
        );
        // Not beneath what is mounted: nothing to use.
        assert_eq!(layout(mountinfo, "0::/system.slice\n"), None);
    }

    #[test]
    fn a_host_mount_is_searched_for_this_process() -> std::io::Result<()> {
        let root = tempfile::tempdir()?;
        let v1 = root.path();
        let pod = v1.join("memory/kubepods/pod1/ctr");
        std::fs::create_dir_all(&pod)?;
        std::fs::create_dir_all(v1.join("blkio"))?;
        std::fs::write(v1.join("memory/cgroup.procs"), "1\n2\n")?;
        std::fs::write(pod.join("cgroup.procs"), "7\n42\n")?;
        std::fs::write(v1.join("blkio/cgroup.procs"), "1\n42\n")?;
        assert_eq!(
            host_layout(v1, 42),
            Some(Layout::V1 {
                blkio: Some(v1.join("blkio")),
                memory: Some(pod.clone()),
            })
        );
        // A run's own cgroup is never taken for the agent's.
        let run = pod.join(format!("{PREFIX}9-0"));
        std::fs::create_dir(&run)?;
        std::fs::write(run.join("cgroup.procs"), "5\n")?;
        assert_eq!(host_layout(v1, 5), None);
        let v2 = tempfile::tempdir()?;
        let ctr = v2
            .path()
            .join("kubepods.slice/pod2.slice/cri-containerd-x.scope");
        std::fs::create_dir_all(&ctr)?;
        std::fs::write(v2.path().join("cgroup.controllers"), "io memory")?;
        std::fs::write(ctr.join("cgroup.procs"), "3\n")?;
        assert_eq!(host_layout(v2.path(), 3), Some(Layout::V2 { own: ctr }));
        assert_eq!(host_layout(v2.path(), 4), None);
        Ok(())
    }

    #[test]
    fn a_sweep_removes_what_earlier_agents_of_the_node_left_and_no_one_elses() -> std::io::Result<()>
    {
        let parent = tempfile::tempdir()?;
        let (owner, own) = names();
        let old = std::time::SystemTime::now() - OWNER_GONE - std::time::Duration::from_secs(5);
        let gone = format!("{PREFIX}pid4194399.7-0123456789ab-1");
        // (name, stood for OWNER_GONE, kept)
        let dirs = [
            (format!("{own}0"), true, true),
            // Another agent of this node (or of a node of the same name): it may be live,
            // between its cgroup's creation and restic's start.
            (format!("{owner}0123456789ab-3"), false, true),
            (format!("{owner}0123456789ab-4"), true, false),
            (format!("{PREFIX}node-2-ba9876543210-0"), true, true),
            (gone.clone(), false, true),
            (format!("{gone}0"), true, false),
            ("kubepods".to_owned(), true, true),
        ];
        for (d, aged, _) in &dirs {
            let dir = parent.path().join(d);
            std::fs::create_dir(&dir)?;
            if *aged {
                std::fs::File::open(&dir)?.set_modified(old)?;
            }
        }
        sweep(parent.path());
        // Beyond the kernel's largest pid (2^22): no such process.
        assert!(owner_gone(&gone));
        let me = std::process::id();
        let live = format!("{PREFIX}pid{me}.{}-0-1", start_time(me).unwrap_or(0));
        assert!(!owner_gone(&live), "{live}");
        for (d, _, kept) in &dirs {
            assert_eq!(parent.path().join(d).exists(), *kept, "{d}");
        }
        Ok(())
    }

    /// What another agent's sweep does to a run between its cgroup's creation and restic's
    /// start: restic must still start, and inside the group.
    #[test]
    fn a_run_cgroup_removed_before_restic_starts_is_made_again() -> std::io::Result<()> {
        if !rustix::process::geteuid().is_root() || own_layout().is_err() {
            eprintln!("skipped: needs root and a cgroup filesystem");
            return Ok(());
        }
        let dev =
            std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(env!("CARGO_MANIFEST_DIR"))?);
        let group = ReadGroup::create(dev, Limits::default(), Limits::default())
            .map_err(std::io::Error::other)?;
        let dirs: Vec<PathBuf> = [&group.io_dir, &group.memory_dir]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        for dir in &dirs {
            // v2 has one directory for both.
            let _ = std::fs::remove_dir(dir);
        }
        let procs = group.procs().map_err(std::io::Error::other)?;
        let mut child = std::process::Command::new("sleep").arg("30").spawn()?;
        let joined = procs
            .iter()
            .try_for_each(|fd| rustix::io::write(fd, child.id().to_string().as_bytes()).map(drop));
        let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", child.id()));
        child.kill()?;
        child.wait()?;
        joined?;
        let name = dirs[0]
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        let cgroups = cgroups?;
        assert!(
            name.is_some_and(|n| cgroups.contains(&n)),
            "the child is in the remade group: {cgroups}"
        );
        group.finish();
        assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?} are removed");
        Ok(())
    }

    #[test]
    fn mount_points_are_unescaped() {
        let m = parse_mountinfo("1 2 0:1 / /a\\040b rw - cgroup2 none rw\n");
        assert_eq!(m[0].mount_point, PathBuf::from("/a b"));
    }

    #[test]
    fn runs_at_once_split_the_node_budget() {
        let node = Limits {
            bytes_per_second: Some(100),
            iops: None,
        };
        let own = Limits {
            bytes_per_second: Some(30),
            iops: Some(5),
        };
        assert_eq!(share(node, node, 1), node);
        assert_eq!(share(node, node, 4).bytes_per_second, Some(25));
        // An assignment's lower limit stays its own.
        assert_eq!(share(own.min(node), node, 2), own);
        assert_eq!(
            share(Limits::default(), Limits::default(), 3),
            Limits::default()
        );
    }

    #[test]
    fn limit_lines_remove_what_is_not_limited() {
        let l = Limits {
            bytes_per_second: Some(52428800),
            iops: None,
        };
        assert_eq!(
            limit_lines(true, "254:0", l),
            vec![("io.max", "254:0 rbps=52428800 riops=max".to_owned())]
        );
        assert_eq!(
            limit_lines(false, "8:0", l),
            vec![
                ("blkio.throttle.read_bps_device", "8:0 52428800".to_owned()),
                ("blkio.throttle.read_iops_device", "8:0 0".to_owned()),
            ]
        );
    }

    #[test]
    fn read_counts_are_the_disks_own() {
        let v1 = "8:0 Read 10\n8:0 Write 3\n254:0 Read 4096\n254:0 Write 0\nTotal 4109\n";
        assert_eq!(parse_v1_stat(v1, "254:0"), Some(4096));
        assert_eq!(parse_v1_stat(v1, "7:0"), None);
        let v2 = "8:0 rbytes=1 wbytes=2 rios=3 wios=4\n254:0 rbytes=8192 wbytes=0 rios=2 wios=0 dbytes=0 dios=0\n";
        assert_eq!(
            parse_v2_stat(v2, "254:0"),
            Some(ReadCount {
                bytes: 8192,
                ops: 2
            })
        );
    }
}
