//! The extractor: writes a tar stream back into a live volume, confined to it (one name at a
//! time below descriptors it holds, never through a symlink), each file replaced atomically.
//!
//! What an in-place restore guarantees, file by file: a file whose content already matches
//! the snapshot is not rewritten (its metadata is corrected in place); any other is written
//! beside its target under a temporary name, given its metadata, flushed, and renamed over
//! the old one, so a reader sees the old content or the new, never a mix; a write that fails
//! (no space, an immutable file, no permission) leaves the old file and is reported at the
//! end, and the restore goes on with the rest. Directory metadata is set once a directory's
//! entries are in, deletions (`--delete`) only after the whole stream has been written.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;

use crate::pattern::Patterns;
use crate::stream::{BLOCK_FILE, CHUNK, StreamError};
use crate::tar::{Entry, Kind, Segment, TarReader};

/// Options of an extraction.
#[derive(Clone, Debug, Default)]
pub struct ExtractOptions {
    /// Remove what the target holds and the snapshot does not (within `include`).
    pub delete_extraneous: bool,
    /// restic include patterns, matched against `/<path in the volume>`; all when empty.
    pub include: Patterns,
    /// restic exclude patterns: what they match (and everything below it) is neither written
    /// nor, with `delete_extraneous`, removed.
    pub exclude: Patterns,
    /// Restore owners (needs CAP_CHOWN; without it, owners are left as they are).
    pub owners: bool,
}

/// One entry the restore could not write, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub path: String,
    pub error: String,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExtractReport {
    /// Regular files written (new or replaced) and their bytes.
    pub files: u64,
    pub bytes: u64,
    /// Regular files whose content already matched the snapshot: not rewritten.
    pub unchanged: u64,
    pub deleted: u64,
    /// Entries of the snapshot the include patterns selected (all, without patterns).
    pub matched: u64,
    /// Everything that could not be restored; the rest was.
    pub failed: Vec<Failure>,
}

/// Checks a tar path: relative, no `..`, no empty or `.` components once normalised.
pub fn safe_relative(path: &[u8]) -> Result<PathBuf, StreamError> {
    let unsafe_path = |reason| StreamError::Unsafe {
        path: String::from_utf8_lossy(path).into_owned(),
        reason,
    };
    if path.first() == Some(&b'/') {
        return Err(unsafe_path("absolute path"));
    }
    if path.contains(&0) {
        return Err(unsafe_path("NUL byte in name"));
    }
    let mut out = PathBuf::new();
    for part in path.split(|b| *b == b'/') {
        match part {
            b"" | b"." => continue,
            b".." => return Err(unsafe_path("'..' in path")),
            p => out.push(OsStr::from_bytes(p)),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(unsafe_path("empty path"));
    }
    Ok(out)
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

const DIR_FLAGS: OFlags = OFlags::DIRECTORY
    .union(OFlags::RDONLY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Directory descriptors open at once on a path being worked on; deeper trees close the
/// shallowest and reopen them through `..` on the way back up, so depth costs no more
/// descriptors and no re-resolution of the whole path.
const OPEN_DIRS: usize = 64;

/// The longest path the kernel resolves in one call (restic goes by whole paths).
const PATH_MAX: usize = 4096;

/// The prefix of every temporary name: a hidden name no workload takes for its own.
pub const TEMP_PREFIX: &str = ".stash-restore-";

/// Makes a file restic staged the agent's own (`--no-owners`). A chown clears a file
/// capability, even one to the same owner, so none is made when the owner is already right,
/// and a regular file's capability is put back after one.
fn give_to_agent(dir: BorrowedFd<'_>, name: &OsStr, ft: FileType, st: &Stat) -> io::Result<()> {
    const CAPABILITY: &str = "security.capability";
    let (uid, gid) = (rustix::process::geteuid(), rustix::process::getegid());
    if (st.st_uid, st.st_gid) == (uid.as_raw(), gid.as_raw()) {
        return Ok(());
    }
    let file = if ft == FileType::RegularFile {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        Some(rustix::fs::openat(dir, name, flags, Mode::empty())?)
    } else {
        None
    };
    let mut cap = vec![0u8; 256];
    let kept = match &file {
        Some(fd) => match rustix::fs::fgetxattr(fd, CAPABILITY, &mut cap[..]) {
            Ok(n) => Some(&cap[..n]),
            Err(Errno::NODATA | Errno::NOTSUP) => None,
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    match &file {
        Some(fd) => rustix::fs::fchown(fd, Some(uid), Some(gid))?,
        None => rustix::fs::chownat(dir, name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?,
    }
    if let (Some(fd), Some(value)) = (&file, kept) {
        rustix::fs::fsetxattr(fd, CAPABILITY, value, rustix::fs::XattrFlags::empty())?;
    }
    Ok(())
}

fn inode(st: &Stat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn file_type(st: &Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode)
}

/// Opens the directory `name` in `dir` without following a symlink.
fn open_child_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())?)
}

/// One directory on the current path.
struct Level<T> {
    name: OsString,
    fd: Option<OwnedFd>,
    id: (u64, u64),
    data: T,
}

/// The directories from a root down to the one being worked on, each held open (up to
/// [`OPEN_DIRS`] of them), so every step down or up is one `openat` of one name.
struct Dirs<'r, T> {
    root: BorrowedFd<'r>,
    root_id: (u64, u64),
    levels: Vec<Level<T>>,
    /// Levels below this index have had their descriptor closed.
    first_open: usize,
}

impl<'r, T> Dirs<'r, T> {
    fn new(root: BorrowedFd<'r>) -> io::Result<Self> {
        let root_id = inode(&rustix::fs::fstat(root)?);
        Ok(Dirs {
            root,
            root_id,
            levels: Vec::new(),
            first_open: 0,
        })
    }

    fn top(&self) -> BorrowedFd<'_> {
        match self.levels.last() {
            Some(Level { fd: Some(fd), .. }) => fd.as_fd(),
            // The top always holds its descriptor (see `pop`).
            _ => self.root,
        }
    }

    fn top_id(&self) -> (u64, u64) {
        self.levels.last().map_or(self.root_id, |l| l.id)
    }

    fn path(&self) -> PathBuf {
        self.levels.iter().map(|l| l.name.as_os_str()).collect()
    }

    fn push(&mut self, name: OsString, fd: OwnedFd, data: T) -> io::Result<()> {
        let id = inode(&rustix::fs::fstat(&fd)?);
        self.levels.push(Level {
            name,
            fd: Some(fd),
            id,
            data,
        });
        if self.levels.len() - self.first_open > OPEN_DIRS {
            self.levels[self.first_open].fd = None;
            self.first_open += 1;
        }
        Ok(())
    }

    /// Leaves the top directory, returning it with its descriptor. The new top is reopened
    /// through `..` if it was closed, and must be the directory it was.
    fn pop(&mut self) -> io::Result<Option<Level<T>>> {
        let Some(level) = self.levels.pop() else {
            return Ok(None);
        };
        let n = self.levels.len();
        if n > 0 && n <= self.first_open {
            let up = match &level.fd {
                Some(fd) => open_child_dir(fd.as_fd(), OsStr::new(".."))?,
                None => self.reopen_from_root()?,
            };
            if inode(&rustix::fs::fstat(&up)?) != self.levels[n - 1].id {
                return Err(io::Error::other("a directory was moved during the restore"));
            }
            self.levels[n - 1].fd = Some(up);
            self.first_open = n - 1;
        }
        self.first_open = self.first_open.min(self.levels.len());
        Ok(Some(level))
    }

    fn reopen_from_root(&self) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat2(
            self.root,
            self.path(),
            DIR_FLAGS,
            Mode::empty(),
            BENEATH,
        )?)
    }
}

/// Metadata a directory gets once its entries are in; `None` for one the stream did not
/// describe (created as a parent of a selected entry).
type DirMeta = Option<Entry>;

fn errno(e: Errno) -> io::Error {
    e.into()
}

/// A name for a temporary entry in a directory: hidden, and unlikely to be taken.
fn temp_name(counter: &mut u64) -> OsString {
    *counter += 1;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ (u64::from(std::process::id()) << 32)
        ^ counter.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut x = seed | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    OsString::from(format!("{TEMP_PREFIX}{x:016x}"))
}

/// Creates a fresh temporary name in `dir` with `make`, retrying on a collision.
fn create_temp<T>(
    counter: &mut u64,
    mut make: impl FnMut(&OsStr) -> rustix::io::Result<T>,
) -> io::Result<(OsString, T)> {
    loop {
        let name = temp_name(counter);
        match make(&name) {
            Ok(v) => return Ok((name, v)),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The entry's mtime as both access and modification time.
fn timestamps(e: &Entry) -> rustix::fs::Timestamps {
    let t = rustix::fs::Timespec {
        tv_sec: e.mtime_secs,
        tv_nsec: i64::from(e.mtime_nanos),
    };
    rustix::fs::Timestamps {
        last_access: t,
        last_modification: t,
    }
}

/// Whether the agent may give files away: restore owners when it may, as restic and GNU tar
/// do as root.
fn may_chown() -> bool {
    rustix::process::geteuid().is_root()
}

/// The names and values of an open file's extended attributes.
fn read_xattrs(fd: BorrowedFd<'_>) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::flistxattr(fd, &mut names[..]) {
            Ok(n) => break n,
            Err(Errno::RANGE) if names.len() < 1 << 20 => names.resize(names.len() * 4, 0),
            Err(Errno::NOTSUP) => return Ok(vec![]),
            Err(e) => return Err(e.into()),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let mut value = vec![0u8; 4096];
        loop {
            match rustix::fs::fgetxattr(fd, OsStr::from_bytes(name), &mut value[..]) {
                Ok(len) => {
                    value.truncate(len);
                    break;
                }
                Err(Errno::RANGE) if value.len() < 1 << 20 => {
                    let len = value.len() * 4;
                    value.resize(len, 0);
                }
                Err(Errno::NODATA) => {
                    value.clear();
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        out.push((name.to_vec(), value));
    }
    Ok(out)
}

/// Extended attributes a restore owns on a file it leaves in place: those not in the
/// snapshot are removed. Others (an SELinux label the kubelet set, say) are left alone.
fn restore_owns(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name.starts_with(b"trusted.")
        || name == b"security.capability"
        || name.starts_with(b"system.posix_acl_")
}

/// Gives an open file, directory or temporary entry the entry's metadata: owner first (a
/// chown clears file capabilities and set-id bits), then extended attributes, then mode
/// and times. `current` is what it has now, to leave what already matches untouched.
fn set_metadata(
    fd: BorrowedFd<'_>,
    entry: &Entry,
    owners: bool,
    failures: &mut Vec<String>,
) -> io::Result<()> {
    let st = rustix::fs::fstat(fd)?;
    let want_owner = (entry.uid as u32, entry.gid as u32);
    if owners && (st.st_uid, st.st_gid) != want_owner {
        rustix::fs::fchown(
            fd,
            Some(rustix::fs::Uid::from_raw(want_owner.0)),
            Some(rustix::fs::Gid::from_raw(want_owner.1)),
        )?;
    }
    let have = read_xattrs(fd).unwrap_or_default();
    for (k, v) in &entry.xattrs {
        if have.iter().any(|(hk, hv)| hk == k && hv == v) {
            continue;
        }
        if let Err(e) =
            rustix::fs::fsetxattr(fd, OsStr::from_bytes(k), v, rustix::fs::XattrFlags::empty())
        {
            failures.push(format!(
                "failed to set extended attribute {}: {e}",
                String::from_utf8_lossy(k)
            ));
        }
    }
    for (k, _) in &have {
        if restore_owns(k)
            && !entry.xattrs.iter().any(|(ek, _)| ek == k)
            && let Err(e) = rustix::fs::fremovexattr(fd, OsStr::from_bytes(k))
        {
            failures.push(format!(
                "failed to remove extended attribute {}: {e}",
                String::from_utf8_lossy(k)
            ));
        }
    }
    let st = rustix::fs::fstat(fd)?;
    if st.st_mode & 0o7777 != entry.mode & 0o7777 || !entry.xattrs.is_empty() {
        rustix::fs::fchmod(fd, Mode::from_raw_mode(entry.mode & 0o7777))?;
    }
    if (st.st_mtime, st.st_mtime_nsec as u32) != (entry.mtime_secs, entry.mtime_nanos) {
        rustix::fs::futimens(fd, &timestamps(entry))?;
    }
    Ok(())
}

/// Owner and times of an entry that cannot be opened (a symlink, a FIFO, a device), set
/// through its directory without following it.
fn set_special_metadata(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    entry: &Entry,
    owners: bool,
) -> io::Result<()> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if owners && (st.st_uid, st.st_gid) != (entry.uid as u32, entry.gid as u32) {
        rustix::fs::chownat(
            dir,
            name,
            Some(rustix::fs::Uid::from_raw(entry.uid as u32)),
            Some(rustix::fs::Gid::from_raw(entry.gid as u32)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    if file_type(&st) != FileType::Symlink && st.st_mode & 0o7777 != entry.mode & 0o7777 {
        chmod_nofollow(dir, name, Mode::from_raw_mode(entry.mode & 0o7777))?;
    }
    if (st.st_mtime, st.st_mtime_nsec as u32) != (entry.mtime_secs, entry.mtime_nanos) {
        rustix::fs::utimensat(dir, name, &timestamps(entry), AtFlags::SYMLINK_NOFOLLOW)?;
    }
    Ok(())
}

/// Changes the mode of a FIFO or device without following a symlink and without opening
/// it (opening a device can act on it): through a path-only descriptor of the very inode.
fn chmod_nofollow(dir: BorrowedFd<'_>, name: &OsStr, mode: Mode) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if file_type(&rustix::fs::fstat(&fd)?) == FileType::Symlink {
        return Ok(());
    }
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::chmodat(
        rustix::fs::CWD,
        proc_path.as_str(),
        mode,
        AtFlags::empty(),
    )?)
}

/// Removes the tree `name` in `dir`, depth first without recursion.
fn remove_tree_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    // Each level keeps the subdirectories it has yet to empty.
    let mut dirs: Dirs<'_, Vec<OsString>> = Dirs::new(dir)?;
    let first = open_child_dir(dir, name)?;
    let subdirs = unlink_files(first.as_fd())?;
    dirs.push(name.to_owned(), first, subdirs)?;
    while let Some(level) = dirs.levels.last_mut() {
        if let Some(next) = level.data.pop() {
            let fd = open_child_dir(dirs.top(), &next)?;
            let subdirs = unlink_files(fd.as_fd())?;
            dirs.push(next, fd, subdirs)?;
            continue;
        }
        let done = dirs.pop()?;
        if let Some(done) = done {
            drop(done.fd);
            rustix::fs::unlinkat(dirs.top(), &done.name, AtFlags::REMOVEDIR)?;
        }
    }
    Ok(())
}

/// Unlinks every non-directory in `dir`; returns the subdirectories.
fn unlink_files(dir: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut subdirs = Vec::new();
    for (name, ft) in list(dir)? {
        if ft == FileType::Directory {
            subdirs.push(name);
        } else {
            rustix::fs::unlinkat(dir, &name, AtFlags::empty())?;
        }
    }
    Ok(subdirs)
}

/// The names in a directory (without `.` and `..`) and their types.
fn list(dir: BorrowedFd<'_>) -> io::Result<Vec<(OsString, FileType)>> {
    let mut out = Vec::new();
    let fd = rustix::fs::openat(dir, ".", DIR_FLAGS, Mode::empty())?;
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        let name = OsStr::from_bytes(n).to_owned();
        let ft = match entry.file_type() {
            FileType::Unknown => rustix::fs::statat(dir, &name, AtFlags::SYMLINK_NOFOLLOW)
                .map(|st| file_type(&st))
                .unwrap_or(FileType::Unknown),
            ft => ft,
        };
        out.push((name, ft));
    }
    Ok(out)
}

/// Whether the byte range `[start, end)` of a file reads as zeros, without reading holes.
fn reads_as_zeros(file: &File, start: u64, end: u64, buf: &mut [u8]) -> io::Result<bool> {
    let mut pos = start;
    while pos < end {
        let data = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(Errno::NXIO) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            return Ok(true);
        }
        let hole = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(data))?.min(end);
        let mut at = data;
        while at < hole {
            let want = (hole - at).min(buf.len() as u64) as usize;
            let n = file.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Ok(true);
            }
            if buf[..n].iter().any(|b| *b != 0) {
                return Ok(false);
            }
            at += n as u64;
        }
        pos = hole;
    }
    Ok(true)
}

/// Where an extraction's entries and data come from: a tar stream ([`TarReader`]), or a
/// snapshot's trees read natively (`crate::tree_source`).
pub trait EntrySource {
    /// The next entry, or `None` at the end. The previous entry's unread data is skipped.
    fn next_entry(&mut self) -> io::Result<Option<Entry>>;
    /// The current entry's data segments when it is stored sparse (see [`TarReader`]).
    fn sparse_map(&self) -> Option<&[Segment]>;
    /// The current entry's data; 0 at its end.
    fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Whether a live file of the snapshot's size and mtime is taken as unchanged without
    /// reading the snapshot's data, as restic's `--overwrite if-changed` takes it: true where
    /// the data costs a fetch from the repository, false for a stream that carries it anyway
    /// (and is then compared byte for byte).
    fn trusts_size_and_mtime(&self) -> bool {
        false
    }
    /// Reads what is left after the last entry.
    fn drain(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<R: Read> EntrySource for TarReader<R> {
    fn next_entry(&mut self) -> io::Result<Option<Entry>> {
        TarReader::next_entry(self)
    }

    fn sparse_map(&self) -> Option<&[Segment]> {
        TarReader::sparse_map(self)
    }

    fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        TarReader::read_data(self, buf)
    }

    fn drain(&mut self) -> io::Result<()> {
        TarReader::drain(self).map(drop)
    }
}

/// How a file's data is being restored: compared against the live file while it matches,
/// then written to a temporary file beside it.
enum Sink {
    Compare(File),
    Write { temp: OsString, file: File },
}

/// What became of one regular file.
enum Outcome {
    Unchanged,
    Written,
}

/// A file the restore put in place (written or found identical): later hard links to its
/// snapshot name may link to it.
#[derive(Clone, Copy, Debug)]
struct Placed {
    id: (u64, u64),
}

/// Hard links whose first name this restore did not write: the first name and the names
/// linked to it, restored as files of their own from a second read of the stream.
type Pending = HashMap<PathBuf, Vec<PathBuf>>;

/// An extraction into one target, over one or two reads of the stream.
#[derive(Debug)]
pub struct Extractor {
    root: OwnedFd,
    opts: ExtractOptions,
    owners: bool,
    report: ExtractReport,
    /// Per directory restored (device, inode): the names the snapshot has in it.
    seen: HashMap<(u64, u64), HashSet<OsString>>,
    placed: HashMap<PathBuf, Placed>,
    pending: Pending,
    /// Direct mode: the first name of each staged file with several names.
    staged_links: HashMap<(u64, u64), PathBuf>,
    /// Files of the snapshot that could not be written: their links fail with them.
    failed_files: HashSet<PathBuf>,
    /// What could not be set on the entry being restored (an extended attribute, say).
    notes: Vec<String>,
    counter: u64,
    buf: Vec<u8>,
    cmp: Vec<u8>,
}

impl Extractor {
    /// Opens (creating it if needed) the target directory.
    pub fn new(target: &Path, opts: &ExtractOptions) -> Result<Self, StreamError> {
        let restore_err = |source: io::Error| StreamError::Restore {
            path: target.display().to_string(),
            source,
        };
        std::fs::create_dir_all(target).map_err(restore_err)?;
        let root = rustix::fs::open(
            target,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| restore_err(e.into()))?;
        Ok(Extractor {
            root,
            opts: opts.clone(),
            owners: opts.owners && may_chown(),
            report: ExtractReport::default(),
            seen: HashMap::new(),
            placed: HashMap::new(),
            pending: Pending::new(),
            failed_files: HashSet::new(),
            staged_links: HashMap::new(),
            notes: Vec::new(),
            counter: 0,
            buf: vec![0u8; CHUNK],
            cmp: vec![0u8; CHUNK],
        })
    }

    /// Whether `rel` is selected (and whether something below it may be).
    fn selected(&self, rel: &Path) -> (bool, bool) {
        let path = Path::new("/").join(rel);
        // restic's exclude patterns match a directory's descendants too.
        if !self.opts.exclude.is_empty() && self.opts.exclude.matches(&path) {
            return (false, false);
        }
        if self.opts.include.is_empty() {
            return (true, true);
        }
        self.opts.include.matches_with_child(&path)
    }

    fn fail(&mut self, rel: &Path, error: impl std::fmt::Display) {
        tracing::warn!(path = %rel.display(), %error, "not restored");
        self.report.failed.push(Failure {
            path: rel.display().to_string(),
            error: error.to_string(),
        });
    }

    /// Moves `dirs` to the directory `parent` (relative to the root), leaving (and setting
    /// the metadata of) the directories not on its path and creating what is missing.
    /// The last component is the directory described by `meta` when given.
    fn go_to(
        &mut self,
        dirs: &mut Dirs<'_, DirMeta>,
        parent: &Path,
        meta: Option<&Entry>,
    ) -> io::Result<()> {
        let parts: Vec<&OsStr> = parent.iter().collect();
        let common = dirs
            .levels
            .iter()
            .zip(&parts)
            .take_while(|(l, p)| l.name.as_os_str() == **p)
            .count();
        while dirs.levels.len() > common {
            self.leave(dirs)?;
        }
        for (i, part) in parts.iter().enumerate().skip(common) {
            let last = i + 1 == parts.len();
            let fd = self.enter(dirs.top(), part, last.then_some(meta).flatten())?;
            self.seen
                .entry(dirs.top_id())
                .or_default()
                .insert(part.to_os_string());
            dirs.push(part.to_os_string(), fd, None)?;
            // A directory of the snapshot, even an empty one, keeps only what it has.
            self.seen.entry(dirs.top_id()).or_default();
        }
        if let (Some(meta), Some(level)) = (meta, dirs.levels.last_mut()) {
            level.data = Some(meta.clone());
        }
        Ok(())
    }

    /// Opens the directory `name` in `dir`, creating it if missing. Only a directory the
    /// snapshot describes replaces what else is there.
    fn enter(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        meta: Option<&Entry>,
    ) -> io::Result<OwnedFd> {
        match open_child_dir(dir, name) {
            Ok(fd) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(Errno::NOENT.raw_os_error()) => {}
            Err(e) if meta.is_some() && is_not_dir(&e) => {
                rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            }
            Err(e) => return Err(e),
        }
        let mode = meta.map_or(0o755, |m| m.mode & 0o7777) | 0o700;
        match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        open_child_dir(dir, name)
    }

    /// Leaves the top directory, giving it its metadata now that its entries are in.
    fn leave(&mut self, dirs: &mut Dirs<'_, DirMeta>) -> io::Result<()> {
        let path = dirs.path();
        if let Some(level) = dirs.pop()?
            && let (Some(meta), Some(fd)) = (&level.data, &level.fd)
        {
            let mut problems = Vec::new();
            if let Err(e) = set_metadata(fd.as_fd(), meta, self.owners, &mut problems) {
                self.fail(&path, format!("failed to set its metadata: {e}"));
            }
            for p in problems {
                self.fail(&path, p);
            }
        }
        Ok(())
    }

    /// The first read of the stream: every selected entry.
    pub fn extract<R: Read>(&mut self, input: R) -> Result<(), StreamError> {
        self.extract_from(&mut TarReader::new(input))
    }

    /// Whether hard links wait for a second read of the stream (their first name was not
    /// restored: left out by the include patterns, or not written).
    pub fn needs_second_pass(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The second read: the data of each pending link's first name, restored under the
    /// link's names as a file of their own.
    pub fn extract_links<R: Read>(&mut self, input: R) -> Result<(), StreamError> {
        self.extract_links_from(&mut TarReader::new(input))
    }

    /// The first read of a snapshot's trees (or any other source): every selected entry.
    pub fn extract_from<S: EntrySource>(&mut self, source: &mut S) -> Result<(), StreamError> {
        self.pass(source, None)
    }

    /// The second read of a source, for hard links (see [`Extractor::extract_links`]).
    pub fn extract_links_from<S: EntrySource>(
        &mut self,
        source: &mut S,
    ) -> Result<(), StreamError> {
        let pending = std::mem::take(&mut self.pending);
        self.pass(source, Some(&pending))?;
        // Pending links the second read did not place become failures.
        for (first, names) in pending {
            for name in names {
                let reported = self
                    .report
                    .failed
                    .iter()
                    .any(|f| Path::new(&f.path) == name);
                if !self.placed.contains_key(&name) && !reported {
                    self.fail(
                        &name,
                        format!(
                            "its hard link target {} is not in the snapshot",
                            first.display()
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    fn pass<S: EntrySource>(
        &mut self,
        reader: &mut S,
        links: Option<&Pending>,
    ) -> Result<(), StreamError> {
        let root = self.root.try_clone().map_err(|e| StreamError::Restore {
            path: ".".into(),
            source: e,
        })?;
        let mut dirs: Dirs<'_, DirMeta> =
            Dirs::new(root.as_fd()).map_err(|e| StreamError::Restore {
                path: ".".into(),
                source: e,
            })?;
        let outcome = self.entries(reader, &mut dirs, links);
        // Directories left open get their metadata whatever happened to the stream: what
        // was written into them changed their times.
        while !dirs.levels.is_empty() {
            if let Err(e) = self.leave(&mut dirs) {
                let path = dirs.path();
                self.fail(&path, e);
                break;
            }
        }
        outcome?;
        reader.drain().map_err(StreamError::Decode)?;
        Ok(())
    }

    fn entries<S: EntrySource>(
        &mut self,
        reader: &mut S,
        dirs: &mut Dirs<'_, DirMeta>,
        links: Option<&Pending>,
    ) -> Result<(), StreamError> {
        while let Some(entry) = reader.next_entry().map_err(StreamError::Decode)? {
            let rel = safe_relative(&entry.path)?;
            let names: Vec<PathBuf> = match links {
                // Second pass: only first names of pending links, written under the links.
                Some(links) => match (&entry.kind, links.get(&rel)) {
                    (Kind::File { .. }, Some(names)) => names.clone(),
                    _ => continue,
                },
                None => {
                    if !self.selected(&rel).0 {
                        continue;
                    }
                    self.report.matched += 1;
                    vec![rel.clone()]
                }
            };
            let mut first: Option<PathBuf> = None;
            for dest in names {
                let Some(parent) = dest.parent() else {
                    continue;
                };
                let name = dest.file_name().unwrap_or_default().to_owned();
                let is_dir = entry.kind == Kind::Dir;
                let target = if is_dir { dest.as_path() } else { parent };
                if let Err(e) = self.go_to(dirs, target, is_dir.then_some(&entry)) {
                    self.fail(&dest, e);
                    continue;
                }
                if is_dir {
                    continue;
                }
                self.seen
                    .entry(dirs.top_id())
                    .or_default()
                    .insert(name.clone());
                let done = match (&first, &entry.kind) {
                    // Further names of a second-pass copy link to its first name.
                    (Some(src), _) => self.hard_link(dirs.top(), &dest, &name, src),
                    (None, _) => self.one(reader, dirs, &entry, &dest, &name),
                };
                for note in std::mem::take(&mut self.notes) {
                    self.fail(&dest, note);
                }
                match done {
                    Ok(()) => {
                        if links.is_some() {
                            first = Some(dest.clone());
                        }
                    }
                    Err(EntryError::Stream(e)) => return Err(e),
                    Err(EntryError::Io(e)) => self.fail(&dest, e),
                }
            }
        }
        Ok(())
    }

    /// Restores one entry other than a directory at `name` in the current directory.
    fn one<S: EntrySource>(
        &mut self,
        reader: &mut S,
        dirs: &Dirs<'_, DirMeta>,
        entry: &Entry,
        rel: &Path,
        name: &OsStr,
    ) -> Result<(), EntryError> {
        let dir = dirs.top();
        let existing = existing_at(dir, name)?;
        match &entry.kind {
            Kind::Dir => Ok(()),
            Kind::File { size } => {
                let outcome = self
                    .file(reader, dir, entry, *size, name, existing.as_ref())
                    .inspect_err(|_| {
                        self.failed_files.insert(rel.to_path_buf());
                    })?;
                let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
                self.placed
                    .insert(rel.to_path_buf(), Placed { id: inode(&st) });
                match outcome {
                    Outcome::Unchanged => self.report.unchanged += 1,
                    Outcome::Written => {
                        self.report.files += 1;
                        self.report.bytes += size;
                    }
                }
                Ok(())
            }
            Kind::HardLink { target } => {
                let src = safe_relative(target)?;
                if self.placed.contains_key(&src) {
                    self.hard_link(dir, rel, name, &src)
                } else if self.failed_files.contains(&src) {
                    Err(EntryError::Io(io::Error::other(format!(
                        "its hard link target {} could not be restored",
                        src.display()
                    ))))
                } else {
                    self.pending.entry(src).or_default().push(rel.to_path_buf());
                    Ok(())
                }
            }
            Kind::Symlink { target } => {
                if let Some(st) = &existing
                    && file_type(st) == FileType::Symlink
                    && rustix::fs::readlinkat(dir, name, Vec::new())
                        .is_ok_and(|t| t.as_bytes() == target.as_slice())
                {
                    set_special_metadata(dir, name, entry, self.owners)?;
                    return Ok(());
                }
                let (temp, ()) = create_temp(&mut self.counter, |t| {
                    rustix::fs::symlinkat(OsStr::from_bytes(target), dir, t)
                })?;
                self.install_special(dir, &temp, name, entry, existing.as_ref())
            }
            Kind::Fifo | Kind::CharDevice { .. } | Kind::BlockDevice { .. } => {
                let (ft, dev) = match entry.kind {
                    Kind::CharDevice { major, minor } => {
                        (FileType::CharacterDevice, rustix::fs::makedev(major, minor))
                    }
                    Kind::BlockDevice { major, minor } => {
                        (FileType::BlockDevice, rustix::fs::makedev(major, minor))
                    }
                    _ => (FileType::Fifo, 0),
                };
                if let Some(st) = &existing
                    && file_type(st) == ft
                    && (ft == FileType::Fifo || st.st_rdev == dev)
                {
                    set_special_metadata(dir, name, entry, self.owners)?;
                    return Ok(());
                }
                let mode = Mode::from_raw_mode(entry.mode & 0o7777);
                let (temp, ()) = create_temp(&mut self.counter, |t| {
                    rustix::fs::mknodat(dir, t, ft, mode, dev)
                })?;
                self.install_special(dir, &temp, name, entry, existing.as_ref())
            }
        }
    }

    /// Gives a temporary symlink, FIFO or device its metadata and renames it over `name`.
    fn install_special(
        &mut self,
        dir: BorrowedFd<'_>,
        temp: &OsStr,
        name: &OsStr,
        entry: &Entry,
        existing: Option<&Stat>,
    ) -> Result<(), EntryError> {
        let done = set_special_metadata(dir, temp, entry, self.owners)
            .and_then(|()| self.rename_over(dir, temp, name, existing));
        if done.is_err() {
            let _ = rustix::fs::unlinkat(dir, temp, AtFlags::empty());
        }
        Ok(done?)
    }

    /// Renames the temporary `temp` over `name`; a directory in the way (the snapshot has
    /// something else there) is removed first, once the replacement is complete.
    fn rename_over(
        &mut self,
        dir: BorrowedFd<'_>,
        temp: &OsStr,
        name: &OsStr,
        existing: Option<&Stat>,
    ) -> io::Result<()> {
        self.move_over(dir, temp, dir, name, existing)
    }

    /// Renames `from` in `from_dir` to `name` in `dir` (see [`Extractor::rename_over`]).
    fn move_over(
        &mut self,
        from_dir: BorrowedFd<'_>,
        from: &OsStr,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        existing: Option<&Stat>,
    ) -> io::Result<()> {
        if existing.is_some_and(|st| file_type(st) == FileType::Directory) {
            remove_tree_at(dir, name)?;
        }
        rustix::fs::renameat(from_dir, from, dir, name)?;
        Ok(())
    }

    /// Makes `name` a hard link to `src`, a file this restore placed; atomically, through
    /// a temporary link renamed over it.
    fn hard_link(
        &mut self,
        dir: BorrowedFd<'_>,
        rel: &Path,
        name: &OsStr,
        src: &Path,
    ) -> Result<(), EntryError> {
        let Some(placed) = self.placed.get(src).copied() else {
            return Err(EntryError::Io(io::Error::other(
                "hard link target not restored",
            )));
        };
        let existing = existing_at(dir, name)?;
        if existing.as_ref().map(inode) == Some(placed.id) {
            self.placed.insert(rel.to_path_buf(), placed);
            return Ok(());
        }
        let src_dir = rustix::fs::openat2(
            &self.root,
            src.parent().unwrap_or(Path::new("")).join("."),
            DIR_FLAGS,
            Mode::empty(),
            BENEATH,
        )
        .map_err(errno)?;
        let src_name = src.file_name().unwrap_or_default();
        let (temp, ()) = create_temp(&mut self.counter, |t| {
            rustix::fs::linkat(&src_dir, src_name, dir, t, AtFlags::empty())
        })?;
        // The workload may have replaced the first name since: link only to what we placed.
        let linked = rustix::fs::statat(dir, &temp, AtFlags::SYMLINK_NOFOLLOW).map(|st| inode(&st));
        let done = match linked {
            Ok(id) if id == placed.id => self.rename_over(dir, &temp, name, existing.as_ref()),
            Ok(_) => Err(io::Error::other(format!(
                "{} changed during the restore; not linked to it",
                src.display()
            ))),
            Err(e) => Err(e.into()),
        };
        if done.is_err() {
            let _ = rustix::fs::unlinkat(dir, &temp, AtFlags::empty());
        }
        done?;
        self.placed.insert(rel.to_path_buf(), placed);
        Ok(())
    }

    /// Restores a regular file's data: compared against the live file while that is a
    /// regular file of the same size and its bytes match, written to a temporary file from
    /// the first difference on, then renamed over it.
    fn file<S: EntrySource>(
        &mut self,
        reader: &mut S,
        dir: BorrowedFd<'_>,
        entry: &Entry,
        size: u64,
        name: &OsStr,
        existing: Option<&Stat>,
    ) -> Result<Outcome, EntryError> {
        let map: Vec<Segment> = match reader.sparse_map() {
            Some(map) => map.to_vec(),
            None => vec![Segment {
                offset: 0,
                len: size,
            }],
        };
        let mut sink = None;
        if let Some(st) = existing
            && file_type(st) == FileType::RegularFile
            && st.st_size as u64 == size
        {
            // Non-blocking: should it have become a FIFO since, the open must not hang.
            if let Ok(fd) = rustix::fs::openat(
                dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            ) && rustix::fs::fstat(&fd).is_ok_and(|now| inode(&now) == inode(st))
            {
                let old = File::from(fd);
                if reader.trusts_size_and_mtime()
                    && st.st_mtime == entry.mtime_secs
                    && st.st_mtime_nsec as u32 == entry.mtime_nanos
                {
                    set_metadata(old.as_fd(), entry, self.owners, &mut self.notes)?;
                    return Ok(Outcome::Unchanged);
                }
                sink = Some(Sink::Compare(old));
            }
        }
        let mut sink = match sink {
            Some(s) => s,
            None => self.new_temp(dir)?,
        };
        let written = self.copy_data(reader, dir, &mut sink, &map, size);
        let temp = match (&sink, written) {
            (Sink::Compare(old), Ok(())) => {
                set_metadata(old.as_fd(), entry, self.owners, &mut self.notes)?;
                return Ok(Outcome::Unchanged);
            }
            (Sink::Write { temp, .. }, Ok(())) => temp.clone(),
            (Sink::Write { temp, .. }, Err(e)) => {
                let _ = rustix::fs::unlinkat(dir, temp, AtFlags::empty());
                return Err(e);
            }
            (Sink::Compare(_), Err(e)) => return Err(e),
        };
        let Sink::Write { file, .. } = &sink else {
            return Err(EntryError::Io(io::Error::other("no temporary file")));
        };
        let installed = (|| -> io::Result<()> {
            set_metadata(file.as_fd(), entry, self.owners, &mut self.notes)?;
            // Replacing a file: its new content must be on disk before the rename makes it
            // the only copy. A new name risks nothing (restic never syncs either).
            if existing.is_some() {
                file.sync_data()?;
            }
            self.rename_over(dir, &temp, name, existing)
        })();
        if let Err(e) = installed {
            let _ = rustix::fs::unlinkat(dir, &temp, AtFlags::empty());
            return Err(EntryError::Io(e));
        }
        Ok(Outcome::Written)
    }

    fn new_temp(&mut self, dir: BorrowedFd<'_>) -> Result<Sink, EntryError> {
        let (temp, fd) = create_temp(&mut self.counter, |t| {
            rustix::fs::openat(
                dir,
                t,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
        })?;
        Ok(Sink::Write {
            temp,
            file: File::from(fd),
        })
    }

    /// Reads the entry's segments from the stream into `sink`. Comparing, holes must read
    /// as zeros and segments as the stream's bytes; at the first difference, what matched
    /// is copied from the live file into a new temporary file, which takes the rest.
    fn copy_data<S: EntrySource>(
        &mut self,
        reader: &mut S,
        dir: BorrowedFd<'_>,
        sink: &mut Sink,
        map: &[Segment],
        size: u64,
    ) -> Result<(), EntryError> {
        let mut buf = std::mem::take(&mut self.buf);
        let mut cmp = std::mem::take(&mut self.cmp);
        let result = (|| {
            let mut hole_start = 0u64;
            for (i, seg) in map.iter().enumerate() {
                if let Sink::Compare(old) = sink
                    && !reads_as_zeros(old, hole_start, seg.offset, &mut cmp)?
                {
                    self.diverge(dir, sink, &map[..i], &mut cmp)?;
                }
                let mut done = 0u64;
                while done < seg.len {
                    let want = (seg.len - done).min(buf.len() as u64) as usize;
                    let n = reader
                        .read_data(&mut buf[..want])
                        .map_err(|e| EntryError::Stream(StreamError::Decode(e)))?;
                    if n == 0 {
                        return Err(EntryError::Stream(StreamError::Decode(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "tar data ends inside a file",
                        ))));
                    }
                    let at = seg.offset + done;
                    if let Sink::Compare(old) = sink {
                        let same =
                            old.read_exact_at(&mut cmp[..n], at).is_ok() && cmp[..n] == buf[..n];
                        if !same {
                            let partial = Segment {
                                offset: seg.offset,
                                len: done,
                            };
                            let mut matched = map[..i].to_vec();
                            matched.push(partial);
                            self.diverge(dir, sink, &matched, &mut cmp)?;
                        }
                    }
                    if let Sink::Write { file, .. } = sink {
                        file.write_all_at(&buf[..n], at)?;
                    }
                    done += n as u64;
                }
                hole_start = seg.end();
            }
            match sink {
                Sink::Compare(old) => {
                    if !reads_as_zeros(old, hole_start, size, &mut cmp)? {
                        self.diverge(dir, sink, map, &mut cmp)?;
                    }
                }
                Sink::Write { .. } => {}
            }
            if let Sink::Write { file, .. } = sink {
                file.set_len(size)?;
                file.flush()?;
            }
            Ok(())
        })();
        self.buf = buf;
        self.cmp = cmp;
        result
    }

    /// Switches a comparing sink to a new temporary file holding the `matched` segments
    /// copied from the live file.
    fn diverge(
        &mut self,
        dir: BorrowedFd<'_>,
        sink: &mut Sink,
        matched: &[Segment],
        buf: &mut [u8],
    ) -> Result<(), EntryError> {
        let Sink::Compare(old) = sink else {
            return Ok(());
        };
        let old = old.try_clone()?;
        *sink = self.new_temp(dir)?;
        let Sink::Write { file, .. } = sink else {
            return Ok(());
        };
        for seg in matched {
            let mut at = seg.offset;
            while at < seg.end() {
                let want = (seg.end() - at).min(buf.len() as u64) as usize;
                old.read_exact_at(&mut buf[..want], at)?;
                file.write_all_at(&buf[..want], at)?;
                at += want as u64;
            }
        }
        Ok(())
    }

    /// Deletes what the snapshot does not have (with `--delete`), turns links still
    /// pending into failures and returns the report.
    pub fn finish(mut self) -> Result<ExtractReport, StreamError> {
        for (first, names) in std::mem::take(&mut self.pending) {
            for name in names {
                self.fail(
                    &name,
                    format!("its hard link target {} was not restored", first.display()),
                );
            }
        }
        if self.opts.delete_extraneous
            && let Err(e) = self.delete_extraneous()
        {
            self.fail(
                Path::new("."),
                format!("failed to delete extraneous files: {e}"),
            );
        }
        Ok(self.report)
    }

    /// Removes, below every directory the snapshot has, the names it does not have there
    /// and the include patterns select; depth first, without recursion.
    fn delete_extraneous(&mut self) -> io::Result<()> {
        let root = self.root.try_clone()?;
        walk_down(root.as_fd(), |step| match step {
            Step::Dir { fd, id, rel } => self.sweep(fd, id, rel),
            Step::Unopened { rel, error } => {
                self.fail(rel, format!("failed to open it: {error}"));
                Ok(vec![])
            }
        })
    }

    /// Deletes the extraneous names of one directory; returns the subdirectories to visit.
    fn sweep(
        &mut self,
        dir: BorrowedFd<'_>,
        id: (u64, u64),
        rel: &Path,
    ) -> io::Result<Vec<OsString>> {
        // Each directory is visited once.
        let Some(keep) = self.seen.remove(&id) else {
            return Ok(vec![]);
        };
        let mut visit = Vec::new();
        for (name, ft) in list(dir)? {
            let child = rel.join(&name);
            if keep.contains(&name) {
                if ft == FileType::Directory && self.selected(&child).1 {
                    visit.push(name);
                }
                continue;
            }
            if !self.selected(&child).0 {
                continue;
            }
            let removed = if ft == FileType::Directory {
                remove_tree_at(dir, &name)
            } else {
                rustix::fs::unlinkat(dir, &name, AtFlags::empty()).map_err(errno)
            };
            match removed {
                Ok(()) => self.report.deleted += 1,
                Err(e) => self.fail(&child, format!("failed to delete it: {e}")),
            }
        }
        Ok(visit)
    }
}

/// One step of [`walk_down`].
enum Step<'a> {
    /// A directory reached: `rel` below the root, `id` its device and inode.
    Dir {
        fd: BorrowedFd<'a>,
        id: (u64, u64),
        rel: &'a Path,
    },
    /// A subdirectory named by its parent's step that could not be opened (what the visit
    /// returns for it is not used).
    Unopened { rel: &'a Path, error: io::Error },
}

/// Visits `root` and, depth first without recursion, every subdirectory the visit of its
/// parent names, each opened beneath its parent, never through a symlink.
fn walk_down(
    root: BorrowedFd<'_>,
    mut visit: impl FnMut(Step<'_>) -> io::Result<Vec<OsString>>,
) -> io::Result<()> {
    let mut dirs: Dirs<'_, ()> = Dirs::new(root)?;
    let first = visit(Step::Dir {
        fd: dirs.top(),
        id: dirs.root_id,
        rel: Path::new(""),
    })?;
    // One list of subdirectories still to visit per open level, the root's first.
    let mut todo = vec![first];
    while let Some(pending) = todo.last_mut() {
        let Some(next) = pending.pop() else {
            todo.pop();
            if !todo.is_empty() {
                dirs.pop()?;
            }
            continue;
        };
        let fd = match open_child_dir(dirs.top(), &next) {
            Ok(fd) => fd,
            Err(error) => {
                let rel = dirs.path().join(&next);
                visit(Step::Unopened { rel: &rel, error })?;
                continue;
            }
        };
        dirs.push(next, fd, ())?;
        let rel = dirs.path();
        let subdirs = visit(Step::Dir {
            fd: dirs.top(),
            id: dirs.top_id(),
            rel: &rel,
        })?;
        todo.push(subdirs);
    }
    Ok(())
}

/// Removes, anywhere below `target`, what an interrupted restore left behind: the temporary
/// files and staging directories named with [`TEMP_PREFIX`]. A restore killed between
/// writing a file beside its target and renaming it over leaves one; without this sweep it
/// would stay in the user's volume for good (only `--delete` would take it). The prefix is
/// the agent's own, and one volume is restored by one agent at a time, so nothing else
/// uses such a name. Depth first without recursion, never through a symlink.
pub fn remove_leftovers(target: &Path) -> Result<u64, StreamError> {
    let restore_err = |source: io::Error| StreamError::Restore {
        path: target.display().to_string(),
        source,
    };
    let root = match rustix::fs::open(target, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => fd,
        // Nothing there yet, or a block device: no directory to sweep.
        Err(Errno::NOENT | Errno::NOTDIR) => return Ok(0),
        Err(e) => return Err(restore_err(e.into())),
    };
    let mut removed = 0u64;
    let mut sweep = |dir: BorrowedFd<'_>| -> io::Result<Vec<OsString>> {
        let mut subdirs = Vec::new();
        for (name, ft) in list(dir)? {
            let ours = name.as_bytes().starts_with(TEMP_PREFIX.as_bytes());
            match (ours, ft) {
                (true, FileType::Directory) => remove_tree_at(dir, &name)?,
                (true, _) => rustix::fs::unlinkat(dir, &name, AtFlags::empty())?,
                (false, FileType::Directory) => {
                    subdirs.push(name);
                    continue;
                }
                (false, _) => continue,
            }
            removed += 1;
        }
        Ok(subdirs)
    };
    walk_down(root.as_fd(), |step| match step {
        Step::Dir { fd, .. } => sweep(fd),
        // Gone or replaced since it was listed: the workload's business, not a failure.
        Step::Unopened { .. } => Ok(vec![]),
    })
    .map_err(restore_err)?;
    Ok(removed)
}

/// A directory inside the target where `restic restore` writes (direct mode), on the same
/// filesystem, so that each of its entries can then be renamed over the live one.
#[derive(Debug)]
pub struct Staging {
    target: OwnedFd,
    name: OsString,
    path: PathBuf,
}

impl Staging {
    pub fn create(target: &Path) -> Result<Staging, StreamError> {
        let restore_err = |source: io::Error| StreamError::Restore {
            path: target.display().to_string(),
            source,
        };
        let fd = rustix::fs::open(target, DIR_FLAGS, Mode::empty())
            .map_err(|e| restore_err(e.into()))?;
        let mut counter = 0;
        let (name, ()) = create_temp(&mut counter, |t| {
            rustix::fs::mkdirat(&fd, t, Mode::from_raw_mode(0o700))
        })
        .map_err(restore_err)?;
        Ok(Staging {
            path: target.join(&name),
            target: fd,
            name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills the staging directory with the live tree: directories recreated (with the live
    /// owner, mode and times), and hard links to the regular files for which `unchanged`
    /// (their path beneath the volume, their stat) holds: those `restic restore --overwrite
    /// if-changed` skips without writing a byte. No other file may be linked: restic 0.18,
    /// replacing a file that has several links, writes only the parts it found to differ
    /// into the new file and leaves holes for the rest, so a same-size file that changed
    /// comes back as neither the snapshot's nor the old. Best effort: what cannot be linked
    /// (an immutable file, a path too long) restic restores in full.
    pub fn mirror(&self, unchanged: impl Fn(&Path, &rustix::fs::Stat) -> bool) -> io::Result<()> {
        let staging = open_child_dir(self.target.as_fd(), &self.name)?;
        let open = |root: BorrowedFd<'_>, rel: &Path| -> io::Result<OwnedFd> {
            if rel.as_os_str().is_empty() {
                return open_child_dir(root, OsStr::new("."));
            }
            Ok(rustix::fs::openat2(
                root,
                rel,
                DIR_FLAGS,
                Mode::empty(),
                BENEATH,
            )?)
        };
        let mut todo = vec![PathBuf::new()];
        while let Some(rel) = todo.pop() {
            let (Ok(live), Ok(staged)) =
                (open(self.target.as_fd(), &rel), open(staging.as_fd(), &rel))
            else {
                continue;
            };
            for (name, ft) in list(live.as_fd())? {
                if name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
                    continue;
                }
                match ft {
                    // restic works with whole paths: deeper than it can reach, nothing is
                    // mirrored (it restores that part in full).
                    FileType::Directory
                        if self.path.as_os_str().len() + rel.as_os_str().len() + 2 * 256
                            < PATH_MAX
                            && rustix::fs::mkdirat(&staged, &name, Mode::from_raw_mode(0o700))
                                .is_ok() =>
                    {
                        todo.push(rel.join(&name));
                    }
                    // Only files restic will leave alone: see `unchanged` at the caller.
                    FileType::RegularFile
                        if rustix::fs::statat(&live, &name, AtFlags::SYMLINK_NOFOLLOW)
                            .is_ok_and(|st| unchanged(&rel.join(&name), &st)) =>
                    {
                        let _ = rustix::fs::linkat(&live, &name, &staged, &name, AtFlags::empty());
                    }
                    _ => {}
                }
            }
            if !rel.as_os_str().is_empty() {
                // Last, as creating entries in it changed its times.
                let entry = staged_entry(live.as_fd(), Kind::Dir)?;
                set_metadata(staged.as_fd(), &entry, true, &mut Vec::new())?;
            }
        }
        Ok(())
    }

    /// Removes what is left of the staging directory.
    pub fn remove(self) -> Result<(), StreamError> {
        match remove_tree_at(self.target.as_fd(), &self.name) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StreamError::Restore {
                path: self.path.display().to_string(),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// An entry as the metadata of something restic restored into the staging directory.
fn staged_entry(fd: BorrowedFd<'_>, kind: Kind) -> io::Result<Entry> {
    let st = rustix::fs::fstat(fd)?;
    Ok(Entry {
        path: Vec::new(),
        kind,
        mode: st.st_mode & 0o7777,
        uid: u64::from(st.st_uid),
        gid: u64::from(st.st_gid),
        mtime_secs: st.st_mtime,
        mtime_nanos: st.st_mtime_nsec as u32,
        xattrs: read_xattrs(fd)?,
    })
}

/// Whether two open files hold the same bytes.
fn same_content(a: &File, b: &File, size: u64, buf: &mut [u8], other: &mut [u8]) -> bool {
    let mut at = 0u64;
    while at < size {
        let want = (size - at).min(buf.len() as u64) as usize;
        let ok = a.read_exact_at(&mut buf[..want], at).is_ok()
            && b.read_exact_at(&mut other[..want], at).is_ok();
        if !ok || buf[..want] != other[..want] {
            return false;
        }
        at += want as u64;
    }
    true
}

impl Extractor {
    /// Moves what restic restored into `staging` over the live entries: one rename per
    /// entry that differs, nothing for one that matches; directory metadata as each is
    /// left. Depth first, without recursion.
    pub fn apply_staged(&mut self, staging: &Staging) -> Result<(), StreamError> {
        let io_err = |source: io::Error| StreamError::Restore {
            path: staging.path.display().to_string(),
            source,
        };
        let root = self.root.try_clone().map_err(io_err)?;
        let mut live: Dirs<'_, DirMeta> = Dirs::new(root.as_fd()).map_err(io_err)?;
        let top = open_child_dir(staging.target.as_fd(), &staging.name).map_err(io_err)?;
        let mut staged: Dirs<'_, Vec<OsString>> = Dirs::new(top.as_fd()).map_err(io_err)?;
        let mut todo = vec![self.apply_dir(&mut live, staged.top(), Path::new(""))];
        while let Some(pending) = todo.last_mut() {
            let Some(next) = pending.pop() else {
                todo.pop();
                if !todo.is_empty() {
                    staged.pop().map_err(io_err)?;
                }
                continue;
            };
            let rel = staged.path().join(&next);
            let fd = match open_child_dir(staged.top(), &next) {
                Ok(fd) => fd,
                Err(e) => {
                    self.fail(&rel, e);
                    continue;
                }
            };
            // A directory outside the include patterns keeps its live metadata, as in
            // stream mode (restic sets none on it either).
            let meta = staged_entry(fd.as_fd(), Kind::Dir);
            let selected = self.selected(&rel).0;
            match meta.map(|m| self.go_to(&mut live, &rel, selected.then_some(&m))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) | Err(e) => {
                    self.fail(&rel, e);
                    continue;
                }
            }
            self.report.matched += 1;
            let subdirs = self.apply_dir(&mut live, fd.as_fd(), &rel);
            staged.push(next, fd, Vec::new()).map_err(io_err)?;
            todo.push(subdirs);
        }
        while !live.levels.is_empty() {
            self.leave(&mut live).map_err(io_err)?;
        }
        Ok(())
    }

    /// Moves the non-directories of the staged directory `dir` (at `rel`) into place;
    /// returns its subdirectories.
    fn apply_dir(
        &mut self,
        live: &mut Dirs<'_, DirMeta>,
        dir: BorrowedFd<'_>,
        rel: &Path,
    ) -> Vec<OsString> {
        let names = match list(dir) {
            Ok(n) => n,
            Err(e) => {
                self.fail(rel, e);
                return vec![];
            }
        };
        let mut subdirs = Vec::new();
        let mut meta = None;
        if !rel.as_os_str().is_empty() && self.selected(rel).0 {
            meta = staged_entry(dir, Kind::Dir).ok();
        }
        if let Err(e) = self.go_to(live, rel, meta.as_ref()) {
            self.fail(rel, e);
            return vec![];
        }
        for (name, ft) in names {
            if ft == FileType::Directory {
                subdirs.push(name);
                continue;
            }
            let child = rel.join(&name);
            self.report.matched += 1;
            self.seen
                .entry(live.top_id())
                .or_default()
                .insert(name.clone());
            if let Err(e) = self.apply_one(live.top(), dir, &child, &name, ft) {
                self.fail(&child, e);
            }
            for note in std::mem::take(&mut self.notes) {
                self.fail(&child, note);
            }
        }
        subdirs
    }

    /// One staged non-directory: left alone (with its metadata corrected) when the live
    /// entry matches it, renamed over the live entry otherwise.
    fn apply_one(
        &mut self,
        live: BorrowedFd<'_>,
        staged: BorrowedFd<'_>,
        rel: &Path,
        name: &OsStr,
        ft: FileType,
    ) -> io::Result<()> {
        let st = rustix::fs::statat(staged, name, AtFlags::SYMLINK_NOFOLLOW)?;
        // A further name of a file restic restored hard-linked: linked to the first name
        // as that is now in the volume.
        if ft == FileType::RegularFile
            && st.st_nlink > 1
            && let Some(first) = self.staged_links.get(&inode(&st)).cloned()
        {
            return match self.hard_link(live, rel, name, &first) {
                Ok(()) => Ok(()),
                Err(EntryError::Io(e)) => Err(e),
                Err(EntryError::Stream(e)) => Err(io::Error::other(e.to_string())),
            };
        }
        if !self.opts.owners {
            // restic restored the snapshot's owners; --no-owners leaves the agent's.
            give_to_agent(staged, name, ft, &st)?;
        }
        let placed = self.apply_file_or_special(live, staged, name, ft, &st);
        if ft == FileType::RegularFile && st.st_nlink > 1 && placed.is_ok() {
            let now = rustix::fs::statat(live, name, AtFlags::SYMLINK_NOFOLLOW)?;
            self.staged_links.insert(inode(&st), rel.to_path_buf());
            self.placed
                .insert(rel.to_path_buf(), Placed { id: inode(&now) });
        }
        placed
    }

    fn apply_file_or_special(
        &mut self,
        live: BorrowedFd<'_>,
        staged: BorrowedFd<'_>,
        name: &OsStr,
        ft: FileType,
        st: &Stat,
    ) -> io::Result<()> {
        let existing = existing_at(live, name)?;
        let same_type = existing.as_ref().is_some_and(|e| file_type(e) == ft);
        if ft == FileType::RegularFile {
            let open = |dir, flags| {
                rustix::fs::openat(
                    dir,
                    name,
                    flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map(File::from)
            };
            // Still the mirrored link of the live file: restic found it unchanged.
            if existing.as_ref().map(inode) == Some(inode(st)) {
                self.report.unchanged += 1;
                return Ok(());
            }
            let new = open(staged, OFlags::RDONLY)?;
            if same_type
                && existing.as_ref().is_some_and(|e| e.st_size == st.st_size)
                && let Ok(old) = open(live, OFlags::RDONLY)
                && same_content(&new, &old, st.st_size as u64, &mut self.buf, &mut self.cmp)
            {
                let entry = staged_entry(
                    new.as_fd(),
                    Kind::File {
                        size: st.st_size as u64,
                    },
                )?;
                set_metadata(old.as_fd(), &entry, self.owners, &mut self.notes)?;
                self.report.unchanged += 1;
                return Ok(());
            }
            if existing.is_some() {
                new.sync_data()?;
            }
            self.move_over(staged, name, live, name, existing.as_ref())?;
            self.report.files += 1;
            self.report.bytes += st.st_size as u64;
            return Ok(());
        }
        let same = same_type
            && match ft {
                FileType::Symlink => {
                    rustix::fs::readlinkat(staged, name, Vec::new())?.as_bytes()
                        == rustix::fs::readlinkat(live, name, Vec::new())?.as_bytes()
                }
                _ => existing.as_ref().is_some_and(|e| e.st_rdev == st.st_rdev),
            };
        if !same {
            return self.move_over(staged, name, live, name, existing.as_ref());
        }
        let entry = Entry {
            path: Vec::new(),
            kind: Kind::Fifo,
            mode: st.st_mode & 0o7777,
            uid: u64::from(st.st_uid),
            gid: u64::from(st.st_gid),
            mtime_secs: st.st_mtime,
            mtime_nanos: st.st_mtime_nsec as u32,
            xattrs: vec![],
        };
        set_special_metadata(live, name, &entry, self.owners)
    }
}

/// What is at `name` in `dir` now, if anything (not following a symlink).
fn existing_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Option<Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn is_not_dir(e: &io::Error) -> bool {
    [Errno::NOTDIR, Errno::LOOP]
        .iter()
        .any(|n| e.raw_os_error() == Some(n.raw_os_error()))
}

/// An entry failed: the stream itself (stop), or writing this entry (go on).
enum EntryError {
    Stream(StreamError),
    Io(io::Error),
}

impl From<io::Error> for EntryError {
    fn from(e: io::Error) -> Self {
        EntryError::Io(e)
    }
}

impl From<Errno> for EntryError {
    fn from(e: Errno) -> Self {
        EntryError::Io(e.into())
    }
}

impl From<StreamError> for EntryError {
    fn from(e: StreamError) -> Self {
        EntryError::Stream(e)
    }
}

/// Writes a tar stream into `target`, confined to it, in one read: hard links whose first
/// name was not restored are reported as failures (the engine reads the stream twice).
pub fn extract<R: Read>(
    input: R,
    target: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport, StreamError> {
    let mut ex = Extractor::new(target, opts)?;
    ex.extract(input)?;
    ex.finish()
}

/// Writes the raw block image of a stream into a block device, from its first byte.
pub fn extract_block<R: Read>(input: R, device: &Path) -> Result<ExtractReport, StreamError> {
    let restore_err = |source| StreamError::Restore {
        path: device.display().to_string(),
        source,
    };
    let mut reader = TarReader::new(input);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(restore_err)?;
    let mut report = ExtractReport::default();
    let mut buf = vec![0u8; CHUNK];
    while let Some(entry) = reader.next_entry().map_err(StreamError::Decode)? {
        if entry.path != BLOCK_FILE.as_bytes() {
            continue;
        }
        if reader.sparse_map().is_some() {
            // The reader never stores a device sparse, and a device has no holes to restore.
            return Err(StreamError::Unsafe {
                path: BLOCK_FILE.into(),
                reason: "a block image stored as a sparse file",
            });
        }
        loop {
            let n = reader.read_data(&mut buf).map_err(StreamError::Decode)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(restore_err)?;
            report.bytes += n as u64;
        }
        out.sync_all().map_err(restore_err)?;
        report.files = 1;
        reader.drain().map_err(StreamError::Decode)?;
        return Ok(report);
    }
    Err(StreamError::Unsafe {
        path: device.display().to_string(),
        reason: "the snapshot holds no block image",
    })
}
