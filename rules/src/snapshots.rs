//! A volume's snapshots as the agent tags them, and which of them a restore may take: the
//! newest complete one of a host, found by the container path the volume was mounted at (the
//! path Stash's users name in a RestoreSession's rules), or by the volume's key for snapshots
//! taken before that tag was written. The operator resolves restores with it and the agent
//! refuses incomplete snapshots with it, so both judge a snapshot alike.

use k8s_openapi::jiff::Timestamp;
use restic_wrapper::Snapshot;

use crate::repository::key_tag;

/// A snapshot the agent's own reader streamed as one tar.
pub const TAG_STREAM: &str = "stash.mode=stream";
/// A snapshot restic read from the volume directory itself.
pub const TAG_DIRECT: &str = "stash.mode=direct";
/// The container path the volume was mounted at when it was backed up.
pub const TAG_MOUNT_PREFIX: &str = "stash.mount=";

/// `/source/data/` and `/source/data` are one mount; restic separates tags with commas.
pub fn normalise_mount(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    let p = if trimmed.is_empty() { "/" } else { trimmed };
    p.replace(',', "_")
}

/// The tag that records where a volume was mounted.
pub fn mount_tag(path: &str) -> String {
    format!("{TAG_MOUNT_PREFIX}{}", normalise_mount(path))
}

/// Where the snapshot's volume was mounted, if the agent recorded it.
pub fn mount_of(s: &Snapshot) -> Option<&str> {
    s.tags
        .iter()
        .flatten()
        .find_map(|t| t.strip_prefix(TAG_MOUNT_PREFIX))
}

/// Whether a snapshot holds the whole volume. A stream that ends because its agent died (or
/// failed) ends for restic in a read error, never an end of file (the stream reaches restic
/// through a socket): restic then saves a snapshot *without* the stream's file, which its
/// summary shows as no file processed, and a dead agent cannot delete it. Such a snapshot is
/// never a parent, an "unchanged" reference or a restore's source, and the next backup of
/// its key deletes it. A snapshot without a summary (older restic, never a stream) is
/// complete; a direct snapshot restic cut short is deleted through the agent's pending record.
pub fn is_complete(snapshot: &Snapshot) -> bool {
    if !snapshot.has_tag(TAG_STREAM) {
        return true;
    }
    snapshot
        .summary
        .as_ref()
        .and_then(|s| s.get("total_files_processed"))
        .and_then(serde_json::Value::as_u64)
        .is_none_or(|files| files > 0)
}

fn time_of(s: &Snapshot) -> Option<Timestamp> {
    s.time.parse().ok()
}

/// The newest complete snapshot of `host` for one volume: the ones tagged with its mount
/// path, or, when none of the host's snapshots carries a mount tag for it, the ones of its
/// key (the same claim, backed up before mount tags were written).
pub fn latest_for<'a>(
    snapshots: &'a [Snapshot],
    host: &str,
    mount_path: Option<&str>,
    key: Option<&str>,
) -> Option<&'a Snapshot> {
    let of_host = || {
        snapshots
            .iter()
            .filter(move |s| s.hostname == host && is_complete(s))
    };
    let newest = |it: &mut dyn Iterator<Item = &'a Snapshot>| -> Option<&'a Snapshot> {
        it.max_by_key(|s| (time_of(s), s.time.clone()))
    };
    if let Some(m) = mount_path {
        let tag = mount_tag(m);
        if let Some(s) = newest(&mut of_host().filter(|s| s.has_tag(&tag))) {
            return Some(s);
        }
    }
    let key = key?;
    let tag = key_tag(key);
    newest(&mut of_host().filter(|s| s.has_tag(&tag) && mount_of(s).is_none()))
}

/// The snapshot an id or id prefix (at least 8 hex digits, as `restic` accepts) names.
pub fn by_id<'a>(snapshots: &'a [Snapshot], id: &str) -> Result<&'a Snapshot, SnapshotLookup> {
    let id = id.trim();
    if id.len() < 8 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SnapshotLookup::BadId(id.to_owned()));
    }
    let mut found = snapshots.iter().filter(|s| s.id.starts_with(id));
    match (found.next(), found.next()) {
        (Some(s), None) => Ok(s),
        (Some(_), Some(_)) => Err(SnapshotLookup::Ambiguous(id.to_owned())),
        (None, _) => Err(SnapshotLookup::NotFound(id.to_owned())),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotLookup {
    #[error("snapshot {0} is not an id: give at least 8 hex digits of a snapshot's id")]
    BadId(String),
    #[error("snapshot {0} does not exist in the repository")]
    NotFound(String),
    #[error("snapshot id {0} is ambiguous: several snapshots start with it; give more digits")]
    Ambiguous(String),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn snap(id: &str, time: &str, host: &str, tags: &[&str], files: Option<u64>) -> Snapshot {
        let mut s: Snapshot = serde_json::from_value(serde_json::json!({
            "time": time, "tree": "t", "hostname": host, "id": id,
            "tags": tags,
        }))
        .unwrap();
        s.summary = files.map(|f| serde_json::json!({"total_files_processed": f}));
        s
    }

    #[test]
    fn newest_complete_of_the_mount_wins() {
        let m = mount_tag("/source/data/");
        let snaps = vec![
            snap(
                "aaaaaaaa01",
                "2026-12-01T10:00:00Z",
                "host-0",
                &[&m, TAG_STREAM],
                Some(3),
            ),
            // Newer, but its reader died.
            snap(
                "bbbbbbbb02",
                "2026-12-01T11:00:00Z",
                "host-0",
                &[&m, TAG_STREAM],
                Some(0),
            ),
            // Newer and complete, but another host.
            snap(
                "cccccccc03",
                "2026-12-01T12:00:00Z",
                "host-1",
                &[&m, TAG_STREAM],
                Some(3),
            ),
            // Offsets compare as instants: 10:30Z.
            snap(
                "dddddddd04",
                "2026-12-01T11:30:00+01:00",
                "host-0",
                &[&m, TAG_DIRECT],
                None,
            ),
        ];
        let got = latest_for(&snaps, "host-0", Some("/source/data"), None).unwrap();
        assert_eq!(got.id, "dddddddd04");
        assert!(latest_for(&snaps, "host-0", Some("/other"), None).is_none());
    }

    #[test]
    fn untagged_snapshots_are_found_by_key() {
        let k = key_tag("uid-1");
        let m = mount_tag("/data");
        let snaps = vec![
            snap(
                "aaaaaaaa01",
                "2026-12-01T10:00:00Z",
                "host-0",
                &[&k, TAG_DIRECT],
                None,
            ),
            snap(
                "bbbbbbbb02",
                "2026-12-01T09:00:00Z",
                "host-0",
                &[&k, &m, TAG_DIRECT],
                None,
            ),
        ];
        // A mount tag wins over a newer untagged snapshot of the key.
        assert_eq!(
            latest_for(&snaps, "host-0", Some("/data"), Some("uid-1"))
                .unwrap()
                .id,
            "bbbbbbbb02"
        );
        // Another mount path: only untagged snapshots of the key stand in.
        assert_eq!(
            latest_for(&snaps, "host-0", Some("/elsewhere"), Some("uid-1"))
                .unwrap()
                .id,
            "aaaaaaaa01"
        );
    }

    #[test]
    fn ids_and_prefixes() {
        let snaps = vec![
            snap("abcdef0123", "2026-12-01T10:00:00Z", "h", &[], None),
            snap("abcdef0199", "2026-12-01T10:00:00Z", "h", &[], None),
        ];
        assert_eq!(by_id(&snaps, "abcdef0123").unwrap().id, "abcdef0123");
        assert_eq!(
            by_id(&snaps, "abcdef01"),
            Err(SnapshotLookup::Ambiguous("abcdef01".into()))
        );
        assert_eq!(
            by_id(&snaps, "12345678"),
            Err(SnapshotLookup::NotFound("12345678".into()))
        );
        assert!(matches!(
            by_id(&snaps, "latest"),
            Err(SnapshotLookup::BadId(_))
        ));
    }
}
