//! Shared by the integration tests.

use std::process::{Command, Stdio};

/// kubectl is installed by `make setup`; a missing one is a broken setup, not a pass.
pub fn require_kubectl() {
    let works = Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(works, "kubectl not found on PATH: run `make setup`");
}
