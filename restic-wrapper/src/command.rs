//! The restic client: one typed method per command. Every command runs with the repository's
//! environment and global flags; long commands (backup, restore) stream their progress.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::backend::{Repository, SecretValue};
use crate::error::Error;
use crate::message::{BackupSummary, Message, RestoreSummary, Stream};
use crate::process::{Input, Invocation, Output, Running, SpawnObserver, StdoutMode, spawn};
use crate::types::{CheckSummary, ForgetGroup, ForgetResult, Key, Node, Snapshot, Stats, Version};

/// How restic caches repository metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cache {
    /// A persistent directory (`--cache-dir`), so incremental backups stay cheap.
    Dir(PathBuf),
    /// `--no-cache`.
    Disabled,
}

/// A restic client for one repository.
#[derive(Clone, Debug)]
pub struct Restic {
    program: PathBuf,
    launcher: Vec<OsString>,
    repository: Repository,
    cache: Cache,
    base_env: Vec<(OsString, OsString)>,
    grace: Duration,
    progress_interval: Duration,
    retry_lock: Option<Duration>,
    timeout: Option<Duration>,
    observer: Option<Arc<dyn SpawnObserver>>,
}

/// Filters shared by `snapshots`, `forget`, `restore` and `dump`.
#[derive(Clone, Debug, Default)]
pub struct SnapshotFilter {
    pub hosts: Vec<String>,
    /// Each entry is a comma-separated set of tags that must all be present.
    pub tags: Vec<String>,
    pub paths: Vec<String>,
}

impl SnapshotFilter {
    fn args(&self, out: &mut Vec<OsString>) {
        for h in &self.hosts {
            out.extend(["--host".into(), h.into()]);
        }
        for t in &self.tags {
            out.extend(["--tag".into(), t.into()]);
        }
        for p in &self.paths {
            out.extend(["--path".into(), p.into()]);
        }
    }
}

/// Options of `restic backup`.
#[derive(Clone, Debug, Default)]
pub struct BackupOptions {
    pub host: Option<String>,
    pub tags: Vec<String>,
    pub excludes: Vec<String>,
    pub parent: Option<String>,
    pub read_concurrency: Option<u32>,
    /// KiB/s, restic's unit.
    pub limit_upload_kib: Option<u64>,
    /// `auto`, `off` or `max`.
    pub compression: Option<String>,
    /// MiB.
    pub pack_size_mib: Option<u32>,
    pub skip_if_unchanged: bool,
    /// Extra arguments from the user (`target.args`), appended last.
    pub extra_args: Vec<String>,
    /// `cgroup.procs` files, open for writing, that restic joins before it starts: its
    /// reads and page cache are then the cgroups' from its first read.
    pub join_cgroups: Vec<Arc<std::os::fd::OwnedFd>>,
}

/// Retention of `restic forget` (STASH-API.md §1.2); zero or `None` means "not set".
#[derive(Clone, Debug, Default)]
pub struct ForgetOptions {
    pub keep_last: Option<u64>,
    pub keep_hourly: Option<u64>,
    pub keep_daily: Option<u64>,
    pub keep_weekly: Option<u64>,
    pub keep_monthly: Option<u64>,
    pub keep_yearly: Option<u64>,
    pub keep_tags: Vec<String>,
    pub prune: bool,
    pub dry_run: bool,
    pub filter: SnapshotFilter,
    /// `--group-by`, restic's default is `host,paths`.
    pub group_by: Option<String>,
}

/// Options of `restic prune`.
#[derive(Clone, Debug, Default)]
pub struct PruneOptions {
    pub dry_run: bool,
    pub max_unused: Option<String>,
    pub max_repack_size: Option<String>,
    pub repack_cacheable_only: bool,
    pub repack_small: bool,
    pub repack_uncompressed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsMode {
    RawData,
    RestoreSize,
}

/// `restic restore --overwrite`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overwrite {
    Always,
    #[default]
    IfChanged,
    IfNewer,
    Never,
}

/// Options of `restic restore`.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// A snapshot id or `latest` (with `filter`), optionally `<id>:<subfolder>`.
    pub snapshot: String,
    pub target: PathBuf,
    pub includes: Vec<String>,
    pub excludes: Vec<String>,
    pub filter: SnapshotFilter,
    pub overwrite: Overwrite,
    /// Delete files in the target that are not in the snapshot.
    pub delete: bool,
    pub extra_args: Vec<String>,
}

/// A running backup: progress arrives on `messages`, the result from `finish`.
pub struct BackupRun {
    running: Option<Running>,
    messages: Option<mpsc::UnboundedReceiver<Message>>,
    input: Option<Box<dyn AsyncRead + Send + Unpin>>,
    restic: Restic,
}

impl std::fmt::Debug for BackupRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupRun").finish_non_exhaustive()
    }
}

/// A running restore: progress arrives on `messages`, the result from `finish`.
pub struct RestoreRun {
    running: Running,
    messages: Option<mpsc::UnboundedReceiver<Message>>,
}

impl std::fmt::Debug for RestoreRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreRun").finish_non_exhaustive()
    }
}

impl Restic {
    /// A client running `restic` from PATH with the cache disabled; see the `with_*` methods.
    pub fn new(repository: Repository) -> Restic {
        let mut base_env = Vec::new();
        for key in ["PATH", "HOME", "TMPDIR", "LANG", "TZ"] {
            if let Some(value) = std::env::var_os(key) {
                base_env.push((key.into(), value));
            }
        }
        Restic {
            program: "restic".into(),
            launcher: Vec::new(),
            repository,
            cache: Cache::Disabled,
            base_env,
            grace: Duration::from_secs(30),
            progress_interval: Duration::from_secs(2),
            retry_lock: None,
            timeout: None,
            observer: None,
        }
    }

    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Runs restic through other programs, for example `nice -n 10 ionice -c 2 -n 7`.
    pub fn with_launcher(mut self, launcher: Vec<OsString>) -> Self {
        self.launcher = launcher;
        self
    }

    pub fn with_cache(mut self, cache: Cache) -> Self {
        self.cache = cache;
        self
    }

    /// Scratch space for restic's temporary files.
    pub fn with_tmp_dir(mut self, dir: &Path) -> Self {
        self.base_env.retain(|(k, _)| k != "TMPDIR");
        self.base_env.push(("TMPDIR".into(), dir.into()));
        self
    }

    /// How long restic gets to exit after SIGINT before it is killed.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// How often backup and restore report progress.
    pub fn with_progress_interval(mut self, every: Duration) -> Self {
        self.progress_interval = every.max(Duration::from_millis(50));
        self
    }

    /// Wait up to this long for a lock held by someone else (`--retry-lock`).
    pub fn with_retry_lock(mut self, wait: Duration) -> Self {
        self.retry_lock = Some(wait);
        self
    }

    /// Stop any command still running after this long. restic itself retries an unreachable
    /// backend for many minutes; a deadline turns that into a retryable error.
    pub fn with_timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Tells `observer` of every restic process this client (and its clones) starts and reaps.
    pub fn with_spawn_observer(mut self, observer: Arc<dyn SpawnObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    fn invocation(&self, action: &'static str, args: Vec<OsString>) -> Invocation {
        // Global flags go before the command: after a command's own `--` (backup's paths)
        // restic would take them for more paths, backing up the cache directory and
        // ignoring the rest.
        let mut full: Vec<OsString> = Vec::new();
        match &self.cache {
            Cache::Dir(dir) => full.extend(["--cache-dir".into(), dir.clone().into()]),
            Cache::Disabled => full.push("--no-cache".into()),
        }
        if let Some(wait) = self.retry_lock {
            full.extend(["--retry-lock".into(), format!("{}s", wait.as_secs()).into()]);
        }
        full.extend(self.repository.global_args().iter().cloned());
        full.extend(args);
        let fps = 1.0 / self.progress_interval.as_secs_f64();
        let mut env = self.base_env.clone();
        env.push(("RESTIC_PROGRESS_FPS".into(), format!("{fps:.6}").into()));
        env.extend(self.repository.env());
        Invocation {
            program: self.program.clone(),
            launcher: self.launcher.clone(),
            args: full,
            env,
            current_dir: None,
            action,
            repository: self.repository.display_name(),
            secrets: Arc::new(
                self.repository
                    .secrets()
                    .values()
                    .map(<[u8]>::to_vec)
                    .collect(),
            ),
            grace: self.grace,
            timeout: self.timeout,
            observer: self.observer.clone(),
            join_cgroups: Vec::new(),
        }
    }

    async fn run(&self, action: &'static str, args: Vec<OsString>) -> Result<Output, Error> {
        spawn(
            self.invocation(action, args),
            StdoutMode::Collect,
            Input::Null,
        )?
        .finish(false)
        .await
    }

    async fn run_json<T: serde::de::DeserializeOwned>(
        &self,
        action: &'static str,
        args: Vec<OsString>,
    ) -> Result<T, Error> {
        let out = self.run(action, args).await?;
        serde_json::from_slice(&out.stdout).map_err(|e| Error::Parse {
            action,
            reason: e.to_string(),
        })
    }

    /// `restic version`, refusing versions older than [`Version::MINIMUM`].
    pub async fn version(&self) -> Result<Version, Error> {
        let mut inv = self.invocation("read the restic version", args(["version", "--json"]));
        // `version` needs no repository: keep secrets out of even this child.
        inv.env
            .retain(|(k, _)| !k.to_string_lossy().starts_with("RESTIC_REPOSITORY"));
        let out = spawn(inv, StdoutMode::Collect, Input::Null)?
            .finish(false)
            .await?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let version = Version::parse(&text).ok_or(Error::UnknownVersion { output: text })?;
        if version < Version::MINIMUM {
            return Err(Error::UnsupportedVersion {
                found: version.to_string(),
                minimum: Version::MINIMUM.to_string(),
            });
        }
        Ok(version)
    }

    /// `restic init`; returns the repository id.
    pub async fn init(&self) -> Result<String, Error> {
        if let crate::backend::Backend::Local { path } = self.repository.backend()
            && let Some(parent) = path.parent()
        {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|source| Error::Io {
                    action: "create the repository's parent directory",
                    source,
                })?;
        }
        let out = self
            .run("initialize the repository", args(["init", "--json"]))
            .await?;
        let value: serde_json::Value = last_json_line(&out.stdout, "initialize the repository")?;
        Ok(value["id"].as_str().unwrap_or_default().to_owned())
    }

    /// Whether the repository exists and opens with this password.
    pub async fn exists(&self) -> Result<bool, Error> {
        match self
            .run(
                "check that the repository exists",
                args(["cat", "config", "--no-lock"]),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::RepositoryNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Initializes the repository unless it exists already. Two `restic init` racing on one
    /// repository can leave a config and key files from different master keys — a repository
    /// no password opens — so initializations of one repository in this process take turns.
    /// (Across processes, one owner must initialize: the operator does, before assigning.)
    pub async fn ensure_initialized(&self) -> Result<(), Error> {
        static LOCKS: std::sync::OnceLock<
            std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
        > = std::sync::OnceLock::new();
        let lock = {
            let mut locks = LOCKS
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            locks
                .entry(self.repository.display_name())
                .or_default()
                .clone()
        };
        let _turn = lock.lock().await;
        // A config file is enough to know without the password: starting restic to open the
        // repository costs its scrypt derivation, half a second before every backup. A wrong
        // password is still reported, by the command that follows.
        if let Ok(files) = crate::native::RepositoryFiles::new(
            self.repository.backend(),
            self.repository.secrets(),
        ) && let Ok(true) = files.has_config().await
        {
            return Ok(());
        }
        if !self.exists().await? {
            self.init().await?;
        }
        Ok(())
    }

    fn backup_args(&self, opts: &BackupOptions) -> Vec<OsString> {
        let mut a = args(["backup", "--json"]);
        if matches!(self.cache, Cache::Dir(_)) {
            a.push("--cleanup-cache".into());
        }
        if let Some(h) = &opts.host {
            a.extend(["--host".into(), h.into()]);
        }
        for t in &opts.tags {
            a.extend(["--tag".into(), t.into()]);
        }
        for e in &opts.excludes {
            a.extend(["--exclude".into(), e.into()]);
        }
        if let Some(p) = &opts.parent {
            a.extend(["--parent".into(), p.into()]);
        }
        if let Some(n) = opts.read_concurrency {
            a.extend(["--read-concurrency".into(), n.to_string().into()]);
        }
        if let Some(n) = opts.limit_upload_kib {
            a.extend(["--limit-upload".into(), n.to_string().into()]);
        }
        if let Some(c) = &opts.compression {
            a.extend(["--compression".into(), c.into()]);
        }
        if let Some(n) = opts.pack_size_mib {
            a.extend(["--pack-size".into(), n.to_string().into()]);
        }
        if opts.skip_if_unchanged {
            a.push("--skip-if-unchanged".into());
        }
        a.extend(opts.extra_args.iter().map(OsString::from));
        a
    }

    /// `restic backup <paths>` run from `cwd` (so snapshot paths are relative to it when
    /// `paths` are relative). Progress streams until [`BackupRun::finish`].
    pub fn backup(
        &self,
        paths: &[PathBuf],
        cwd: Option<&Path>,
        opts: &BackupOptions,
    ) -> Result<BackupRun, Error> {
        let mut a = self.backup_args(opts);
        a.push("--".into());
        a.extend(paths.iter().map(|p| p.clone().into_os_string()));
        let mut inv = self.invocation("back up", a);
        inv.current_dir = cwd.map(Path::to_path_buf);
        inv.join_cgroups = opts.join_cgroups.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        let running = spawn(
            inv,
            StdoutMode::Messages(Stream::Backup, Some(tx)),
            Input::Null,
        )?;
        Ok(BackupRun {
            running: Some(running),
            messages: Some(rx),
            input: None,
            restic: self.clone(),
        })
    }

    /// `restic backup --stdin --stdin-filename <name>` fed from `input`. If `input` fails,
    /// restic is interrupted before it sees the end of the stream, so no snapshot is saved.
    /// restic sees an end of its input only once `input` has ended: if this process dies
    /// first, restic's read fails instead, and a snapshot it saves then lacks the file (see
    /// `StreamInput`); callers must not take such a snapshot for a backup.
    pub fn backup_stdin(
        &self,
        filename: &str,
        input: impl AsyncRead + Send + Unpin + 'static,
        opts: &BackupOptions,
    ) -> Result<BackupRun, Error> {
        let mut a = self.backup_args(opts);
        a.extend(["--stdin".into(), "--stdin-filename".into(), filename.into()]);
        let inv = self.invocation("back up a stream", a);
        let (tx, rx) = mpsc::unbounded_channel();
        let running = spawn(
            inv,
            StdoutMode::Messages(Stream::Backup, Some(tx)),
            Input::Stream,
        )?;
        Ok(BackupRun {
            running: Some(running),
            messages: Some(rx),
            input: Some(Box::new(input)),
            restic: self.clone(),
        })
    }

    /// `restic snapshots --json`.
    pub async fn snapshots(&self, filter: &SnapshotFilter) -> Result<Vec<Snapshot>, Error> {
        let mut a = args(["snapshots", "--json", "--no-lock"]);
        filter.args(&mut a);
        let snaps: Option<Vec<Snapshot>> = self.run_json("list snapshots", a).await?;
        Ok(snaps.unwrap_or_default())
    }

    /// `restic forget` with a retention policy; returns what was kept and removed.
    pub async fn forget(&self, opts: &ForgetOptions) -> Result<ForgetResult, Error> {
        let mut a = args(["forget", "--json"]);
        let keeps = [
            ("--keep-last", opts.keep_last),
            ("--keep-hourly", opts.keep_hourly),
            ("--keep-daily", opts.keep_daily),
            ("--keep-weekly", opts.keep_weekly),
            ("--keep-monthly", opts.keep_monthly),
            ("--keep-yearly", opts.keep_yearly),
        ];
        for (flag, n) in keeps {
            if let Some(n) = n.filter(|n| *n > 0) {
                a.extend([flag.into(), n.to_string().into()]);
            }
        }
        for t in &opts.keep_tags {
            a.extend(["--keep-tag".into(), t.into()]);
        }
        let has_policy =
            keeps.iter().any(|(_, n)| n.is_some_and(|n| n > 0)) || !opts.keep_tags.is_empty();
        if !has_policy {
            // restic would refuse, but say why in our words: an empty policy removes nothing.
            return Err(Error::InvalidOptions {
                action: "apply the retention policy",
                reason: "a retention policy needs at least one keep rule",
            });
        }
        if opts.prune {
            a.push("--prune".into());
        }
        if opts.dry_run {
            a.push("--dry-run".into());
        }
        if let Some(g) = &opts.group_by {
            a.extend(["--group-by".into(), g.into()]);
        }
        opts.filter.args(&mut a);
        let out = self.run("apply the retention policy", a).await?;
        // With --prune, prune's progress follows the JSON on stdout: take the array's line.
        let line = out
            .stdout
            .split(|b| *b == b'\n')
            .find(|l| l.first() == Some(&b'['));
        let groups: Vec<ForgetGroup> = match line {
            Some(line) => serde_json::from_slice(line).map_err(|e| Error::Parse {
                action: "apply the retention policy",
                reason: e.to_string(),
            })?,
            None => Vec::new(),
        };
        Ok(ForgetResult { groups })
    }

    /// `restic forget [--prune] <ids>`.
    pub async fn forget_snapshots(&self, ids: &[String], prune: bool) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut a = args(["forget"]);
        if prune {
            a.push("--prune".into());
        }
        a.extend(ids.iter().map(OsString::from));
        self.run("delete snapshots", a).await.map(drop)
    }

    /// `restic tag --add` on one snapshot. restic rewrites a snapshot to change its tags, so
    /// the snapshot gets a new id, which is returned (its `original` names the old one).
    pub async fn add_tags(&self, id: &str, tags: &[String]) -> Result<String, Error> {
        const ACTION: &str = "tag the snapshot";
        let mut a = args(["tag", "--json"]);
        for t in tags {
            a.extend(["--add".into(), t.into()]);
        }
        a.push(id.into());
        let out = self.run(ACTION, a).await?;
        // restic ≥ 0.18 prints the change; older ones print text, so look the copy up.
        let changed = out
            .stdout
            .split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
            .find(|v| v["message_type"] == "changed" && v["old_snapshot_id"] == id)
            .and_then(|v| v["new_snapshot_id"].as_str().map(str::to_owned));
        if let Some(new) = changed {
            return Ok(new);
        }
        self.snapshots(&SnapshotFilter::default())
            .await?
            .into_iter()
            .find(|s| s.original.as_deref() == Some(id) || (s.id == id))
            .map(|s| s.id)
            .ok_or_else(|| Error::Parse {
                action: ACTION,
                reason: format!("restic reported no tagged copy of snapshot {id}"),
            })
    }

    /// `restic prune`.
    pub async fn prune(&self, opts: &PruneOptions) -> Result<(), Error> {
        let mut a = args(["prune"]);
        if opts.dry_run {
            a.push("--dry-run".into());
        }
        if let Some(v) = &opts.max_unused {
            a.extend(["--max-unused".into(), v.into()]);
        }
        if let Some(v) = &opts.max_repack_size {
            a.extend(["--max-repack-size".into(), v.into()]);
        }
        if opts.repack_cacheable_only {
            a.push("--repack-cacheable-only".into());
        }
        if opts.repack_small {
            a.push("--repack-small".into());
        }
        if opts.repack_uncompressed {
            a.push("--repack-uncompressed".into());
        }
        self.run("prune the repository", a).await.map(drop)
    }

    /// `restic check`, optionally reading a subset of the data (`1/5`, `10%`, `1G`).
    pub async fn check(&self, read_data_subset: Option<&str>) -> Result<CheckSummary, Error> {
        let mut a = args(["check", "--json"]);
        if let Some(subset) = read_data_subset {
            a.extend(["--read-data-subset".into(), subset.into()]);
        }
        // check exits non-zero when it finds errors, so reaching the summary means none
        // were found; a missing summary (older output) says the same.
        let out = self.run("check the repository", a).await?;
        Ok(last_json_line(&out.stdout, "check the repository").unwrap_or_default())
    }

    /// `restic stats` of the repository or one snapshot.
    pub async fn stats(&self, mode: StatsMode, snapshot: Option<&str>) -> Result<Stats, Error> {
        let mode = match mode {
            StatsMode::RawData => "raw-data",
            StatsMode::RestoreSize => "restore-size",
        };
        let mut a = args(["stats", "--json", "--no-lock", "--mode", mode]);
        a.extend(snapshot.map(OsString::from));
        self.run_json("read repository statistics", a).await
    }

    /// `restic restore`. Progress streams until [`RestoreRun::finish`].
    pub fn restore(&self, opts: &RestoreOptions) -> Result<RestoreRun, Error> {
        if !opts.includes.is_empty() && !opts.excludes.is_empty() {
            return Err(Error::InvalidOptions {
                action: "restore",
                reason: "include and exclude patterns cannot be combined in one restore",
            });
        }
        let mut a = args(["restore", "--json"]);
        a.push(opts.snapshot.clone().into());
        a.extend(["--target".into(), opts.target.clone().into_os_string()]);
        for i in &opts.includes {
            a.extend(["--include".into(), i.into()]);
        }
        for e in &opts.excludes {
            a.extend(["--exclude".into(), e.into()]);
        }
        opts.filter.args(&mut a);
        let overwrite = match opts.overwrite {
            Overwrite::Always => "always",
            Overwrite::IfChanged => "if-changed",
            Overwrite::IfNewer => "if-newer",
            Overwrite::Never => "never",
        };
        a.extend(["--overwrite".into(), overwrite.into()]);
        if opts.delete {
            a.push("--delete".into());
        }
        a.extend(opts.extra_args.iter().map(OsString::from));
        let (tx, rx) = mpsc::unbounded_channel();
        let running = spawn(
            self.invocation("restore", a),
            StdoutMode::Messages(Stream::Restore, Some(tx)),
            Input::Null,
        )?;
        Ok(RestoreRun {
            running,
            messages: Some(rx),
        })
    }

    /// `restic dump <snapshot> <path>` into `out`.
    pub async fn dump(
        &self,
        snapshot: &str,
        path: &str,
        filter: &SnapshotFilter,
        out: impl AsyncWrite + Send + Unpin + 'static,
    ) -> Result<(), Error> {
        let mut a = args(["dump"]);
        filter.args(&mut a);
        a.extend([snapshot.into(), path.into()]);
        spawn(
            self.invocation("dump a file", a),
            StdoutMode::Pipe(Box::new(out)),
            Input::Null,
        )?
        .finish(false)
        .await
        .map(drop)
    }

    /// `restic ls --json <snapshot>`: the snapshot and its nodes.
    pub async fn ls(&self, snapshot: &str) -> Result<(Snapshot, Vec<Node>), Error> {
        let out = self
            .run(
                "list a snapshot",
                args(["ls", "--json", "--no-lock", snapshot]),
            )
            .await?;
        let mut lines = out.stdout.split(|b| *b == b'\n').filter(|l| !l.is_empty());
        let parse_err = |e: serde_json::Error| Error::Parse {
            action: "list a snapshot",
            reason: e.to_string(),
        };
        let mut snap: Snapshot = match lines.next() {
            Some(first) => serde_json::from_slice(first).map_err(parse_err)?,
            None => {
                return Err(Error::Parse {
                    action: "list a snapshot",
                    reason: "no output".into(),
                });
            }
        };
        // `ls` tags its lines; they are not part of the snapshot itself.
        snap.other.remove("message_type");
        snap.other.remove("struct_type");
        let nodes = lines
            .map(|l| serde_json::from_slice(l).map_err(parse_err))
            .collect::<Result<Vec<Node>, _>>()?;
        Ok((snap, nodes))
    }

    /// `restic unlock`: removes stale locks only (dead processes on this host, or old ones).
    pub async fn unlock(&self) -> Result<(), Error> {
        self.run("remove stale locks", args(["unlock"]))
            .await
            .map(drop)
    }

    /// `restic unlock --remove-all`: removes every lock, even those of running processes.
    /// Only for an operator who knows no one else is using the repository.
    pub async fn unlock_remove_all(&self) -> Result<(), Error> {
        self.run("remove all locks", args(["unlock", "--remove-all"]))
            .await
            .map(drop)
    }

    /// The ids of the locks in the repository.
    pub async fn list_locks(&self) -> Result<Vec<String>, Error> {
        let out = self
            .run("list locks", args(["list", "locks", "--no-lock"]))
            .await?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// `restic key add`; the new password travels on stdin, never in a file or argument.
    pub async fn key_add(
        &self,
        new_password: &SecretValue,
        host: Option<&str>,
        user: Option<&str>,
    ) -> Result<String, Error> {
        let mut a = args(["key", "add", "--new-password-file", "/dev/stdin"]);
        if let Some(h) = host {
            a.extend(["--host".into(), h.into()]);
        }
        if let Some(u) = user {
            a.extend(["--user".into(), u.into()]);
        }
        let mut inv = self.invocation("add a key", a);
        let mut secrets: Vec<Vec<u8>> = inv.secrets.as_ref().clone();
        secrets.push(new_password.expose().to_vec());
        inv.secrets = Arc::new(secrets);
        let mut running = spawn(inv, StdoutMode::Collect, Input::Pipe)?;
        if let Some(mut stdin) = running.take_stdin() {
            let mut line = new_password.expose().to_vec();
            line.push(b'\n');
            stdin.write_all(&line).await.map_err(|source| Error::Io {
                action: "pass the new key's password",
                source,
            })?;
        }
        let out = running.finish(false).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .last()
            .filter(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned)
            .ok_or_else(|| Error::Parse {
                action: "add a key",
                reason: format!("no key id in {text:?}"),
            })
    }

    pub async fn key_list(&self) -> Result<Vec<Key>, Error> {
        self.run_json("list keys", args(["key", "list", "--json", "--no-lock"]))
            .await
    }

    pub async fn key_remove(&self, id: &str) -> Result<(), Error> {
        self.run("remove a key", args(["key", "remove", id]))
            .await
            .map(drop)
    }

    /// `restic migrate upgrade_repo_v2`: enables compression on an old repository.
    pub async fn migrate_to_v2(&self) -> Result<(), Error> {
        self.run(
            "upgrade the repository to format v2",
            args(["migrate", "upgrade_repo_v2"]),
        )
        .await
        .map(drop)
    }
}

impl BackupRun {
    /// Progress and per-file errors as restic reports them. Taken once.
    pub fn messages(&mut self) -> Option<mpsc::UnboundedReceiver<Message>> {
        self.messages.take()
    }

    /// Feeds the input (for `backup_stdin`), waits for restic and returns its summary.
    pub async fn finish(mut self) -> Result<BackupSummary, Error> {
        let Some(mut running) = self.running.take() else {
            return Err(Error::Interrupted { action: "back up" });
        };
        if let Some(mut input) = self.input.take()
            && let Err(source) = feed(&mut input, &mut running).await
        {
            // Stop restic before it sees the end of the stream, so it saves nothing.
            let _ = running.stop().await;
            let result = running.finish(true).await;
            // If restic saved a snapshot anyway, it is partial: delete it.
            if let Err(Error::IncompleteBackup {
                snapshot_id: Some(id),
                ..
            }) = &result
            {
                let _ = self
                    .restic
                    .forget_snapshots(std::slice::from_ref(id), false)
                    .await;
            }
            return Err(Error::Input {
                action: "back up a stream",
                source,
            });
        }
        let out = running.finish(false).await?;
        out.messages
            .into_iter()
            .rev()
            .find_map(|m| match m {
                Message::BackupSummary(s) => Some(s),
                _ => None,
            })
            .ok_or(Error::Parse {
                action: "back up",
                reason: "restic printed no summary".into(),
            })
    }

    /// Interrupts the backup (SIGINT, then SIGKILL after the grace period).
    pub async fn cancel(mut self) -> Result<(), Error> {
        if let Some(mut running) = self.running.take() {
            running.stop().await.map_err(|source| Error::Io {
                action: "stop restic",
                source,
            })?;
        }
        Ok(())
    }
}

/// Copies the input into restic's stdin. A read error is returned; a write error means
/// restic stopped reading, and its own exit status will say why.
async fn feed(
    input: &mut (dyn AsyncRead + Send + Unpin),
    running: &mut Running,
) -> std::io::Result<()> {
    let Some(mut stdin) = running.take_stream() else {
        return Ok(());
    };
    let mut buf = vec![0u8; 1 << 20];
    loop {
        // A read error returns with the stream uncommitted: restic stores nothing of it.
        let n = input.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if stdin.write_all(&buf[..n]).await.is_err() {
            return Ok(());
        }
    }
    // restic's signal that the stream is complete.
    let _ = stdin.commit().await;
    Ok(())
}

impl RestoreRun {
    pub fn messages(&mut self) -> Option<mpsc::UnboundedReceiver<Message>> {
        self.messages.take()
    }

    pub async fn finish(self) -> Result<RestoreSummary, Error> {
        let out = self.running.finish(false).await?;
        Ok(out
            .messages
            .into_iter()
            .rev()
            .find_map(|m| match m {
                Message::RestoreSummary(s) => Some(s),
                _ => None,
            })
            .unwrap_or_default())
    }

    pub async fn cancel(mut self) -> Result<(), Error> {
        self.running
            .stop()
            .await
            .map(drop)
            .map_err(|source| Error::Io {
                action: "stop restic",
                source,
            })
    }
}

fn args<const N: usize>(a: [&str; N]) -> Vec<OsString> {
    a.iter().map(OsString::from).collect()
}

fn last_json_line<T: serde::de::DeserializeOwned>(
    stdout: &[u8],
    action: &'static str,
) -> Result<T, Error> {
    let line = stdout
        .split(|b| *b == b'\n')
        .rev()
        .find(|l| l.first() == Some(&b'{'))
        .ok_or(Error::Parse {
            action,
            reason: "no JSON output".into(),
        })?;
    serde_json::from_slice(line).map_err(|e| Error::Parse {
        action,
        reason: e.to_string(),
    })
}
