//! Fills the index in the background: every Repository is listed with the native reader at
//! start, when it appears or changes, after each BackupSession that wrote to it ends, and on
//! an interval. A failed listing keeps the last good one and says so in the Repository's
//! `SnapshotsListed` condition. Runs on every replica: any of them may serve a request.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use stash_api::BackupConfiguration;
use stash_api::backup_session::{BackupSession, BackupSessionPhase};
use stash_api::conditions::{Condition, find_condition, reasons, set_condition, types};
use stash_api::repository::Repository;
use tokio::sync::mpsc;

use super::index::Index;
use crate::cli::RunArgs;
use crate::repository::{OpenError, open_with};

/// What a listing found.
#[derive(Debug)]
enum Outcome {
    Listed(Vec<restic_wrapper::Snapshot>),
    /// Not initialised yet, and never listed: nothing to serve and nothing wrong yet.
    NotYetInitialised,
    Failed(String),
}

pub struct Refresher {
    client: kube::Client,
    args: RunArgs,
    index: Arc<Index>,
    repos: Store<Repository>,
    /// Whether this replica leads: only the leader writes Repository status.
    leading: Arc<AtomicBool>,
    requests: mpsc::UnboundedSender<String>,
}

impl std::fmt::Debug for Refresher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher").finish_non_exhaustive()
    }
}

fn split_key(key: &str) -> (&str, &str) {
    key.split_once('/').unwrap_or(("", key))
}

/// The `SnapshotsListed` condition for a listing's outcome, or `None` to leave it as is.
pub fn listing_condition(stale: Option<&str>, listed_at: Option<jiff::Timestamp>) -> Condition {
    match stale {
        None => Condition::new(
            types::SNAPSHOTS_LISTED,
            true,
            reasons::SNAPSHOT_LISTING_CURRENT,
            "the Snapshot API serves a current listing of the repository's snapshots",
        ),
        Some(why) => {
            let since = listed_at.map_or_else(
                || "it was never listed".to_owned(),
                |t| {
                    format!(
                        "served as last listed at {}",
                        t.strftime("%Y-%m-%dT%H:%M:%SZ")
                    )
                },
            );
            Condition::new(
                types::SNAPSHOTS_LISTED,
                false,
                reasons::SNAPSHOT_LISTING_STALE,
                format!("the snapshot listing is stale ({since}): {why}"),
            )
        }
    }
}

impl Refresher {
    /// The refresher, and the future that runs it until dropped.
    pub fn start(
        client: kube::Client,
        args: RunArgs,
        index: Arc<Index>,
        leading: Arc<AtomicBool>,
    ) -> (Arc<Refresher>, impl Future<Output = ()> + Send) {
        let (reader, writer) = reflector::store();
        let (tx, rx) = mpsc::unbounded_channel();
        let me = Arc::new(Refresher {
            client: client.clone(),
            args,
            index,
            repos: reader,
            leading,
            requests: tx,
        });
        let run = {
            let me = me.clone();
            async move {
                let repo_watch = reflector::reflector(
                    writer,
                    watcher(
                        Api::<Repository>::all(client.clone()),
                        watcher::Config::default(),
                    )
                    .default_backoff(),
                )
                .for_each(|event| {
                    me.on_repository_event(event);
                    std::future::ready(())
                });
                tokio::join!(
                    repo_watch,
                    me.watch_sessions(),
                    me.tick(),
                    me.clone().work(rx),
                );
            }
        };
        (me, run)
    }

    /// The Repositories the refresher knows, once its watch has listed them.
    pub fn repositories(&self) -> &Store<Repository> {
        &self.repos
    }

    fn on_repository_event(&self, event: Result<watcher::Event<Repository>, watcher::Error>) {
        match event {
            Ok(watcher::Event::Apply(r) | watcher::Event::InitApply(r)) => {
                self.request(&crate::repository::repo_key(
                    &r.namespace().unwrap_or_default(),
                    &r.name_any(),
                ));
            }
            Ok(watcher::Event::Delete(r)) => {
                let (ns, name) = (r.namespace().unwrap_or_default(), r.name_any());
                self.index.remove_repository(&ns, &name);
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
            Err(error) => {
                tracing::warn!(%error, "the Snapshot index's Repository watch failed; retrying")
            }
        }
    }

    /// Asks for a listing of `namespace/name` soon; repeated asks before it runs are one.
    pub fn request(&self, key: &str) {
        let _ = self.requests.send(key.to_owned());
    }

    /// Every Repository, on the interval.
    async fn tick(&self) {
        let every = Duration::from_secs(self.args.snapshot_api.index_interval_seconds.max(1));
        let mut interval = tokio::time::interval(every);
        interval.tick().await;
        loop {
            interval.tick().await;
            for r in self.repos.state() {
                self.request(&crate::repository::repo_key(
                    &r.namespace().unwrap_or_default(),
                    &r.name_any(),
                ));
            }
        }
    }

    /// A BackupSession that ended wrote (or tried to write, and retention may have pruned)
    /// its repository: list it again.
    async fn watch_sessions(&self) {
        let sessions: Api<BackupSession> = Api::all(self.client.clone());
        let mut ended = EndedSessions::default();
        let mut stream =
            std::pin::pin!(watcher(sessions, watcher::Config::default()).default_backoff());
        while let Some(next) = stream.next().await {
            let Ok(event) = next else { continue };
            let Some(session) = ended.on(event) else {
                continue;
            };
            if let Some(key) = self.repository_of(&session).await {
                self.request(&key);
            }
        }
    }

    async fn repository_of(&self, session: &BackupSession) -> Option<String> {
        let ns = session.namespace().unwrap_or_default();
        let invoker = session.spec.invoker.as_ref()?;
        if invoker.kind != "BackupConfiguration" {
            return None;
        }
        let config = Api::<BackupConfiguration>::namespaced(self.client.clone(), &ns)
            .get_opt(&invoker.name)
            .await
            .ok()??;
        let r = config.spec.repository?;
        Some(crate::repository::repo_key(
            r.namespace.as_deref().unwrap_or(&ns),
            &r.name,
        ))
    }

    /// Lists what was asked for, a few repositories at a time.
    async fn work(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<String>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(
            self.args.snapshot_api.index_concurrency.max(1),
        ));
        let pending: Arc<Mutex<HashSet<String>>> = Arc::default();
        while let Some(key) = rx.recv().await {
            let fresh = pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(key.clone());
            if !fresh {
                continue;
            }
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (me, pending) = (self.clone(), pending.clone());
            tokio::spawn(async move {
                pending
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&key);
                me.refresh(&key).await;
                drop(permit);
            });
        }
    }

    /// Lists one Repository now and records the outcome.
    pub async fn refresh(&self, key: &str) {
        let (ns, name) = split_key(key);
        let Some(repo) = self.repos.get(&ObjectRef::new(name).within(ns)) else {
            self.index.remove_repository(ns, name);
            return;
        };
        let labels: BTreeMap<String, String> = repo.labels().clone();
        match self.list(&repo).await {
            Outcome::Listed(snaps) => {
                tracing::debug!(repository = key, snapshots = snaps.len(), "listed");
                self.index.replace(ns, name, labels, snaps);
            }
            Outcome::NotYetInitialised if self.index.listing(ns, name).is_none() => {
                self.index.replace(ns, name, labels, Vec::new());
            }
            Outcome::NotYetInitialised => self.index.mark_stale(
                ns,
                name,
                "the repository's config file is gone (the backend is empty, unmounted or another one)".into(),
            ),
            Outcome::Failed(why) => {
                tracing::warn!(repository = key, reason = %why, "cannot list the repository's snapshots; serving the last listing");
                self.index.mark_stale(ns, name, why);
            }
        }
        // One writer per status: a standby serves its own index but leaves the Repository's
        // condition to the leader, whose index lists the same repository.
        if !self.leading.load(Ordering::Relaxed) {
            return;
        }
        if let Some(l) = self.index.listing(ns, name) {
            self.write_condition(&repo, listing_condition(l.stale.as_deref(), l.listed_at))
                .await;
        }
    }

    async fn list(&self, repo: &Repository) -> Outcome {
        let opened = match open_with(&self.client, &self.args, repo).await {
            Ok(o) => o,
            Err(OpenError::Invalid { message, .. }) => return Outcome::Failed(message),
            Err(OpenError::Failed(e)) => return Outcome::Failed(e.to_string()),
        };
        // The process's reader, shared with the reconcilers: a listing fetches and decrypts
        // only the snapshots that are new since any of them last looked. Checked against the
        // config file first, so a repository whose files went away (an unmounted volume, a
        // wiped bucket) is told from one without snapshots: it fails to open.
        let native = match restic_wrapper::native::reader(&opened.backend, &opened.secrets).await {
            Ok(n) => n,
            Err(restic_wrapper::NativeError::NotFound(_)) => return Outcome::NotYetInitialised,
            Err(e) => return Outcome::Failed(format!("failed to open the repository: {e}")),
        };
        match native.snapshots().await {
            Ok(s) => Outcome::Listed(s),
            Err(e) => Outcome::Failed(format!("failed to list the snapshots: {e}")),
        }
    }

    /// Sets the condition when it differs from what the Repository says, with the
    /// Repository's resourceVersion as a precondition (the reconciler writes its status too).
    async fn write_condition(&self, repo: &Repository, condition: Condition) {
        let mut conds = repo
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        if let Some(c) = find_condition(&conds, &condition.type_)
            && c.status == condition.status
            && c.message == condition.message
        {
            return;
        }
        let mut condition = condition;
        condition.observed_generation = repo.meta().generation;
        set_condition(&mut conds, condition, Time(jiff::Timestamp::now()));
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": repo.resource_version()},
            "status": {"conditions": conds},
        });
        if let Err(error) = Api::<Repository>::namespaced(
            self.client.clone(),
            &repo.namespace().unwrap_or_default(),
        )
        .patch_status(
            &repo.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        {
            // A conflict means the Repository changed: its watch event lists it again.
            tracing::debug!(%error, "cannot write the SnapshotsListed condition yet");
        }
    }
}

/// The BackupSessions seen ended, so that each end asks for one listing however often the
/// session is seen again. A session is forgotten once it is deleted or a re-list no longer
/// has it, so the set holds only sessions that exist (retention deletes old ones).
#[derive(Debug, Default)]
struct EndedSessions {
    uids: HashSet<String>,
    /// During a re-list: the sessions it has shown so far.
    relisting: Option<HashSet<String>>,
}

impl EndedSessions {
    /// The session this event shows ended for the first time, if it does.
    fn on(&mut self, event: watcher::Event<BackupSession>) -> Option<BackupSession> {
        match event {
            watcher::Event::Apply(session) | watcher::Event::InitApply(session) => {
                let uid = session.uid().unwrap_or_default();
                if let Some(seen) = &mut self.relisting {
                    seen.insert(uid.clone());
                }
                let done = session
                    .status
                    .as_ref()
                    .and_then(|s| s.phase)
                    .is_some_and(|p| {
                        matches!(
                            p,
                            BackupSessionPhase::Succeeded | BackupSessionPhase::Failed
                        )
                    });
                (done && self.uids.insert(uid)).then_some(session)
            }
            watcher::Event::Delete(session) => {
                self.uids.remove(&session.uid().unwrap_or_default());
                None
            }
            watcher::Event::Init => {
                self.relisting = Some(HashSet::new());
                None
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relisting.take() {
                    self.uids.retain(|uid| seen.contains(uid));
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod ended_tests {
    use super::*;

    fn session(uid: &str, phase: Option<BackupSessionPhase>) -> BackupSession {
        let mut s: BackupSession = serde_json::from_value(serde_json::json!({
            "apiVersion": "stash.appscode.com/v1beta1",
            "kind": "BackupSession",
            "metadata": {"name": uid, "namespace": "demo", "uid": uid},
            "spec": {}
        }))
        .unwrap();
        s.status = phase.map(|p| stash_api::backup_session::BackupSessionStatus {
            phase: Some(p),
            ..Default::default()
        });
        s
    }

    fn names(got: Option<BackupSession>) -> Option<String> {
        got.map(|s| s.name_any())
    }

    #[test]
    fn each_end_is_reported_once_and_forgotten_sessions_leave_the_set() {
        use BackupSessionPhase::{Failed, Running, Succeeded};
        use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
        let mut ended = EndedSessions::default();
        assert_eq!(names(ended.on(Init)), None);
        assert_eq!(
            names(ended.on(InitApply(session("a", Some(Succeeded))))),
            Some("a".into())
        );
        assert_eq!(
            names(ended.on(InitApply(session("b", Some(Running))))),
            None
        );
        assert_eq!(names(ended.on(InitDone)), None);
        // Seen again (a status write, a resync): not a new end.
        assert_eq!(names(ended.on(Apply(session("a", Some(Succeeded))))), None);
        assert_eq!(
            names(ended.on(Apply(session("b", Some(Failed))))),
            Some("b".into())
        );
        assert_eq!(names(ended.on(Apply(session("c", None)))), None);
        // Deleted: forgotten.
        ended.on(Delete(session("a", Some(Succeeded))));
        assert_eq!(ended.uids, HashSet::from(["b".to_owned()]));
        // A re-list that no longer has b (deleted while the watch was down) forgets it too.
        ended.on(Init);
        ended.on(InitApply(session("c", Some(Running))));
        ended.on(InitDone);
        assert!(ended.uids.is_empty(), "{:?}", ended.uids);
    }
}
