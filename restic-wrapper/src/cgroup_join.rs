//! Moving restic into cgroups before it runs a single instruction of its own.
//!
//! A caller that wants restic's reads and page cache accounted apart from its own (the node
//! agent charges them to its IO budget and drops the page cache they brought in) must have
//! restic in the cgroup from its first read. Moving it after `spawn` returns races with
//! restic's start; so the child moves itself, between `fork` and `exec`, by writing `0` (the
//! writing process) to each `cgroup.procs` file the caller opened. This module is the crate's
//! only `unsafe`: std offers that hook only as `pre_exec`.
#![allow(unsafe_code)]

use std::os::fd::OwnedFd;
use std::sync::Arc;

/// Makes the child of `cmd` join the cgroups whose `cgroup.procs` files `procs` are (opened
/// for writing) before it executes anything. A write that fails fails the spawn: restic
/// outside its cgroup would read unpaced.
pub(crate) fn before_exec(cmd: &mut tokio::process::Command, procs: Vec<Arc<OwnedFd>>) {
    if procs.is_empty() {
        return;
    }
    let hook = move || -> std::io::Result<()> {
        for fd in &procs {
            // write(2) is async-signal-safe, and nothing here allocates: the only kind of
            // code allowed in a child forked from a threaded process.
            rustix::io::write(fd, b"0")?;
        }
        Ok(())
    };
    // SAFETY: the hook only calls write(2) on descriptors opened before the fork and returns
    // its error; it neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}
