//! This checkout's own binaries, built (or found current) with `cargo build --locked`, so a
//! test that runs them as processes never runs a stale copy. Cargo reports where it put each
//! executable, which keeps `CARGO_TARGET_DIR` and profiles out of the test's guesswork.

use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Builds `(package, bin)` pairs in one cargo run (one feature resolution, one lock wait)
/// and returns each bin's executable by name.
pub fn build(bins: &[(&str, &str)]) -> Result<BTreeMap<String, PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args([
        "build",
        "--locked",
        "--message-format=json-render-diagnostics",
    ]);
    for (package, bin) in bins {
        cmd.args(["-p", package, "--bin", bin]);
    }
    let out = cmd
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
        if msg["reason"] == "compiler-artifact"
            && let Some(exe) = msg["executable"].as_str()
            && let Some(name) = msg["target"]["name"].as_str()
        {
            found.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    for (_, bin) in bins {
        if !found.contains_key(*bin) {
            bail!("cargo build reported no executable for {bin}");
        }
    }
    Ok(found)
}
