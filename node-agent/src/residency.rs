//! Which pages of a file the page cache holds, so a backup leaves the cache as it found it:
//! what a workload kept hot stays hot, and what the backup brought in leaves again.
//!
//! The reader notes, a little ahead of its reads, which pages are resident (`mincore` on a
//! mapping of the range that is never touched) and, as its reads pass them, drops only the
//! pages that were not. This module and `uring` are the only ones allowed `unsafe`: the
//! mapping exists only for the `mincore` call and its memory is never read, so a file that
//! shrinks under it cannot fault the agent.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::AsRawFd;

/// The page size the kernel counts residency in.
pub fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// Turns off the agent's own readahead for this open file (it concerns no other opener): the
/// agent reads ahead itself, several reads in flight, so the kernel's would only double it.
pub fn no_readahead(file: &File) {
    // Advice only: where it is ignored, the kernel reads ahead, and the keeper's notes ahead
    // of each read still catch what it brings in.
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::Random);
}

/// Whether each page of `len` bytes at `offset` (rounded out to whole pages) is in the page
/// cache, or `None` when the file cannot be mapped (some filesystems cannot) or the range is
/// empty.
pub fn resident_pages(file: &File, offset: u64, len: u64) -> Option<Vec<bool>> {
    let page = page_size();
    let start = offset / page * page;
    let end = offset.checked_add(len)?.div_ceil(page) * page;
    let map_len = usize::try_from(end.checked_sub(start)?).ok()?;
    if map_len == 0 {
        return None;
    }
    let file_offset = libc::off_t::try_from(start).ok()?;
    // SAFETY: a fresh shared, read-only mapping chosen by the kernel (no address hint, so no
    // existing mapping is replaced). It is only passed to `mincore`, which looks the pages
    // up without touching them, and unmapped before returning; no reference to its memory
    // is ever made, so truncation of the file cannot raise SIGBUS here.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            file_offset,
        );
        if addr == libc::MAP_FAILED {
            return None;
        }
        let mut vec = vec![0u8; map_len.div_ceil(page as usize)];
        let rc = libc::mincore(addr, map_len, vec.as_mut_ptr());
        libc::munmap(addr, map_len);
        (rc == 0).then(|| vec.iter().map(|v| v & 1 == 1).collect())
    }
}

/// How far ahead of each read the residency of the file is noted: farther than the kernel's
/// readahead reaches (`read_ahead_kb`, 128 KiB by default, a few MiB at most), so a page
/// that readahead brings in ahead of the agent's reads is noted as not cached before it is.
pub const LOOKAHEAD: u64 = 64 << 20;

/// One file's page-cache residency as it was before the agent read it, noted a little ahead
/// of the reads, and the drop of what the reads brought in as they pass.
///
/// Readahead cannot be turned off entirely: `POSIX_FADV_RANDOM` stops the agent's own reads
/// from reading ahead, but a page a workload's readahead marked still starts the kernel's
/// asynchronous readahead when the agent reads it. Those pages are caught by noting ahead.
/// A page a workload brings in between its note and the agent's pass is dropped with the
/// agent's; the window is what the agent reads in well under a second.
#[derive(Debug)]
pub struct CacheKeeper {
    page: u64,
    size: u64,
    /// Index of the first page in `resident`.
    base: u64,
    /// Whether each noted page was cached when noted; unknown (a file that cannot be mapped)
    /// counts as not, so it is dropped, as a reader that must not fill the cache would.
    resident: std::collections::VecDeque<bool>,
}

impl CacheKeeper {
    /// For a file of `size` bytes (as far as its reads will go).
    pub fn new(size: u64) -> CacheKeeper {
        CacheKeeper {
            page: page_size(),
            size,
            base: 0,
            resident: Default::default(),
        }
    }

    /// Before a read of `len` bytes at `offset` is issued: notes the residency of every page
    /// from the read to [`LOOKAHEAD`] beyond it not noted yet. Pages already noted keep what
    /// was noted first (the rest of a short read is read again).
    pub fn before_read(&mut self, file: &File, offset: u64, len: u64) {
        let page = self.page;
        let first = offset / page;
        let ahead = offset.saturating_add(LOOKAHEAD).min(self.size);
        let target = offset.saturating_add(len).max(ahead).div_ceil(page);
        if first > self.noted_to() {
            // A jump past everything noted (a long hole): what lies between was never near
            // a read.
            self.passed(file, first);
            self.base = first;
        }
        let from = self.noted_to();
        if target > from {
            let n = (target - from) as usize;
            match resident_pages(file, from * page, (target - from) * page) {
                Some(pages) if pages.len() == n => self.resident.extend(pages),
                _ => self.resident.extend(std::iter::repeat_n(false, n)),
            }
        }
    }

    /// After the `len` bytes at `offset` were delivered: drops what the reads have passed
    /// (holes between them included) that was not cached when noted.
    pub fn delivered(&mut self, file: &File, offset: u64, len: u64) {
        let end = offset.saturating_add(len).div_ceil(self.page);
        self.passed(file, end);
    }

    /// After the file's last read: drops whatever was noted and not cached (what readahead
    /// brought in past the last read, into a trailing hole).
    pub fn finish(&mut self, file: &File) {
        self.passed(file, u64::MAX);
    }

    fn noted_to(&self) -> u64 {
        self.base + self.resident.len() as u64
    }

    /// Settles every noted page before page `end`, merging the drops into runs so that a
    /// cold range costs one call.
    fn passed(&mut self, file: &File, end: u64) {
        let page = self.page;
        let drop_run = |from: u64, to: u64| {
            let _ = rustix::fs::fadvise(
                file,
                from * page,
                std::num::NonZeroU64::new((to - from) * page),
                rustix::fs::Advice::DontNeed,
            );
        };
        let mut run: Option<u64> = None;
        while self.base < end {
            let Some(was) = self.resident.pop_front() else {
                break;
            };
            let p = self.base;
            self.base += 1;
            if was {
                if let Some(from) = run.take() {
                    drop_run(from, p);
                }
            } else {
                run.get_or_insert(p);
            }
        }
        if let Some(from) = run {
            drop_run(from, self.base);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn an_empty_range_is_none_and_fresh_writes_are_resident() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 3 * page_size() as usize])?;
        let f = File::open(&path)?;
        assert_eq!(resident_pages(&f, 0, 0), None);
        // Written just now: every page is cached.
        assert_eq!(resident_pages(&f, 1, 2 * page_size()), Some(vec![true; 3]));
        Ok(())
    }
}
