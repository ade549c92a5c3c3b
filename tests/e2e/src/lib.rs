//! End-to-end scenarios of Stash driven through kubectl, as a user would type them: the
//! chart installed with `helm install` on the simulated cluster (two nodes, a Garage S3
//! server on the cluster's gateway address, the real pushgateway in the operator pod), or on
//! the real cluster `STASH_E2E_KUBECONFIG` names. Backups are checked with stock restic
//! from the host. See README.md for what a real cluster must have installed.
//!
//! The suites live in `tests/*.rs`, one test each (nextest gives every test a process, so
//! a suite's scenarios share one cluster by running inside one test); [`runner::run`] runs
//! them and tears everything down, checking that nothing is left.

// Test support fails loudly, as tests do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod env;
pub mod expect;
pub mod http;
pub mod leftovers;
pub mod manifests;
pub mod restic;
pub mod runner;
pub mod scenario;

pub use env::Env;
pub use manifests::{BackupConfig, Kind, Source, Volume, Workload};
pub use scenario::Scenario;
