//! Snapshot (`repositories.stash.appscode.com/v1alpha1`): one restic snapshot as a Kubernetes
//! object. Served read-only (plus delete) by the operator's aggregated API, so it is a type
//! here but never a CRD.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Snapshots carry no spec: everything is in `metadata` and `status`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "repositories.stash.appscode.com",
    version = "v1alpha1",
    kind = "Snapshot",
    root = "Snapshot",
    namespaced,
    no_spec,
    status = "SnapshotStatus",
    derive = "PartialEq",
    derive = "Default"
)]
pub struct SnapshotFields {}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotStatus {
    pub tree: Option<String>,
    pub paths: Option<Vec<String>>,
    pub hostname: Option<String>,
    pub username: Option<String>,
    pub uid: Option<i32>,
    pub gid: Option<i32>,
    pub tags: Option<Vec<String>>,
    /// The Repository object the snapshot was listed from.
    pub repository: Option<String>,
}

/// Length of the snapshot-id suffix in a Snapshot's name (`<repository>-<id8>`).
pub const SHORT_ID_LEN: usize = 8;

/// The Snapshot name for a restic snapshot id in a Repository.
pub fn snapshot_name(repository: &str, snapshot_id: &str) -> String {
    let short = snapshot_id.get(..SHORT_ID_LEN).unwrap_or(snapshot_id);
    format!("{repository}-{short}")
}

/// Splits a Snapshot name into the Repository name and the 8-character id prefix.
pub fn parse_snapshot_name(name: &str) -> Option<(&str, &str)> {
    let (repo, id) = name.rsplit_once('-')?;
    let valid =
        !repo.is_empty() && id.len() == SHORT_ID_LEN && id.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then_some((repo, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_split_on_the_last_dash() {
        let id = "4bc21d6f0a1e2d3c4b5a69788796a5b4c3d2e1f00112233445566778899aabb";
        assert_eq!(snapshot_name("my-repo", id), "my-repo-4bc21d6f");
        assert_eq!(
            parse_snapshot_name("my-repo-4bc21d6f"),
            Some(("my-repo", "4bc21d6f"))
        );
        assert_eq!(parse_snapshot_name("my-repo-4bc21d6"), None);
        assert_eq!(parse_snapshot_name("my-repo-4bc21d6z"), None);
        assert_eq!(parse_snapshot_name("-4bc21d6f"), None);
        assert_eq!(parse_snapshot_name("4bc21d6f"), None);
    }
}
