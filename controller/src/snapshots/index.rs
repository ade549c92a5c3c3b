//! The index the Snapshot API serves from: every Repository's snapshots as last listed, a
//! resourceVersion that grows with each change, and a bounded history of changes for watches
//! that resume. Requests read it under a lock held for microseconds; nothing here waits on a
//! backend (the refresher in `refresh.rs` does that, in the background).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};

use tokio::sync::broadcast;

use super::object::IndexedSnapshot;
use super::query::ListOptions;

/// Changes kept for watches that resume from an older resourceVersion; older ones get 410.
const HISTORY: usize = 10_000;
/// Changes a live watch may fall behind by before it is ended (its client then re-lists).
const LIVE_BUFFER: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Added => "ADDED",
            ChangeKind::Modified => "MODIFIED",
            ChangeKind::Deleted => "DELETED",
        }
    }
}

/// One change; the snapshot's resourceVersion is the change's.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: ChangeKind,
    pub snapshot: Arc<IndexedSnapshot>,
}

/// A Repository's entry.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// By snapshot name.
    pub snapshots: BTreeMap<String, Arc<IndexedSnapshot>>,
    /// When the last listing succeeded.
    pub listed_at: Option<jiff::Timestamp>,
    /// Why the last listing failed, while the one above is served instead.
    pub stale: Option<String>,
}

#[derive(Debug)]
struct State {
    resource_version: u64,
    repos: BTreeMap<String, Listing>,
    history: VecDeque<Change>,
}

/// A watch's start: the changes after its resourceVersion, then the live ones.
#[derive(Debug)]
pub struct Subscription {
    pub backlog: Vec<Change>,
    pub resource_version: u64,
    pub live: broadcast::Receiver<Change>,
}

/// Asked for a resourceVersion older than the history holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub requested: u64,
    pub oldest: u64,
}

#[derive(Debug)]
pub struct Index {
    state: RwLock<State>,
    live: broadcast::Sender<Change>,
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

fn repo_key(ns: &str, repo: &str) -> String {
    format!("{ns}/{repo}")
}

/// Which snapshots of a listing come, go or change (their Repository's labels did).
pub fn diff(
    old: &BTreeMap<String, Arc<IndexedSnapshot>>,
    new: &BTreeMap<String, IndexedSnapshot>,
) -> Vec<(ChangeKind, String)> {
    let mut out = Vec::new();
    for (name, s) in new {
        match old.get(name) {
            None => out.push((ChangeKind::Added, name.clone())),
            Some(o) if o.repository_labels != s.repository_labels || o.snapshot != s.snapshot => {
                out.push((ChangeKind::Modified, name.clone()));
            }
            Some(_) => {}
        }
    }
    for name in old.keys() {
        if !new.contains_key(name) {
            out.push((ChangeKind::Deleted, name.clone()));
        }
    }
    out
}

impl Index {
    pub fn new() -> Self {
        // Start above any resourceVersion a previous process handed out, so a client that
        // resumes a watch across an operator restart is told to re-list (410), not served
        // a gap.
        let start = u64::try_from(jiff::Timestamp::now().as_millisecond()).unwrap_or(1) * 1000;
        Index {
            state: RwLock::new(State {
                resource_version: start,
                repos: BTreeMap::new(),
                history: VecDeque::new(),
            }),
            live: broadcast::channel(LIVE_BUFFER).0,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn resource_version(&self) -> u64 {
        self.read().resource_version
    }

    /// Records a change under the write lock, so subscribers never miss or repeat one.
    fn record(st: &mut State, live: &broadcast::Sender<Change>, change: Change) {
        if st.history.len() == HISTORY {
            st.history.pop_front();
        }
        st.history.push_back(change.clone());
        // No receiver is not an error: nobody watches.
        let _ = live.send(change);
    }

    /// A successful listing of a Repository replaces its entry; the differences become
    /// changes.
    pub fn replace(
        &self,
        namespace: &str,
        repository: &str,
        labels: BTreeMap<String, String>,
        snapshots: Vec<restic_wrapper::Snapshot>,
    ) {
        let new: BTreeMap<String, IndexedSnapshot> = snapshots
            .into_iter()
            .map(|snapshot| {
                let s = IndexedSnapshot {
                    namespace: namespace.to_owned(),
                    repository: repository.to_owned(),
                    repository_labels: labels.clone(),
                    snapshot,
                    resource_version: 0,
                    rendered: Default::default(),
                };
                (s.name(), s)
            })
            .collect();
        let mut st = self.write();
        let key = repo_key(namespace, repository);
        let old = st.repos.remove(&key).unwrap_or_default();
        let changes = diff(&old.snapshots, &new);
        let mut entry = Listing {
            snapshots: BTreeMap::new(),
            listed_at: Some(jiff::Timestamp::now()),
            stale: None,
        };
        // Unchanged snapshots keep their resourceVersion.
        for (name, s) in &old.snapshots {
            if new.contains_key(name) {
                entry.snapshots.insert(name.clone(), s.clone());
            }
        }
        for (kind, name) in changes {
            st.resource_version += 1;
            let rv = st.resource_version;
            let snapshot = match kind {
                ChangeKind::Deleted => match old.snapshots.get(&name) {
                    Some(s) => {
                        let mut gone = (**s).clone();
                        gone.resource_version = rv;
                        Arc::new(gone)
                    }
                    None => continue,
                },
                _ => match new.get(&name) {
                    Some(s) => {
                        let mut s = s.clone();
                        s.resource_version = rv;
                        let s = Arc::new(s);
                        entry.snapshots.insert(name.clone(), s.clone());
                        s
                    }
                    None => continue,
                },
            };
            Self::record(&mut st, &self.live, Change { kind, snapshot });
        }
        st.repos.insert(key, entry);
    }

    /// A failed listing: the last good one stays, marked stale with `reason`.
    pub fn mark_stale(&self, namespace: &str, repository: &str, reason: String) {
        let mut st = self.write();
        st.repos
            .entry(repo_key(namespace, repository))
            .or_default()
            .stale = Some(reason);
    }

    /// A deleted Repository's snapshots go with it.
    pub fn remove_repository(&self, namespace: &str, repository: &str) {
        let mut st = self.write();
        let Some(old) = st.repos.remove(&repo_key(namespace, repository)) else {
            return;
        };
        for s in old.snapshots.values() {
            st.resource_version += 1;
            let mut gone = (**s).clone();
            gone.resource_version = st.resource_version;
            Self::record(
                &mut st,
                &self.live,
                Change {
                    kind: ChangeKind::Deleted,
                    snapshot: Arc::new(gone),
                },
            );
        }
    }

    /// A Repository's entry, if it was ever listed or tried.
    pub fn listing(&self, namespace: &str, repository: &str) -> Option<Listing> {
        self.read()
            .repos
            .get(&repo_key(namespace, repository))
            .cloned()
    }

    /// The Repositories the index holds, as `namespace/name`.
    pub fn repositories(&self) -> Vec<String> {
        self.read().repos.keys().cloned().collect()
    }

    /// The snapshots of `namespace` (all when `None`) that `opts` selects, in
    /// `namespace/name` order, and the index's resourceVersion.
    pub fn list(
        &self,
        namespace: Option<&str>,
        opts: &ListOptions,
    ) -> (u64, Vec<Arc<IndexedSnapshot>>) {
        let st = self.read();
        let out = select(&st, namespace, opts);
        let rv = st.resource_version;
        drop(st);
        (rv, sorted(out))
    }

    /// One snapshot by namespace and name.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<IndexedSnapshot>> {
        let (repo, _) = super::object::parse_name(name)?;
        self.read()
            .repos
            .get(&repo_key(namespace, repo))?
            .snapshots
            .get(name)
            .cloned()
    }

    /// The changes after `since`, and the live ones from then on.
    pub fn subscribe(&self, since: u64) -> Result<Subscription, Expired> {
        let st = self.read();
        let live = self.live.subscribe();
        let oldest = st
            .history
            .front()
            .map_or(st.resource_version, |c| c.snapshot.resource_version - 1);
        if since < oldest {
            return Err(Expired {
                requested: since,
                oldest,
            });
        }
        let backlog = st
            .history
            .iter()
            .filter(|c| c.snapshot.resource_version > since)
            .cloned()
            .collect();
        Ok(Subscription {
            backlog,
            resource_version: st.resource_version,
            live,
        })
    }

    /// A watch that starts now, with every current snapshot it selects as its first events.
    pub fn subscribe_with_state(
        &self,
        namespace: Option<&str>,
        opts: &ListOptions,
    ) -> (Vec<Arc<IndexedSnapshot>>, Subscription) {
        // Both under one read lock: no change falls between the state and the live feed.
        let st = self.read();
        let live = self.live.subscribe();
        let items = select(&st, namespace, opts);
        let resource_version = st.resource_version;
        drop(st);
        (
            sorted(items),
            Subscription {
                backlog: Vec::new(),
                resource_version,
                live,
            },
        )
    }
}

fn select(st: &State, namespace: Option<&str>, opts: &ListOptions) -> Vec<Arc<IndexedSnapshot>> {
    st.repos
        .iter()
        .filter(|(key, _)| {
            namespace.is_none_or(|ns| key.split_once('/').is_some_and(|(n, _)| n == ns))
        })
        .flat_map(|(_, l)| l.snapshots.values())
        .filter(|s| opts.matches(s))
        .cloned()
        .collect()
}

fn sorted(mut items: Vec<Arc<IndexedSnapshot>>) -> Vec<Arc<IndexedSnapshot>> {
    items.sort_by(|a, b| a.key().cmp(b.key()));
    items
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn snap(id: &str, host: &str) -> restic_wrapper::Snapshot {
        serde_json::from_value(json!({
            "time": "2025-03-04T05:06:07Z", "tree": "t", "paths": ["/d"], "hostname": host,
            "id": id.repeat(64 / id.len()), "short_id": id.repeat(8 / id.len()),
        }))
        .unwrap()
    }

    #[test]
    fn listings_become_changes_with_growing_versions() {
        let index = Index::new();
        let start = index.resource_version();
        index.replace(
            "demo",
            "r",
            BTreeMap::new(),
            vec![snap("a", "host-0"), snap("b", "host-1")],
        );
        let (rv, all) = index.list(None, &ListOptions::default());
        assert_eq!(rv, start + 2);
        assert_eq!(
            all.iter().map(|s| s.name()).collect::<Vec<_>>(),
            ["r-aaaaaaaa", "r-bbbbbbbb"]
        );
        let sub = index.subscribe(rv).unwrap();
        assert!(sub.backlog.is_empty());
        let mut live = sub.live;
        // b is forgotten, c is new; a is unchanged and keeps its version.
        index.replace(
            "demo",
            "r",
            BTreeMap::new(),
            vec![snap("a", "host-0"), snap("c", "host-0")],
        );
        let first = live.try_recv().unwrap();
        let second = live.try_recv().unwrap();
        let mut seen = [
            (first.kind, first.snapshot.name()),
            (second.kind, second.snapshot.name()),
        ];
        seen.sort_by_key(|(_, n)| n.clone());
        assert_eq!(
            seen,
            [
                (ChangeKind::Deleted, "r-bbbbbbbb".to_owned()),
                (ChangeKind::Added, "r-cccccccc".to_owned())
            ]
        );
        assert_eq!(
            index.get("demo", "r-aaaaaaaa").unwrap().resource_version,
            start + 1
        );
        assert!(index.get("demo", "r-bbbbbbbb").is_none());
        // A watch from the first listing's version replays both changes.
        let replay = index.subscribe(rv).unwrap();
        assert_eq!(replay.backlog.len(), 2);
        assert!(index.subscribe(start - 5).is_err());
    }

    #[test]
    fn a_failed_listing_keeps_the_last_good_one() {
        let index = Index::new();
        index.replace("demo", "r", BTreeMap::new(), vec![snap("a", "host-0")]);
        index.mark_stale("demo", "r", "connection refused".into());
        let l = index.listing("demo", "r").unwrap();
        assert_eq!(l.snapshots.len(), 1);
        assert_eq!(l.stale.as_deref(), Some("connection refused"));
        index.replace("demo", "r", BTreeMap::new(), vec![snap("a", "host-0")]);
        assert!(index.listing("demo", "r").unwrap().stale.is_none());
    }

    #[test]
    fn lists_select_by_namespace_and_labels() {
        let index = Index::new();
        index.replace(
            "demo",
            "r",
            BTreeMap::new(),
            vec![snap("a", "host-0"), snap("b", "host-1")],
        );
        index.replace("other", "s", BTreeMap::new(), vec![snap("c", "host-1")]);
        let host1 = ListOptions::parse("labelSelector=hostname%3Dhost-1").unwrap();
        let names =
            |v: Vec<Arc<IndexedSnapshot>>| v.iter().map(|s| s.key().to_owned()).collect::<Vec<_>>();
        assert_eq!(
            names(index.list(None, &host1).1),
            ["demo/r-bbbbbbbb", "other/s-cccccccc"]
        );
        assert_eq!(
            names(index.list(Some("other"), &host1).1),
            ["other/s-cccccccc"]
        );
        index.remove_repository("other", "s");
        assert_eq!(names(index.list(None, &host1).1), ["demo/r-bbbbbbbb"]);
    }
}
