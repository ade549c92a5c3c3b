//! The agent's own restic processes, and the removal of their stale locks. Every restic the
//! agent starts is recorded in a journal in its state directory (a host path that outlives the
//! container and the pod); before work on a repository, the agent removes the locks of
//! recorded processes that are gone, and never touches any other lock, whatever its age.
//!
//! Why not `restic unlock`: it removes every lock of a dead process *with restic's own host
//! name* and every lock older than 30 minutes from anywhere. The first rule misses our own
//! dead locks, since a replaced agent pod has a new host name; the second removes other
//! machines' locks, such as a long backup whose lock refresh is late.
//!
//! When is a recorded process surely gone?
//! * It belongs to an earlier agent instance. Its restic processes were children of the
//!   earlier agent, in its container, and a container's processes all end with it: the
//!   runtime kills every process of a stopped container, and the kernel every process of a
//!   pid namespace whose init dies. The earlier container had stopped before this instance
//!   started: a restarted container replaces the one that exited, and a replaced pod starts
//!   only after the old one is gone, because the DaemonSet never runs two agent pods on one
//!   node (the chart pins `maxSurge: 0`; the one way around it is force-deleting a pod, which
//!   Kubernetes itself warns leaves its containers running). The earlier instance's pids may
//!   since name unrelated processes of the new pid namespace, so they are not tested, and
//!   only locks written before this instance started are taken as its.
//! * It belongs to this instance and was reaped after a kill (`exited`), or its pid is no
//!   longer a live process.
//!
//! A lock whose host name and pid match a live restic of this instance is never removed.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use restic_wrapper::{NativeError, NativeRepository, Repository, RepositoryFiles};
use restic_wrapper::{SpawnObserver, SpawnedProcess};
use serde::{Deserialize, Serialize};

/// The journal's file name in the state directory.
pub const JOURNAL_FILE: &str = "restic-processes.json";
/// Entries kept at most. Entries leave when their process ends normally or when their
/// repository is next cleaned; the bound only matters for repositories never used again.
pub const MAX_ENTRIES: usize = 256;
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("failed to {action} {path}: {source}")]
    Journal {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to {action} of {repository}: {source}")]
    Repository {
        action: &'static str,
        repository: String,
        source: Box<NativeError>,
    },
}

impl LockError {
    pub fn is_retryable(&self) -> bool {
        match self {
            LockError::Journal { .. } => true,
            LockError::Repository { source, .. } => source.is_retryable(),
        }
    }
}

/// Who this agent instance is, as its restic processes' locks will show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// This process's host name: restic inherits it and writes it into its locks.
    pub hostname: String,
    /// Random for every start of the agent.
    pub instance: String,
    /// When this instance started; an earlier instance's locks were all written before.
    pub started: jiff::Timestamp,
}

impl Identity {
    /// The identity of a new agent instance in this process.
    pub fn new_instance() -> Identity {
        let hostname = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
        Identity {
            hostname,
            instance: random_id(),
            started: jiff::Timestamp::now(),
        }
    }
}

/// 128 random bits as hex. std's `RandomState` is seeded from the operating system's random
/// source once per process and differs on every call.
fn random_id() -> String {
    use std::hash::BuildHasher;
    let seed = (std::process::id(), jiff::Timestamp::now().as_nanosecond());
    let a = std::hash::RandomState::new().hash_one(seed);
    let b = std::hash::RandomState::new().hash_one((a, seed));
    format!("{a:016x}{b:016x}")
}

/// One restic process the agent started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub hostname: String,
    pub pid: u32,
    pub instance: String,
    /// The repository, without credentials.
    pub repository: String,
    pub started: jiff::Timestamp,
    /// Reaped after a kill: gone, and its lock may have stayed.
    #[serde(default)]
    pub exited: bool,
}

impl Entry {
    fn same_process(&self, other: &Entry) -> bool {
        self.instance == other.instance
            && self.pid == other.pid
            && self.hostname == other.hostname
            && self.started == other.started
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct JournalFile {
    version: u32,
    entries: Vec<Entry>,
}

/// The journal of one agent instance. It observes the restic processes of every client it is
/// given to ([`restic_wrapper::Restic::with_spawn_observer`]).
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    identity: Identity,
}

impl Journal {
    pub fn new(state_dir: &Path, identity: Identity) -> Journal {
        Journal {
            path: state_dir.join(JOURNAL_FILE),
            identity,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every entry. A missing journal is empty; an unreadable one too, with a warning: it
    /// only helps remove locks sooner, and the agent must keep working without it.
    pub fn entries(&self) -> Vec<Entry> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read the restic process journal; treating it as empty");
                return Vec::new();
            }
        };
        match serde_json::from_slice::<JournalFile>(&bytes) {
            Ok(file) if file.version == FORMAT_VERSION => file.entries,
            Ok(file) => {
                tracing::warn!(path = %self.path.display(), version = file.version, "the restic process journal has an unknown format; treating it as empty");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "the restic process journal is unreadable; treating it as empty");
                Vec::new()
            }
        }
    }

    /// Whether an entry's process is surely gone (see the module documentation).
    pub fn is_gone(&self, entry: &Entry) -> bool {
        entry.instance != self.identity.instance || entry.exited || !process_alive(entry.pid)
    }

    /// Whether a lock is the stale lock of an entry: the same holder, gone, and for an
    /// earlier instance written before this one started (a lock written since cannot be from
    /// a process that was dead by then).
    fn is_stale_lock_of(&self, entry: &Entry, lock: &restic_wrapper::Lock) -> bool {
        let same_holder = lock.hostname == entry.hostname && lock.pid == i64::from(entry.pid);
        let earlier_instance = entry.instance != self.identity.instance;
        same_holder
            && self.is_gone(entry)
            && (!earlier_instance || lock.created().is_some_and(|t| t < self.identity.started))
    }

    /// Whether a lock may be held by a live restic of this instance. Every one of them
    /// started after this instance did, and so did its locks.
    fn may_hold(&self, entry: &Entry, lock: &restic_wrapper::Lock) -> bool {
        lock.hostname == entry.hostname
            && lock.pid == i64::from(entry.pid)
            && !self.is_gone(entry)
            && lock.created().is_none_or(|t| t >= self.identity.started)
    }

    /// Applies a change under an exclusive lock on the journal and writes the result
    /// atomically: a temporary file, synced, renamed over the journal. A crash at any point
    /// leaves either the old journal or the new one. Synchronous on purpose: the journal is a
    /// few kilobytes, and a new process's entry must be on disk before that restic can lock.
    fn update(&self, change: impl FnOnce(&mut Vec<Entry>)) -> Result<(), LockError> {
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| LockError::Journal {
                action,
                path,
                source,
            }
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io("create the state directory", dir))?;
        // Writers take turns: the agent's tasks, and in tests several agents in one process.
        let lock_path = self.path.with_extension("lock");
        let guard = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("open the journal lock", &lock_path))?;
        guard.lock().map_err(io("lock the journal", &lock_path))?;
        let mut entries = self.entries();
        change(&mut entries);
        compact(&mut entries, &self.identity.instance);
        let body = serde_json::to_vec_pretty(&JournalFile {
            version: FORMAT_VERSION,
            entries,
        })
        .map_err(|e| LockError::Journal {
            action: "encode the journal",
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        let tmp = self.path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(&body).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("sync", &tmp))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(io("replace", &self.path))?;
        // The rename is durable once the directory is synced (a power cut kills restic
        // too, and then the journal is what finds its locks).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        drop(guard);
        Ok(())
    }

    /// Records a restic process of this instance.
    pub fn record_started(&self, pid: u32, repository: &str) -> Result<(), LockError> {
        let entry = Entry {
            hostname: self.identity.hostname.clone(),
            pid,
            instance: self.identity.instance.clone(),
            repository: repository.to_owned(),
            started: jiff::Timestamp::now(),
            exited: false,
        };
        self.update(|entries| entries.push(entry))
    }

    /// Records the end of a process of this instance: one that exited on its own ran
    /// restic's exit path, which removes its lock, so it leaves the journal; one killed by a
    /// signal stays, marked, until its repository's stale locks are next removed.
    pub fn record_exited(&self, pid: u32, killed: bool) -> Result<(), LockError> {
        let ours = |e: &Entry| e.instance == self.identity.instance && e.pid == pid && !e.exited;
        self.update(|entries| {
            if killed {
                for e in entries.iter_mut().filter(|e| ours(e)) {
                    e.exited = true;
                }
            } else {
                entries.retain(|e| !ours(e));
            }
        })
    }

    fn forget(&self, gone: &[Entry]) -> Result<(), LockError> {
        self.update(|entries| entries.retain(|e| !gone.iter().any(|g| g.same_process(e))))
    }
}

/// Keeps the journal bounded, dropping the oldest entries first, and the live processes of
/// this instance last.
fn compact(entries: &mut Vec<Entry>, instance: &str) {
    if entries.len() <= MAX_ENTRIES {
        return;
    }
    let live = |e: &Entry| e.instance == instance && !e.exited;
    entries.sort_by_key(|e| (live(e), e.started));
    let excess = entries.len() - MAX_ENTRIES;
    tracing::warn!(
        dropped = excess,
        "the restic process journal is full; forgetting its oldest entries"
    );
    entries.drain(..excess);
    entries.sort_by_key(|e| e.started);
}

impl SpawnObserver for Journal {
    fn started(&self, process: &SpawnedProcess) {
        if let Err(e) = self.record_started(process.pid, &process.repository) {
            tracing::warn!(error = %e, pid = process.pid, "cannot record a restic process; its lock will not be removed if it is killed");
        }
    }

    fn exited(&self, process: &SpawnedProcess, status: ExitStatus) {
        if let Err(e) = self.record_exited(process.pid, status.signal().is_some()) {
            tracing::warn!(error = %e, pid = process.pid, "cannot record the end of a restic process");
        }
    }
}

/// Whether a pid names a live process in this pid namespace. A zombie is dead: it holds no
/// lock any more. When /proc cannot tell, the process is taken as alive, so its lock stays.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold any byte.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_none_or(|state| !matches!(state, 'Z' | 'X' | 'x')),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

/// A lock removed because its holder was one of this agent's restic processes and is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedLock {
    pub id: String,
    pub hostname: String,
    pub pid: i64,
}

/// Removes the stale locks of this agent's restic processes from one repository, and
/// forgets the journal entries it has dealt with. Costs nothing when no recorded process of
/// this repository is gone, and no key derivation when the repository holds no lock.
pub async fn remove_own_stale_locks(
    journal: &Journal,
    repository: &Repository,
) -> Result<Vec<RemovedLock>, LockError> {
    let name = repository.display_name();
    let repo_err = |action: &'static str| {
        let repository = name.clone();
        move |source| LockError::Repository {
            action,
            repository,
            source: Box::new(source),
        }
    };
    let gone: Vec<Entry> = journal
        .entries()
        .into_iter()
        .filter(|e| e.repository == name && journal.is_gone(e))
        .collect();
    if gone.is_empty() {
        return Ok(Vec::new());
    }
    let files = RepositoryFiles::new(repository.backend(), repository.secrets())
        .map_err(repo_err("open the storage"))?;
    let ids = files.lock_ids().await.map_err(repo_err("list the locks"))?;
    if ids.is_empty() {
        journal.forget(&gone)?;
        return Ok(Vec::new());
    }
    let native = NativeRepository::open(repository.backend(), repository.secrets())
        .await
        .map_err(repo_err("open the repository to read its locks"))?;
    let mut locks = Vec::new();
    let mut retry_later = false;
    for id in ids {
        match native.lock(&id).await {
            Ok(Some(lock)) => locks.push(lock),
            Ok(None) => {}
            Err(e) => {
                // Not ours to judge: restic refuses to lock past an unreadable lock too, and
                // says so. A passing read error is worth another look next time.
                retry_later |= e.is_retryable();
                tracing::warn!(lock = %id, repository = %name, error = %e, "cannot read a lock");
            }
        }
    }
    // Read after the locks were listed: a restic of ours that wrote one of them was recorded
    // before it could, so whoever is live now is in this reading.
    let entries = journal.entries();
    let mut removed = Vec::new();
    // Gone processes whose lock could also be a live one's (a pid used again): kept in the
    // journal until the live process is gone too.
    let mut undecided: Vec<Entry> = Vec::new();
    for lock in locks {
        let owners: Vec<&Entry> = gone
            .iter()
            .filter(|e| journal.is_stale_lock_of(e, &lock))
            .collect();
        if owners.is_empty() {
            continue;
        }
        if entries.iter().any(|e| journal.may_hold(e, &lock)) {
            undecided.extend(owners.into_iter().cloned());
            continue;
        }
        native
            .remove_lock(&lock.id)
            .await
            .map_err(repo_err("remove a stale lock"))?;
        removed.push(RemovedLock {
            id: lock.id,
            hostname: lock.hostname,
            pid: lock.pid,
        });
    }
    if !retry_later {
        let done: Vec<Entry> = gone
            .into_iter()
            .filter(|g| !undecided.iter().any(|u| u.same_process(g)))
            .collect();
        journal.forget(&done)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(instance: &str) -> Identity {
        Identity {
            hostname: "agent-pod".into(),
            instance: instance.into(),
            started: jiff::Timestamp::now(),
        }
    }

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() -> std::io::Result<()> {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn()?;
        let pid = child.id();
        child.wait()?;
        assert!(!process_alive(pid));
        Ok(())
    }

    #[test]
    fn a_zombie_is_not_alive() -> std::io::Result<()> {
        let mut child = std::process::Command::new("true").spawn()?;
        let pid = child.id();
        // Not reaped yet: the exited child stays a zombie until waited for.
        let mut zombie = false;
        for _ in 0..500 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            if stat.contains(") Z") {
                zombie = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(zombie, "the child exited");
        assert!(!process_alive(pid));
        child.wait()?;
        Ok(())
    }

    #[test]
    fn entries_come_and_go_with_their_processes() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let journal = Journal::new(dir.path(), identity("one"));
        journal.record_started(11, "/repo")?;
        journal.record_started(12, "/repo")?;
        journal.record_exited(11, false)?;
        journal.record_exited(12, true)?;
        let entries = journal.entries();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!((entries[0].pid, entries[0].exited), (12, true));
        assert!(journal.is_gone(&entries[0]));
        // A live process of this instance is not gone; every entry of an earlier one is.
        let live = Entry {
            pid: std::process::id(),
            exited: false,
            ..entries[0].clone()
        };
        assert!(!journal.is_gone(&live));
        let next = Journal::new(dir.path(), identity("two"));
        assert!(next.is_gone(&live));
        Ok(())
    }

    #[test]
    fn the_journal_stays_bounded_and_keeps_live_entries() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let old = Journal::new(dir.path(), identity("old"));
        old.record_started(1, "/repo")?;
        let journal = Journal::new(dir.path(), identity("now"));
        for pid in 0..(MAX_ENTRIES as u32 + 10) {
            journal.record_started(1000 + pid, "/repo")?;
        }
        let entries = journal.entries();
        assert_eq!(entries.len(), MAX_ENTRIES);
        assert!(entries.iter().all(|e| e.instance == "now"));
        assert_eq!(
            entries.last().map(|e| e.pid),
            Some(1000 + MAX_ENTRIES as u32 + 9),
            "the newest stay"
        );
        Ok(())
    }
}
