//! The tools `make setup` installs into `.tools/bin` (restic, kubectl, helm, garage,
//! pushgateway), found from the workspace root so that a fresh clone works after setup.

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// The workspace root (this crate lives in `tests/support`).
pub fn workspace() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize().unwrap_or(root)
}

/// A tool from `.tools/bin`, else from PATH.
pub fn tool(name: &str) -> Result<PathBuf> {
    let local = workspace().join(".tools/bin").join(name);
    if local.exists() {
        return Ok(local);
    }
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    });
    match found {
        Some(p) => Ok(p),
        None => bail!("{name} is not installed: run `make setup`"),
    }
}
