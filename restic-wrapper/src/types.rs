//! Typed results of restic's JSON documents: snapshots, forget groups, stats, check, keys, ls.
//! Fields restic may add later are kept in `other`, so nothing restic says is lost.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One snapshot as `restic snapshots --json` prints it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// RFC 3339 with nanoseconds, as restic stored it.
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub tree: String,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub username: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excludes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Value>,
    /// The full snapshot id (the storage id of its file).
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub short_id: String,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl Snapshot {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().flatten().any(|t| t == tag)
    }
}

/// One group of `restic forget --json`: what was kept and removed for a host/paths/tags set.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct ForgetGroup {
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub paths: Option<Vec<String>>,
    #[serde(default)]
    pub keep: Option<Vec<Snapshot>>,
    #[serde(default)]
    pub remove: Option<Vec<Snapshot>>,
}

/// The outcome of a retention run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ForgetResult {
    pub groups: Vec<ForgetGroup>,
}

impl ForgetResult {
    pub fn kept(&self) -> impl Iterator<Item = &Snapshot> {
        self.groups.iter().flat_map(|g| g.keep.iter().flatten())
    }

    pub fn removed(&self) -> impl Iterator<Item = &Snapshot> {
        self.groups.iter().flat_map(|g| g.remove.iter().flatten())
    }
}

/// `restic stats --json`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Stats {
    pub total_size: u64,
    pub total_file_count: u64,
    pub total_blob_count: u64,
    pub snapshots_count: u64,
    pub total_uncompressed_size: u64,
    pub compression_ratio: f64,
}

/// `restic check --json` summary.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CheckSummary {
    pub num_errors: u64,
    pub suggest_repair_index: bool,
    pub suggest_prune: bool,
}

/// One entry of `restic key list --json`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Key {
    pub current: bool,
    pub id: String,
    #[serde(rename = "userName")]
    pub user_name: String,
    #[serde(rename = "hostName")]
    pub host_name: String,
    pub created: String,
}

/// One node of `restic ls --json`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Node {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    pub uid: u32,
    pub gid: u32,
    pub size: Option<u64>,
    pub mode: u32,
    pub permissions: String,
    pub mtime: String,
}

/// `restic version --json`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    /// The oldest restic this project supports: exit codes 10–12 and `--json` errors.
    pub const MINIMUM: Version = Version {
        major: 0,
        minor: 17,
        patch: 0,
    };

    /// Reads `0.18.0`, `restic 0.16.4 compiled with …` or `{"version":"0.18.0",…}`.
    pub fn parse(output: &str) -> Option<Version> {
        let text = serde_json::from_str::<Value>(output.trim())
            .ok()
            .and_then(|v| v.get("version").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| output.to_owned());
        let token = text
            .split_whitespace()
            .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
        let mut parts = token
            .split(|c: char| !c.is_ascii_digit())
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<u32>().ok());
        Some(Version {
            major: parts.next()??,
            minor: parts.next()??,
            patch: parts.next().flatten().unwrap_or(0),
        })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_in_every_form() {
        let v = |s| Version::parse(s);
        assert_eq!(
            v(r#"{"message_type":"version","version":"0.18.0","go_version":"go1.24.4"}"#),
            Some(Version {
                major: 0,
                minor: 18,
                patch: 0
            })
        );
        assert_eq!(
            v("restic 0.16.4 compiled with go1.21.6 on linux/amd64"),
            Some(Version {
                major: 0,
                minor: 16,
                patch: 4
            })
        );
        assert!(v("restic 0.16.4").is_some_and(|v| v < Version::MINIMUM));
        assert_eq!(v("nonsense"), None);
    }

    #[test]
    fn snapshots_keep_unknown_fields() -> Result<(), serde_json::Error> {
        let text = r#"{"time":"2026-11-25T16:57:19.55920551Z","tree":"fe","paths":["/d"],
            "hostname":"h","username":"root","future_field":{"a":1},"id":"c1","short_id":"c1"}"#;
        let s: Snapshot = serde_json::from_str(text)?;
        assert_eq!(s.other["future_field"]["a"], 1);
        let back = serde_json::to_value(&s)?;
        assert_eq!(back, serde_json::from_str::<Value>(text)?);
        Ok(())
    }
}
