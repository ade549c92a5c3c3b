//! One volume's backup or restore, in either read mode. Shared by the standalone commands and
//! the assignment worker.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use restic_wrapper::{
    BackupOptions, NativeRepository, Overwrite, Restic, RestoreOptions, SnapshotFilter,
};
use serde::Serialize;

use crate::budget::{AssignmentBudget, Limits};
use crate::cgroup::{ReadCount, ReadGroup};
use crate::extract::{ExtractOptions, ExtractReport, Extractor};
use crate::pattern::Patterns;
use crate::pipe::{ChannelReader, ChannelWriter, DEPTH};
use crate::stream::{Progress, ReadReport, StreamError, VolumeReader};
use crate::tree_source::{TreeSource, into_agent_error};
use crate::walk::{Manifest, Volume, volume_paths};

/// The file name of the tar stream inside a stream-mode snapshot.
pub const STREAM_FILE: &str = "volume.tar";
/// Tags that describe how a snapshot was made, and the completeness rule the operator shares.
pub use stash_rules::repository::{TAG_KEY_PREFIX, key_tag};
pub use stash_rules::snapshots::{TAG_DIRECT, TAG_STREAM, is_complete, mount_tag};
pub const TAG_MANIFEST_PREFIX: &str = "stash.manifest=";
/// On a snapshot that left out files it was not permitted to read: how many.
pub const TAG_UNREADABLE_PREFIX: &str = "stash.unreadable=";

pub use stash_api::common::UnreadablePolicy;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReadMode {
    Stream,
    Direct,
}

pub use crate::error::AgentError;
use crate::pending;

/// What to back up and how.
#[derive(Clone, Debug)]
pub struct BackupRequest {
    pub path: PathBuf,
    pub mode: ReadMode,
    pub host: Option<String>,
    pub tags: Vec<String>,
    /// Stable identity of the volume (PVC UID or namespace/workload/volume).
    pub key: Option<String>,
    /// restic `--exclude` patterns, applied in both modes with restic's matching rules; a
    /// leading `/` anchors a pattern at the volume root.
    pub excludes: Vec<String>,
    /// Sub-directories of the volume to back up (relative to it); all of it when empty.
    pub paths: Vec<PathBuf>,
    /// Direct mode: flags passed to `restic backup` as written, checked by `spec::restic_args`.
    pub restic_args: Vec<String>,
    pub budget: AssignmentBudget,
    /// Direct mode: restic's own read parallelism and upload limit (KiB/s).
    pub read_concurrency: Option<u32>,
    pub limit_upload_kib: Option<u64>,
    /// Stream mode: read through io_uring when the runtime allows it.
    pub io_uring: bool,
    /// Files the reader may not read: fail the backup, or leave them out and say so.
    pub on_unreadable: UnreadablePolicy,
    /// Counters the caller watches for progress reports.
    pub progress: Arc<Progress>,
    /// Direct mode: where the records of backups in flight live (see `pending`); without
    /// it, a partial snapshot of an agent that dies before judging it is not found again.
    pub pending_dir: Option<PathBuf>,
}

impl BackupRequest {
    /// A request with no host, tags or key, an unlimited budget and io_uring allowed.
    pub fn new(path: impl Into<PathBuf>, mode: ReadMode) -> BackupRequest {
        BackupRequest {
            path: path.into(),
            mode,
            host: None,
            tags: vec![],
            key: None,
            excludes: vec![],
            paths: vec![],
            restic_args: vec![],
            budget: AssignmentBudget::unlimited(),
            read_concurrency: None,
            limit_upload_kib: None,
            io_uring: true,
            on_unreadable: UnreadablePolicy::Fail,
            progress: Arc::default(),
            pending_dir: None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct BackupResult {
    pub snapshot_id: Option<String>,
    pub bytes: u64,
    pub files: u64,
    pub duration_seconds: f64,
    pub mode: Option<ReadMode>,
    pub unchanged: bool,
    /// Stream mode: the time the agent's reader took (the rest is restic's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_seconds: Option<f64>,
    /// Stream mode: `io_uring`, or `pread` where io_uring is off or forbidden.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_engine: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed_during_read: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vanished_during_read: Vec<String>,
    /// Left out because reading them was not permitted (policy `Warn`); the snapshot is
    /// tagged with their count.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
    /// Direct mode: what restic read from the volume's disk, as the kernel counted it
    /// (restic's cache on that disk included; page-cache hits are not reads).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_read_bytes: Option<u64>,
    /// Direct mode: restic's read rate from that disk in bytes per second, from its first
    /// read to its last (what a budget limits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_read_rate: Option<f64>,
    /// Why the backup read in another mode than the one asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode_note: Option<String>,
}

/// `use_it` on this process's native reader of the repository (see
/// [`restic_wrapper::native::with_reader`]).
async fn with_native<T, F>(
    restic: &Restic,
    use_it: impl Fn(Arc<NativeRepository>) -> F,
) -> Result<T, restic_wrapper::NativeError>
where
    F: Future<Output = Result<T, restic_wrapper::NativeError>>,
{
    let repo = restic.repository();
    restic_wrapper::native::with_reader(repo.backend(), repo.secrets(), use_it).await
}

/// The snapshots of a host and volume key, oldest first, found by the native reader
/// without starting restic. A listing that fails is an error, never "none": taken for
/// "none", it would make a backup without its parent or restore nothing.
async fn key_snapshots(
    restic: &Restic,
    host: Option<&str>,
    key: Option<&str>,
) -> Result<Vec<restic_wrapper::Snapshot>, AgentError> {
    let key_tag = key.map(key_tag);
    // Before this process has a reader for the repository, list the snapshot files without
    // the key: a repository without any (a first backup) then costs no scrypt derivation.
    // With a reader open, its own listing suffices; a second would be a second LIST on an
    // object store for every backup.
    let repo = restic.repository();
    if !restic_wrapper::native::is_open(repo.backend(), repo.secrets()) {
        match restic_wrapper::RepositoryFiles::new(repo.backend(), repo.secrets()) {
            Ok(files) => {
                if files
                    .snapshot_ids()
                    .await
                    .map_err(AgentError::ListSnapshots)?
                    .is_empty()
                {
                    return Ok(Vec::new());
                }
            }
            Err(restic_wrapper::NativeError::Unsupported(_)) => {}
            Err(e) => return Err(AgentError::ListSnapshots(e)),
        }
    }
    let mut snapshots = match with_native(restic, |r| async move { r.snapshots().await }).await {
        Ok(s) => s,
        // A backend the native reader does not speak: restic lists them.
        Err(restic_wrapper::NativeError::Unsupported(_)) => {
            restic.snapshots(&SnapshotFilter::default()).await?
        }
        Err(e) => return Err(AgentError::ListSnapshots(e)),
    };
    snapshots.retain(|s| {
        host.is_none_or(|h| s.hostname == h) && key_tag.as_deref().is_none_or(|t| s.has_tag(t))
    });
    Ok(snapshots)
}

/// The newest complete snapshot of `snapshots` (in one read mode, when given).
fn newest_complete(
    snapshots: &[restic_wrapper::Snapshot],
    mode_tag: Option<&str>,
) -> Option<restic_wrapper::Snapshot> {
    snapshots
        .iter()
        .rfind(|s| is_complete(s) && mode_tag.is_none_or(|t| s.has_tag(t)))
        .cloned()
}

/// Deletes the snapshots of a key that earlier backups left incomplete (their agent died
/// before it could delete them). Best effort: they are never used anyway, and a repository
/// busy with other backups refuses `forget` its exclusive lock, so a failure only leaves
/// them to the next backup. Without a key, other volumes' snapshots cannot be told apart:
/// nothing is deleted.
async fn remove_incomplete(
    restic: &Restic,
    key: Option<&str>,
    snapshots: &[restic_wrapper::Snapshot],
) {
    let ids: Vec<String> = snapshots
        .iter()
        .filter(|s| key.is_some() && !is_complete(s))
        .map(|s| s.id.clone())
        .collect();
    if ids.is_empty() {
        return;
    }
    match restic.forget_snapshots(&ids, false).await {
        Ok(()) => tracing::info!(snapshots = ?ids, "deleted snapshots left incomplete"),
        Err(error) => tracing::warn!(
            %error,
            snapshots = ?ids,
            "failed to delete snapshots left incomplete; the next backup tries again"
        ),
    }
}

/// Whether `path` is a raw block volume (read only in stream mode).
pub fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// The newest complete snapshot of a host and volume key, in either mode: what "restore the
/// latest" means for a volume.
pub async fn latest(
    restic: &Restic,
    host: &str,
    key: &str,
) -> Result<Option<restic_wrapper::Snapshot>, AgentError> {
    Ok(newest_complete(
        &key_snapshots(restic, Some(host), Some(key)).await?,
        None,
    ))
}

/// A digest of everything a stream backup would carry of the volume (see
/// [`crate::walk::Manifest`]): equal digests mean the stream would be the same. The walk is
/// the reader's own, so both see the same entries, left out and selected alike; it counts the
/// regular files and the bytes the reader will read of them (a sparse file's holes are not
/// read), the totals progress is reported against. Each entry costs one IO operation.
/// With `skip_denied`, what may not be read counts as one more name in the digest, as the
/// reader will leave it out; otherwise it fails the scan.
pub fn manifest_digest(
    volume: &Volume,
    budget: &AssignmentBudget,
    skip_denied: bool,
) -> Result<(String, u64, u64), AgentError> {
    let mut manifest = Manifest::default();
    volume.walk(budget, skip_denied, &mut manifest)?;
    let (bytes, files) = (manifest.bytes, manifest.files);
    Ok((manifest.digest(), bytes, files))
}

pub async fn backup(restic: &Restic, req: BackupRequest) -> Result<BackupResult, AgentError> {
    let started = Instant::now();
    let mut tags = req.tags.clone();
    if let Some(k) = &req.key {
        tags.push(key_tag(k));
    }
    // Bad patterns or paths fail the backup before anything is read.
    let excludes = Patterns::new(&req.excludes)?;
    let paths = volume_paths(&req.paths)?;
    // What the backup found of its key, for the clean-up once it is done.
    let mut found = Vec::new();
    // Direct mode is paced and page-cache clean only in cgroups of restic's own; where the
    // machine cannot limit its reads, a budgeted backup is read by the agent's own reader.
    let (mode, group, mode_note) = direct_group(&req);
    if mode != req.mode && !req.restic_args.is_empty() {
        // Neither can be dropped silently: the args are restic's, the budget the node's.
        return Err(AgentError::InvalidSpec {
            what: "backup",
            reason: format!(
                "args {:?} need direct mode, which cannot keep the IO budget on this volume ({})",
                req.restic_args,
                mode_note.unwrap_or_default()
            ),
        });
    }
    let mut result = match mode {
        ReadMode::Stream if is_block_device(&req.path) => {
            // A raw device has no metadata to compare: it is read every time.
            tags.push(TAG_STREAM.into());
            if req.key.is_some() {
                found = key_snapshots(restic, req.host.as_deref(), req.key.as_deref()).await?;
            }
            backup_stream(restic, &req, tags).await?
        }
        ReadMode::Direct if is_block_device(&req.path) => {
            return Err(AgentError::Other {
                action: "back up the volume",
                reason: "a block volume can only be read in stream mode".into(),
            });
        }
        ReadMode::Stream => {
            // The metadata walk and the snapshot lookup (which may derive the key) overlap.
            let path = req.path.clone();
            let skip = req.on_unreadable == UnreadablePolicy::Warn;
            let budget = req.budget.clone();
            let walk = tokio::task::spawn_blocking(move || {
                let volume = Volume::open(&path, &excludes, &paths)?;
                manifest_digest(&volume, &budget, skip)
            });
            found = key_snapshots(restic, req.host.as_deref(), req.key.as_deref()).await?;
            let prev = newest_complete(&found, Some(TAG_STREAM));
            let (digest, bytes_total, files_total) =
                walk.await.map_err(|e| AgentError::Other {
                    action: "scan the volume",
                    reason: e.to_string(),
                })??;
            req.progress
                .bytes_total
                .store(bytes_total, Ordering::Relaxed);
            req.progress
                .files_total
                .store(files_total, Ordering::Relaxed);
            let manifest_tag = format!("{TAG_MANIFEST_PREFIX}{digest}");
            // A snapshot that left files out is never "unchanged": they are tried again.
            if let Some(prev) = prev
                && prev.has_tag(&manifest_tag)
                && !is_incomplete(&prev)
            {
                BackupResult {
                    snapshot_id: Some(prev.id),
                    unchanged: true,
                    ..BackupResult::default()
                }
            } else {
                tags.push(TAG_STREAM.into());
                tags.push(manifest_tag);
                backup_stream(restic, &req, tags).await?
            }
        }
        ReadMode::Direct => {
            tags.push(TAG_DIRECT.into());
            found = key_snapshots(restic, req.host.as_deref(), req.key.as_deref()).await?;
            let record = pending_record(restic, &req);
            if let Some(file) = &record {
                forget_unverified(restic, file, &mut found).await?;
            }
            let parent = newest_complete(&found, Some(TAG_DIRECT));
            // restic starts inside the volume through the root's descriptor, never by a path
            // a tenant could change, and matches excludes against host paths: they are
            // anchored beneath the host path restic will see (see `Patterns::beneath`).
            let volume = Volume::open(&req.path, &excludes, &paths)?;
            let targets = direct_targets(&paths)?;
            let cwd = PathBuf::from(format!("/proc/self/fd/{}", volume.root_fd().as_raw_fd()));
            let opts = BackupOptions {
                join_cgroups: match &group {
                    Some(g) => g.procs().map_err(|e| AgentError::Other {
                        action: "prepare restic's cgroups",
                        reason: e.to_string(),
                    })?,
                    None => Vec::new(),
                },
                host: req.host.clone(),
                tags,
                excludes: excludes.beneath(volume.host_path())?,
                // Explicit, because restic's own choice keys on the path, which holds the
                // pod UID and changes with every new pod.
                parent: parent.as_ref().map(|p| p.id.clone()),
                read_concurrency: req.read_concurrency,
                limit_upload_kib: req.limit_upload_kib,
                skip_if_unchanged: parent.is_some(),
                extra_args: req.restic_args.clone(),
                ..BackupOptions::default()
            };
            if let Some(file) = &record {
                pending::write(
                    file,
                    &pending::Record {
                        started: jiff::Timestamp::now(),
                        repository: restic.repository().display_name(),
                        host: req.host.clone().unwrap_or_default(),
                        key: req.key.clone().unwrap_or_default(),
                    },
                )?;
            }
            let mut run = restic.backup(&targets, Some(&cwd), &opts)?;
            // restic has its working directory; the descriptor has served.
            let host_path = volume.host_path().to_path_buf();
            drop(volume);
            // restic reports its own progress in direct mode; mirror it for status reports.
            let mirror = run.messages().map(|mut messages| {
                let progress = req.progress.clone();
                tokio::spawn(async move {
                    while let Some(m) = messages.recv().await {
                        match m {
                            restic_wrapper::Message::BackupStatus(s) => {
                                progress.bytes.store(s.bytes_done, Ordering::Relaxed);
                                progress.files.store(s.files_done, Ordering::Relaxed);
                                progress.bytes_total.store(s.total_bytes, Ordering::Relaxed);
                                progress.files_total.store(s.total_files, Ordering::Relaxed);
                            }
                            // Also printed when some files could not be read (exit code 3).
                            // A backup quicker than restic's progress interval prints no
                            // status at all: the summary gives the totals too.
                            restic_wrapper::Message::BackupSummary(s) => {
                                for (done, total, n) in [
                                    (
                                        &progress.bytes,
                                        &progress.bytes_total,
                                        s.total_bytes_processed,
                                    ),
                                    (
                                        &progress.files,
                                        &progress.files_total,
                                        s.total_files_processed,
                                    ),
                                ] {
                                    done.store(n, Ordering::Relaxed);
                                    total.fetch_max(n, Ordering::Relaxed);
                                }
                            }
                            _ => {}
                        }
                    }
                })
            });
            let (stop, stopped) = tokio::sync::oneshot::channel();
            let charger = group
                .clone()
                .map(|g| charge_reads(g, req.budget.clone(), stopped));
            let finished = run.finish().await;
            if let Some(task) = mirror {
                // Its channel closed with restic's output: every message is counted.
                let _ = task.await;
            }
            let _ = stop.send(());
            let trace = match charger {
                Some(task) => task.await.unwrap_or_default(),
                None => ReadTrace::default(),
            };
            // restic has exited: what it read is counted, and what it cached can go.
            let storage_read_bytes = group.as_ref().and_then(|g| g.read_count()).map(|c| c.bytes);
            if let Some(g) = group.clone() {
                // Reclaiming a cgroup's pages takes the kernel a while (0.17 s for 92 MB of
                // small files): not on a runtime thread that other assignments share.
                let dropped = tokio::task::spawn_blocking(move || g.finish())
                    .await
                    .unwrap_or_default();
                tracing::debug!(dropped, "dropped the page cache restic brought in");
            }
            let (summary, unreadable) = match finished {
                Ok(summary) => (summary, vec![]),
                // Some files could not be read and the rest matched the parent, so restic
                // saved nothing (`--skip-if-unchanged`). Under `Warn` the volume is
                // unchanged: its parent left out the same files.
                Err(restic_wrapper::Error::IncompleteBackup {
                    snapshot_id: None,
                    unreadable,
                }) if opts.skip_if_unchanged && req.on_unreadable == UnreadablePolicy::Warn => {
                    let summary = restic_wrapper::BackupSummary {
                        total_bytes_processed: req.progress.bytes.load(Ordering::Relaxed),
                        total_files_processed: req.progress.files.load(Ordering::Relaxed),
                        ..Default::default()
                    };
                    (summary, volume_relative(&req.path, unreadable))
                }
                // restic saved a snapshot without the files it could not read.
                Err(restic_wrapper::Error::IncompleteBackup {
                    snapshot_id: Some(id),
                    unreadable,
                }) => {
                    let unreadable = volume_relative(&host_path, unreadable);
                    let kept =
                        incomplete_snapshot(restic, &id, &unreadable, req.on_unreadable).await?;
                    // The summary went with the exit status; restic's last progress
                    // report has the totals.
                    let summary = restic_wrapper::BackupSummary {
                        snapshot_id: Some(kept),
                        total_bytes_processed: req.progress.bytes.load(Ordering::Relaxed),
                        total_files_processed: req.progress.files.load(Ordering::Relaxed),
                        ..Default::default()
                    };
                    (summary, unreadable)
                }
                Err(e) => return Err(e.into()),
            };
            // The snapshot is judged (complete, or forgotten, or kept as partial under
            // `Warn` with its tag): nothing is left to find.
            if let Some(file) = &record {
                pending::remove(file);
            }
            let unchanged = summary.snapshot_id.is_none();
            BackupResult {
                snapshot_id: summary.snapshot_id.or(parent.map(|p| p.id)),
                bytes: summary.total_bytes_processed,
                files: summary.total_files_processed,
                unchanged,
                unreadable,
                storage_read_bytes,
                storage_read_rate: trace.rate(),
                ..BackupResult::default()
            }
        }
    };
    remove_incomplete(restic, req.key.as_deref(), &found).await;
    result.mode = Some(mode);
    result.mode_note = mode_note;
    result.duration_seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

/// The mode a backup reads in, with restic's cgroups for direct mode (see `cgroup`), and why
/// the mode is not the one asked for when it is not.
fn direct_group(req: &BackupRequest) -> (ReadMode, Option<Arc<ReadGroup>>, Option<String>) {
    if req.mode != ReadMode::Direct || is_block_device(&req.path) {
        return (req.mode, None, None);
    }
    let budgeted = req.budget.limits() != Limits::default();
    let group = std::fs::metadata(&req.path)
        .map_err(|e| e.to_string())
        .and_then(|m| {
            ReadGroup::create(m.dev(), req.budget.limits(), req.budget.node_limits())
                .map_err(|e| e.to_string())
        });
    if budgeted && !group.as_ref().is_ok_and(ReadGroup::paced) {
        let why = match &group {
            Ok(_) => "the volume has no block device of its own to limit restic's reads to the \
                      IO budget on"
                .to_owned(),
            Err(e) => format!("restic's reads cannot be limited to the IO budget ({e})"),
        };
        return (
            ReadMode::Stream,
            None,
            Some(format!("read in stream mode: {why}")),
        );
    }
    match group {
        Ok(g) => {
            if !g.drops_page_cache() {
                tracing::warn!("no memory cgroup: the page cache restic's reads bring in stays");
            }
            (ReadMode::Direct, Some(Arc::new(g)), None)
        }
        Err(e) => {
            tracing::warn!(error = %e, "restic runs without a cgroup of its own: the page cache its reads bring in stays");
            (ReadMode::Direct, None, None)
        }
    }
}

/// What restic read from the volume's disk, sampled as it read: the first and last samples
/// at which the count grew, for the rate of the read itself (restic's start and its snapshot
/// upload are not part of it).
#[derive(Clone, Copy, Debug, Default)]
struct ReadTrace {
    first: Option<(Instant, u64)>,
    last: Option<(Instant, u64)>,
}

impl ReadTrace {
    fn note(&mut self, at: Instant, bytes: u64) {
        if self.last.is_none_or(|(_, b)| bytes > b) {
            self.first.get_or_insert((at, bytes));
            self.last = Some((at, bytes));
        }
    }

    /// Bytes per second between the first and the last growth seen.
    fn rate(&self) -> Option<f64> {
        let ((t0, b0), (t1, b1)) = (self.first?, self.last?);
        let secs = t1.saturating_duration_since(t0).as_secs_f64();
        (secs > 0.0 && b1 > b0).then(|| (b1 - b0) as f64 / secs)
    }
}

/// Charges what restic reads from the volume's disk to the node's budget as it reads, so the
/// agent's own reader yields to it (the kernel paces restic itself), until `stop` fires.
fn charge_reads(
    group: Arc<ReadGroup>,
    budget: AssignmentBudget,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<ReadTrace> {
    tokio::spawn(async move {
        let mut last = ReadCount::default();
        let mut trace = ReadTrace::default();
        // Often enough for a rate within a percent or two over a read of a few seconds.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stop => break,
            }
            if let Some(now) = group.read_count() {
                let _ = budget.charge(
                    now.bytes.saturating_sub(last.bytes),
                    now.ops.saturating_sub(last.ops),
                );
                if now.bytes > 0 {
                    trace.note(Instant::now(), now.bytes);
                }
                last = now;
            }
        }
        trace
    })
}

/// The record file of a direct backup of this repository, host and key, when the caller
/// keeps records and the backup has a key.
fn pending_record(restic: &Restic, req: &BackupRequest) -> Option<PathBuf> {
    let (dir, key) = (req.pending_dir.as_ref()?, req.key.as_ref()?);
    Some(pending::path(
        dir,
        &restic.repository().display_name(),
        req.host.as_deref().unwrap_or_default(),
        key,
    ))
}

/// A record left behind means an agent died while its direct backup ran: every direct
/// snapshot of the key since then is forgotten (none was seen complete; a partial one would
/// look whole), and the record goes. If forgetting fails the record stays for the next try.
async fn forget_unverified(
    restic: &Restic,
    file: &Path,
    found: &mut Vec<restic_wrapper::Snapshot>,
) -> Result<(), AgentError> {
    let Some(record) = pending::read(file) else {
        pending::remove(file);
        return Ok(());
    };
    let ids: Vec<String> = pending::unverified(&record, found, TAG_DIRECT)
        .into_iter()
        .map(|s| s.id.clone())
        .collect();
    if !ids.is_empty() {
        restic.forget_snapshots(&ids, false).await?;
        tracing::info!(snapshots = ?ids, "forgot direct snapshots an agent never saw complete");
        found.retain(|s| !ids.contains(&s.id));
    }
    pending::remove(file);
    Ok(())
}

/// What restic backs up in direct mode, relative to the volume it starts in. restic itself
/// resolves a nested path (`a/b`), through whatever `a` is by then, so only paths of one
/// component are given to it: restic `lstat`s a target and never follows it.
fn direct_targets(paths: &[PathBuf]) -> Result<Vec<PathBuf>, AgentError> {
    if paths.is_empty() {
        return Ok(vec![PathBuf::from(".")]);
    }
    for p in paths {
        if p.components().count() > 1 {
            return Err(AgentError::Stream(StreamError::BadPath {
                path: p.display().to_string(),
                reason: "direct mode takes only top-level directories of the volume \
                         (restic would resolve a nested path itself); use stream mode",
            }));
        }
    }
    Ok(paths.to_vec())
}

/// restic names an unreadable item twice, once from its scanner (relative to where it
/// runs, the volume) and once from its reader (absolute, with the host path and pod UID):
/// one name each, relative to the volume, as the stream reader reports them.
fn volume_relative(volume: &Path, items: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    items
        .into_iter()
        .map(|item| {
            let p = Path::new(&item);
            let rel = p.strip_prefix(volume).unwrap_or(p);
            rel.strip_prefix(".")
                .unwrap_or(rel)
                .to_string_lossy()
                .into_owned()
        })
        .filter(|item| seen.insert(item.clone()))
        .collect()
}

fn is_incomplete(snapshot: &restic_wrapper::Snapshot) -> bool {
    snapshot
        .tags
        .iter()
        .flatten()
        .any(|t| t.starts_with(TAG_UNREADABLE_PREFIX))
}

/// A snapshot restic or the reader saved without some files it was not permitted to read.
/// Under `Fail` it is deleted, so nothing looks like a complete backup, and the backup fails
/// naming the files; under `Warn` it is kept, tagged with their count. Returns the id kept.
async fn incomplete_snapshot(
    restic: &Restic,
    id: &str,
    unreadable: &[String],
    policy: UnreadablePolicy,
) -> Result<String, AgentError> {
    match policy {
        UnreadablePolicy::Fail => {
            restic.forget_snapshots(&[id.to_owned()], false).await?;
            Err(AgentError::Restic(
                restic_wrapper::Error::IncompleteBackup {
                    snapshot_id: None,
                    unreadable: unreadable.to_vec(),
                },
            ))
        }
        UnreadablePolicy::Warn => {
            let tag = format!("{TAG_UNREADABLE_PREFIX}{}", unreadable.len().max(1));
            Ok(restic.add_tags(id, &[tag]).await?)
        }
    }
}

async fn backup_stream(
    restic: &Restic,
    req: &BackupRequest,
    tags: Vec<String>,
) -> Result<BackupResult, AgentError> {
    let (tx, rx) = tokio::sync::mpsc::channel(DEPTH);
    let progress = req.progress.clone();
    let (engine, fallback) = crate::uring::choose(req.io_uring);
    if let Some(reason) = fallback {
        tracing::info!(%reason, "reading with ordinary reads");
    }
    let engine_name = engine.name();
    let reader = VolumeReader {
        root: req.path.clone(),
        budget: req.budget.clone(),
        engine,
        progress: progress.clone(),
        skip_unreadable: req.on_unreadable == UnreadablePolicy::Warn,
        excludes: Patterns::new(&req.excludes)?,
        paths: volume_paths(&req.paths)?,
    };
    let error_tx = tx.clone();
    let thread = std::thread::Builder::new()
        .name("volume-reader".into())
        .spawn(move || -> Result<ReadReport, StreamError> {
            let outcome = reader
                .run(ChannelWriter::new(tx))
                .and_then(|(report, mut w)| {
                    std::io::Write::flush(&mut w).map_err(StreamError::Write)?;
                    Ok(report)
                });
            if let Err(e) = &outcome {
                // Tell restic's feeder the stream failed, so no snapshot is saved.
                let _ = error_tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
            outcome
        })
        .map_err(|e| AgentError::Other {
            action: "start the volume reader",
            reason: e.to_string(),
        })?;
    let opts = BackupOptions {
        host: req.host.clone(),
        tags,
        ..BackupOptions::default()
    };
    let backed_up = match restic.backup_stdin(STREAM_FILE, ChannelReader::new(rx), &opts) {
        Ok(run) => run.finish().await,
        Err(e) => Err(e),
    };
    let read = tokio::task::spawn_blocking(move || thread.join())
        .await
        .map_err(|e| AgentError::Other {
            action: "wait for the volume reader",
            reason: e.to_string(),
        })?
        .map_err(|_| AgentError::Other {
            action: "read the volume",
            reason: "the reader thread panicked".into(),
        })?;
    // The reader's own error names the file; restic's only says the input failed. But when
    // the reader could not write, restic stopped reading, and restic's error says why (a lock
    // held by someone else, say, which is worth another try).
    let summary = match (read.as_ref(), backed_up) {
        (Err(StreamError::Write(_)), Err(e)) => return Err(e.into()),
        (_, backed_up) => backed_up,
    };
    let report = read?;
    let summary = summary?;
    let mut snapshot_id = summary.snapshot_id;
    if !report.unreadable.is_empty()
        && let Some(id) = &snapshot_id
    {
        snapshot_id =
            Some(incomplete_snapshot(restic, id, &report.unreadable, req.on_unreadable).await?);
    }
    Ok(BackupResult {
        snapshot_id,
        unreadable: report.unreadable,
        bytes: report.bytes,
        files: report.files,
        read_seconds: Some(report.seconds),
        read_engine: Some(engine_name),
        changed_during_read: report.changed,
        vanished_during_read: report.vanished,
        ..BackupResult::default()
    })
}

/// What to restore, where.
#[derive(Clone, Debug)]
pub struct RestoreRequest {
    pub snapshot: String,
    pub target: PathBuf,
    pub delete: bool,
    /// restic include patterns (in both modes, restic's semantics).
    pub include: Vec<String>,
    /// restic exclude patterns (in both modes, restic's semantics).
    pub exclude: Vec<String>,
    /// Restore owners when the agent may (as root); on by default.
    pub owners: bool,
    /// What a stream restore may write per second: it reads the dump no faster (what it
    /// reads, it writes). restic writes a direct restore itself, unpaced.
    pub budget: AssignmentBudget,
}

/// A stream restore's input, read no faster than its budget allows.
struct Paced<R> {
    inner: R,
    budget: AssignmentBudget,
}

impl<R: Read> Read for Paced<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.budget.acquire_blocking(n as u64, 0);
        }
        Ok(n)
    }
}

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RestoreResult {
    pub snapshot_id: String,
    /// Files written (new or replaced) and their bytes.
    pub bytes: u64,
    pub files: u64,
    /// Files whose content already matched the snapshot, left as they were.
    pub unchanged: u64,
    pub deleted: u64,
    pub duration_seconds: f64,
    pub mode: Option<ReadMode>,
}

/// Runs `restic dump` of a stream snapshot into a pipe: the reading end, and the dump's
/// outcome to wait for once it has been read.
fn dump_stream(
    handle: &tokio::runtime::Handle,
    restic: &Restic,
    id: &str,
) -> Result<(PipeReader, DumpTask), AgentError> {
    let (reader, writer) = std::io::pipe().map_err(|e| AgentError::Other {
        action: "create a pipe",
        reason: e.to_string(),
    })?;
    // restic's output is copied 8 KiB at a time; each write to a tokio file is a task on
    // the blocking pool, so coalesce them into writes of 1 MiB.
    let sink = tokio::io::BufWriter::with_capacity(
        PIPE_CHUNK,
        tokio::fs::File::from_std(std::fs::File::from(std::os::fd::OwnedFd::from(writer))),
    );
    let (restic, id) = (restic.clone(), id.to_owned());
    let task = handle.spawn(async move {
        restic
            .dump(
                &id,
                &format!("/{STREAM_FILE}"),
                &SnapshotFilter::default(),
                sink,
            )
            .await
    });
    Ok((std::io::BufReader::with_capacity(PIPE_CHUNK, reader), task))
}

/// How much of the stream moves through the pipe at once.
const PIPE_CHUNK: usize = 1 << 20;

type PipeReader = std::io::BufReader<std::io::PipeReader>;
type DumpTask = tokio::task::JoinHandle<Result<(), restic_wrapper::Error>>;

fn wait_dump(handle: &tokio::runtime::Handle, task: DumpTask) -> Result<(), AgentError> {
    handle
        .block_on(task)
        .map_err(|e| AgentError::Other {
            action: "wait for restic dump",
            reason: e.to_string(),
        })?
        .map_err(AgentError::from)
}

/// Ends a dump whose stream the extractor has finished with: waits for it once the stream
/// was read to the end, and stops it when the extractor gave up part-way (an unsafe entry,
/// a corrupt header). restic holds a reading end of its own output (so that it never dies
/// of a broken pipe with its lock held): left to finish, it would wait forever for a reader.
fn end_dump<T>(
    handle: &tokio::runtime::Handle,
    task: DumpTask,
    extracted: &Result<T, StreamError>,
) -> Result<(), AgentError> {
    if extracted.is_ok() {
        return wait_dump(handle, task);
    }
    // Dropping the dump stops restic (SIGINT, then SIGKILL after its grace period).
    task.abort();
    let _ = handle.block_on(task);
    Ok(())
}

/// A stream restore, on a blocking thread: the stream is read once, and a second time only
/// for hard links whose first name the first read did not restore.
fn restore_stream(
    handle: &tokio::runtime::Handle,
    restic: &Restic,
    id: &str,
    target: &Path,
    opts: &ExtractOptions,
    budget: &AssignmentBudget,
) -> Result<ExtractReport, AgentError> {
    let paced = |inner| Paced {
        inner,
        budget: budget.clone(),
    };
    if is_block_device(target) {
        let (reader, dump) = dump_stream(handle, restic, id)?;
        let extracted = crate::extract::extract_block(paced(reader), target);
        let dumped = end_dump(handle, dump, &extracted);
        let report = extracted?;
        dumped?;
        return Ok(report);
    }
    let mut ex = Extractor::new(target, opts)?;
    let (reader, dump) = dump_stream(handle, restic, id)?;
    let extracted = ex.extract(paced(reader));
    let dumped = end_dump(handle, dump, &extracted);
    extracted?;
    dumped?;
    if ex.needs_second_pass() {
        let (reader, dump) = dump_stream(handle, restic, id)?;
        let extracted = ex.extract_links(paced(reader));
        let dumped = end_dump(handle, dump, &extracted);
        extracted?;
        dumped?;
    }
    Ok(ex.finish()?)
}

/// A direct restore read by the agent itself (see `tree_source`): the snapshot's trees
/// walked into the extractor, only the files that differ fetched and written, each beside
/// its target and renamed over it. `None` when this build's reader cannot open the backend.
async fn restore_native(
    restic: &Restic,
    snap: &restic_wrapper::Snapshot,
    req: &RestoreRequest,
    opts: &ExtractOptions,
) -> Result<Option<ExtractReport>, AgentError> {
    let repo = restic.repository();
    let reader = match restic_wrapper::native::reader(repo.backend(), repo.secrets()).await {
        Ok(reader) => reader,
        Err(restic_wrapper::NativeError::Unsupported(backend)) => {
            tracing::info!(backend, "restoring through restic: no native reader for it");
            return Ok(None);
        }
        Err(e) => return Err(AgentError::ReadSnapshot(e)),
    };
    let index = reader
        .load_index()
        .await
        .map_err(AgentError::ReadSnapshot)?;
    let (handle, tree) = (tokio::runtime::Handle::current(), snap.tree.clone());
    let (target, opts, budget) = (req.target.clone(), opts.clone(), req.budget.clone());
    tokio::task::spawn_blocking(move || -> Result<ExtractReport, AgentError> {
        let source = || {
            TreeSource::new(
                handle.clone(),
                reader.clone(),
                index.clone(),
                &tree,
                budget.clone(),
            )
            .map_err(|e| into_agent_error(StreamError::Decode(e)))
        };
        let mut ex = Extractor::new(&target, &opts)?;
        ex.extract_from(&mut source()?).map_err(into_agent_error)?;
        // Hard links whose first name was left out: a second walk, as a stream is read twice.
        if ex.needs_second_pass() {
            ex.extract_links_from(&mut source()?)
                .map_err(into_agent_error)?;
        }
        Ok(ex.finish()?)
    })
    .await
    .map_err(|e| AgentError::Other {
        action: "wait for the extractor",
        reason: e.to_string(),
    })?
    .map(Some)
}

/// A direct restore through restic, where the agent cannot read the backend itself, that
/// never writes into a live file: restic restores into a staging
/// directory inside the volume (same filesystem), whose entries then replace the live ones
/// one rename at a time; identical files are left alone, `--delete` applies last.
async fn restore_direct(
    restic: &Restic,
    id: &str,
    req: &RestoreRequest,
    opts: &ExtractOptions,
) -> Result<ExtractReport, AgentError> {
    std::fs::create_dir_all(&req.target).map_err(|e| AgentError::Other {
        action: "create the restore target",
        reason: e.to_string(),
    })?;
    // What restic's `--overwrite if-changed` compares of each file: its size and mtime.
    let (_, nodes) = restic.ls(id).await?;
    let snapshot_files: std::collections::HashMap<PathBuf, (u64, jiff::Timestamp)> = nodes
        .into_iter()
        .filter(|n| n.kind == "file")
        .filter_map(|n| {
            let mtime = n.mtime.parse::<jiff::Timestamp>().ok()?;
            let rel = PathBuf::from(n.path.trim_start_matches('/'));
            Some((rel, (n.size.unwrap_or(0), mtime)))
        })
        .collect();
    let staging = crate::extract::Staging::create(&req.target)?;
    // The live files restic will skip, hard-linked: restic then writes only what differs,
    // beside it, and never over a link (see `Staging::mirror`).
    let (staging, mirrored) = tokio::task::spawn_blocking(move || {
        let mirrored = staging.mirror(|rel, st| {
            let mtime = jiff::Timestamp::new(st.st_mtime, st.st_mtime_nsec as i32).ok();
            snapshot_files
                .get(rel)
                .is_some_and(|(size, at)| *size == st.st_size as u64 && Some(*at) == mtime)
        });
        (staging, mirrored)
    })
    .await
    .map_err(|e| AgentError::Other {
        action: "mirror the volume for the restore",
        reason: e.to_string(),
    })?;
    if let Err(e) = mirrored {
        tracing::warn!(error = %e, "restoring without a mirror of the live volume");
    }
    // `--delete` in the staging directory takes out the mirrored names the snapshot does
    // not have (within the include): what is left is the snapshot's.
    let restic_opts = RestoreOptions {
        snapshot: id.to_owned(),
        target: staging.path().to_path_buf(),
        includes: req.include.clone(),
        excludes: req.exclude.clone(),
        overwrite: Overwrite::IfChanged,
        delete: true,
        ..RestoreOptions::default()
    };
    let restored = match restic.restore(&restic_opts) {
        Ok(run) => run.finish().await.map_err(AgentError::from),
        Err(e) => Err(e.into()),
    };
    let (target, opts) = (req.target.clone(), opts.clone());
    tokio::task::spawn_blocking(move || -> Result<ExtractReport, AgentError> {
        // restic's own errors leave the live volume as it was: only the staging goes.
        let summary = match restored {
            Ok(summary) => summary,
            Err(e) => {
                staging.remove()?;
                return Err(e);
            }
        };
        let mut ex = Extractor::new(&target, &opts)?;
        let applied = ex.apply_staged(&staging);
        staging.remove()?;
        applied?;
        let mut report = ex.finish()?;
        // The staging directory also holds mirrored names outside the include patterns.
        report.matched = summary
            .total_files
            .max(summary.files_restored + summary.files_skipped);
        Ok(report)
    })
    .await
    .map_err(|e| AgentError::Other {
        action: "wait for the staged restore",
        reason: e.to_string(),
    })?
}

/// Who reads a direct snapshot's data for a restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirectReader {
    /// The agent's own reader where it can open the backend, restic elsewhere.
    Native,
    /// restic, into a staging directory.
    Restic,
}

/// Restores a snapshot into `req.target`, in place: see the README's "What an in-place
/// restore guarantees".
pub async fn restore(restic: &Restic, req: RestoreRequest) -> Result<RestoreResult, AgentError> {
    restore_with(restic, req, DirectReader::Native).await
}

/// [`restore`] with a direct snapshot's data read by restic into a staging directory, as it
/// is for the backends the agent's own reader cannot open (GCS, Azure, B2, Swift, REST).
/// Public so that path is held to the same tests on a backend every machine has.
pub async fn restore_through_restic(
    restic: &Restic,
    req: RestoreRequest,
) -> Result<RestoreResult, AgentError> {
    restore_with(restic, req, DirectReader::Restic).await
}

async fn restore_with(
    restic: &Restic,
    req: RestoreRequest,
    reader: DirectReader,
) -> Result<RestoreResult, AgentError> {
    let started = Instant::now();
    // Bad patterns are refused before anything is read or written.
    let include = Patterns::new(&req.include)?;
    let exclude = Patterns::new(&req.exclude)?;
    if !include.is_empty() && !exclude.is_empty() {
        return Err(AgentError::invalid(
            "restore",
            "include and exclude patterns are mutually exclusive (as in restic restore); give \
             one or the other",
        ));
    }
    let wanted = req.snapshot.clone();
    let snap = with_native(restic, |r| {
        let wanted = wanted.clone();
        async move { r.snapshot(&wanted).await }
    })
    .await
    .map_err(|e| match e {
        restic_wrapper::NativeError::NoSuchSnapshot(_) => {
            AgentError::NoSnapshot(req.snapshot.clone())
        }
        e => AgentError::ListSnapshots(e),
    })?;
    if !is_complete(&snap) {
        return Err(AgentError::IncompleteSnapshot(snap.id));
    }
    // What a restore killed earlier left in the volume goes first, in either mode.
    let target = req.target.clone();
    let leftovers = tokio::task::spawn_blocking(move || crate::extract::remove_leftovers(&target))
        .await
        .map_err(|e| AgentError::Other {
            action: "wait for the sweep of an earlier restore's temporary files",
            reason: e.to_string(),
        })??;
    if leftovers > 0 {
        tracing::info!(
            target = %req.target.display(),
            removed = leftovers,
            "removed the temporary files of an interrupted restore"
        );
    }
    let opts = ExtractOptions {
        delete_extraneous: req.delete,
        include,
        exclude,
        owners: req.owners,
    };
    let (report, mode) = if snap.has_tag(TAG_STREAM) {
        let (restic, id, target, opts, budget) = (
            restic.clone(),
            snap.id.clone(),
            req.target.clone(),
            opts.clone(),
            req.budget.clone(),
        );
        let handle = tokio::runtime::Handle::current();
        let report = tokio::task::spawn_blocking(move || {
            restore_stream(&handle, &restic, &id, &target, &opts, &budget)
        })
        .await
        .map_err(|e| AgentError::Other {
            action: "wait for the extractor",
            reason: e.to_string(),
        })??;
        (report, ReadMode::Stream)
    } else {
        let native = match reader {
            DirectReader::Native => restore_native(restic, &snap, &req, &opts).await?,
            DirectReader::Restic => None,
        };
        let report = match native {
            Some(report) => report,
            None => restore_direct(restic, &snap.id, &req, &opts).await?,
        };
        (report, ReadMode::Direct)
    };
    if !req.include.is_empty() && report.matched == 0 {
        return Err(AgentError::NothingMatched {
            patterns: req.include.clone(),
        });
    }
    if !report.failed.is_empty() {
        return Err(AgentError::RestoreIncomplete {
            failed: report.failed,
        });
    }
    Ok(RestoreResult {
        snapshot_id: snap.id,
        bytes: report.bytes,
        files: report.files,
        unchanged: report.unchanged,
        deleted: report.deleted,
        duration_seconds: started.elapsed().as_secs_f64(),
        mode: Some(mode),
    })
}
