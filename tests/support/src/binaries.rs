//! This checkout's own binaries, built (or found current) with `cargo build --locked`, so a
//! test that runs them as processes never runs a stale copy. Cargo reports where it put each
//! executable, which keeps `CARGO_TARGET_DIR` and profiles out of the test's guesswork.
//!
//! The build selects what `cargo test --workspace` (nextest) selects, every bin and test of
//! the workspace, so features resolve the same way: inside a test run it finds everything
//! current and relinks nothing. A narrower build (`-p <crate>`) resolves other features and
//! relinks `target/debug/<bin>` under the feet of other tests executing it.
//!
//! The environment matters as much: a test runs with the variables cargo sets for its own
//! crate (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...), and a build script that reads one of them
//! (ring's does) is fingerprinted with its value, so a build inheriting them reruns ring and
//! relinks every binary over TLS, differently from each test crate that builds. They are
//! removed, which leaves the environment `cargo nextest run` built with.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Builds the workspace's bins and tests; returns the executables of `bins` by name.
pub fn build(bins: &[&str]) -> Result<BTreeMap<String, PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut command = std::process::Command::new(cargo);
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_for_the_test_crate) {
            command.env_remove(name);
        }
    }
    let out = command
        .args([
            "build",
            "--locked",
            "--workspace",
            "--bins",
            "--tests",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(crate::workspace())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("failed to run cargo build")?;
    if !out.status.success() {
        bail!("cargo build of {bins:?} failed ({})", out.status);
    }
    let mut found = BTreeMap::new();
    let mut rebuilt = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["fresh"] == false
            && let Some(name) = msg["target"]["name"].as_str()
        {
            rebuilt.push(name.to_owned());
        }
        // A bin's unit-test harness has the bin's name too; only the bin itself counts.
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == false
            && let Some(exe) = msg["executable"].as_str()
            && let Some(name) = msg["target"]["name"].as_str()
            && bins.contains(&name)
        {
            found.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    // Inside `cargo nextest run --workspace` everything is current: a rebuild here relinks
    // binaries that other tests are running, so say which units it took.
    if !rebuilt.is_empty() && std::env::var_os("NEXTEST").is_some() {
        eprintln!(
            "warning: the test's cargo build rebuilt {} unit(s) the test run had built: {}",
            rebuilt.len(),
            rebuilt.join(", ")
        );
    }
    for bin in bins {
        if !found.contains_key(*bin) {
            bail!("cargo build reported no executable for {bin}");
        }
    }
    found
        .into_iter()
        .map(|(name, exe)| Ok((name, pinned(&exe)?)))
        .collect()
}

/// A name of the executable's file that no later build replaces: a hard link (a copy across
/// filesystems) in `target/test-binaries`, named after the file's inode. A build while tests
/// run (a developer's, or a test's own that found something stale) unlinks and relinks
/// `target/debug/<bin>`, so a suite's later processes would run another build than its first
/// ones (and a half-written file, mid-link). Links of other builds older than a day go.
fn pinned(exe: &std::path::Path) -> Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(exe).with_context(|| format!("stat {}", exe.display()))?;
    let name = exe
        .file_name()
        .and_then(|n| n.to_str())
        .context("an executable without a name")?;
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .unwrap_or(std::path::Path::new("."))
        .join("test-binaries");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let pin = dir.join(format!("{name}-{}-{}", meta.dev(), meta.ino()));
    if !pin.exists() {
        let tmp = dir.join(format!(".{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        if std::fs::hard_link(exe, &tmp).is_err() {
            std::fs::copy(exe, &tmp).with_context(|| format!("copy {}", exe.display()))?;
        }
        std::fs::rename(&tmp, &pin).with_context(|| format!("rename to {}", pin.display()))?;
    }
    let day = std::time::Duration::from_secs(86_400);
    for old in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let path = old.path();
        let stale = old
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > day));
        let same_bin = old
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(name))
            .is_some_and(|rest| rest.starts_with('-'));
        if stale && same_bin && path != pin {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(pin)
}

/// Variables cargo (or nextest) sets for the test's own crate, which no build should inherit.
fn set_for_the_test_crate(name: &str) -> bool {
    const EXACT: [&str; 7] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
    ];
    EXACT.contains(&name)
        || name == "OUT_DIR"
        || name.starts_with("CARGO_PKG_")
        || name.starts_with("CARGO_BIN_EXE_")
}
