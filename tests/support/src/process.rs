//! Running a tool as a test does: its output captured, killed if the test gives up, and a
//! failure that quotes what the tool said.

use anyhow::{Context, Result, bail};
use std::process::{Output, Stdio};
use tokio::io::AsyncWriteExt;

/// Runs `cmd` with its stdout and stderr captured, feeding it `stdin`;
/// fails with its stderr and stdout when it exits non-zero. `what` names it in errors.
pub async fn run(
    mut cmd: tokio::process::Command,
    stdin: Option<&[u8]>,
    what: &str,
) -> Result<Output> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start {what}"))?;
    if let Some(input) = stdin {
        let mut si = child.stdin.take().context("no stdin")?;
        si.write_all(input).await?;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

/// Sends `tracing` output (cluster-sim's warnings) to the test's captured output; a
/// second call is a no-op.
pub fn log_to_test_output() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}
