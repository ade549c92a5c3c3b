//! The io_uring read engine: positional reads submitted to a ring owned by the reader thread,
//! a few of them in flight at once. This module and `residency` are the only ones allowed
//! `unsafe`: a read submitted to the kernel writes into its buffer until its completion
//! arrives, which the borrow checker cannot see. So the engine owns its buffers, marks each one in flight from
//! submission until its completion is reaped, and never reads, reuses or frees a buffer in
//! that state: not on errors, not when the caller's callback fails or panics, not on drop.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;

use io_uring::{IoUring, opcode, types};

use crate::stream::{CHUNK, RangeError, ReadEngine};

/// Reads of one file in flight at once. Memory: `DEPTH * CHUNK` = 4 MiB of buffers per
/// engine, and there is one engine per reader thread, so one per running stream backup.
pub const DEPTH: usize = 4;
/// `user_data` of the probe's no-op, which is no buffer's index.
const PROBE: u64 = u64::MAX;
/// How often a read the kernel asks to retry (EINTR, EAGAIN) is resubmitted before failing.
const RETRIES: u32 = 16;

/// A heap buffer held only by its raw pointer. The kernel writes into it while a read is in
/// flight; a `Box` or `Vec` would claim unique access each time it is moved or borrowed.
struct RawBuf {
    ptr: NonNull<[u8]>,
}

// SAFETY: the buffer is a uniquely owned heap allocation, like a `Box<[u8]>`; the raw pointer
// is not shared with another thread of ours (only with the kernel, under the in-flight rule).
unsafe impl Send for RawBuf {}

impl RawBuf {
    fn new(len: usize) -> RawBuf {
        RawBuf {
            ptr: NonNull::from(Box::leak(vec![0u8; len].into_boxed_slice())),
        }
    }

    fn as_mut_ptr(&self) -> *mut u8 {
        self.ptr.cast::<u8>().as_ptr()
    }

    fn len(&self) -> usize {
        self.ptr.len()
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from a leaked `Box<[u8]>` in `new`, and this is the only place
        // it is freed. The engine never drops a buffer that may still be in flight: it
        // leaks it instead.
        unsafe { drop(Box::from_raw(self.ptr.as_ptr())) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Idle,
    /// Submitted; the kernel owns the buffer until the completion is reaped.
    InFlight,
    /// Completed with this result (bytes read, or a negated errno).
    Done(i32),
}

/// One buffer and the read it is used for: `len` bytes of the file at `offset`.
struct Slot {
    buf: RawBuf,
    state: State,
    offset: u64,
    len: usize,
    retries: u32,
}

pub struct UringEngine {
    ring: IoUring,
    slots: Vec<Slot>,
    chunk: usize,
    /// Reads submitted whose completion has not been reaped yet.
    in_flight: usize,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine")
            .field("depth", &self.slots.len())
            .field("chunk", &self.chunk)
            .finish_non_exhaustive()
    }
}

impl UringEngine {
    /// Sets up a ring with [`DEPTH`] reads of [`CHUNK`] bytes in flight, and proves it works
    /// with a no-op round trip: container runtimes that forbid io_uring (seccomp) fail either
    /// the setup or the first submission.
    pub fn probe() -> io::Result<UringEngine> {
        UringEngine::with_depth(DEPTH, CHUNK)
    }

    /// As [`UringEngine::probe`], with `depth` reads of at most `chunk` bytes in flight (at
    /// most `depth * chunk` bytes of buffers).
    pub fn with_depth(depth: usize, chunk: usize) -> io::Result<UringEngine> {
        if depth == 0 || chunk == 0 || u32::try_from(chunk).is_err() || depth > 1024 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an io_uring engine needs 1 to 1024 reads in flight of 1 byte to 4 GiB",
            ));
        }
        // The ring never holds more than `depth` submissions, and its completion queue is
        // twice that, so neither can overflow.
        let mut ring = IoUring::new(depth.next_power_of_two() as u32)?;
        let nop = opcode::Nop::new().build().user_data(PROBE);
        // SAFETY: a no-op references no memory.
        unsafe {
            ring.submission()
                .push(&nop)
                .map_err(|_| io::Error::other("the io_uring submission queue is full"))?;
        }
        ring.submit_and_wait(1)?;
        let cqe = ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("io_uring returned no completion"))?;
        if cqe.result() < 0 {
            return Err(io::Error::from_raw_os_error(-cqe.result()));
        }
        let slots = (0..depth)
            .map(|_| Slot {
                buf: RawBuf::new(chunk),
                state: State::Idle,
                offset: 0,
                len: 0,
                retries: 0,
            })
            .collect();
        Ok(UringEngine {
            ring,
            slots,
            chunk,
            in_flight: 0,
        })
    }

    /// Submits a read of the slot's `len` bytes at its `offset` into its buffer.
    fn submit(&mut self, fd: RawFd, index: usize) -> io::Result<()> {
        let slot = &mut self.slots[index];
        debug_assert!(slot.state != State::InFlight && slot.len <= slot.buf.len());
        let len = slot.len.min(slot.buf.len()) as u32;
        let read = opcode::Read::new(types::Fd(fd), slot.buf.as_mut_ptr(), len)
            .offset(slot.offset)
            .build()
            .user_data(index as u64);
        // SAFETY: the buffer is `len` or more bytes, owned by this engine, and from here on
        // marked in flight: nothing reads, reuses or frees it until this read's completion
        // is reaped (`drain` waits for it; `Drop` waits or leaks the buffers). The fd is the
        // caller's open file, borrowed for the whole `read_range` call, which drains every
        // read before it returns; should the drain itself fail, a late read can still only
        // write into this buffer, which stays reserved.
        unsafe {
            self.ring
                .submission()
                .push(&read)
                .map_err(|_| io::Error::other("the io_uring submission queue is full"))?;
        }
        slot.state = State::InFlight;
        self.in_flight += 1;
        // Submitted now, so the kernel takes its own reference to the file at once.
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for at least one completion and records every completion there is.
    fn wait(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        for cqe in self.ring.completion() {
            let Some(slot) = usize::try_from(cqe.user_data())
                .ok()
                .and_then(|i| self.slots.get_mut(i))
            else {
                continue;
            };
            if slot.state == State::InFlight {
                slot.state = State::Done(cqe.result());
                self.in_flight -= 1;
            }
        }
        Ok(())
    }

    /// Waits until no read is in flight and frees every slot, discarding their results.
    fn drain(&mut self) -> io::Result<()> {
        while self.in_flight > 0 {
            self.wait()?;
        }
        for slot in &mut self.slots {
            slot.state = State::Idle;
        }
        Ok(())
    }

    /// Keeps up to `DEPTH` reads of the range in flight and delivers them in order.
    fn pipeline(
        &mut self,
        fd: RawFd,
        offset: u64,
        len: u64,
        before_read: &mut dyn FnMut(u64, u64),
        deliver: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<u64, RangeError> {
        let end = offset.checked_add(len).ok_or_else(|| {
            RangeError::Read(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read range past the largest offset",
            ))
        })?;
        let mut next = offset;
        let mut delivered = 0u64;
        // Slots in file order; the front is the next piece to deliver.
        let mut order: VecDeque<usize> = VecDeque::with_capacity(self.slots.len());
        loop {
            while next < end && order.len() < self.slots.len() {
                let Some(index) = self.slots.iter().position(|s| s.state == State::Idle) else {
                    break;
                };
                let want = (end - next).min(self.chunk as u64);
                before_read(next, want);
                let slot = &mut self.slots[index];
                slot.offset = next;
                slot.len = want as usize;
                slot.retries = 0;
                self.submit(fd, index).map_err(RangeError::Read)?;
                order.push_back(index);
                next += want;
            }
            let Some(&head) = order.front() else {
                return Ok(delivered);
            };
            let result = loop {
                if let State::Done(result) = self.slots[head].state {
                    break result;
                }
                self.wait().map_err(RangeError::Read)?;
            };
            if result < 0 {
                let error = io::Error::from_raw_os_error(-result);
                let slot = &mut self.slots[head];
                let transient = matches!(
                    error.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                );
                if transient && slot.retries < RETRIES {
                    slot.retries += 1;
                    self.submit(fd, head).map_err(RangeError::Read)?;
                    continue;
                }
                return Err(RangeError::Read(error));
            }
            let slot = &self.slots[head];
            let n = (result as usize).min(slot.len);
            if n == 0 {
                // The file ends before the range does; what is still in flight is drained
                // by the caller.
                return Ok(delivered);
            }
            // SAFETY: this slot's read completed and was reaped (state `Done`), so the kernel
            // no longer writes to its buffer; the first `n` bytes, `n <= len <= buf.len`, are
            // what it read, and no mutable access to the buffer exists while `data` lives.
            let data = unsafe { std::slice::from_raw_parts(slot.buf.as_mut_ptr(), n) };
            deliver(slot.offset, data).map_err(RangeError::Deliver)?;
            delivered += n as u64;
            let slot = &mut self.slots[head];
            if n < slot.len {
                // A short read: the rest of this piece is read again before anything after
                // it is delivered.
                slot.offset += n as u64;
                slot.len -= n;
                slot.retries = 0;
                before_read(slot.offset, slot.len as u64);
                self.submit(fd, head).map_err(RangeError::Read)?;
            } else {
                slot.state = State::Idle;
                order.pop_front();
            }
        }
    }
}

impl ReadEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn read_range(
        &mut self,
        file: &File,
        offset: u64,
        len: u64,
        before_read: &mut dyn FnMut(u64, u64),
        deliver: &mut dyn FnMut(u64, &[u8]) -> io::Result<()>,
    ) -> Result<u64, RangeError> {
        // Reads left over by a call that unwound (a panicking callback) end first.
        self.drain().map_err(RangeError::Read)?;
        let outcome = self.pipeline(file.as_raw_fd(), offset, len, before_read, deliver);
        // However the pipeline stopped, no read outlives the caller's borrow of the file.
        match (outcome, self.drain()) {
            (Ok(_), Err(e)) => Err(RangeError::Read(e)),
            (outcome, _) => outcome,
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        if self.drain().is_err() {
            // The kernel may still write into them: leak the buffers rather than free
            // memory it owns.
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

/// The best engine this process may use: io_uring when allowed (and not turned off), else
/// ordinary reads. Says which, and why, so the log and metrics can show it.
pub fn choose(allow_uring: bool) -> (Box<dyn ReadEngine>, Option<String>) {
    if !allow_uring {
        return (
            Box::new(crate::stream::PreadEngine::default()),
            Some("io_uring turned off".into()),
        );
    }
    match UringEngine::probe() {
        Ok(engine) => (Box::new(engine), None),
        Err(e) => (
            Box::new(crate::stream::PreadEngine::default()),
            Some(format!("io_uring unavailable ({e}); using ordinary reads")),
        ),
    }
}

/// For tests: the io_uring engine `make` builds. CI has io_uring, so its absence fails the
/// test (a test that passes with "nothing to test" cannot fail). On a machine without it,
/// skip the io_uring cases deliberately with `STASH_SKIP_IO_URING=1`: they are then left out,
/// saying so, and the ordinary-read cases still run.
#[cfg(test)]
#[allow(clippy::panic)]
pub(crate) fn required_for_tests(
    make: impl FnOnce() -> io::Result<UringEngine>,
) -> Option<UringEngine> {
    match make() {
        Ok(engine) => Some(engine),
        Err(e) if std::env::var_os("STASH_SKIP_IO_URING").is_some_and(|v| v == "1") => {
            eprintln!("io_uring unavailable ({e}); skipped as STASH_SKIP_IO_URING=1 asks");
            None
        }
        Err(e) => panic!(
            "io_uring is unavailable here ({e}); set STASH_SKIP_IO_URING=1 to skip the \
             io_uring cases deliberately on a machine without it"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::PreadEngine;

    /// Every engine this machine can run: the fallback always, io_uring when allowed, at
    /// production geometry and with small chunks so that a file spans many reads.
    fn engines() -> Vec<(String, Box<dyn ReadEngine>, u64)> {
        let mut out: Vec<(String, Box<dyn ReadEngine>, u64)> = vec![(
            "pread".into(),
            Box::new(PreadEngine::default()),
            CHUNK as u64,
        )];
        if let Some(engine) = required_for_tests(UringEngine::probe) {
            out.push(("io_uring".into(), Box::new(engine), CHUNK as u64));
            for (depth, chunk) in [(2, 4096), (DEPTH, 4096), (3, 1000)] {
                let engine = UringEngine::with_depth(depth, chunk).expect("a second ring");
                out.push((
                    format!("io_uring {depth}x{chunk}"),
                    Box::new(engine),
                    chunk as u64,
                ));
            }
        }
        out
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len as u64).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// What one `read_range` call did.
    #[derive(Debug, Default)]
    struct Seen {
        data: Vec<u8>,
        reads: Vec<u64>,
        returned: u64,
    }

    /// Reads `len` bytes from `offset`, checking that pieces arrive in order, each no larger
    /// than a chunk, and that every piece was paid for before it was read.
    fn read(
        engine: &mut dyn ReadEngine,
        file: &File,
        offset: u64,
        len: u64,
        chunk: u64,
        mut hook: impl FnMut(usize),
    ) -> Result<Seen, RangeError> {
        let mut seen = Seen::default();
        let mut next = offset;
        let reads = std::cell::RefCell::new(Vec::new());
        let announced = std::cell::RefCell::new(Vec::new());
        let mut before_read = |at: u64, want: u64| {
            assert!(want > 0 && want <= chunk, "a read of {want} bytes");
            assert!(
                at >= offset && at + want <= offset + len,
                "a read at {at} outside the range"
            );
            reads.borrow_mut().push(want);
            announced.borrow_mut().push((at, want));
            hook(reads.borrow().len());
        };
        let mut deliver = |at: u64, data: &[u8]| -> io::Result<()> {
            assert_eq!(at, next, "pieces arrive in file order");
            assert!(!data.is_empty() && data.len() as u64 <= chunk);
            let paid: u64 = reads.borrow().iter().sum();
            assert!(
                at + data.len() as u64 - offset <= paid,
                "read before it was paid for"
            );
            let end = at + data.len() as u64;
            assert!(
                announced
                    .borrow()
                    .iter()
                    .any(|(a, w)| *a <= at && end <= a + w),
                "a piece at {at} that no announced read covers"
            );
            next += data.len() as u64;
            seen.data.extend_from_slice(data);
            Ok(())
        };
        seen.returned = engine.read_range(file, offset, len, &mut before_read, &mut deliver)?;
        seen.reads = reads.into_inner();
        Ok(seen)
    }

    #[test]
    fn every_engine_reads_files_of_every_size() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        for (name, mut engine, chunk) in engines() {
            let c = chunk as usize;
            for size in [0, 1, c, c + 1, 5 * c + 123] {
                let path = dir.path().join(format!("f{size}"));
                let data = pattern(size);
                std::fs::write(&path, &data)?;
                let file = File::open(&path)?;
                let seen = read(engine.as_mut(), &file, 0, size as u64, chunk, |_| {})
                    .map_err(|e| io::Error::other(format!("{name}: {e:?}")))?;
                assert!(seen.data == data, "{name}: {size} bytes differ");
                assert_eq!(seen.returned, size as u64, "{name}");
                // The budget is charged once per read, for exactly what is read.
                assert_eq!(seen.reads.iter().sum::<u64>(), size as u64, "{name}");
                assert_eq!(seen.reads.len(), size.div_ceil(c), "{name}");
                // A range in the middle, across chunk boundaries.
                if size > c {
                    let (from, len) = (c as u64 / 2, 2 * chunk);
                    let seen = read(engine.as_mut(), &file, from, len, chunk, |_| {})
                        .map_err(|e| io::Error::other(format!("{name}: {e:?}")))?;
                    let want = &data[from as usize..(from + len).min(size as u64) as usize];
                    assert!(
                        seen.data == want,
                        "{name}: a middle range of {size} differs"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_file_shorter_than_the_range_ends_the_read_early() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        for (name, mut engine, chunk) in engines() {
            let size = 3 * chunk as usize + 17;
            let path = dir.path().join("short");
            let data = pattern(size);
            std::fs::write(&path, &data)?;
            let file = File::open(&path)?;
            let seen = read(engine.as_mut(), &file, 0, 8 * chunk, chunk, |_| {})
                .map_err(|e| io::Error::other(format!("{name}: {e:?}")))?;
            assert_eq!(seen.returned, size as u64, "{name}");
            assert!(seen.data == data, "{name}");
            let past = read(engine.as_mut(), &file, 10 * chunk, chunk, chunk, |_| {})
                .map_err(|e| io::Error::other(format!("{name}: {e:?}")))?;
            assert_eq!(past.returned, 0, "{name}");
        }
        Ok(())
    }

    #[test]
    fn a_file_shrinking_during_the_read_yields_a_prefix_of_it() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        for (name, mut engine, chunk) in engines() {
            let size = 12 * chunk as usize;
            let path = dir.path().join("shrinking");
            let data = pattern(size);
            std::fs::write(&path, &data)?;
            let file = File::open(&path)?;
            // Cut mid-chunk as the sixth read is paid for: reads issued later find the new
            // end, one of them short; reads already in flight may still see the old data.
            let cut = 4 * chunk + chunk / 3;
            let writer = std::fs::OpenOptions::new().write(true).open(&path)?;
            let seen = read(engine.as_mut(), &file, 0, size as u64, chunk, |n| {
                if n == 6 {
                    writer.set_len(cut).expect("truncate");
                }
            })
            .map_err(|e| io::Error::other(format!("{name}: {e:?}")))?;
            assert_eq!(seen.returned, seen.data.len() as u64, "{name}");
            assert!(seen.returned >= cut, "{name}: {} < {cut}", seen.returned);
            assert!(
                seen.returned < size as u64,
                "{name}: the shrink went unseen"
            );
            assert!(
                seen.data[..] == data[..seen.data.len()],
                "{name}: not a prefix"
            );
            // The engine is ready for the next file.
            std::fs::write(&path, &data)?;
            let again = read(
                engine.as_mut(),
                &File::open(&path)?,
                0,
                size as u64,
                chunk,
                |_| {},
            )
            .map_err(|e| io::Error::other(format!("{name}: {e:?}")))?;
            assert!(again.data == data, "{name}: after a shrink");
        }
        Ok(())
    }

    #[test]
    fn read_errors_and_refused_deliveries_stop_the_read_and_leave_the_engine_usable()
    -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let data = pattern(5 << 20);
        std::fs::write(&path, &data)?;
        let file = File::open(&path)?;
        for (name, mut engine, chunk) in engines() {
            // Every read of a directory fails (EISDIR), in flight or not.
            let err = read(
                engine.as_mut(),
                &File::open(dir.path())?,
                0,
                4 * chunk,
                chunk,
                |_| {},
            );
            assert!(
                matches!(&err, Err(RangeError::Read(e)) if e.raw_os_error() == Some(21)),
                "{name}: {err:?}"
            );
            let mut pieces = 0;
            let err =
                engine.read_range(&file, 0, data.len() as u64, &mut |_, _| {}, &mut |_, _| {
                    pieces += 1;
                    if pieces == 2 {
                        Err(io::Error::other("the stream is gone"))
                    } else {
                        Ok(())
                    }
                });
            assert!(
                matches!(err, Err(RangeError::Deliver(_))),
                "{name}: {err:?}"
            );
            assert_eq!(pieces, 2, "{name}: nothing is delivered after a refusal");
            let seen = read(engine.as_mut(), &file, 0, data.len() as u64, chunk, |_| {})
                .map_err(|e| io::Error::other(format!("{name}: {e:?}")))?;
            assert!(seen.data == data, "{name}: after errors");
        }
        Ok(())
    }

    #[test]
    fn a_panicking_consumer_leaves_no_read_in_flight() -> io::Result<()> {
        let Some(mut engine) = required_for_tests(|| UringEngine::with_depth(DEPTH, 4096)) else {
            return Ok(());
        };
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let data = pattern(100_000);
        std::fs::write(&path, &data)?;
        let file = File::open(&path)?;
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine.read_range(&file, 0, data.len() as u64, &mut |_, _| {}, &mut |_, _| {
                panic!("the consumer failed")
            })
        }));
        assert!(unwound.is_err());
        // The unwinding call left its slots taken (in flight or not yet delivered); the next
        // call reaps and frees them before it reuses a buffer.
        assert!(engine.slots.iter().all(|s| s.state != State::Idle));
        let seen = read(&mut engine, &file, 0, data.len() as u64, 4096, |_| {})
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        assert!(seen.data == data);
        assert_eq!(engine.in_flight, 0);
        assert!(engine.slots.iter().all(|s| s.state == State::Idle));
        Ok(())
    }

    #[test]
    fn io_uring_missing_fails_a_test_unless_skipped_deliberately() {
        let missing = || Err(io::Error::from(io::ErrorKind::Unsupported));
        let outcome = std::panic::catch_unwind(|| required_for_tests(missing).is_none());
        if std::env::var_os("STASH_SKIP_IO_URING").is_some_and(|v| v == "1") {
            assert!(matches!(outcome, Ok(true)));
        } else {
            assert!(outcome.is_err(), "a missing io_uring passed silently");
        }
    }

    #[test]
    fn turning_io_uring_off_uses_ordinary_reads() {
        let (engine, why) = choose(false);
        assert_eq!(engine.name(), "pread");
        assert!(why.is_some());
    }
}
