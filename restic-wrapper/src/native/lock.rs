//! restic's lock files (`locks/<id>`), read and removed without restic: who holds each lock
//! (host name and pid, the pair restic itself tests for staleness), so a caller that knows
//! which of those processes were its own can remove exactly their stale locks. Lock files use
//! the unpacked data format, encrypted like snapshots and zstd-compressed in repository
//! format v2 (restic's design document, "Unpacked Data Format" and "Locks").

use sha2::{Digest, Sha256};

use super::crypto::Unpacker;
use super::{NativeError, NativeRepository, RepositoryFiles, Source};

/// One lock file: restic's lock JSON and the file's id.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Lock {
    /// The file name under `locks/` (the SHA-256 of the file); not part of the JSON.
    #[serde(skip)]
    pub id: String,
    /// When restic created (or last refreshed) the lock, RFC 3339 with restic's offset.
    pub time: String,
    #[serde(default)]
    pub exclusive: bool,
    /// The host name of the holder, as its `os.Hostname()` returned it.
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub username: String,
    /// The holder's process id, in its own pid namespace.
    pub pid: i64,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

impl Lock {
    /// When the lock was written, if its time parses.
    pub fn created(&self) -> Option<jiff::Timestamp> {
        self.time.parse().ok()
    }
}

/// Lock ids come from listings and callers; only a plain 64-digit hex name is a lock file
/// (anything else could name a path outside `locks/`).
fn check_id(id: &str) -> Result<(), NativeError> {
    if id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(NativeError::Format {
            what: "lock id",
            reason: format!("{id:?} is not a 64-digit hex id"),
        })
    }
}

async fn lock_ids(source: &Source) -> Result<Vec<String>, NativeError> {
    let mut ids = source.list("locks").await?;
    ids.retain(|name| check_id(name).is_ok());
    Ok(ids)
}

impl RepositoryFiles {
    /// The ids of the repository's lock files; needs no password.
    pub async fn lock_ids(&self) -> Result<Vec<String>, NativeError> {
        lock_ids(&self.source).await
    }
}

impl NativeRepository {
    /// The ids of the repository's lock files.
    pub async fn lock_ids(&self) -> Result<Vec<String>, NativeError> {
        lock_ids(&self.source).await
    }

    /// One lock, or `None` when it is gone (its holder released it since it was listed) or
    /// empty (an interrupted upload on a backend without atomic writes, which restic ignores
    /// too).
    pub async fn lock(&self, id: &str) -> Result<Option<Lock>, NativeError> {
        check_id(id)?;
        let Some(bytes) = self.source.get(format!("locks/{id}")).await? else {
            return Ok(None);
        };
        if bytes.is_empty() {
            return Ok(None);
        }
        decode_lock(self, id, &bytes).map(Some)
    }

    /// Every readable lock. A lock released while this runs is left out; a lock that cannot
    /// be read fails the listing, since nothing can be said of its holder.
    pub async fn locks(&self) -> Result<Vec<Lock>, NativeError> {
        use futures::{StreamExt, TryStreamExt};
        let ids = self.lock_ids().await?;
        let locks: Vec<Option<Lock>> = futures::stream::iter(ids)
            .map(|id| async move { self.lock(&id).await })
            .buffer_unordered(super::FETCH_CONCURRENCY)
            .try_collect()
            .await?;
        let mut locks: Vec<Lock> = locks.into_iter().flatten().collect();
        locks.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(locks)
    }

    /// Deletes one lock file. A lock that is already gone is not an error: its holder (or
    /// another cleaner) removed it first.
    pub async fn remove_lock(&self, id: &str) -> Result<(), NativeError> {
        check_id(id)?;
        self.source.delete(format!("locks/{id}")).await
    }

    /// Writes a lock file as restic would (tests only: its IV is derived, not random).
    #[cfg(any(test, feature = "test-support"))]
    pub async fn write_lock(&self, lock: &Lock) -> Result<String, NativeError> {
        let plain = serde_json::to_vec(lock).map_err(|e| NativeError::Format {
            what: "lock",
            reason: e.to_string(),
        })?;
        let mut iv = [0u8; 16];
        let digest = Sha256::new()
            .chain_update(&plain)
            .chain_update(jiff::Timestamp::now().as_nanosecond().to_le_bytes())
            .finalize();
        iv.copy_from_slice(&digest[..16]);
        let sealed = self.key.encrypt_with_iv(iv, &plain);
        let id = hex::encode(Sha256::digest(&sealed));
        self.source.put(format!("locks/{id}"), sealed).await?;
        Ok(id)
    }
}

fn decode_lock(repo: &NativeRepository, id: &str, bytes: &[u8]) -> Result<Lock, NativeError> {
    if hex::encode(Sha256::digest(bytes)) != id {
        return Err(NativeError::HashMismatch {
            kind: "lock",
            id: id.to_owned(),
        });
    }
    let plain = Unpacker::default().unpack(repo.key.decrypt(bytes)?, "lock")?;
    let mut lock: Lock = serde_json::from_slice(&plain).map_err(|e| NativeError::Format {
        what: "lock",
        reason: format!("{id}: {e}"),
    })?;
    lock.id = id.to_owned();
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_json_as_restic_writes_it_parses() -> Result<(), serde_json::Error> {
        // The example of restic's design document, and a lock without uid/gid (omitempty).
        let lock: Lock = serde_json::from_str(
            r#"{"time":"2015-06-27T12:18:51.759239612+02:00","exclusive":false,
                "hostname":"kasimir","username":"fd0","pid":13607,"uid":1000,"gid":100}"#,
        )?;
        assert_eq!((lock.hostname.as_str(), lock.pid), ("kasimir", 13607));
        assert_eq!((lock.uid, lock.gid, lock.exclusive), (1000, 100, false));
        assert_eq!(
            lock.created().map(|t| t.as_second()),
            Some(1_435_400_331),
            "the offset is honoured"
        );
        let root: Lock = serde_json::from_str(
            r#"{"time":"2024-01-01T00:00:00Z","exclusive":true,"hostname":"h","username":"root","pid":1}"#,
        )?;
        assert_eq!((root.uid, root.gid, root.exclusive), (0, 0, true));
        Ok(())
    }

    #[test]
    fn only_hex_ids_name_lock_files() {
        assert!(check_id(&"a".repeat(64)).is_ok());
        for bad in ["../config", "", &"g".repeat(64), &"a".repeat(63)] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }
}
