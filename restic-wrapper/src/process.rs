//! Running one restic process: a clean environment holding only what restic needs, stdout
//! parsed line by line into messages (or collected), stderr scrubbed of secrets and kept as a
//! short tail, and an interrupt-then-kill stop on cancellation or drop, so restic removes its
//! own lock instead of leaving a stale one behind. A caller's [`SpawnObserver`] hears of every
//! process started and reaped, so it can tell its own restic processes' locks from others'.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Error, Failure, classify};
use crate::message::{Message, Stream};

/// One restic process this crate started.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SpawnedProcess {
    /// The process id. It is restic's own (the one in its locks) unless a launcher stays in
    /// between: `nice`, `ionice` and `taskset` exec restic and keep it.
    pub pid: u32,
    /// What the command does, as errors name it ("back up", "list locks", …).
    pub action: &'static str,
    /// The repository, without credentials ([`crate::Repository::display_name`]).
    pub repository: String,
}

/// Hears of every restic process a [`crate::Restic`] starts and reaps. `started` is called
/// right after the process starts, before restic can have opened the repository (and so
/// before it can have taken a lock); `exited` once it is reaped, with its status. A process
/// left running when no tokio runtime is there to reap it is killed and never reported.
/// Both are called from async code, `started` before the spawning call returns: keep them
/// short.
pub trait SpawnObserver: Send + Sync + std::fmt::Debug {
    fn started(&self, process: &SpawnedProcess);
    fn exited(&self, process: &SpawnedProcess, status: ExitStatus);
}

/// How many stderr lines are kept for error messages.
const STDERR_TAIL_LINES: usize = 20;

/// What to do with stdout.
pub(crate) enum StdoutMode {
    /// Parse JSON lines into messages, forwarded to the caller and kept for the result.
    Messages(Stream, Option<mpsc::UnboundedSender<Message>>),
    /// Collect everything (JSON documents such as `snapshots --json`).
    Collect,
    /// Copy the bytes into a writer (`dump`).
    Pipe(Box<dyn AsyncWrite + Send + Unpin>),
}

/// One prepared restic invocation.
pub(crate) struct Invocation {
    pub program: PathBuf,
    pub launcher: Vec<OsString>,
    pub args: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub current_dir: Option<PathBuf>,
    pub action: &'static str,
    pub repository: String,
    pub secrets: Arc<Vec<Vec<u8>>>,
    pub grace: Duration,
    /// Stop the command (SIGINT, then SIGKILL) if it has not finished by then.
    pub timeout: Option<Duration>,
    pub observer: Option<Arc<dyn SpawnObserver>>,
}

/// What a successful run produced.
#[derive(Debug, Default)]
pub(crate) struct Output {
    pub stdout: Vec<u8>,
    pub messages: Vec<Message>,
}

/// The observer of one process, told of its exit once.
struct Watch {
    observer: Arc<dyn SpawnObserver>,
    process: SpawnedProcess,
}

impl Watch {
    fn exited(self, status: &std::io::Result<ExitStatus>) {
        if let Ok(status) = status {
            self.observer.exited(&self.process, *status);
        }
    }
}

/// Kills the child gently when dropped: SIGINT first, SIGKILL after the grace period.
struct ChildGuard {
    child: Option<Child>,
    grace: Duration,
    watch: Option<Watch>,
}

impl ChildGuard {
    /// Tells the observer how the process ended, once it has been reaped.
    fn reaped(&mut self, status: std::io::Result<ExitStatus>) -> std::io::Result<ExitStatus> {
        if let Some(watch) = self.watch.take() {
            watch.exited(&status);
        }
        status
    }

    fn pid(&self) -> Option<Pid> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw)
    }

    fn interrupt(&self) {
        if let Some(pid) = self.pid() {
            // The process may have exited in the meantime; nothing to do then.
            let _ = kill(pid, Signal::SIGINT);
        }
    }

    async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        let status = match self.child.as_mut() {
            Some(child) => child.wait().await,
            None => return Err(std::io::Error::other("the process was already reaped")),
        };
        self.reaped(status)
    }

    /// Interrupts, waits up to the grace period, then kills.
    async fn stop(&mut self) -> std::io::Result<ExitStatus> {
        self.interrupt();
        let grace = self.grace;
        let Some(child) = self.child.as_mut() else {
            return Err(std::io::Error::other("the process was already reaped"));
        };
        let status = match tokio::time::timeout(grace, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(
                    grace_secs = grace.as_secs(),
                    "restic ignored SIGINT; killing it"
                );
                child.kill().await?;
                child.wait().await
            }
        };
        self.reaped(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let watch = self.watch.take();
        if let Ok(Some(status)) = child.try_wait() {
            if let Some(watch) = watch {
                watch.exited(&Ok(status));
            }
            return;
        }
        if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        let grace = self.grace;
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let status = match tokio::time::timeout(grace, child.wait()).await {
                        Ok(status) => status,
                        Err(_) => {
                            let _ = child.kill().await;
                            child.wait().await
                        }
                    };
                    if let Some(watch) = watch {
                        watch.exited(&status);
                    }
                });
            }
            Err(_) => {
                // No runtime to wait on: fall back to an immediate kill so nothing leaks.
                let _ = child.start_kill();
            }
        }
    }
}

type StdoutResult = Result<(Vec<u8>, Vec<Message>), std::io::Error>;

/// A running restic process.
pub(crate) struct Running {
    guard: ChildGuard,
    stdin: Option<ChildStdin>,
    stdout_task: JoinHandle<StdoutResult>,
    stderr_task: JoinHandle<StderrCapture>,
    action: &'static str,
    repository: String,
    timeout: Option<Duration>,
}

#[derive(Debug, Default)]
struct StderrCapture {
    tail: VecDeque<String>,
    exit_message: Option<String>,
    unreadable: Vec<String>,
}

/// The capacity asked for restic's stdin pipe.
const STDIN_PIPE_BYTES: i32 = 1 << 20;

pub(crate) fn spawn(
    inv: Invocation,
    stdout: StdoutMode,
    with_stdin: bool,
) -> Result<Running, Error> {
    let (program, mut args) = match inv.launcher.split_first() {
        Some((first, rest)) => {
            let mut args: Vec<OsString> = rest.to_vec();
            args.push(inv.program.clone().into_os_string());
            (PathBuf::from(first), args)
        }
        None => (inv.program.clone(), Vec::new()),
    };
    args.extend(inv.args.iter().cloned());
    tracing::debug!(action = inv.action, program = %program.display(), args = ?args, "running restic");
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        // Only what restic needs: nothing from this process's environment leaks in, and a
        // RESTIC_* variable set by accident cannot redirect the command.
        .env_clear()
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .stdin(if with_stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // We stop the child ourselves (SIGINT, then SIGKILL) so restic can release its lock.
        .kill_on_drop(false);
    if let Some(dir) = &inv.current_dir {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        program: program.clone(),
        source,
    })?;
    // Told now, while restic is still starting up: it takes its lock only after opening the
    // repository, so whatever the observer records is in place before any lock exists.
    let watch = match (inv.observer, child.id()) {
        (Some(observer), Some(pid)) => {
            let process = SpawnedProcess {
                pid,
                action: inv.action,
                repository: inv.repository.clone(),
            };
            observer.started(&process);
            Some(Watch { observer, process })
        }
        _ => None,
    };
    let stdin = child.stdin.take();
    let out = child.stdout.take();
    let err = child.stderr.take();
    // From here on the guard owns the process: an early return stops it and reports its end.
    let guard = ChildGuard {
        child: Some(child),
        grace: inv.grace,
        watch,
    };
    if let Some(pipe) = &stdin {
        // A 64 KiB pipe makes restic wait for this process some 20,000 times per GiB of a
        // stream backup; 1 MiB (the default unprivileged maximum) keeps its chunker fed.
        // Only a hint: a smaller pipe still works.
        let _ = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(STDIN_PIPE_BYTES));
    }
    let out = out.ok_or_else(|| Error::Io {
        action: "capture restic's output",
        source: std::io::Error::other("no stdout pipe"),
    })?;
    let err = err.ok_or_else(|| Error::Io {
        action: "capture restic's errors",
        source: std::io::Error::other("no stderr pipe"),
    })?;
    let stdout_task = tokio::spawn(read_stdout(out, stdout));
    let stderr_task = tokio::spawn(read_stderr(err, inv.secrets.clone()));
    Ok(Running {
        guard,
        stdin,
        stdout_task,
        stderr_task,
        action: inv.action,
        repository: inv.repository,
        timeout: inv.timeout,
    })
}

async fn read_stdout(out: impl AsyncRead + Unpin, mode: StdoutMode) -> StdoutResult {
    match mode {
        StdoutMode::Collect => {
            let mut buf = Vec::new();
            let mut out = out;
            tokio::io::AsyncReadExt::read_to_end(&mut out, &mut buf).await?;
            Ok((buf, Vec::new()))
        }
        StdoutMode::Pipe(mut writer) => {
            let mut out = out;
            tokio::io::copy(&mut out, &mut writer).await?;
            writer.flush().await?;
            writer.shutdown().await?;
            Ok((Vec::new(), Vec::new()))
        }
        StdoutMode::Messages(stream, tx) => {
            let mut lines = BufReader::new(out).split(b'\n');
            let mut kept = Vec::new();
            while let Some(line) = lines.next_segment().await? {
                if line.is_empty() {
                    continue;
                }
                let msg = Message::parse(stream, &line);
                // Progress is forwarded but not kept: a long backup prints thousands of them.
                let keep = !matches!(msg, Message::BackupStatus(_) | Message::RestoreStatus(_));
                if let Some(tx) = &tx {
                    let _ = tx.send(msg.clone());
                }
                if keep {
                    kept.push(msg);
                }
            }
            Ok((Vec::new(), kept))
        }
    }
}

async fn read_stderr(err: impl AsyncRead + Unpin, secrets: Arc<Vec<Vec<u8>>>) -> StderrCapture {
    let mut cap = StderrCapture::default();
    let mut lines = BufReader::new(err).split(b'\n');
    while let Ok(Some(line)) = lines.next_segment().await {
        let line = scrub(&line, &secrets);
        match Message::parse(Stream::Other, line.as_bytes()) {
            Message::ExitError(e) => cap.exit_message = Some(e.message),
            Message::Error(e) => {
                tracing::warn!(item = %e.item, error = %e.error.message, "restic could not process an item");
                cap.unreadable.push(e.item);
            }
            _ => {
                tracing::debug!(stderr = %line, "restic");
                if cap.tail.len() == STDERR_TAIL_LINES {
                    cap.tail.pop_front();
                }
                cap.tail.push_back(line);
            }
        }
    }
    cap
}

/// Replaces every secret value in a line of output with `***`.
pub(crate) fn scrub(line: &[u8], secrets: &[Vec<u8>]) -> String {
    let mut text = String::from_utf8_lossy(line).trim_end().to_owned();
    for secret in secrets {
        // Short values (a one-letter test password) would blank out ordinary words.
        if secret.len() < 4 {
            continue;
        }
        if let Ok(s) = std::str::from_utf8(secret)
            && text.contains(s)
        {
            text = text.replace(s, "***");
        }
    }
    text
}

impl Running {
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// Asks restic to stop (SIGINT), then kills it after the grace period.
    pub async fn stop(&mut self) -> std::io::Result<ExitStatus> {
        self.stdin.take();
        self.guard.stop().await
    }

    /// Waits for the process and returns its output, or the classified error.
    pub async fn finish(mut self, interrupted: bool) -> Result<Output, Error> {
        self.stdin.take();
        let mut timed_out = None;
        let waited = match self.timeout {
            Some(limit) => match tokio::time::timeout(limit, self.guard.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    timed_out = Some(limit);
                    self.guard.stop().await
                }
            },
            None => self.guard.wait().await,
        };
        let status = waited.map_err(|source| Error::Io {
            action: "wait for restic",
            source,
        })?;
        let (stdout, messages) = match (&mut self.stdout_task).await {
            Ok(Ok(out)) => out,
            Ok(Err(source)) => {
                return Err(Error::Io {
                    action: "read restic's output",
                    source,
                });
            }
            Err(join) => {
                return Err(Error::Io {
                    action: "read restic's output",
                    source: std::io::Error::other(join.to_string()),
                });
            }
        };
        let cap = (&mut self.stderr_task).await.unwrap_or_default();
        if status.success() && !interrupted && timed_out.is_none() {
            return Ok(Output { stdout, messages });
        }
        let snapshot_id = messages.iter().find_map(|m| match m {
            Message::BackupSummary(s) => s.snapshot_id.clone(),
            _ => None,
        });
        let failure = Failure {
            code: status.code(),
            exit_message: cap.exit_message,
            unreadable: cap.unreadable,
            stderr_tail: cap.tail.into_iter().collect::<Vec<_>>().join("\n"),
            snapshot_id,
            interrupted,
            timed_out,
        };
        Err(classify(self.action, &self.repository, failure))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_removes_secrets_but_not_short_values() {
        let secrets = vec![b"hunter22".to_vec(), b"pw".to_vec()];
        assert_eq!(
            scrub(b"Fatal: bad key hunter22 for pw\n", &secrets),
            "Fatal: bad key *** for pw"
        );
    }
}
