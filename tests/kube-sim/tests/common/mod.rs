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

/// What a kubectl run printed and how it ended.
#[allow(dead_code)]
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs kubectl with `kubeconfig` and a private discovery cache, feeding it `stdin`.
#[allow(dead_code)]
pub async fn kubectl(
    kubeconfig: &std::path::Path,
    cache: &std::path::Path,
    args: &[&str],
    stdin: &str,
) -> Out {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("KUBECACHEDIR", cache)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl runs");
    let mut input = child.stdin.take().expect("a stdin pipe");
    input
        .write_all(stdin.as_bytes())
        .await
        .expect("kubectl reads its input");
    drop(input);
    let out = child.wait_with_output().await.expect("kubectl ends");
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
