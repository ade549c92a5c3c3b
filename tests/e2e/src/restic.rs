//! The repository read from this host with stock restic, as a user checks a backup without
//! Stash: `restic snapshots --json`, `restic dump <id> /volume.tar | tar -x` for the agent's
//! stream snapshots, `restic restore` for direct ones.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::Path;

use crate::env::S3;

/// The file a stream-mode snapshot holds (the agent's tar of the volume).
pub const STREAM_FILE: &str = "/volume.tar";

#[derive(Debug, Clone)]
pub struct HostRepo {
    pub url: String,
    env: Vec<(String, String)>,
}

/// A snapshot as `restic snapshots --json` prints it (the fields the scenarios read).
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: String,
    pub short_id: String,
    pub hostname: String,
    pub paths: Vec<String>,
    pub tags: Vec<String>,
}

impl HostRepo {
    pub fn new(s3: &S3, prefix: &str, password: &str) -> Self {
        Self {
            url: format!(
                "s3:{}/{}/{}",
                s3.host_endpoint.trim_end_matches('/'),
                s3.bucket,
                prefix
            ),
            env: vec![
                ("RESTIC_PASSWORD".into(), password.into()),
                ("AWS_ACCESS_KEY_ID".into(), s3.access_key_id.clone()),
                ("AWS_SECRET_ACCESS_KEY".into(), s3.secret_access_key.clone()),
                ("AWS_DEFAULT_REGION".into(), s3.region.clone()),
            ],
        }
    }

    /// A local repository, read from this host's view of the node's directory.
    pub fn local(path: &Path, password: &str) -> Self {
        Self {
            url: path.display().to_string(),
            env: vec![("RESTIC_PASSWORD".into(), password.into())],
        }
    }

    async fn restic(&self, args: &[&str]) -> Result<std::process::Output> {
        let mut cmd = tokio::process::Command::new(stash_test_support::tool("restic")?);
        cmd.args(["-r", &self.url, "--no-cache"])
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let what = format!("restic {} on {}", args.join(" "), self.url);
        stash_test_support::run(cmd, None, &what).await
    }

    /// `restic init`: a repository that exists before Stash sees it.
    pub async fn init(&self) -> Result<()> {
        self.restic(&["init"]).await.map(drop)
    }

    /// Every snapshot, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let out = self.restic(&["snapshots", "--json", "--no-lock"]).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("restic snapshots printed no JSON")?;
        let strings = |x: &serde_json::Value| -> Vec<String> {
            x.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .map(|s| Snapshot {
                id: s["id"].as_str().unwrap_or_default().into(),
                short_id: s["short_id"].as_str().unwrap_or_default().into(),
                hostname: s["hostname"].as_str().unwrap_or_default().into(),
                paths: strings(&s["paths"]),
                tags: strings(&s["tags"]),
            })
            .collect())
    }

    /// The regular files of a snapshot by path relative to the volume, read back through
    /// restic: stream snapshots are dumped and untarred, direct ones restored.
    pub async fn files(&self, snap: &Snapshot) -> Result<BTreeMap<String, Vec<u8>>> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("out");
        std::fs::create_dir(&out)?;
        if snap.paths.iter().any(|p| p == STREAM_FILE) {
            let tar = dir.path().join("volume.tar");
            let dump = self
                .restic(&["--no-lock", "dump", &snap.id, STREAM_FILE])
                .await?;
            std::fs::write(&tar, &dump.stdout)?;
            let status = tokio::process::Command::new("tar")
                .arg("-xf")
                .arg(&tar)
                .arg("-C")
                .arg(&out)
                .status()
                .await
                .context("failed to run tar")?;
            if !status.success() {
                bail!("tar -x of snapshot {} failed: {status}", snap.short_id);
            }
        } else {
            let target = out.to_string_lossy().into_owned();
            self.restic(&["--no-lock", "restore", &snap.id, "--target", &target])
                .await?;
        }
        read_tree(&out)
    }
}

/// Regular files under `root`, by relative path.
pub fn read_tree(root: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("failed to read {}", dir.display()))?
        {
            let entry = entry?;
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                let rel = entry
                    .path()
                    .strip_prefix(root)?
                    .to_string_lossy()
                    .into_owned();
                files.insert(rel, std::fs::read(entry.path())?);
            }
        }
    }
    Ok(files)
}

/// How `actual` differs from `expected` (empty when identical), ignoring `skip` paths
/// whose content changes (they must still be there).
pub fn tree_diff(
    actual: &BTreeMap<String, Vec<u8>>,
    expected: &BTreeMap<String, Vec<u8>>,
    skip: &[&str],
) -> Vec<String> {
    let mut diff = Vec::new();
    for (path, bytes) in expected {
        match actual.get(path) {
            None => diff.push(format!("{path} is missing")),
            Some(a) if a != bytes => diff.push(format!(
                "{path} differs ({} bytes, expected {})",
                a.len(),
                bytes.len()
            )),
            Some(_) => {}
        }
    }
    for path in actual.keys() {
        if !expected.contains_key(path) && !skip.contains(&path.as_str()) {
            diff.push(format!("{path} is extra"));
        }
    }
    for path in skip {
        if !actual.contains_key(*path) {
            diff.push(format!("{path} is missing"));
        }
    }
    diff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffs_name_missing_extra_and_changed_files() {
        let m = |pairs: &[(&str, &str)]| -> BTreeMap<String, Vec<u8>> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect()
        };
        let expected = m(&[("a", "1"), ("b", "2")]);
        assert!(
            tree_diff(
                &m(&[("a", "1"), ("b", "2"), ("tick", "9")]),
                &expected,
                &["tick"]
            )
            .is_empty()
        );
        let d = tree_diff(&m(&[("a", "x"), ("c", "3")]), &expected, &["tick"]);
        assert_eq!(
            d,
            [
                "a differs (1 bytes, expected 1)",
                "b is missing",
                "c is extra",
                "tick is missing"
            ]
        );
    }
}
