//! The io_uring read engine: positional reads submitted to a ring owned by the reader thread.
//! This is the only module allowed `unsafe`: a read submitted to the kernel writes into our
//! buffer until its completion arrives, which the borrow checker cannot see, so each read
//! here waits for its own completion before the buffer is touched or returned.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use io_uring::{IoUring, opcode, types};

use crate::stream::ReadEngine;

/// Entries in the ring. One read is in flight at a time, so a small ring is enough.
const RING_ENTRIES: u32 = 4;

pub struct UringEngine {
    ring: IoUring,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine").finish_non_exhaustive()
    }
}

impl UringEngine {
    /// Sets up a ring and proves it works with a no-op round trip: container runtimes that
    /// forbid io_uring (seccomp) fail either the setup or the first submission.
    pub fn probe() -> io::Result<UringEngine> {
        let mut ring = IoUring::new(RING_ENTRIES)?;
        let nop = opcode::Nop::new().build().user_data(0);
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
        Ok(UringEngine { ring })
    }
}

impl ReadEngine for UringEngine {
    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn read_at(&mut self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        let read = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), len)
            .offset(offset)
            .build()
            .user_data(1);
        // SAFETY: `buf` and `file` outlive the operation: we wait below for this very
        // completion before returning, and nothing else is in flight on this ring.
        unsafe {
            self.ring
                .submission()
                .push(&read)
                .map_err(|_| io::Error::other("the io_uring submission queue is full"))?;
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // The read may still be in flight; wait it out before `buf` is released.
                    let _ = self.ring.submit_and_wait(1);
                    return Err(e);
                }
            }
        }
        let cqe = self
            .ring
            .completion()
            .next()
            .ok_or_else(|| io::Error::other("io_uring returned no completion"))?;
        match cqe.result() {
            n if n < 0 => Err(io::Error::from_raw_os_error(-n)),
            n => Ok(n as usize),
        }
    }
}

/// The best engine this process may use: io_uring when allowed (and not turned off), else
/// ordinary reads. Says which, and why, so the log and metrics can show it.
pub fn choose(allow_uring: bool) -> (Box<dyn ReadEngine>, Option<String>) {
    if !allow_uring {
        return (
            Box::new(crate::stream::PreadEngine),
            Some("io_uring turned off".into()),
        );
    }
    match UringEngine::probe() {
        Ok(engine) => (Box::new(engine), None),
        Err(e) => (
            Box::new(crate::stream::PreadEngine),
            Some(format!("io_uring unavailable ({e}); using ordinary reads")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_through_the_ring_match_ordinary_reads() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data)?;
        let file = File::open(&path)?;
        let Ok(mut engine) = UringEngine::probe() else {
            // The fallback path is what runs where io_uring is forbidden; prove it works.
            let (mut fallback, why) = choose(true);
            assert!(why.is_some());
            let mut buf = vec![0u8; 1000];
            assert_eq!(fallback.read_at(&file, &mut buf, 100)?, 1000);
            assert_eq!(&buf[..], &data[100..1100]);
            return Ok(());
        };
        let mut buf = vec![0u8; 65536];
        let mut out = Vec::new();
        let mut offset = 0u64;
        loop {
            let n = engine.read_at(&file, &mut buf, offset)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            offset += n as u64;
        }
        assert_eq!(out, data);
        let missing = engine.read_at(&File::open("/dev/null")?, &mut buf, 0)?;
        assert_eq!(missing, 0);
        Ok(())
    }

    #[test]
    fn turning_io_uring_off_uses_ordinary_reads() {
        let (engine, why) = choose(false);
        assert_eq!(engine.name(), "pread");
        assert!(why.is_some());
    }
}
