//! Drives the restic CLI as a typed protocol, and reads restic repositories natively.
//! This crate knows nothing about Kubernetes: it takes a backend description and the keys of
//! a storage Secret, and speaks restic.
//!
//! * [`Restic`] runs one typed command at a time: secrets only in the child's environment,
//!   `--json` output parsed into [`Message`]s, exit codes mapped to [`Error`]s that say whether
//!   a retry can help, and SIGINT-then-kill on cancellation so restic removes its own lock.
//! * [`NativeRepository`] lists snapshots without starting restic, for fast listing, and
//!   reads and removes lock files, so a caller can remove exactly the locks it knows are its
//!   own (a [`SpawnObserver`] tells it the pid of every restic it starts).

pub mod backend;
mod cgroup_join;
pub mod command;
pub mod error;
pub mod message;
pub mod native;
mod process;
pub mod types;

pub use backend::{Backend, Repository, SecretValue, Secrets};
pub use command::{
    BackupOptions, BackupRun, Cache, ForgetOptions, Overwrite, PruneOptions, Restic,
    RestoreOptions, RestoreRun, SnapshotFilter, StatsMode,
};
pub use error::{Error, LockHolder};
pub use message::{BackupStatus, BackupSummary, Message, RestoreStatus, RestoreSummary};
pub use native::{Lock, NativeError, NativeRepository, RepositoryFiles};
pub use process::{
    ExecShim, SpawnObserver, SpawnedProcess, exec_with_parent_death, install_exec_shim,
};
pub use types::{ForgetResult, Key, Node, Snapshot, Stats, Version};
