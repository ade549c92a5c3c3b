//! Rules the operator and the node agent must agree on, written once: a Repository as
//! restic reaches it (`repository`), a pod volume as the kubelet lays it out (`volumes`), and
//! Stash's host names and volume selection for a target (`hosts`), and which snapshot of a
//! volume a restore takes (`snapshots`).

pub mod hosts;
pub mod repository;
pub mod snapshots;
pub mod volumes;
