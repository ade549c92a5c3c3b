//! Running one restic process: a clean environment holding only what restic needs, stdout
//! parsed line by line into messages (or collected), stderr scrubbed of secrets and kept as a
//! short tail, and an interrupt-then-kill stop on cancellation or drop, so restic removes its
//! own lock instead of leaving a stale one behind. A caller's [`SpawnObserver`] hears of every
//! process started and reaped, so it can tell its own restic processes' locks from others'.
//! A program that installs an [`ExecShim`] has every restic die with it (see there).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
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

/// How restic is made to die with the program that started it.
///
/// A restic that outlives its agent is the worst failure a backup can have: fed a stream,
/// it sees the end of its stdin when the agent dies and saves a snapshot of the truncated
/// stream; reading a directory, it finishes a backup no one will mark complete. Nothing in
/// a dying process can prevent that, so the kernel must: `PR_SET_PDEATHSIG` sends restic
/// SIGTERM when its parent goes, and restic, as on SIGINT, cancels, saves nothing and
/// removes its lock (SIGKILL would leave the lock for an exclusive `forget` to trip on).
///
/// The signal can only be asked for by the child itself, between `fork` and `exec`, which
/// std allows only in `unsafe` code; so the child is first this very program
/// (`/proc/self/exe`, the right binary even if the file was replaced), run with
/// `subcommand`, which calls [`exec_with_parent_death`]: it sets the signal on itself and
/// `exec`s restic, keeping its pid (the one in restic's locks) and the signal. Inverting the
/// pipe with restic's `--stdin-from-command` would cover stream backups only, and put
/// restic in charge of the agent's reader and its IO budget.
///
/// The kernel sends the signal when the *thread* that forked the child exits, not the
/// process: tokio's blocking threads come and go, and a worker thread can end inside
/// `block_in_place`. So with a shim every restic is started from one thread that lives as
/// long as the process (see `spawn_child`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecShim {
    /// The hidden subcommand of this program that calls [`exec_with_parent_death`].
    pub subcommand: OsString,
}

static EXEC_SHIM: OnceLock<ExecShim> = OnceLock::new();

/// Starts every later restic of this process through `shim`. A process property, not a
/// client's: every [`crate::Restic`] and its clones, however made, must get it. Set once;
/// a second call keeps the first shim and returns `false`.
pub fn install_exec_shim(shim: ExecShim) -> bool {
    EXEC_SHIM.set(shim).is_ok()
}

/// The body of the shim's subcommand. `args` are what follows the subcommand: the pid of
/// the process that started it, then the program to run and its arguments. Returns only if
/// it could not run the program.
pub fn exec_with_parent_death(args: impl IntoIterator<Item = OsString>) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let mut args = args.into_iter();
    let parent = args
        .next()
        .and_then(|p| p.to_str().and_then(|p| p.parse::<i32>().ok()));
    let Some(program) = args.next() else {
        return std::io::Error::other("usage: <parent pid> <program> [args…]");
    };
    let death =
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
    if let Err(e) = death {
        return std::io::Error::other(format!("failed to ask for the parent-death signal: {e}"));
    }
    // The parent may have died before the signal was asked for: then it never comes.
    let parent_now = rustix::process::getppid().map(rustix::process::Pid::as_raw_nonzero);
    if parent.is_none() || parent_now.map(|p| p.get()) != parent {
        return std::io::Error::other("the process that started restic is gone");
    }
    // The environment is already restic's alone (`spawn` clears it), and `exec` keeps this
    // pid and the signal (for a program without set-user-id bits or file capabilities).
    std::process::Command::new(&program).args(args).exec()
}

/// A request to the thread that starts restic processes.
struct SpawnRequest {
    command: Command,
    inherit: Vec<std::os::fd::OwnedFd>,
    runtime: tokio::runtime::Handle,
    reply: std::sync::mpsc::SyncSender<std::io::Result<Child>>,
}

impl SpawnRequest {
    fn spawn(mut self) -> std::io::Result<Child> {
        for fd in &self.inherit {
            rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
        }
        let _entered = self.runtime.enter();
        // The copies close here, in this process; the child keeps its own.
        self.command.spawn()
    }
}

/// Starts `command` from the one thread of this process that starts restic processes, so
/// their parent-death signal is tied to the process, not to a thread that may end first.
/// The child is still tokio's: the thread enters the caller's runtime to start it. It also
/// inherits a copy of each of `inherit` (all of this process's own descriptors are
/// close-on-exec; these alone are not, and only while this one thread starts a child).
fn spawn_child(command: Command, inherit: Vec<std::os::fd::OwnedFd>) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Result<Mutex<std::sync::mpsc::Sender<SpawnRequest>>, String>> =
        OnceLock::new();
    let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("restic-spawner".into())
            .spawn(move || {
                for request in rx {
                    let reply = request.reply.clone();
                    let _ = reply.send(request.spawn());
                }
            })
            .map(|_| Mutex::new(tx))
            .map_err(|e| format!("failed to start the thread that starts restic: {e}"))
    });
    let spawner = spawner
        .as_ref()
        .map_err(|e| std::io::Error::other(e.clone()))?;
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let sent = spawner
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send(SpawnRequest {
            command,
            inherit,
            runtime,
            reply,
        });
    if let Err(std::sync::mpsc::SendError(request)) = sent {
        // The thread is gone (it never ends by itself); start here rather than not at all.
        return request.spawn();
    }
    // A wait of one fork and exec, as long as a spawn on this thread would block it.
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the thread that starts restic ended"))?
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
    /// `cgroup.procs` files the child writes itself into before it runs (see `cgroup_join`).
    pub join_cgroups: Vec<Arc<std::os::fd::OwnedFd>>,
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
    stream: Option<StreamInput>,
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

/// The capacity asked for restic's stdin pipe (and its stream socket's send buffer).
const STDIN_PIPE_BYTES: i32 = 1 << 20;

/// What restic's stdin is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Input {
    /// `/dev/null`.
    Null,
    /// A pipe, for a few bytes (a new key's password).
    Pipe,
    /// A [`StreamInput`]: data restic stores, committed only by [`StreamInput::commit`].
    Stream,
}

/// The writing end of the stream restic backs up from stdin.
///
/// restic saves a snapshot when its stdin ends, and an ordinary pipe ends the same way
/// whether the writer finished or died: a stream cut short by a killed agent would be
/// saved as if whole. So restic reads a Unix socket instead, and the kernel tells the two
/// apart: a socket closed while data sent *to* it is still unread makes its peer's next
/// read fail with `ECONNRESET` (Linux `unix_release_sock`). One byte is sent to this end
/// before restic starts, and read back only by [`StreamInput::commit`], after the last
/// byte of the stream: closed any other way — the process killed, the input failed, this
/// value dropped — restic's read fails, and restic stores no file (it saves a snapshot
/// without it and exits 3).
pub(crate) struct StreamInput {
    socket: tokio::net::UnixStream,
}

impl StreamInput {
    /// Creates the socket pair: this end, and restic's stdin.
    fn new() -> std::io::Result<(StreamInput, std::os::fd::OwnedFd)> {
        use std::io::Write;
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair()?;
        theirs.write_all(&[COMMIT_BYTE])?;
        // Only a hint, as for the pipe; root may pass the system's limit, others not.
        let size = STDIN_PIPE_BYTES as usize;
        if rustix::net::sockopt::set_socket_send_buffer_size_force(&ours, size).is_err() {
            let _ = rustix::net::sockopt::set_socket_send_buffer_size(&ours, size);
        }
        ours.set_nonblocking(true)?;
        let socket = tokio::net::UnixStream::from_std(ours)?;
        Ok((StreamInput { socket }, theirs.into()))
    }

    /// Ends the stream as complete: restic sees the end of its input and saves it.
    pub async fn commit(mut self) -> std::io::Result<()> {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        self.socket.read_exact(&mut byte).await?;
        self.socket.shutdown().await
    }
}

impl AsyncWrite for StreamInput {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.socket).poll_flush(cx)
    }

    /// Not an end of the stream (that is [`StreamInput::commit`]): the socket stays open
    /// until dropped, and a drop without a commit aborts it.
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The byte [`StreamInput`] keeps unread until it commits.
const COMMIT_BYTE: u8 = b'.';

pub(crate) fn spawn(inv: Invocation, stdout: StdoutMode, input: Input) -> Result<Running, Error> {
    let mut chain: Vec<OsString> = Vec::new();
    if let Some(shim) = EXEC_SHIM.get() {
        chain.extend([
            "/proc/self/exe".into(),
            shim.subcommand.clone(),
            std::process::id().to_string().into(),
        ]);
    }
    chain.extend(inv.launcher.iter().cloned());
    chain.push(inv.program.clone().into_os_string());
    chain.extend(inv.args.iter().cloned());
    let mut chain = chain.into_iter();
    let program = PathBuf::from(chain.next().unwrap_or_default());
    let args: Vec<OsString> = chain.collect();
    tracing::debug!(action = inv.action, program = %program.display(), args = ?args, "running restic");
    let pipes = || -> std::io::Result<_> { Ok((std::io::pipe()?, std::io::pipe()?)) };
    let ((out, out_w), (err, err_w)) = pipes().map_err(|source| Error::Io {
        action: "create restic's output pipes",
        source,
    })?;
    // restic holds a copy of the reading ends of its own output: if this process dies, its
    // writes still succeed (a few lines fit in the pipe), where a broken pipe would kill it
    // (Go exits on SIGPIPE from stdout or stderr) before it removes its lock. Not of a
    // `dump`'s stdout, which is the data itself: the pipe would fill within a moment and
    // restic block on it for good, deaf to the parent-death signal and refreshing its lock
    // forever. Killed by the broken pipe instead, it leaves a lock of a dead process, which
    // the next agent removes (`locks`).
    let piped_data = matches!(stdout, StdoutMode::Pipe(_));
    let keep_open = [
        (!piped_data).then(|| out.try_clone()),
        Some(err.try_clone()),
    ]
    .into_iter()
    .flatten()
    .map(|r| r.map(std::os::fd::OwnedFd::from))
    .collect::<std::io::Result<Vec<_>>>()
    .map_err(|source| Error::Io {
        action: "create restic's output pipes",
        source,
    })?;
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        // Only what restic needs: nothing from this process's environment leaks in, and a
        // RESTIC_* variable set by accident cannot redirect the command.
        .env_clear()
        .envs(inv.env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::from(out_w))
        .stderr(Stdio::from(err_w))
        // We stop the child ourselves (SIGINT, then SIGKILL) so restic can release its lock.
        .kill_on_drop(false);
    if let Some(dir) = &inv.current_dir {
        cmd.current_dir(dir);
    }
    crate::cgroup_join::before_exec(&mut cmd, inv.join_cgroups.clone());
    let mut stream = None;
    match input {
        Input::Null => {
            cmd.stdin(Stdio::null());
        }
        Input::Pipe => {
            cmd.stdin(Stdio::piped());
        }
        Input::Stream => {
            let (ours, theirs) = StreamInput::new().map_err(|source| Error::Io {
                action: "create restic's input stream",
                source,
            })?;
            cmd.stdin(Stdio::from(theirs));
            stream = Some(ours);
        }
    }
    let mut child = spawn_child(cmd, keep_open).map_err(|source| Error::Spawn {
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
    let receiver = |r: std::io::PipeReader| {
        tokio::net::unix::pipe::Receiver::from_owned_fd(r.into()).map_err(|source| Error::Io {
            action: "capture restic's output",
            source,
        })
    };
    let (out, err) = (receiver(out)?, receiver(err)?);
    let stdout_task = tokio::spawn(read_stdout(out, stdout));
    let stderr_task = tokio::spawn(read_stderr(err, inv.secrets.clone()));
    Ok(Running {
        guard,
        stdin,
        stream,
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

    pub fn take_stream(&mut self) -> Option<StreamInput> {
        self.stream.take()
    }

    /// Asks restic to stop (SIGINT), then kills it after the grace period.
    pub async fn stop(&mut self) -> std::io::Result<ExitStatus> {
        self.stdin.take();
        self.stream.take();
        self.guard.stop().await
    }

    /// Waits for the process and returns its output, or the classified error.
    pub async fn finish(mut self, interrupted: bool) -> Result<Output, Error> {
        self.stdin.take();
        self.stream.take();
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
