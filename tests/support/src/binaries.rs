//! This checkout's own binaries, built (or found current) with `cargo build --locked`, so a
//! test that runs them as processes never runs a stale copy. Cargo reports where it put each
//! executable, which keeps `CARGO_TARGET_DIR` and profiles out of the test's guesswork.
//!
//! The build selects what `cargo test --workspace` (nextest) selects, every bin and test of
//! the workspace, so features resolve the same way: inside a test run it finds everything
//! current and relinks nothing. A narrower build (`-p <crate>`) resolves other features and
//! relinks `target/debug/<bin>` under the feet of other tests executing it.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Builds the workspace's bins and tests; returns the executables of `bins` by name.
pub fn build(bins: &[&str]) -> Result<BTreeMap<String, PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let out = std::process::Command::new(cargo)
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
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
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
    for bin in bins {
        if !found.contains_key(*bin) {
            bail!("cargo build reported no executable for {bin}");
        }
    }
    Ok(found)
}
