//! Stream mode's reader: a reader thread walks a volume and writes a tar stream of it, paced by
//! the IO budget and without filling the page cache. Sparse files travel as their data segments
//! only. The way back is `extract`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::budget::AssignmentBudget;
use crate::pattern::Patterns;
use crate::residency::{CacheKeeper, no_readahead};
use crate::tar::{Entry, Kind, MAX_SEGMENTS, Segment, TarWriter};
use crate::walk::{Found, Item, Meta, Skipped, Visitor, Volume};

/// Size of one read: large enough for sequential throughput, small enough to pace smoothly.
pub const CHUNK: usize = 1 << 20;
/// Zeros for what a file that shrank during its read can no longer supply.
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
/// The name of a raw block volume's content inside the stream.
pub const BLOCK_FILE: &str = "block.img";

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("failed to read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("failed to write the stream: {0}")]
    Write(io::Error),
    #[error("refused tar entry {path:?}: {reason}")]
    Unsafe { path: String, reason: &'static str },
    #[error("failed to restore {path}: {source}")]
    Restore { path: String, source: io::Error },
    #[error("failed to read the stream: {0}")]
    Decode(io::Error),
    #[error("failed to back up path {path:?}: {reason}")]
    BadPath { path: String, reason: &'static str },
}

/// Counters the reader updates as it goes, for progress reports.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub files: AtomicU64,
    pub throttled_nanos: AtomicU64,
    /// What the whole volume holds, once known (zero until then).
    pub bytes_total: AtomicU64,
    pub files_total: AtomicU64,
}

/// What a finished read saw.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReadReport {
    pub bytes: u64,
    pub files: u64,
    /// Files that changed size or time while they were read; the stream holds what was read.
    pub changed: Vec<String>,
    /// Files that disappeared between the directory listing and their read.
    pub vanished: Vec<String>,
    /// Files and directories left out because reading them was not permitted (only when
    /// the reader was told to skip them; otherwise the first one fails the read).
    pub unreadable: Vec<String>,
    /// How long the walk and the reads took, throttling included.
    pub seconds: f64,
}

/// Why a range read stopped before its end.
#[derive(Debug)]
pub enum RangeError {
    /// Reading the file failed.
    Read(io::Error),
    /// Whoever took the data failed (writing the stream, say).
    Deliver(io::Error),
}

/// How file contents are read. One implementation uses io_uring; the fallback uses `pread`.
/// An engine owns its buffers, so it decides how many reads are in flight.
pub trait ReadEngine: Send {
    fn name(&self) -> &'static str;

    /// Reads `len` bytes of `file` from `offset` and hands them to `deliver` in file order,
    /// in pieces of at most [`CHUNK`] bytes, each with its offset in the file. `before_read`
    /// is called with the offset and size of every read before it is issued, so the IO
    /// budget paces them and the page cache's state before the read can be noted. Returns
    /// the bytes delivered, fewer than `len` when the file ends early. No read is left in
    /// flight when this returns.
    fn read_range(
        &mut self,
        file: &File,
        offset: u64,
        len: u64,
        before_read: &mut dyn FnMut(u64, u64),
        deliver: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<u64, RangeError>;
}

/// Ordinary positional reads, one at a time, through one buffer of [`CHUNK`] bytes.
#[derive(Debug, Default)]
pub struct PreadEngine {
    buf: Vec<u8>,
}

impl ReadEngine for PreadEngine {
    fn name(&self) -> &'static str {
        "pread"
    }

    fn read_range(
        &mut self,
        file: &File,
        offset: u64,
        len: u64,
        before_read: &mut dyn FnMut(u64, u64),
        deliver: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<u64, RangeError> {
        self.buf.resize(CHUNK, 0);
        let mut done = 0u64;
        while done < len {
            let want = (len - done).min(CHUNK as u64) as usize;
            let at = offset + done;
            before_read(at, want as u64);
            let n = match std::os::unix::fs::FileExt::read_at(file, &mut self.buf[..want], at) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(RangeError::Read(e)),
            };
            deliver(at, &self.buf[..n]).map_err(RangeError::Deliver)?;
            done += n as u64;
        }
        Ok(done)
    }
}

/// The data segments of the first `size` bytes of a file, as the filesystem reports them
/// (`SEEK_DATA`/`SEEK_HOLE`), ending with an empty segment at `size` when the file ends in a
/// hole. `None` when the filesystem cannot tell or the map would be too long: the file is
/// then read whole.
fn data_segments(file: &File, size: u64) -> Option<Vec<Segment>> {
    use rustix::fs::SeekFrom;
    let mut map = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(start) => start,
            // Nothing but holes from `pos` on (or the file shrank): the map is complete.
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return None,
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(file, SeekFrom::Hole(start)) {
            Ok(end) => end.min(size),
            Err(rustix::io::Errno::NXIO) => size,
            Err(_) => return None,
        };
        if end <= start || map.len() >= MAX_SEGMENTS - 1 {
            return None;
        }
        map.push(Segment {
            offset: start,
            len: end - start,
        });
        pos = end;
    }
    if map.last().map_or(0, Segment::end) < size {
        map.push(Segment {
            offset: size,
            len: 0,
        });
    }
    Some(map)
}

fn write_zeros<W: Write>(tar: &mut TarWriter<W>, mut n: u64) -> io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        tar.data(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

fn rel_name(rel: &Path) -> String {
    String::from_utf8_lossy(rel.as_os_str().as_bytes()).into_owned()
}

fn entry_for(rel: &Path, meta: &Meta, kind: Kind, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Entry {
    Entry {
        path: rel.as_os_str().as_bytes().to_vec(),
        kind,
        mode: meta.mode & 0o7777,
        uid: u64::from(meta.uid),
        gid: u64::from(meta.gid),
        mtime_secs: meta.mtime,
        mtime_nanos: meta.mtime_nsec,
        xattrs,
    }
}

/// Reads a volume into a tar stream written to `out`.
pub struct VolumeReader<'a> {
    pub root: PathBuf,
    pub budget: AssignmentBudget,
    pub engine: Box<dyn ReadEngine + 'a>,
    pub progress: Arc<Progress>,
    /// Leave out what may not be read (permission denied) instead of failing.
    pub skip_unreadable: bool,
    /// restic's exclude patterns (see `pattern`): matching entries are not in the stream.
    pub excludes: Patterns,
    /// Only these sub-directories of the volume (relative to it; empty: all of it).
    pub paths: Vec<PathBuf>,
}

impl std::fmt::Debug for VolumeReader<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeReader")
            .field("root", &self.root)
            .field("engine", &self.engine.name())
            .finish_non_exhaustive()
    }
}

/// The walk's entries written as tar entries.
struct TarVisitor<'r, 'a, W: Write> {
    reader: &'r mut VolumeReader<'a>,
    tar: &'r mut TarWriter<W>,
    report: &'r mut ReadReport,
    /// The first name of each multiply linked file whose data is in the stream: a later
    /// name becomes a link to it, and only to a file this stream holds.
    links: HashMap<(u64, u64), Vec<u8>>,
}

fn push_once(list: &mut Vec<String>, name: String) {
    if list.last() != Some(&name) {
        list.push(name);
    }
}

impl<W: Write> Visitor for TarVisitor<'_, '_, W> {
    const OPENS_FILES: bool = true;

    fn item(&mut self, item: Item<'_>) -> Result<(), StreamError> {
        let Item {
            rel,
            meta,
            xattrs,
            found,
        } = item;
        let kind = match found {
            Found::File(Some(file)) => {
                let key = (meta.dev, meta.ino);
                if meta.nlink > 1
                    && let Some(first) = self.links.get(&key)
                {
                    let kind = Kind::HardLink {
                        target: first.clone(),
                    };
                    return self
                        .tar
                        .append_header(&entry_for(rel, &meta, kind, xattrs))
                        .map_err(StreamError::Write);
                }
                self.reader
                    .file(&file, meta, rel, xattrs, self.tar, self.report)?;
                if meta.nlink > 1 {
                    self.links.insert(key, rel.as_os_str().as_bytes().to_vec());
                }
                return Ok(());
            }
            // Not opened: the walk opens every file for a reader.
            Found::File(None) => return Ok(()),
            Found::Dir => Kind::Dir,
            Found::Symlink(target) => Kind::Symlink { target },
            Found::Fifo => Kind::Fifo,
            Found::CharDevice | Found::BlockDevice => {
                let (major, minor) = (rustix::fs::major(meta.rdev), rustix::fs::minor(meta.rdev));
                if matches!(found, Found::CharDevice) {
                    Kind::CharDevice { major, minor }
                } else {
                    Kind::BlockDevice { major, minor }
                }
            }
            // Sockets cannot be archived; they are recreated by their owner.
            Found::Socket => return Ok(()),
        };
        self.tar
            .append_header(&entry_for(rel, &meta, kind, xattrs))
            .map_err(StreamError::Write)
    }

    fn skipped(&mut self, rel: &Path, why: Skipped) {
        let name = rel_name(rel);
        match why {
            Skipped::Changed => push_once(&mut self.report.changed, name),
            Skipped::Vanished => push_once(&mut self.report.vanished, name),
            Skipped::Unreadable => {
                tracing::warn!(path = %rel.display(), "left out: not readable");
                push_once(&mut self.report.unreadable, name);
            }
        }
    }
}

impl VolumeReader<'_> {
    pub fn run<W: Write>(mut self, out: W) -> Result<(ReadReport, W), StreamError> {
        let started = std::time::Instant::now();
        let mut tar = TarWriter::new(out);
        let mut report = ReadReport::default();
        let read_err = |source| StreamError::Read {
            path: self.root.display().to_string(),
            source,
        };
        let root_meta = std::fs::metadata(&self.root).map_err(read_err)?;
        if root_meta.file_type().is_block_device() {
            // A raw block volume is one file in the stream, as large as the device; one that
            // cannot be read leaves nothing to back up. Its path is the kubelet's.
            let device = File::open(&self.root).map_err(read_err)?;
            let meta = Meta::of(&device).map_err(read_err)?;
            self.file(
                &device,
                meta,
                Path::new(BLOCK_FILE),
                vec![],
                &mut tar,
                &mut report,
            )?;
        } else {
            let volume = Volume::open(&self.root, &self.excludes, &self.paths)?;
            let budget = self.budget.clone();
            let skip = self.skip_unreadable;
            let mut visitor = TarVisitor {
                reader: &mut self,
                tar: &mut tar,
                report: &mut report,
                links: HashMap::new(),
            };
            volume.walk(&budget, skip, &mut visitor)?;
        }
        let out = tar.finish().map_err(StreamError::Write)?;
        report.seconds = started.elapsed().as_secs_f64();
        Ok((report, out))
    }

    fn file<W: Write>(
        &mut self,
        file: &File,
        before: Meta,
        rel: &Path,
        xattrs: Vec<(Vec<u8>, Vec<u8>)>,
        tar: &mut TarWriter<W>,
        report: &mut ReadReport,
    ) -> Result<(), StreamError> {
        let read_err = |source| StreamError::Read {
            path: rel.display().to_string(),
            source,
        };
        // The engine keeps several reads in flight: the kernel's readahead would only bring
        // in pages twice over for the cache keeper to drop.
        no_readahead(file);
        let size = if before.file_type() == rustix::fs::FileType::BlockDevice {
            // A device's size is where its end is, not what stat says.
            io::Seek::seek(&mut &*file, io::SeekFrom::End(0)).map_err(read_err)?
        } else {
            before.size
        };
        let whole = [Segment {
            offset: 0,
            len: size,
        }];
        let sparse = if before.looks_sparse() {
            // Finding the holes costs extent lookups: one operation.
            self.budget.acquire_blocking(0, 1);
            data_segments(file, size).filter(|map| map[..] != whole[..])
        } else {
            None
        };
        let entry = entry_for(rel, &before, Kind::File { size }, xattrs);
        let (segments, data_len) = match &sparse {
            Some(map) => {
                let data = tar
                    .append_sparse_header(&entry, map)
                    .map_err(StreamError::Write)?;
                (&map[..], data)
            }
            None => {
                tar.append_header(&entry).map_err(StreamError::Write)?;
                (&whole[..], size)
            }
        };
        // The header promised every byte of every segment: what the file no longer holds
        // because it shrank (before or after the map was taken) goes as zeros.
        let mut short = false;
        let mut keeper = CacheKeeper::new(size);
        let mut copy = || -> Result<(), StreamError> {
            for segment in segments.iter().filter(|s| s.len > 0) {
                let got = self
                    .read_segment(file, *segment, &mut keeper, tar)
                    .map_err(|e| match e {
                        RangeError::Read(source) => read_err(source),
                        RangeError::Deliver(e) => StreamError::Write(e),
                    })?;
                if got < segment.len {
                    short = true;
                    write_zeros(tar, segment.len - got).map_err(StreamError::Write)?;
                }
            }
            Ok(())
        };
        let copied = copy();
        // Failed or not, what was read leaves the cache.
        keeper.finish(file);
        copied?;
        tar.finish_entry(data_len).map_err(StreamError::Write)?;
        let after = Meta::of(file).map_err(read_err)?;
        let block = after.file_type() == rustix::fs::FileType::BlockDevice;
        if short
            || (!block && after.size != size)
            || (after.mtime, after.mtime_nsec) != (before.mtime, before.mtime_nsec)
        {
            push_once(&mut report.changed, rel_name(rel));
        }
        report.bytes += size;
        report.files += 1;
        self.progress.files.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Copies one segment of `file` into the stream through the engine, paced by the budget;
    /// returns the bytes the file still had.
    fn read_segment<W: Write>(
        &mut self,
        file: &File,
        segment: Segment,
        keeper: &mut CacheKeeper,
        tar: &mut TarWriter<W>,
    ) -> Result<u64, RangeError> {
        let VolumeReader {
            engine,
            budget,
            progress,
            ..
        } = self;
        // The workloads' page cache matters more than ours: what was cached before a read
        // stays cached, and what the read brought in is dropped once it is delivered.
        let keeper = std::cell::RefCell::new(keeper);
        let mut before_read = |at: u64, want: u64| {
            let waited = budget.acquire_blocking(want, 1);
            progress
                .throttled_nanos
                .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
            keeper.borrow_mut().before_read(file, at, want);
        };
        let mut deliver = |at: u64, data: &[u8]| -> io::Result<()> {
            keeper.borrow_mut().delivered(file, at, data.len() as u64);
            tar.data(data)?;
            progress
                .bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(())
        };
        engine.read_range(
            file,
            segment.offset,
            segment.len,
            &mut before_read,
            &mut deliver,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{IoBudget, Limits};
    use crate::extract::{ExtractOptions, extract, extract_block};
    use crate::tar::TarReader;

    #[test]
    fn the_extractors_read_their_input_to_the_end() -> io::Result<()> {
        // Whatever follows the first end-of-archive block is still read, so the process
        // writing the archive into a pipe (restic dump) never finds it closed early.
        let dir = tempfile::tempdir()?;
        let mut w = TarWriter::new(Vec::new());
        w.append_header(&Entry {
            path: BLOCK_FILE.as_bytes().to_vec(),
            kind: Kind::File { size: 8 },
            mode: 0o600,
            uid: 0,
            gid: 0,
            mtime_secs: 1_700_000_000,
            mtime_nanos: 0,
            xattrs: vec![],
        })?;
        w.data(b"an image")?;
        w.finish_entry(8)?;
        let tar = w.finish()?;
        let mut input = &tar[..];
        extract(
            &mut input,
            &dir.path().join("t"),
            &ExtractOptions::default(),
        )
        .map_err(io::Error::other)?;
        assert!(input.is_empty(), "{} bytes left unread", input.len());
        let device = dir.path().join("device.img");
        std::fs::write(&device, b"")?;
        let mut input = &tar[..];
        extract_block(&mut input, &device).map_err(io::Error::other)?;
        assert!(input.is_empty(), "{} bytes left unread", input.len());
        assert_eq!(std::fs::read(&device)?, b"an image");
        Ok(())
    }

    const K64: u64 = 64 << 10;

    /// A file of `size` bytes holding `fill` at each `(offset, len)` and holes elsewhere.
    fn holey(path: &Path, size: u64, data: &[(u64, u64)], fill: u8) -> io::Result<()> {
        let f = File::create(path)?;
        f.set_len(size)?;
        for (offset, len) in data {
            std::os::unix::fs::FileExt::write_all_at(&f, &vec![fill; *len as usize], *offset)?;
        }
        f.sync_all()
    }

    fn reader<'a>(root: &Path, engine: Box<dyn ReadEngine + 'a>) -> VolumeReader<'a> {
        VolumeReader {
            root: root.to_path_buf(),
            budget: IoBudget::new(Limits::default()).for_assignment(Limits::default()),
            engine,
            progress: Arc::default(),
            skip_unreadable: false,
            excludes: Patterns::default(),
            paths: vec![],
        }
    }

    /// Both engines; io_uring's absence fails the test unless skipped deliberately (see
    /// [`crate::uring::required_for_tests`]).
    fn engines() -> Vec<Box<dyn ReadEngine>> {
        let mut out: Vec<Box<dyn ReadEngine>> = vec![Box::new(PreadEngine::default())];
        if let Some(e) = crate::uring::required_for_tests(crate::uring::UringEngine::probe) {
            out.push(Box::new(e));
        }
        out
    }

    /// An entry of a stream, its sparse map and its data as stored.
    type Stored = (Entry, Option<Vec<Segment>>, Vec<u8>);

    fn entries(tar: &[u8]) -> io::Result<Vec<Stored>> {
        let mut r = TarReader::new(tar);
        let mut out = Vec::new();
        while let Some(e) = r.next_entry()? {
            let map = r.sparse_map().map(<[Segment]>::to_vec);
            let mut data = Vec::new();
            let mut buf = vec![0u8; 1 << 16];
            while let n @ 1.. = r.read_data(&mut buf)? {
                data.extend_from_slice(&buf[..n]);
            }
            out.push((e, map, data));
        }
        Ok(out)
    }

    fn seg(offset: u64, len: u64) -> Segment {
        Segment { offset, len }
    }

    #[test]
    fn sparse_files_travel_as_their_data_segments() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let v = dir.path();
        holey(
            &v.join("a-ends-in-data"),
            16 << 20,
            &[(0, K64), (5 << 20, K64), ((16 << 20) - K64, K64)],
            1,
        )?;
        holey(&v.join("b-ends-in-hole"), 16 << 20, &[(1 << 20, K64)], 2)?;
        holey(&v.join("c-all-hole"), 8 << 20, &[], 0)?;
        std::fs::write(v.join("d-dense"), vec![4u8; 3 << 20])?;
        for engine in engines() {
            let name = engine.name();
            let r = reader(v, engine);
            let progress = r.progress.clone();
            let (report, tar) = r.run(Vec::new()).map_err(io::Error::other)?;
            let got = entries(&tar)?;
            let maps: Vec<_> = got.iter().map(|(_, m, _)| m.clone()).collect();
            assert_eq!(
                maps,
                vec![
                    Some(vec![
                        seg(0, K64),
                        seg(5 << 20, K64),
                        seg((16 << 20) - K64, K64)
                    ]),
                    Some(vec![seg(1 << 20, K64), seg(16 << 20, 0)]),
                    Some(vec![seg(8 << 20, 0)]),
                    None,
                ],
                "{name}"
            );
            assert_eq!(got[0].2, vec![1u8; 3 * K64 as usize], "{name}");
            assert_eq!(got[1].2, vec![2u8; K64 as usize], "{name}");
            assert!(
                got[2].2.is_empty() && got[3].2 == vec![4u8; 3 << 20],
                "{name}"
            );
            let sizes: Vec<_> = got.iter().map(|(e, _, _)| e.size()).collect();
            assert_eq!(sizes, vec![16 << 20, 16 << 20, 8 << 20, 3 << 20], "{name}");
            // Only data is read; the report still counts what the files hold.
            let read = progress.bytes.load(Ordering::Relaxed);
            assert_eq!(read, 4 * K64 + (3 << 20), "{name}");
            assert_eq!(report.bytes, (40 << 20) + (3 << 20), "{name}");
            assert_eq!((report.files, report.changed.len()), (4, 0), "{name}");
            assert!(tar.len() < 4 << 20, "{name}: {} bytes of stream", tar.len());
        }
        Ok(())
    }

    /// The real engine, after `act` has run once, just before the first read: a file that
    /// shrinks or grows between its header and its reads, without a race.
    struct BeforeFirstRead {
        inner: Box<dyn ReadEngine>,
        act: Option<Box<dyn FnOnce() -> io::Result<()> + Send>>,
    }

    impl ReadEngine for BeforeFirstRead {
        fn name(&self) -> &'static str {
            self.inner.name()
        }

        fn read_range(
            &mut self,
            file: &File,
            offset: u64,
            len: u64,
            before_read: &mut dyn FnMut(u64, u64),
            deliver: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
        ) -> Result<u64, RangeError> {
            if let Some(act) = self.act.take() {
                act().map_err(RangeError::Read)?;
            }
            self.inner
                .read_range(file, offset, len, before_read, deliver)
        }
    }

    #[test]
    fn a_file_growing_during_its_read_is_reported_and_stored_as_it_was() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        for inner in engines() {
            let name = inner.name();
            let v = dir.path().join(name);
            std::fs::create_dir(&v)?;
            let log = v.join("log");
            std::fs::write(&log, vec![1u8; 3 << 20])?;
            let grow = log.clone();
            let engine = BeforeFirstRead {
                inner,
                act: Some(Box::new(move || {
                    let mut f = std::fs::OpenOptions::new().append(true).open(&grow)?;
                    f.write_all(b"more\n")
                })),
            };
            let (report, tar) = reader(&v, Box::new(engine))
                .run(Vec::new())
                .map_err(io::Error::other)?;
            assert_eq!(report.changed, vec!["log".to_owned()], "{name}");
            let got = entries(&tar)?;
            // The header's size holds: what was there when the entry was written.
            assert_eq!(got[0].0.size(), 3 << 20, "{name}");
            assert!(got[0].2 == vec![1u8; 3 << 20], "{name}");
        }
        Ok(())
    }

    /// A hard link whose first name the stream leaves out (excluded, outside `paths`) is
    /// written as a file of its own: a link entry only ever names data the stream holds.
    #[test]
    fn a_link_never_names_a_file_left_out() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let v = dir.path();
        std::fs::create_dir_all(v.join("a"))?;
        std::fs::create_dir_all(v.join("b"))?;
        std::fs::write(v.join("a/first"), b"shared data")?;
        std::fs::hard_link(v.join("a/first"), v.join("b/second"))?;
        std::fs::hard_link(v.join("a/first"), v.join("b/third"))?;
        let cases: [(&[&str], &[&str]); 3] = [(&[], &[]), (&["/a"], &[]), (&[], &["b"])];
        for (excludes, paths) in cases {
            let mut r = reader(v, Box::new(PreadEngine::default()));
            r.excludes = Patterns::new(excludes)?;
            r.paths = paths.iter().map(PathBuf::from).collect();
            let (_, tar) = r.run(Vec::new())?;
            let got: Vec<_> = entries(&tar)?
                .into_iter()
                .filter(|(e, _, _)| !matches!(e.kind, Kind::Dir))
                .map(|(e, _, data)| (String::from_utf8_lossy(&e.path).into_owned(), e.kind, data))
                .collect();
            let first = if excludes.is_empty() && paths.is_empty() {
                "a/first"
            } else {
                "b/second"
            };
            assert_eq!(got[0].0, first, "{excludes:?} {paths:?}");
            assert_eq!(got[0].2, b"shared data", "{excludes:?} {paths:?}");
            for (name, kind, _) in &got[1..] {
                assert_eq!(
                    kind,
                    &Kind::HardLink {
                        target: first.as_bytes().to_vec()
                    },
                    "{name}: {excludes:?} {paths:?}"
                );
            }
        }
        Ok(())
    }

    /// Page numbers as runs, `a-b`, for a message.
    fn runs(pages: &[usize]) -> String {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for &p in pages {
            match out.last_mut() {
                Some((_, end)) if *end + 1 == p => *end = p,
                _ => out.push((p, p)),
            }
        }
        out.iter()
            .map(|(a, b)| format!("{a}-{b}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Which pages of `path` are cached.
    fn residency(path: &Path) -> io::Result<Vec<bool>> {
        let f = File::open(path)?;
        let len = f.metadata()?.len();
        crate::residency::resident_pages(&f, 0, len)
            .ok_or_else(|| io::Error::other("mincore failed"))
    }

    /// Writes `path` to disk and drops it from the page cache; fails, rather than passing
    /// with nothing to test, on a filesystem that keeps its pages anyway (tmpfs).
    fn cold(path: &Path, data: &[u8]) -> io::Result<()> {
        let f = File::create(path)?;
        io::Write::write_all(&mut &f, data)?;
        f.sync_all()?;
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)?;
        let left = residency(path)?.iter().filter(|r| **r).count();
        assert_eq!(
            left,
            0,
            "{} keeps its pages cached after POSIX_FADV_DONTNEED: run the tests on a disk \
             filesystem",
            path.display()
        );
        Ok(())
    }

    /// A backup leaves the page cache as it found it: the pages a workload had cached are
    /// still cached, and none that it had not are, whichever engine reads and however the
    /// cached ranges fall against the reads (within one, across two, at the end).
    #[test]
    fn the_page_cache_is_left_as_it_was_found() -> io::Result<()> {
        // Under target/: a disk filesystem where /tmp may be memory.
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))?;
        let page = crate::residency::page_size() as usize;
        let mib = 1usize << 20;
        for engine in engines() {
            let name = engine.name();
            let v = dir.path().join(name);
            std::fs::create_dir(&v)?;
            let mixed = v.join("mixed");
            let size = 24 * mib + 5 * page + 17;
            cold(
                &mixed,
                &(0..size).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
            )?;
            cold(&v.join("untouched"), &vec![7u8; 8 * mib])?;
            // What a workload keeps hot: whole reads, part of one, two reads' worth across
            // a boundary, and the file's last pages.
            let hot = [
                (0, mib),
                (3 * mib + 3 * page, 7 * page),
                (10 * mib + mib / 2, 2 * mib),
                (size - 2 * page, 2 * page),
            ];
            let f = File::open(&mixed)?;
            for (at, len) in hot {
                let mut buf = vec![0u8; len];
                std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, at as u64)?;
            }
            let before = residency(&mixed)?;
            let cached = before.iter().filter(|r| **r).count();
            assert!(
                cached >= (3 * mib + 7 * page) / page,
                "{name}: {cached} pages"
            );

            let r = reader(&v, engine);
            let progress = r.progress.clone();
            r.run(io::sink()).map_err(io::Error::other)?;
            assert_eq!(
                progress.bytes.load(Ordering::Relaxed),
                (size + 8 * mib) as u64,
                "{name}: everything was read"
            );

            let after = residency(&mixed)?;
            let lost: Vec<_> = (0..before.len())
                .filter(|&p| before[p] && !after[p])
                .collect();
            let left: Vec<_> = (0..before.len())
                .filter(|&p| !before[p] && after[p])
                .collect();
            assert!(
                lost.is_empty(),
                "{name}: hot pages dropped: {}",
                runs(&lost)
            );
            assert!(
                left.is_empty(),
                "{name}: pages left cached: {}",
                runs(&left)
            );
            let untouched = residency(&v.join("untouched"))?;
            assert!(
                untouched.iter().all(|r| !r),
                "{name}: a cold file left cached"
            );
        }
        Ok(())
    }

    #[test]
    fn a_file_shrinking_after_its_map_is_padded_and_reported() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        for inner in engines() {
            let name = inner.name();
            let v = dir.path().join(name);
            std::fs::create_dir(&v)?;
            let path = v.join("shrinks");
            holey(
                &path,
                16 << 20,
                &[(0, K64), (4 << 20, K64), (12 << 20, K64)],
                7,
            )?;
            std::fs::write(v.join("then-this"), b"still in line")?;
            // Cut inside the second segment, so its read comes back short.
            let engine = BeforeFirstRead {
                inner,
                act: Some(Box::new(move || {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len((4 << 20) + 1000)
                })),
            };
            let (report, tar) = reader(&v, Box::new(engine))
                .run(Vec::new())
                .map_err(io::Error::other)?;
            assert_eq!(report.changed, vec!["shrinks".to_owned()], "{name}");
            let got = entries(&tar)?;
            // The header's promise is kept: every segment, zeros for what was gone.
            let map = got[0].1.clone().expect("still sparse");
            assert_eq!(map.len(), 4, "{name}");
            let mut want = vec![7u8; K64 as usize + 1000];
            want.resize(3 * K64 as usize, 0);
            assert!(got[0].2 == want, "{name}: stored data");
            assert_eq!(got[1].0.path, b"then-this", "{name}");
            assert_eq!(got[1].2, b"still in line", "{name}");
            // And GNU tar, the reference reader, agrees.
            let out = dir.path().join(format!("{name}-out"));
            std::fs::create_dir(&out)?;
            let mut tar_cmd = std::process::Command::new("tar")
                .arg("-x")
                .arg("-C")
                .arg(&out)
                .stdin(std::process::Stdio::piped())
                .spawn()?;
            tar_cmd.stdin.take().expect("stdin").write_all(&tar)?;
            assert!(tar_cmd.wait()?.success(), "{name}");
            assert_eq!(
                std::fs::metadata(out.join("shrinks"))?.len(),
                16 << 20,
                "{name}"
            );
            assert_eq!(
                std::fs::read(out.join("then-this"))?,
                b"still in line",
                "{name}"
            );
        }
        Ok(())
    }

    #[test]
    fn the_extractor_recreates_holes_and_refuses_bad_maps() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let src = dir.path().join("src");
        std::fs::create_dir(&src)?;
        holey(&src.join("s"), 32 << 20, &[(8 << 20, K64)], 9)?;
        let (_, tar) = reader(&src, Box::new(PreadEngine::default()))
            .run(Vec::new())
            .map_err(io::Error::other)?;
        let target = dir.path().join("target");
        let report =
            extract(&tar[..], &target, &ExtractOptions::default()).map_err(io::Error::other)?;
        assert_eq!((report.files, report.bytes), (1, 32 << 20));
        let restored = target.join("s");
        assert!(std::fs::read(&restored)? == std::fs::read(src.join("s"))?);
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&restored)?) * 512 < 1 << 20,
            "restored dense"
        );
        // A block image must not arrive sparse: a device has no holes to restore.
        std::fs::rename(src.join("s"), src.join(BLOCK_FILE))?;
        let (_, image) = reader(&src, Box::new(PreadEngine::default()))
            .run(Vec::new())
            .map_err(io::Error::other)?;
        let device = dir.path().join("device.img");
        std::fs::write(&device, b"untouched")?;
        let err = extract_block(&image[..], &device);
        assert!(matches!(err, Err(StreamError::Unsafe { .. })), "{err:?}");
        assert_eq!(std::fs::read(&device)?, b"untouched");
        // A map that overruns the file is refused before anything is written.
        let mut bad = tar.clone();
        // "2" segments, 64 KiB at 8 MiB and the empty one at 32 MiB, which becomes 92 MiB.
        let map = b"2\n8388608\n65536\n33554432\n0\n";
        let at = bad
            .windows(map.len())
            .position(|w| w == map)
            .expect("the map");
        bad[at + 16] = b'9';
        let err = extract(&bad[..], &dir.path().join("t2"), &ExtractOptions::default());
        assert!(matches!(err, Err(StreamError::Decode(_))), "{err:?}");
        assert!(!dir.path().join("t2/s").exists());
        Ok(())
    }
}
