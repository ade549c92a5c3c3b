//! Files the agent may not read. The agent runs as an unprivileged user here (root reads
//! everything): with `--on-unreadable fail` a backup fails, names what it could not read and
//! keeps no snapshot; with `warn` it keeps a snapshot without those files, tagged with their
//! count, and lists them. Both read modes, against the real restic.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

type Result<T = ()> = anyhow::Result<T>;

const NOBODY: u32 = 65534;
const PASSWORD: &str = "unreadable test";

struct Sandbox {
    _dir: tempfile::TempDir,
    root: PathBuf,
    agent: PathBuf,
    restic: PathBuf,
    volume: PathBuf,
}

fn chmod(path: &Path, mode: u32) -> Result {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Copies of both binaries where the unprivileged user can run them (the checkout may sit
/// under a home directory it cannot enter), and a volume with one file and one directory
/// that only root may read.
fn sandbox() -> Result<Sandbox> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_path_buf();
    chmod(&root, 0o755)?;
    let bin = root.join("bin");
    std::fs::create_dir(&bin)?;
    let agent = bin.join("stash-node-agent");
    std::fs::copy(env!("CARGO_BIN_EXE_stash-node-agent"), &agent)?;
    let restic = bin.join("restic");
    let stock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/restic");
    anyhow::ensure!(stock.exists(), "restic is not installed: run `make setup`");
    std::fs::copy(&stock, &restic)?;
    for p in [&bin, &agent, &restic] {
        chmod(p, 0o755)?;
    }
    let repos = root.join("repos");
    std::fs::create_dir(&repos)?;
    chmod(&repos, 0o777)?;

    let volume = root.join("volume");
    std::fs::create_dir_all(volume.join("sub"))?;
    std::fs::write(volume.join("readable.txt"), b"anyone may read this")?;
    std::fs::write(volume.join("sub/also.txt"), b"and this")?;
    std::fs::write(volume.join("secret.txt"), b"only root")?;
    std::fs::create_dir(volume.join("private"))?;
    std::fs::write(volume.join("private/inner.txt"), b"only root too")?;
    for (p, mode) in [
        ("", 0o755),
        ("sub", 0o755),
        ("readable.txt", 0o644),
        ("sub/also.txt", 0o644),
        ("secret.txt", 0o600),
        ("private", 0o700),
        ("private/inner.txt", 0o644),
    ] {
        chmod(&volume.join(p), mode)?;
    }
    Ok(Sandbox {
        _dir: dir,
        root,
        agent,
        restic,
        volume,
    })
}

impl Sandbox {
    fn repo(&self, name: &str) -> PathBuf {
        self.root.join("repos").join(name)
    }

    /// The standalone backup, run as `nobody`.
    fn backup(&self, repo: &Path, mode: &str, policy: &str) -> Result<Output> {
        let out = Command::new("setpriv")
            .args([
                format!("--reuid={NOBODY}"),
                format!("--regid={NOBODY}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(&self.agent)
            .args(["backup", "--host", "host-0", "--key", "ns/app/data"])
            .args(["--mode", mode, "--on-unreadable", policy])
            .arg("--path")
            .arg(&self.volume)
            .arg("--repo")
            .arg(repo)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("RESTIC_PASSWORD", PASSWORD)
            .env("STASH_RESTIC", &self.restic)
            .env("STASH_LOG_LEVEL", "warn")
            .output()?;
        // setpriv itself failing (not root, say) must not pass for the agent's refusal.
        anyhow::ensure!(
            !String::from_utf8_lossy(&out.stderr).starts_with("setpriv:"),
            "cannot run as nobody: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// Stock restic, as root, on a repository.
    fn restic(&self, repo: &Path, args: &[&str]) -> Result<Vec<u8>> {
        let out = Command::new(&self.restic)
            .args(args)
            .args(["--no-cache", "--quiet"])
            .env("RESTIC_REPOSITORY", repo)
            .env("RESTIC_PASSWORD", PASSWORD)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "restic {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out.stdout)
    }

    fn snapshots(&self, repo: &Path) -> Result<Vec<Value>> {
        let listed: Value = serde_json::from_slice(&self.restic(repo, &["snapshots", "--json"])?)?;
        Ok(listed.as_array().cloned().unwrap_or_default())
    }

    /// The regular files a snapshot holds, by their name inside the volume.
    fn files_in(&self, repo: &Path, snapshot: &Value) -> Result<Vec<String>> {
        let id = snapshot["id"].as_str().unwrap_or_default();
        let tags = snapshot["tags"].as_array().cloned().unwrap_or_default();
        if tags.iter().any(|t| t == "stash.mode=stream") {
            let tar = self.restic(repo, &["dump", id, "/volume.tar"])?;
            let listing = self.root.join(format!("{id}.tar"));
            std::fs::write(&listing, tar)?;
            let out = Command::new("tar").arg("-tf").arg(&listing).output()?;
            anyhow::ensure!(out.status.success(), "GNU tar could not list the stream");
            return Ok(String::from_utf8(out.stdout)?
                .lines()
                .map(|l| l.trim_end_matches('/').to_owned())
                .collect());
        }
        let ls = self.restic(repo, &["ls", "--json", id])?;
        Ok(String::from_utf8(ls)?
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["struct_type"] == "node")
            .filter_map(|v| {
                v["path"]
                    .as_str()
                    .map(|p| p.trim_start_matches('/').to_owned())
            })
            .collect())
    }
}

#[test]
fn fail_keeps_no_snapshot_and_names_what_could_not_be_read() -> Result {
    let sb = sandbox()?;
    for mode in ["stream", "direct"] {
        let repo = sb.repo(&format!("fail-{mode}"));
        let out = sb.backup(&repo, mode, "fail")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{mode}: the backup succeeded");
        assert!(out.stdout.is_empty(), "{mode}: a summary was printed");
        match mode {
            // The reader names the first path it may not read.
            "stream" => assert!(
                stderr.contains("private") && stderr.contains("ermission denied"),
                "{mode}: {stderr}"
            ),
            // restic reads on and reports how many it could not.
            _ => assert!(
                stderr.contains("2 file(s) could not be read"),
                "{mode}: {stderr}"
            ),
        }
        assert!(
            sb.snapshots(&repo)?.is_empty(),
            "{mode}: a failed backup left a snapshot"
        );
        sb.restic(&repo, &["check"])?;
    }
    Ok(())
}

#[test]
fn warn_keeps_a_tagged_snapshot_without_them_and_lists_them() -> Result {
    let sb = sandbox()?;
    for mode in ["stream", "direct"] {
        let repo = sb.repo(&format!("warn-{mode}"));
        let out = sb.backup(&repo, mode, "warn")?;
        assert!(
            out.status.success(),
            "{mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary: Value = serde_json::from_slice(&out.stdout)?;
        let unreadable: Vec<&str> = summary["unreadable"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        assert_eq!(unreadable.len(), 2, "{mode}: {summary}");
        // What was read is still counted: readable.txt and sub/also.txt.
        assert_eq!(summary["files"], 2, "{mode}: {summary}");
        for name in ["secret.txt", "private"] {
            assert!(
                unreadable.iter().any(|u| u.ends_with(name)),
                "{mode}: {name} not listed in {summary}"
            );
        }

        let snapshots = sb.snapshots(&repo)?;
        assert_eq!(snapshots.len(), 1, "{mode}: one snapshot, the tagged one");
        let snap = &snapshots[0];
        assert_eq!(snap["id"], summary["snapshot_id"], "{mode}");
        let tags = snap["tags"].as_array().cloned().unwrap_or_default();
        assert!(
            tags.iter().any(|t| t == "stash.unreadable=2"),
            "{mode}: tags {tags:?}"
        );
        let files = sb.files_in(&repo, snap)?;
        for present in ["readable.txt", "sub/also.txt"] {
            assert!(
                files.iter().any(|f| f.ends_with(present)),
                "{mode}: {present} missing from {files:?}"
            );
        }
        for absent in ["secret.txt", "private/inner.txt"] {
            assert!(
                !files.iter().any(|f| f.ends_with(absent)),
                "{mode}: {absent} in {files:?}"
            );
        }
        sb.restic(&repo, &["check"])?;
    }

    // The volume has not changed, but its last snapshot is incomplete: the next stream
    // backup reads it again instead of calling it unchanged.
    let repo = sb.repo("warn-stream");
    let again: Value = serde_json::from_slice(&sb.backup(&repo, "stream", "warn")?.stdout)?;
    assert_eq!(again["unchanged"], false, "{again}");
    Ok(())
}

/// With `warn`, a direct backup of an unchanged volume: restic saves nothing
/// (`--skip-if-unchanged`) and exits 3 for the files it still may not read. That is an
/// unchanged volume, not a failed backup.
#[test]
fn warn_on_an_unchanged_volume_in_direct_mode_is_unchanged() -> Result {
    let sb = sandbox()?;
    let repo = sb.repo("warn-unchanged-direct");
    let mut summaries = Vec::new();
    for _ in 0..2 {
        let out = sb.backup(&repo, "direct", "warn")?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        summaries.push(serde_json::from_slice::<Value>(&out.stdout)?);
    }
    let (first, second) = (&summaries[0], &summaries[1]);
    assert_eq!(first["unchanged"], false, "{first}");
    assert_eq!(second["unchanged"], true, "{second}");
    assert_eq!(second["snapshot_id"], first["snapshot_id"], "{second}");
    let unreadable = second["unreadable"].as_array().map_or(0, Vec::len);
    assert_eq!(unreadable, 2, "still listed: {second}");
    assert_eq!(sb.snapshots(&repo)?.len(), 1);
    Ok(())
}
