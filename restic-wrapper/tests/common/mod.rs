//! Test support: the real restic binary from `make setup`, temporary repositories, and the
//! shared Garage S3 server (stash-test-support) seen as restic-wrapper backends.
// Test support panics on failure, as tests do.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use restic_wrapper::{Backend, Repository, Restic, Secrets};

pub const PASSWORD: &str = "correct horse battery staple";

pub fn restic_bin() -> PathBuf {
    stash_test_support::tool("restic").unwrap()
}

/// A client for a local repository inside `dir` (not yet initialized).
pub fn local(dir: &Path, password: &str) -> Restic {
    let repo = Repository::new(
        Backend::Local {
            path: dir.join("repo"),
        },
        Secrets::new().with("RESTIC_PASSWORD", password),
        dir,
    )
    .expect("repository");
    Restic::new(repo)
        .with_program(restic_bin())
        .with_tmp_dir(dir)
        .with_grace(Duration::from_secs(10))
}

/// A directory with a few files, a subdirectory and a symlink.
pub fn sample_tree(root: &Path) -> PathBuf {
    let data = root.join("data");
    std::fs::create_dir_all(data.join("sub")).unwrap();
    std::fs::write(data.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(data.join("sub/b.bin"), pseudo_random(300_000, 7)).unwrap();
    std::fs::write(data.join("skip.tmp"), b"excluded").unwrap();
    std::os::unix::fs::symlink("a.txt", data.join("link")).unwrap();
    data
}

pub use stash_test_support::{Garage, pseudo_random};

/// A Garage S3 server on loopback.
pub fn garage() -> Garage {
    Garage::start(std::net::Ipv4Addr::LOCALHOST.into()).unwrap()
}

pub fn free_port() -> u16 {
    stash_test_support::free_port(std::net::Ipv4Addr::LOCALHOST.into()).unwrap()
}

/// The restic-wrapper view of a Garage bucket.
pub trait GarageExt {
    fn backend(&self, prefix: &str) -> Backend;
    fn secrets(&self) -> Secrets;
}

impl GarageExt for Garage {
    fn backend(&self, prefix: &str) -> Backend {
        Backend::S3 {
            endpoint: self.endpoint.clone(),
            bucket: self.bucket.clone(),
            prefix: prefix.into(),
            region: Some(self.region.clone()),
            insecure_tls: false,
        }
    }

    fn secrets(&self) -> Secrets {
        Secrets::new()
            .with("RESTIC_PASSWORD", PASSWORD)
            .with("AWS_ACCESS_KEY_ID", self.key_id.clone())
            .with("AWS_SECRET_ACCESS_KEY", self.secret.clone())
    }
}

/// Records every restic process a client starts and how each ended.
#[derive(Debug, Default)]
pub struct Spawns(std::sync::Mutex<Vec<(restic_wrapper::SpawnedProcess, Option<ExitStatus>)>>);

impl Spawns {
    /// The pids of the processes started for an action, in order.
    pub fn pids(&self, action: &str) -> Vec<u32> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p.action == action)
            .map(|(p, _)| p.pid)
            .collect()
    }

    /// How a process ended, once it was reaped.
    pub fn exit(&self, pid: u32) -> Option<ExitStatus> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| p.pid == pid)
            .and_then(|(_, s)| *s)
    }

    pub fn all(&self) -> Vec<(restic_wrapper::SpawnedProcess, Option<ExitStatus>)> {
        self.0.lock().unwrap().clone()
    }
}

impl restic_wrapper::SpawnObserver for Spawns {
    fn started(&self, process: &restic_wrapper::SpawnedProcess) {
        self.0.lock().unwrap().push((process.clone(), None));
    }

    fn exited(&self, process: &restic_wrapper::SpawnedProcess, status: ExitStatus) {
        let mut all = self.0.lock().unwrap();
        if let Some(entry) = all.iter_mut().find(|(p, s)| p == process && s.is_none()) {
            entry.1 = Some(status);
        }
    }
}

/// A reader that never ends, so a stdin backup holds its lock until it is stopped.
pub struct Endless;

impl tokio::io::AsyncRead for Endless {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
}

/// This machine's host name, as restic writes it into its locks.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}
