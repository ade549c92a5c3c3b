//! The one walk of a volume, shared by change detection (`manifest`) and the stream reader,
//! so the two cannot disagree about what the volume holds.
//!
//! Every byte of a volume is hostile: the walk holds a descriptor of each directory it is in
//! and opens every entry relative to it, one component at a time, with `O_NOFOLLOW` (a
//! `paths` entry of several components goes through `openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`; an ancestor whose descriptor was closed is
//! opened again through its child's `..`, or one name at a time from an ancestor still open,
//! and checked to be the directory it was — never by its whole path, which in a deep tree is
//! longer than the kernel resolves). Anything that is
//! not a directory is opened `O_NONBLOCK`, so a FIFO put in a file's place cannot block it,
//! and the type is checked again with `fstat` on the opened descriptor: what is not what the
//! listing said is a changed entry, reported, never followed.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::budget::AssignmentBudget;
use crate::pattern::Patterns;
use crate::stream::StreamError;

/// Directory descriptors the walk keeps open at once; shallower ancestors are closed and
/// opened again (checked to be the same directory) when the walk returns to them, so no tree
/// a tenant can make exhausts the agent's descriptors.
const OPEN_DIRS: usize = 64;

/// An entry's metadata, from `lstat` in its directory or `fstat` on its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub dev: u64,
    pub ino: u64,
    /// `st_mode`, type bits included.
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub ctime: i64,
    pub ctime_nsec: u32,
}

impl From<rustix::fs::Stat> for Meta {
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    fn from(s: rustix::fs::Stat) -> Meta {
        Meta {
            dev: s.st_dev as u64,
            ino: s.st_ino as u64,
            mode: s.st_mode as u32,
            nlink: s.st_nlink as u64,
            uid: s.st_uid,
            gid: s.st_gid,
            rdev: s.st_rdev as u64,
            size: s.st_size.max(0) as u64,
            blocks: s.st_blocks.max(0) as u64,
            mtime: s.st_mtime as i64,
            mtime_nsec: u32::try_from(s.st_mtime_nsec).unwrap_or(0),
            ctime: s.st_ctime as i64,
            ctime_nsec: u32::try_from(s.st_ctime_nsec).unwrap_or(0),
        }
    }
}

impl Meta {
    pub fn of(fd: impl AsFd) -> io::Result<Meta> {
        Ok(rustix::fs::fstat(fd)?.into())
    }

    pub fn file_type(&self) -> FileType {
        FileType::from_raw_mode(self.mode as _)
    }

    fn same_inode(&self, other: &Meta) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// Holes a file must have, in bytes, before it is read as a sparse file.
const SPARSE_MIN_HOLES: u64 = crate::stream::CHUNK as u64;

impl Meta {
    /// Whether a file's allocated blocks fall clearly short of its size, so that looking for
    /// its holes is worth it.
    pub fn looks_sparse(&self) -> bool {
        self.file_type() == FileType::RegularFile
            && self
                .blocks
                .saturating_mul(512)
                .saturating_add(SPARSE_MIN_HOLES)
                <= self.size
    }

    /// The bytes a stream backup reads of a file: its size, or about its allocated bytes
    /// when it is sparse. Progress is reported against the sum of these.
    pub fn bytes_to_read(&self) -> u64 {
        if self.looks_sparse() {
            self.blocks.saturating_mul(512)
        } else {
            self.size
        }
    }
}

/// Extended attributes, (name, value), in the order the filesystem lists them.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// What an entry is, with what the walk had to open or read to know it.
#[derive(Debug)]
pub enum Found {
    Dir,
    /// A regular file, opened when the visitor reads contents.
    File(Option<File>),
    Symlink(Vec<u8>),
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
}

/// One entry of the walk, parents before children, names in byte order.
#[derive(Debug)]
pub struct Item<'a> {
    /// Relative to the volume root.
    pub rel: &'a Path,
    pub meta: Meta,
    pub xattrs: Xattrs,
    pub found: Found,
}

/// Why an entry is not in the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skipped {
    /// It was replaced (by a symlink, a FIFO, another directory) while the walk looked at it.
    Changed,
    /// Gone between the listing and its turn.
    Vanished,
    /// Reading it was not permitted, and the walk was told to leave such entries out.
    Unreadable,
}

pub trait Visitor {
    /// Whether regular files are opened for their contents (the reader) or only looked at
    /// (change detection).
    const OPENS_FILES: bool;

    /// Whether items carry their extended attributes. Change detection needs none: every
    /// change of one (an ACL, a file capability, any `setfattr`) updates the entry's ctime,
    /// which it records, so reading them would be a few syscalls per entry for nothing.
    const READS_XATTRS: bool = true;

    fn item(&mut self, item: Item<'_>) -> Result<(), StreamError>;

    fn skipped(&mut self, rel: &Path, why: Skipped);

    /// Called between an entry's `lstat` and its open: where a test swaps the entry, to race
    /// the walk deterministically.
    fn before_open(&mut self, _rel: &Path) {}
}

/// The sub-directories a backup is limited to, as a tree: a node either takes everything
/// beneath it or only the children it names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Selection {
    all: bool,
    children: BTreeMap<OsString, Selection>,
}

impl Selection {
    fn new(paths: &[PathBuf]) -> Selection {
        let mut root = Selection {
            all: paths.is_empty(),
            ..Selection::default()
        };
        for path in paths {
            let mut node = &mut root;
            for c in path.components() {
                if let Component::Normal(name) = c {
                    node = node.children.entry(name.to_owned()).or_default();
                }
            }
            node.all = true;
        }
        root
    }

    fn child(&self, name: &OsStr) -> Option<&Selection> {
        static ALL: Selection = Selection {
            all: true,
            children: BTreeMap::new(),
        };
        if self.all {
            Some(&ALL)
        } else {
            self.children.get(name)
        }
    }
}

/// The `paths` of a request, checked and made relative to the volume: a leading `/` means
/// the volume root; `.`, `..` and empty paths are refused.
pub fn volume_paths<S: AsRef<Path>>(paths: &[S]) -> Result<Vec<PathBuf>, StreamError> {
    let mut out = Vec::new();
    for p in paths.iter().map(AsRef::as_ref) {
        let bad = |reason| StreamError::BadPath {
            path: p.display().to_string(),
            reason,
        };
        let mut rel = PathBuf::new();
        for c in p.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(name) => rel.push(name),
                Component::ParentDir => return Err(bad("'..' would leave the volume")),
                Component::Prefix(_) => return Err(bad("not a path")),
            }
        }
        if rel.as_os_str().is_empty() {
            return Err(bad("names the whole volume; leave paths empty for that"));
        }
        out.push(rel);
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// An open volume: its root directory's descriptor, the host path the kernel gives it, and
/// what to leave out.
#[derive(Debug)]
pub struct Volume {
    root: Arc<OwnedFd>,
    host: PathBuf,
    /// Patterns rewritten for host paths (see [`Patterns::beneath`]): both modes match the
    /// same patterns against the same strings.
    excludes: Patterns,
    selection: Selection,
}

fn read_error(path: &Path, source: io::Error) -> StreamError {
    StreamError::Read {
        path: path.display().to_string(),
        source,
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

impl Volume {
    /// Opens the volume's root directory (a host path the kubelet made, not the tenant) and
    /// checks that each of `paths` is a directory beneath it, reached without a symlink.
    pub fn open(
        root: &Path,
        excludes: &Patterns,
        paths: &[PathBuf],
    ) -> Result<Volume, StreamError> {
        let fd = rustix::fs::open(root, dir_flags(), Mode::empty())
            .map_err(|e| read_error(root, e.into()))?;
        let host = std::fs::read_link(format!("/proc/self/fd/{}", fd_number(fd.as_fd())))
            .map_err(|e| read_error(root, e))?;
        let excludes = Patterns::new(
            &excludes
                .beneath(&host)
                .map_err(|e| read_error(root, io::Error::other(e)))?,
        )
        .map_err(|e| read_error(root, io::Error::other(e)))?;
        for p in paths {
            let sub = rustix::fs::openat2(&fd, p, dir_flags(), Mode::empty(), beneath());
            if let Err(e) = sub {
                return Err(StreamError::BadPath {
                    path: p.display().to_string(),
                    reason: match e {
                        Errno::NOENT => "no such directory in the volume",
                        Errno::NOTDIR => "not a directory",
                        Errno::LOOP | Errno::XDEV => "reached through a symlink",
                        _ => "cannot be opened",
                    },
                });
            }
        }
        Ok(Volume {
            root: Arc::new(fd),
            host,
            excludes,
            selection: Selection::new(paths),
        })
    }

    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The root as the kernel names it (symlinks on the host path resolved): what restic
    /// started inside the volume sees as its working directory.
    pub fn host_path(&self) -> &Path {
        &self.host
    }

    fn excluded(&self, rel: &Path) -> bool {
        !self.excludes.is_empty() && self.excludes.matches(&self.host.join(rel))
    }

    /// Walks the volume: parents before children, names in byte order, each entry charged
    /// one operation to the budget. With `skip_denied`, what may not be read is reported and
    /// left out; otherwise it fails the walk.
    pub fn walk<V: Visitor>(
        &self,
        budget: &AssignmentBudget,
        skip_denied: bool,
        visitor: &mut V,
    ) -> Result<(), StreamError> {
        let mut w = Walk {
            volume: self,
            budget,
            skip_denied,
            stack: Vec::new(),
            rel: Vec::new(),
        };
        let names = list(self.root.as_fd()).map_err(|e| read_error(&self.host, e))?;
        let root_meta = Meta::of(self.root.as_fd()).map_err(|e| read_error(&self.host, e))?;
        w.stack.push(Frame {
            fd: Some(self.root.clone()),
            rel_len: 0,
            meta: root_meta,
            names: names.into_iter(),
            selection: &self.selection,
        });
        w.run(visitor)
    }
}

fn fd_number(fd: BorrowedFd<'_>) -> i32 {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// A directory's names, sorted so the same volume makes the same stream (and restic
/// deduplicates it well).
fn list(fd: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    let mut names = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    names.sort();
    Ok(names)
}

struct Frame<'s> {
    /// `None` for an ancestor closed to save descriptors.
    fd: Option<Arc<OwnedFd>>,
    /// The length of this directory's path in [`Walk::rel`]: its name is what lies between
    /// its parent's length (and a `/`) and this one. Each frame holds no path of its own,
    /// so a chain of directories costs memory in proportion to its depth, not its square.
    rel_len: usize,
    meta: Meta,
    names: std::vec::IntoIter<OsString>,
    selection: &'s Selection,
}

struct Walk<'v> {
    volume: &'v Volume,
    budget: &'v AssignmentBudget,
    skip_denied: bool,
    stack: Vec<Frame<'v>>,
    /// The path, relative to the root, of the entry being looked at (or of the directory
    /// on top of the stack between entries).
    rel: Vec<u8>,
}

fn as_path(bytes: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(bytes))
}

/// What an error opening or reading an entry means for the walk.
enum Outcome {
    Skip(Skipped),
    Fail(io::Error),
}

impl<'v> Walk<'v> {
    fn outcome(&self, e: Errno) -> Outcome {
        match e {
            Errno::NOENT => Outcome::Skip(Skipped::Vanished),
            // A symlink where a file or directory was (O_NOFOLLOW), a file where a
            // directory was, something that is no longer a symlink, a FIFO or device that
            // will not open without blocking: the entry was swapped under the walk.
            Errno::LOOP | Errno::NOTDIR | Errno::INVAL | Errno::NXIO | Errno::XDEV => {
                Outcome::Skip(Skipped::Changed)
            }
            Errno::ACCESS | Errno::PERM if self.skip_denied => Outcome::Skip(Skipped::Unreadable),
            e => Outcome::Fail(e.into()),
        }
    }

    fn handle<V: Visitor>(&self, visitor: &mut V, rel: &Path, e: Errno) -> Result<(), StreamError> {
        match self.outcome(e) {
            Outcome::Skip(why) => {
                visitor.skipped(rel, why);
                Ok(())
            }
            Outcome::Fail(source) => Err(read_error(&self.volume.host.join(rel), source)),
        }
    }

    /// The descriptor of the frame on top of the stack, opened again if it was closed;
    /// `None` when that directory is no longer where it was.
    fn top_fd(&mut self) -> Option<Arc<OwnedFd>> {
        if let Some(fd) = &self.stack.last()?.fd {
            return Some(fd.clone());
        }
        let fd = Arc::new(self.reopen_top()?);
        self.stack.last_mut()?.fd = Some(fd.clone());
        Some(fd)
    }

    /// Opens the directory on top of the stack again, one name at a time from its nearest
    /// ancestor still open (the root at worst), each step checked to reach the directory
    /// the walk went through. Never one path of the whole depth: a tree deeper than
    /// PATH_MAX is walked to its bottom like any other.
    fn reopen_top(&self) -> Option<OwnedFd> {
        let open = self.stack.iter().rposition(|f| f.fd.is_some())?;
        let mut fd = self.stack[open].fd.as_deref()?.try_clone().ok()?;
        for pair in self.stack[open..].windows(2) {
            let (parent, frame) = (&pair[0], &pair[1]);
            let start = if parent.rel_len == 0 {
                0
            } else {
                parent.rel_len + 1
            };
            let name = OsStr::from_bytes(self.rel.get(start..frame.rel_len)?);
            let next = rustix::fs::openat(&fd, name, dir_flags(), Mode::empty()).ok()?;
            if !Meta::of(&next).ok()?.same_inode(&frame.meta) {
                return None;
            }
            fd = next;
        }
        Some(fd)
    }

    /// Leaves the directory on top of the stack. Its parent, if its descriptor was closed,
    /// is opened again through the child's `..` (one step, whatever the depth), and only
    /// if that is still the directory the walk came from; otherwise [`Walk::top_fd`] looks
    /// for it where it was.
    fn pop(&mut self) {
        let Some(done) = self.stack.pop() else {
            return;
        };
        let Some(parent) = self.stack.last_mut() else {
            return;
        };
        self.rel.truncate(parent.rel_len);
        if parent.fd.is_none()
            && let Some(child) = &done.fd
            && let Ok(up) = rustix::fs::openat(child.as_fd(), "..", dir_flags(), Mode::empty())
            && Meta::of(&up).is_ok_and(|m| m.same_inode(&parent.meta))
        {
            parent.fd = Some(Arc::new(up));
        }
    }

    fn run<V: Visitor>(&mut self, visitor: &mut V) -> Result<(), StreamError> {
        while let Some(top) = self.stack.last_mut() {
            let Some(name) = top.names.next() else {
                self.pop();
                continue;
            };
            let Some(selection) = top.selection.child(&name) else {
                continue;
            };
            let (base, depth) = (top.rel_len, self.stack.len());
            if base > 0 {
                self.rel.push(b'/');
            }
            self.rel.extend_from_slice(name.as_bytes());
            let step = self.step(visitor, &name, selection);
            // An entry that became a directory of the walk keeps its name on the path.
            if self.stack.len() == depth {
                self.rel.truncate(base);
            }
            step?;
        }
        Ok(())
    }

    /// The entry `name` of the directory on top of the stack, whose path is [`Walk::rel`].
    fn step<V: Visitor>(
        &mut self,
        visitor: &mut V,
        name: &OsStr,
        selection: &'v Selection,
    ) -> Result<(), StreamError> {
        if self.volume.excluded(as_path(&self.rel)) {
            return Ok(());
        }
        self.budget.acquire_blocking(0, 1);
        let Some(dir) = self.top_fd() else {
            // The directory was moved or replaced while the walk was deeper down.
            let top_len = self.stack.last().map_or(0, |f| f.rel_len);
            visitor.skipped(as_path(&self.rel[..top_len]), Skipped::Changed);
            self.pop();
            return Ok(());
        };
        self.entry(visitor, &dir, name, selection)
    }

    fn entry<V: Visitor>(
        &mut self,
        visitor: &mut V,
        dir: &OwnedFd,
        name: &OsStr,
        selection: &'v Selection,
    ) -> Result<(), StreamError> {
        let rel = as_path(&self.rel);
        let meta: Meta = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(s) => s.into(),
            Err(e) => return self.handle(visitor, rel, e),
        };
        visitor.before_open(rel);
        let (meta, xattrs, found) = match meta.file_type() {
            FileType::Directory => {
                return self.directory(visitor, dir, name, meta, selection);
            }
            FileType::RegularFile if V::OPENS_FILES => {
                let flags = OFlags::RDONLY
                    | OFlags::NOFOLLOW
                    | OFlags::NONBLOCK
                    | OFlags::NOCTTY
                    | OFlags::CLOEXEC;
                let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
                    Ok(fd) => fd,
                    Err(e) => return self.handle(visitor, rel, e),
                };
                let opened = Meta::of(&fd).map_err(|e| read_error(rel, e))?;
                if opened.file_type() != FileType::RegularFile {
                    // A FIFO or device in the file's place: never read.
                    visitor.skipped(rel, Skipped::Changed);
                    return Ok(());
                }
                if !opened.same_inode(&meta) {
                    // Renamed over since the listing (an editor's save, log rotation): the
                    // file now there is read, and reported as changed.
                    visitor.skipped(rel, Skipped::Changed);
                }
                (opened, xattrs::<V>(&fd), Found::File(Some(File::from(fd))))
            }
            ft => {
                let found = match ft {
                    FileType::RegularFile => Found::File(None),
                    FileType::Symlink => match rustix::fs::readlinkat(dir, name, Vec::new()) {
                        Ok(t) => Found::Symlink(t.into_bytes()),
                        Err(e) => return self.handle(visitor, rel, e),
                    },
                    FileType::Fifo => Found::Fifo,
                    FileType::CharacterDevice => Found::CharDevice,
                    FileType::BlockDevice => Found::BlockDevice,
                    _ => Found::Socket,
                };
                // Not opened: the attributes are read through the directory, without
                // following the entry.
                (meta, xattrs_at::<V>(dir, name), found)
            }
        };
        match xattrs {
            Ok(xattrs) => visitor.item(Item {
                rel,
                meta,
                xattrs,
                found,
            }),
            Err(e) => self.handle(visitor, rel, e),
        }
    }

    fn directory<V: Visitor>(
        &mut self,
        visitor: &mut V,
        parent: &OwnedFd,
        name: &OsStr,
        meta: Meta,
        selection: &'v Selection,
    ) -> Result<(), StreamError> {
        let rel = as_path(&self.rel);
        let fd = match rustix::fs::openat(parent, name, dir_flags(), Mode::empty()) {
            Ok(fd) => fd,
            Err(e @ (Errno::ACCESS | Errno::PERM)) if self.skip_denied => {
                // Its entry stays, empty, as the listing showed it.
                let xattrs = xattrs_at::<V>(parent, name).unwrap_or_default();
                visitor.item(Item {
                    rel,
                    meta,
                    xattrs,
                    found: Found::Dir,
                })?;
                return self.handle(visitor, rel, e);
            }
            Err(e) => return self.handle(visitor, rel, e),
        };
        let opened = Meta::of(&fd).map_err(|e| read_error(rel, e))?;
        if !opened.same_inode(&meta) {
            visitor.skipped(rel, Skipped::Changed);
        }
        let xattrs = match xattrs::<V>(&fd) {
            Ok(x) => x,
            Err(e) => return self.handle(visitor, rel, e),
        };
        let names = match list(fd.as_fd()) {
            Ok(n) => n,
            Err(e) => {
                return self.handle(visitor, rel, Errno::from_io_error(&e).unwrap_or(Errno::IO));
            }
        };
        visitor.item(Item {
            rel,
            meta: opened,
            xattrs,
            found: Found::Dir,
        })?;
        // Keep at most OPEN_DIRS descriptors: close the shallowest one still open (never
        // the root's, which the volume holds anyway).
        if self.stack.iter().filter(|f| f.fd.is_some()).count() >= OPEN_DIRS
            && let Some(f) = self.stack.iter_mut().skip(1).find(|f| f.fd.is_some())
        {
            f.fd = None;
        }
        self.stack.push(Frame {
            fd: Some(Arc::new(fd)),
            rel_len: self.rel.len(),
            meta: opened,
            names: names.into_iter(),
            selection,
        });
        Ok(())
    }
}

/// An entry named through its directory's descriptor: resolving it jumps to that directory
/// (no path walk a tenant can change) and the `l*` calls do not follow the entry itself.
fn entry_path(dir: &OwnedFd, name: &OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", fd_number(dir.as_fd())));
    p.push(name);
    p
}

/// Every extended attribute, however many: the buffers grow until the kernel's answer
/// fits. An attribute removed between the listing and its read is left out; a filesystem
/// without attributes has none; any other failure is the caller's to report.
fn read_all_xattrs(
    list: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
    get: impl Fn(&OsStr, &mut [u8]) -> rustix::io::Result<usize>,
) -> Result<Xattrs, Errno> {
    let mut names = vec![0u8; 1024];
    let n = loop {
        match list(&mut names) {
            Ok(n) => break n,
            Err(Errno::RANGE) => {
                let want = list(&mut []).unwrap_or(names.len() * 2);
                names.resize(want.max(names.len() * 2), 0);
            }
            Err(Errno::NOTSUP) => return Ok(vec![]),
            Err(e) => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name_os = OsStr::from_bytes(name);
        let mut value = vec![0u8; 256];
        let len = loop {
            match get(name_os, &mut value) {
                Ok(len) => break Some(len),
                Err(Errno::RANGE) => {
                    let want = get(name_os, &mut []).unwrap_or(value.len() * 2);
                    value.resize(want.max(value.len() * 2), 0);
                }
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(e),
            }
        };
        if let Some(len) = len {
            value.truncate(len);
            out.push((name.to_vec(), value));
        }
    }
    Ok(out)
}

fn xattrs<V: Visitor>(fd: &OwnedFd) -> Result<Xattrs, Errno> {
    if !V::READS_XATTRS {
        return Ok(Xattrs::default());
    }
    read_all_xattrs(
        |buf| rustix::fs::flistxattr(fd, buf),
        |name, buf| rustix::fs::fgetxattr(fd, name, buf),
    )
}

/// The attributes of an entry not opened, read through its directory without following it.
fn xattrs_at<V: Visitor>(dir: &OwnedFd, name: &OsStr) -> Result<Xattrs, Errno> {
    if !V::READS_XATTRS {
        return Ok(Xattrs::default());
    }
    let path = entry_path(dir, name);
    let path = path.as_path();
    read_all_xattrs(
        |buf| rustix::fs::llistxattr(path, buf),
        |name, buf| rustix::fs::lgetxattr(path, name, buf),
    )
}

/// Change detection: a digest of everything the stream carries of each entry (name, type,
/// mode, owners, size, times, inode, link count, device numbers, link target; extended
/// attributes through the ctime, which every change of one updates), and the totals
/// progress is reported against.
#[derive(Debug)]
pub struct Manifest {
    h: Sha256,
    pub bytes: u64,
    pub files: u64,
}

impl Default for Manifest {
    fn default() -> Manifest {
        Manifest {
            h: Sha256::new(),
            bytes: 0,
            files: 0,
        }
    }
}

impl Manifest {
    pub fn digest(self) -> String {
        self.h
            .finalize()
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl Visitor for Manifest {
    const OPENS_FILES: bool = false;
    const READS_XATTRS: bool = false;

    fn item(&mut self, item: Item<'_>) -> Result<(), StreamError> {
        let h = &mut self.h;
        let m = &item.meta;
        h.update(item.rel.as_os_str().as_bytes());
        h.update([0]);
        for v in [
            u64::from(m.mode),
            m.size,
            m.mtime as u64,
            u64::from(m.mtime_nsec),
            m.ctime as u64,
            u64::from(m.ctime_nsec),
            m.ino,
            u64::from(m.uid),
            u64::from(m.gid),
            m.nlink,
            m.rdev,
        ] {
            h.update(v.to_le_bytes());
        }
        if let Found::Symlink(target) = &item.found {
            h.update(target);
            h.update([0]);
        }
        if let Found::File(_) = item.found {
            self.bytes += m.bytes_to_read();
            self.files += 1;
        }
        Ok(())
    }

    fn skipped(&mut self, rel: &Path, why: Skipped) {
        // What the reader will leave out as unreadable is one more name: tried again
        // whenever the digest changes. Vanished or changed entries are in no stream.
        if why == Skipped::Unreadable {
            self.h.update(b"\0unreadable\0");
            self.h.update(rel.as_os_str().as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{IoBudget, Limits};

    type Swap = Box<dyn FnMut(&Path)>;

    #[derive(Default)]
    struct Record {
        items: Vec<(String, &'static str)>,
        skipped: Vec<(String, Skipped)>,
        contents: Vec<Vec<u8>>,
        /// Runs between an entry's lstat and its open.
        swap: Option<Swap>,
    }

    impl Visitor for Record {
        const OPENS_FILES: bool = true;
        fn before_open(&mut self, rel: &Path) {
            if let Some(swap) = &mut self.swap {
                swap(rel);
            }
        }
        fn item(&mut self, item: Item<'_>) -> Result<(), StreamError> {
            if let Found::File(Some(f)) = &item.found {
                let mut data = Vec::new();
                io::Read::read_to_end(&mut &*f, &mut data).map_err(StreamError::Write)?;
                self.contents.push(data);
            }
            let kind = match item.found {
                Found::Dir => "dir",
                Found::File(_) => "file",
                Found::Symlink(_) => "symlink",
                Found::Fifo => "fifo",
                _ => "other",
            };
            self.items.push((item.rel.display().to_string(), kind));
            Ok(())
        }
        fn skipped(&mut self, rel: &Path, why: Skipped) {
            self.skipped.push((rel.display().to_string(), why));
        }
    }

    fn budget() -> AssignmentBudget {
        IoBudget::new(Limits::default()).for_assignment(Limits::default())
    }

    /// A clock that never moves: the budget's debt then counts every operation charged.
    #[derive(Debug)]
    struct Stopped(std::time::Instant);

    impl crate::budget::Clock for Stopped {
        fn now(&self) -> std::time::Instant {
            self.0
        }
    }

    /// The metadata walk costs one operation per file and directory, as the reader's reads
    /// do: change detection on a huge tree cannot run past the node's IO budget.
    #[test]
    fn the_metadata_walk_is_charged_one_operation_per_entry() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let v = dir.path();
        for d in 0..3 {
            std::fs::create_dir(v.join(format!("d{d}")))?;
            for f in 0..4 {
                std::fs::write(v.join(format!("d{d}/f{f}")), b"x")?;
            }
        }
        const RATE: u64 = 1_000_000;
        let node = IoBudget::with_clock(
            Limits {
                bytes_per_second: None,
                iops: Some(RATE),
            },
            Arc::new(Stopped(std::time::Instant::now())),
        );
        let budget = node.for_assignment(Limits::default());
        let vol = Volume::open(v, &Patterns::default(), &[])?;
        vol.walk(&budget, false, &mut Manifest::default())?;
        // The bucket starts empty; the next operation waits for all the walk took, plus one.
        let waited = budget.charge(0, 1).as_secs_f64() * RATE as f64;
        assert_eq!(waited.round() as u64, 3 + 3 * 4 + 1);
        Ok(())
    }

    #[test]
    fn paths_are_checked_and_made_relative() {
        assert_eq!(
            volume_paths(&["/data/x/", "./logs", "data/x"]).unwrap(),
            vec![PathBuf::from("data/x"), PathBuf::from("logs")]
        );
        for bad in ["..", "a/../../b", "/", "."] {
            assert!(volume_paths(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_walk_selects_excludes_and_never_follows() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let v = dir.path().join("vol");
        std::fs::create_dir_all(v.join("a/b"))?;
        std::fs::create_dir_all(v.join("c"))?;
        std::fs::write(v.join("a/b/f"), b"f")?;
        std::fs::write(v.join("a/g.log"), b"g")?;
        std::fs::write(v.join("c/h"), b"h")?;
        std::fs::write(dir.path().join("outside"), b"marker")?;
        std::os::unix::fs::symlink(dir.path().join("outside"), v.join("a/link"))?;
        std::os::unix::fs::symlink(dir.path(), v.join("c/up"))?;
        std::process::Command::new("mkfifo")
            .arg(v.join("c/fifo"))
            .status()?;
        let excludes = Patterns::new(&["*.log"])?;
        let vol = Volume::open(&v, &excludes, &[PathBuf::from("a")])?;
        let mut r = Record::default();
        vol.walk(&budget(), false, &mut r)?;
        assert_eq!(
            r.items,
            vec![
                ("a".into(), "dir"),
                ("a/b".into(), "dir"),
                ("a/b/f".into(), "file"),
                ("a/link".into(), "symlink"),
            ]
        );
        let vol = Volume::open(&v, &Patterns::default(), &[])?;
        let mut r = Record::default();
        vol.walk(&budget(), false, &mut r)?;
        assert!(r.items.contains(&("c/fifo".into(), "fifo")));
        assert!(r.items.contains(&("c/up".into(), "symlink")));
        // A symlink as a path is refused, not followed.
        let err = Volume::open(&v, &Patterns::default(), &[PathBuf::from("c/up")]);
        assert!(matches!(err, Err(StreamError::BadPath { .. })), "{err:?}");
        Ok(())
    }

    /// Entries swapped between the walk's lstat and its open, deterministically: a file for
    /// a FIFO, a file for a symlink out of the volume, a directory for one, a file renamed
    /// over. Nothing outside is read, nothing blocks, each is reported as changed.
    #[test]
    fn entries_swapped_under_the_walk_are_changed_never_followed() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let v = dir.path().join("vol");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(v.join("d"))?;
        std::fs::create_dir_all(&outside)?;
        std::fs::write(outside.join("secret"), b"MARKER")?;
        std::fs::write(v.join("d/inner"), b"inner")?;
        for f in ["fifo", "link", "renamed"] {
            std::fs::write(v.join(f), b"old")?;
        }
        let (vv, out) = (v.clone(), outside.clone());
        let swap = move |rel: &Path| {
            let p = vv.join(rel);
            let done = match rel.to_str() {
                Some("fifo") => std::fs::remove_file(&p).and_then(|()| {
                    std::process::Command::new("mkfifo")
                        .arg(&p)
                        .status()
                        .map(drop)
                }),
                Some("link") => std::fs::remove_file(&p)
                    .and_then(|()| std::os::unix::fs::symlink(out.join("secret"), &p)),
                Some("d") => std::fs::rename(&p, vv.join("d.moved"))
                    .and_then(|()| std::os::unix::fs::symlink(&out, &p)),
                Some("renamed") => std::fs::write(vv.join("new"), b"new")
                    .and_then(|()| std::fs::rename(vv.join("new"), &p)),
                _ => Ok(()),
            };
            done.expect("swap");
        };
        let mut r = Record {
            swap: Some(Box::new(swap)),
            ..Record::default()
        };
        let vol = Volume::open(&v, &Patterns::default(), &[])?;
        vol.walk(&budget(), false, &mut r)?;
        assert_eq!(r.items, vec![("renamed".into(), "file")]);
        assert_eq!(r.contents, vec![b"new".to_vec()]);
        let mut changed: Vec<_> = r.skipped.iter().map(|(p, w)| (p.as_str(), *w)).collect();
        changed.sort();
        assert_eq!(
            changed,
            vec![
                ("d", Skipped::Changed),
                ("fifo", Skipped::Changed),
                ("link", Skipped::Changed),
                ("renamed", Skipped::Changed),
            ]
        );
        Ok(())
    }

    fn digest(v: &Path) -> anyhow::Result<String> {
        let vol = Volume::open(v, &Patterns::default(), &[])?;
        let mut m = Manifest::default();
        vol.walk(&budget(), false, &mut m)?;
        Ok(m.digest())
    }

    /// What restic's change detection looks at, and every piece of metadata the stream
    /// carries, changes the digest: a same-size rewrite with the old mtime put back (ctime),
    /// a file replaced by a copy (inode), an xattr alone.
    #[test]
    fn the_manifest_sees_what_mtime_and_size_hide() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let v = dir.path();
        let f = v.join("f");
        std::fs::write(&f, b"aaaa")?;
        let mtime = std::fs::metadata(&f)?.modified()?;
        let first = digest(v)?;
        assert_eq!(first, digest(v)?, "the digest is stable");
        std::fs::write(&f, b"bbbb")?;
        File::options().write(true).open(&f)?.set_modified(mtime)?;
        let rewritten = digest(v)?;
        assert_ne!(first, rewritten, "same size, old mtime");
        std::fs::copy(&f, v.join("g"))?;
        std::fs::rename(v.join("g"), &f)?;
        File::options().write(true).open(&f)?.set_modified(mtime)?;
        let replaced = digest(v)?;
        assert_ne!(rewritten, replaced, "replaced by a copy");
        if rustix::fs::setxattr(&f, "user.k", b"v", rustix::fs::XattrFlags::empty()).is_ok() {
            assert_ne!(replaced, digest(v)?, "an xattr alone");
        }
        Ok(())
    }

    #[test]
    fn more_than_4k_of_xattr_names_are_all_read() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let f = dir.path().join("f");
        std::fs::write(&f, b"x")?;
        let mut want = Vec::new();
        for i in 0..120 {
            let name = format!("user.{i:03}-{}", "n".repeat(40));
            let value = vec![b'v'; if i == 7 { 70_000 } else { 10 }];
            if rustix::fs::setxattr(&f, name.as_str(), &value, rustix::fs::XattrFlags::empty())
                .is_err()
            {
                eprintln!("this filesystem refuses user xattrs; nothing to check");
                return Ok(());
            }
            want.push((name.into_bytes(), value));
        }
        let fd: OwnedFd = File::open(&f)?.into();
        let mut got = xattrs::<Record>(&fd)?;
        got.sort();
        want.sort();
        assert!(got == want, "{} of {} attributes", got.len(), want.len());
        Ok(())
    }

    #[test]
    fn a_deep_tree_is_walked_with_few_descriptors() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut p = dir.path().join("vol");
        for _ in 0..(OPEN_DIRS * 3) {
            p.push("d");
        }
        std::fs::create_dir_all(&p)?;
        std::fs::write(p.join("leaf"), b"x")?;
        std::fs::write(dir.path().join("vol/z-after"), b"y")?;
        let vol = Volume::open(&dir.path().join("vol"), &Patterns::default(), &[])?;
        let mut r = Record::default();
        vol.walk(&budget(), false, &mut r)?;
        assert_eq!(r.items.len(), OPEN_DIRS * 3 + 2);
        assert_eq!(r.items.last().map(|i| i.0.as_str()), Some("z-after"));
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        Ok(())
    }
}
