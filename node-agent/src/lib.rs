//! The node agent: resolves pod volumes to the kubelet's host paths, reads them under the
//! node's IO budget, and stores them with restic — as a tar stream through its own reader
//! (`stream`) or by letting restic read the directory (`direct`). Restores write in place,
//! confined to the target volume.

pub mod budget;
pub mod cgroup;
pub mod cli;
pub mod engine;
pub mod error;
pub mod extract;
pub mod hostpath;
pub mod locks;
pub mod metrics;
pub mod pattern;
pub mod pending;
pub mod pipe;
pub mod pressure;
pub mod residency;
pub mod spec;
pub mod status;
pub mod stream;
pub mod tar;
pub mod tree_source;
pub mod uring;
pub mod walk;
pub mod worker;
