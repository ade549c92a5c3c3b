//! The record of a direct-mode backup in flight. restic saves its snapshot before it exits;
//! a snapshot that left files out (exit 3) is forgotten by the agent afterwards. An agent that
//! dies between the two would leave a partial snapshot that looks complete, so before restic
//! starts the agent writes down when it started (per repository, host and key, in its state
//! directory), and removes the record only once it has judged the result. The next backup of
//! that key finds the record and forgets every direct snapshot of the key taken since: none of
//! them was seen complete.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::error::AgentError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    pub started: Timestamp,
    pub repository: String,
    pub host: String,
    pub key: String,
}

/// Where the record of one repository, host and key lives.
pub fn path(dir: &Path, repository: &str, host: &str, key: &str) -> PathBuf {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [repository, host, key] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let digest = h.finalize();
    let name: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{name}.json"))
}

fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> AgentError {
    move |source| AgentError::Io { action, source }
}

/// Writes the record, durably, before restic starts.
pub fn write(file: &Path, record: &Record) -> Result<(), AgentError> {
    use std::io::Write;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(io("create the pending-backup directory"))?;
    }
    let tmp = file.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io("write the pending-backup record"))?;
    let body = serde_json::to_vec(record).map_err(|e| AgentError::Other {
        action: "write the pending-backup record",
        reason: e.to_string(),
    })?;
    f.write_all(&body)
        .and_then(|()| f.sync_all())
        .map_err(io("write the pending-backup record"))?;
    std::fs::rename(&tmp, file).map_err(io("write the pending-backup record"))
}

/// The record left by a backup that never finished, if any (an unreadable one counts as
/// none: it cannot say since when).
pub fn read(file: &Path) -> Option<Record> {
    let body = std::fs::read(file).ok()?;
    serde_json::from_slice(&body).ok()
}

pub fn remove(file: &Path) {
    if let Err(error) = std::fs::remove_file(file)
        && error.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(%error, file = %file.display(), "cannot remove the pending-backup record");
    }
}

/// The snapshots of a record's key taken since it started: never seen complete.
pub fn unverified<'a>(
    record: &Record,
    snapshots: &'a [restic_wrapper::Snapshot],
    mode_tag: &str,
) -> Vec<&'a restic_wrapper::Snapshot> {
    snapshots
        .iter()
        .filter(|s| s.has_tag(mode_tag))
        .filter(|s| {
            s.time
                .parse::<Timestamp>()
                .is_ok_and(|t| t >= record.started)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_record_names_its_key_and_survives_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let a = path(dir.path(), "s3:x/b", "host-0", "k");
        assert_ne!(a, path(dir.path(), "s3:x/b", "host-1", "k"));
        assert_ne!(a, path(dir.path(), "s3:x/b", "host-0", "k2"));
        let r = Record {
            started: Timestamp::from_second(1_000).unwrap(),
            repository: "s3:x/b".into(),
            host: "host-0".into(),
            key: "k".into(),
        };
        write(&a, &r).unwrap();
        assert_eq!(read(&a), Some(r.clone()));
        let snap = |time: &str, tag: &str| restic_wrapper::Snapshot {
            time: time.into(),
            tags: Some(vec![tag.into()]),
            ..serde_json::from_value(serde_json::json!({"time": time, "tree": "t"})).unwrap()
        };
        let snaps = vec![
            snap("1970-01-01T00:16:39Z", "stash.mode=direct"),
            snap("1970-01-01T00:16:41.5Z", "stash.mode=direct"),
            snap("1970-01-01T00:16:42Z", "stash.mode=stream"),
        ];
        let u = unverified(&r, &snaps, "stash.mode=direct");
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].time, "1970-01-01T00:16:41.5Z");
        remove(&a);
        assert_eq!(read(&a), None);
    }
}
