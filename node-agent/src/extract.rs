//! The extractor: writes a tar stream back into a volume, confined to it by the kernel
//! (`openat2` with `RESOLVE_BENEATH` and no symlinks), sparse files with their holes, and a
//! raw block image onto a device.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};

use crate::stream::{BLOCK_FILE, CHUNK, StreamError};
use crate::tar::{Entry, Kind, Segment, TarReader};

/// Options of an extraction.
#[derive(Clone, Debug, Default)]
pub struct ExtractOptions {
    /// Remove files in the target that are not in the stream.
    pub delete_extraneous: bool,
    /// Only entries under these paths (relative, as in the snapshot); all when empty.
    pub include: Vec<String>,
    /// Restore owners (needs CAP_CHOWN).
    pub owners: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExtractReport {
    pub files: u64,
    pub bytes: u64,
    pub deleted: u64,
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

/// Opens a directory below `root` without following any symlink on the way.
fn open_dir_beneath(root: &OwnedFd, rel: &Path) -> io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    Ok(rustix::fs::openat2(
        root,
        rel,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        BENEATH,
    )?)
}

/// Creates the parent directories of `rel` below `root` (never through a symlink) and
/// returns the parent's descriptor.
fn make_parents(root: &OwnedFd, rel: &Path) -> io::Result<OwnedFd> {
    let mut current = Path::new("").to_path_buf();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            current.push(part);
            let parent_fd = open_dir_beneath(root, current.parent().unwrap_or(Path::new("")))?;
            match rustix::fs::mkdirat(&parent_fd, part.as_os_str(), Mode::from_raw_mode(0o755)) {
                Ok(()) => {}
                Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    open_dir_beneath(root, rel.parent().unwrap_or(Path::new("")))
}

/// Removes whatever is at `name` in `dir` unless it is a directory we may reuse.
fn clear_slot(dir: &OwnedFd, name: &OsStr, keep_dir: bool) -> io::Result<()> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => {
            let is_dir =
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
            if is_dir && keep_dir {
                return Ok(());
            }
            if is_dir {
                remove_tree_at(dir, name)
            } else {
                Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?)
            }
        }
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn remove_tree_at(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut entries = Vec::new();
    for entry in rustix::fs::Dir::read_from(&sub)? {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            entries.push(OsStr::from_bytes(n).to_owned());
        }
    }
    for e in entries {
        clear_slot(&sub, &e, false)?;
    }
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?)
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

fn set_times(fd: impl AsFd, e: &Entry) -> io::Result<()> {
    Ok(rustix::fs::futimens(fd, &timestamps(e))?)
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

/// Writes a tar stream into `target`, confined to it.
pub fn extract<R: Read>(
    input: R,
    target: &Path,
    opts: &ExtractOptions,
) -> Result<ExtractReport, StreamError> {
    let restore_err = |path: &Path, source: io::Error| StreamError::Restore {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(target).map_err(|e| restore_err(target, e))?;
    let root: OwnedFd = rustix::fs::open(
        target,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| restore_err(target, e.into()))?;
    let mut reader = TarReader::new(input);
    let mut report = ExtractReport::default();
    let mut seen: BTreeSet<PathBuf> = BTreeSet::new();
    let mut dirs: Vec<(PathBuf, Entry)> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    while let Some(entry) = reader.next_entry().map_err(StreamError::Decode)? {
        let rel = safe_relative(&entry.path)?;
        let included = opts.include.is_empty()
            || opts.include.iter().any(|i| {
                rel.starts_with(i.trim_start_matches('/'))
                    || Path::new(i.trim_start_matches('/')).starts_with(&rel)
            });
        if !included {
            continue;
        }
        let name = rel.file_name().unwrap_or_default().to_owned();
        let parent = make_parents(&root, &rel).map_err(|e| restore_err(&rel, e))?;
        for ancestor in rel.ancestors().skip(1) {
            if !ancestor.as_os_str().is_empty() {
                seen.insert(ancestor.to_path_buf());
            }
        }
        seen.insert(rel.clone());
        let mode = Mode::from_raw_mode(entry.mode & 0o7777);
        match &entry.kind {
            Kind::Dir => {
                clear_slot(&parent, &name, true).map_err(|e| restore_err(&rel, e))?;
                match rustix::fs::mkdirat(&parent, &name, mode) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(restore_err(&rel, e.into())),
                }
                dirs.push((rel.clone(), entry.clone()));
            }
            Kind::File { size } => {
                clear_slot(&parent, &name, false).map_err(|e| restore_err(&rel, e))?;
                let fd = rustix::fs::openat(
                    &parent,
                    &name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| restore_err(&rel, e.into()))?;
                let mut file = File::from(fd);
                if let Some(map) = reader.sparse_map().map(<[Segment]>::to_vec) {
                    write_sparse(&mut reader, &file, &map, *size, &mut buf, &rel)?;
                } else {
                    loop {
                        let n = reader.read_data(&mut buf).map_err(StreamError::Decode)?;
                        if n == 0 {
                            break;
                        }
                        file.write_all(&buf[..n])
                            .map_err(|e| restore_err(&rel, e))?;
                    }
                }
                report.files += 1;
                report.bytes += size;
                finish_attributes(&file, &entry, opts).map_err(|e| restore_err(&rel, e))?;
            }
            Kind::Symlink { target: link } => {
                clear_slot(&parent, &name, false).map_err(|e| restore_err(&rel, e))?;
                rustix::fs::symlinkat(OsStr::from_bytes(link), &parent, &name)
                    .map_err(|e| restore_err(&rel, e.into()))?;
                finish_special(&parent, &name, &entry, opts).map_err(|e| restore_err(&rel, e))?;
            }
            Kind::HardLink { target: link } => {
                let src = safe_relative(link)?;
                let src_parent = open_dir_beneath(&root, src.parent().unwrap_or(Path::new("")))
                    .map_err(|e| restore_err(&rel, e))?;
                clear_slot(&parent, &name, false).map_err(|e| restore_err(&rel, e))?;
                rustix::fs::linkat(
                    &src_parent,
                    src.file_name().unwrap_or_default(),
                    &parent,
                    &name,
                    AtFlags::empty(),
                )
                .map_err(|e| restore_err(&rel, e.into()))?;
            }
            Kind::Fifo | Kind::CharDevice { .. } | Kind::BlockDevice { .. } => {
                clear_slot(&parent, &name, false).map_err(|e| restore_err(&rel, e))?;
                let (ft, dev) = match entry.kind {
                    Kind::CharDevice { major, minor } => (
                        rustix::fs::FileType::CharacterDevice,
                        rustix::fs::makedev(major, minor),
                    ),
                    Kind::BlockDevice { major, minor } => (
                        rustix::fs::FileType::BlockDevice,
                        rustix::fs::makedev(major, minor),
                    ),
                    _ => (rustix::fs::FileType::Fifo, 0),
                };
                rustix::fs::mknodat(&parent, &name, ft, mode, dev)
                    .map_err(|e| restore_err(&rel, e.into()))?;
                finish_special(&parent, &name, &entry, opts).map_err(|e| restore_err(&rel, e))?;
            }
        }
    }
    reader.drain().map_err(StreamError::Decode)?;
    // Directory times last: writing into a directory changes its mtime.
    for (rel, entry) in dirs.iter().rev() {
        let fd = open_dir_beneath(&root, rel).map_err(|e| restore_err(rel, e))?;
        let file = File::from(fd);
        finish_attributes(&file, entry, opts).map_err(|e| restore_err(rel, e))?;
    }
    if opts.delete_extraneous && opts.include.is_empty() {
        report.deleted =
            delete_extraneous(&root, Path::new(""), &seen).map_err(|e| restore_err(target, e))?;
    }
    Ok(report)
}

/// Writes a sparse entry's segments at their offsets into a new, empty file and gives it its
/// size: what no segment covers stays a hole.
fn write_sparse<R: Read>(
    reader: &mut TarReader<R>,
    file: &File,
    map: &[Segment],
    size: u64,
    buf: &mut [u8],
    rel: &Path,
) -> Result<(), StreamError> {
    let restore_err = |source| StreamError::Restore {
        path: rel.display().to_string(),
        source,
    };
    for segment in map {
        let mut done = 0u64;
        while done < segment.len {
            let want = (segment.len - done).min(buf.len() as u64) as usize;
            let n = reader
                .read_data(&mut buf[..want])
                .map_err(StreamError::Decode)?;
            if n == 0 {
                return Err(StreamError::Decode(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tar data ends inside a sparse segment",
                )));
            }
            std::os::unix::fs::FileExt::write_all_at(file, &buf[..n], segment.offset + done)
                .map_err(restore_err)?;
            done += n as u64;
        }
    }
    file.set_len(size).map_err(restore_err)
}

fn finish_attributes(file: &File, entry: &Entry, opts: &ExtractOptions) -> io::Result<()> {
    for (k, v) in &entry.xattrs {
        // Best effort: the target filesystem may not support every namespace.
        let _ = rustix::fs::fsetxattr(
            file,
            OsStr::from_bytes(k),
            v,
            rustix::fs::XattrFlags::empty(),
        );
    }
    if opts.owners {
        rustix::fs::fchown(
            file,
            Some(rustix::fs::Uid::from_raw(entry.uid as u32)),
            Some(rustix::fs::Gid::from_raw(entry.gid as u32)),
        )?;
    }
    rustix::fs::fchmod(file, Mode::from_raw_mode(entry.mode & 0o7777))?;
    set_times(file, entry)
}

/// Owner and times of an entry that cannot be opened (a symlink, a FIFO, a device), set
/// through its directory without following it.
fn finish_special(
    parent: &OwnedFd,
    name: &OsStr,
    entry: &Entry,
    opts: &ExtractOptions,
) -> io::Result<()> {
    if opts.owners {
        rustix::fs::chownat(
            parent,
            name,
            Some(rustix::fs::Uid::from_raw(entry.uid as u32)),
            Some(rustix::fs::Gid::from_raw(entry.gid as u32)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    Ok(rustix::fs::utimensat(
        parent,
        name,
        &timestamps(entry),
        AtFlags::SYMLINK_NOFOLLOW,
    )?)
}

fn delete_extraneous(root: &OwnedFd, rel: &Path, keep: &BTreeSet<PathBuf>) -> io::Result<u64> {
    let dir = open_dir_beneath(root, rel)?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let n = entry.file_name().to_bytes();
        if n != b"." && n != b".." {
            names.push((OsStr::from_bytes(n).to_owned(), entry.file_type()));
        }
    }
    let mut deleted = 0;
    for (name, ft) in names {
        let child = rel.join(&name);
        if !keep.contains(&child) {
            clear_slot(&dir, &name, false)?;
            deleted += 1;
        } else if ft == rustix::fs::FileType::Directory {
            deleted += delete_extraneous(root, &child, keep)?;
        }
    }
    Ok(deleted)
}
