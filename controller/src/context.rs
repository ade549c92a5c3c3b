//! What every reconciler shares, and `stash-operator run`: wait for the CRDs, serve the probes,
//! take the leader Lease, then run the controllers until SIGTERM or lost leadership.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::Api;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use stash_api::BackupConfiguration;

use crate::cli::RunArgs;
use crate::error::Error;
use crate::metrics::Metrics;

/// The field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "stash-operator";

/// The object as JSON with its `apiVersion` and `kind`, which server-side apply requires.
fn typed<K>(obj: &K) -> serde_json::Value
where
    K: kube::Resource<DynamicType = ()> + serde::Serialize,
{
    let mut v = serde_json::to_value(obj).unwrap_or_default();
    v["apiVersion"] = K::api_version(&()).into();
    v["kind"] = K::kind(&()).into();
    v
}

/// Applies an object under the operator's field manager.
pub async fn apply<K>(api: &Api<K>, obj: &K) -> Result<(), kube::Error>
where
    K: kube::Resource<DynamicType = ()>
        + serde::Serialize
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let params = kube::api::PatchParams::apply(FIELD_MANAGER).force();
    api.patch(&name, &params, &kube::api::Patch::Apply(&typed(obj)))
        .await
        .map(|_| ())
}

/// A namespaced kind the operator reads and writes through `Api<K>`.
pub trait Namespaced:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + std::fmt::Debug
    + serde::de::DeserializeOwned
{
}

impl<K> Namespaced for K where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
{
}

/// A kind whose status is the operator's alone to write (see [`Written`]).
pub trait OwnStatus: Namespaced {
    type Status: Clone + PartialEq + Default + serde::Serialize;
    /// The status as this copy of the object (the cache's) holds it.
    fn cached_status(&self) -> Option<&Self::Status>;
}

impl OwnStatus for stash_api::BackupSession {
    type Status = stash_api::backup_session::BackupSessionStatus;
    fn cached_status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
}

impl OwnStatus for stash_api::RestoreSession {
    type Status = stash_api::restore_session::RestoreSessionStatus;
    fn cached_status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
}

/// Applies `status` to the status subresource of `obj`, under the operator's field manager:
/// the one writer of its kinds' status.
pub async fn apply_status<K: Namespaced, S: serde::Serialize>(
    client: &Client,
    obj: &K,
    status: &S,
    action: &'static str,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    let ns = obj.meta().namespace.clone().unwrap_or_default();
    let name = obj.meta().name.clone().unwrap_or_default();
    Api::<K>::namespaced(client.clone(), &ns)
        .patch_status(
            &name,
            &kube::api::PatchParams::apply(FIELD_MANAGER).force(),
            &kube::api::Patch::Apply(&patch),
        )
        .await
        .map_err(Error::kube(action))?;
    Ok(())
}

/// The statuses this process wrote, by object UID, until its cache shows them.
///
/// The operator is the one writer of its sessions' status, so what it last wrote is the
/// status, whatever a cache still holds. A reconcile started a moment after a write (by a
/// requeue, or an assignment's change) often found the cache without it and did the step
/// again: planned a session twice, or ran its post-backup actions and pushed its metrics a
/// second time, with a second, later duration. A record is dropped once the cache holds the
/// same status, or after [`Written::PATIENCE`], when a cache would long have caught up
/// (which bounds the memory of sessions deleted in between).
pub struct Written<S> {
    entries: Mutex<HashMap<String, (S, std::time::Instant)>>,
}

impl<S> Default for Written<S> {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
        }
    }
}

impl<S: Clone + PartialEq> Written<S> {
    const PATIENCE: Duration = Duration::from_secs(600);

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, (S, std::time::Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The object's status: the last one this process wrote, unless the cache (`cached`)
    /// already shows it.
    fn status(&self, uid: &str, cached: Option<&S>) -> Option<S> {
        let mut entries = self.entries();
        match entries.get(uid) {
            Some((written, at)) if cached != Some(written) && at.elapsed() < Self::PATIENCE => {
                Some(written.clone())
            }
            Some(_) => {
                entries.remove(uid);
                cached.cloned()
            }
            None => cached.cloned(),
        }
    }

    /// Records a status just written; forgets those a cache has long caught up with.
    fn remember(&self, uid: &str, status: &S) {
        let mut entries = self.entries();
        entries.retain(|_, (_, at)| at.elapsed() < Self::PATIENCE);
        entries.insert(uid.to_owned(), (status.clone(), std::time::Instant::now()));
    }
}

impl<S: Clone + PartialEq + Default + serde::Serialize> Written<S> {
    /// The status of `obj`: this process's last write, unless the cache's copy already
    /// shows it.
    pub fn status_of<K: OwnStatus<Status = S>>(&self, obj: &K) -> S {
        self.status(
            &obj.meta().uid.clone().unwrap_or_default(),
            obj.cached_status(),
        )
        .unwrap_or_default()
    }

    /// Writes `status` to `obj` (see [`apply_status`]) unless it is its status already (as
    /// the cache holds it, or as this process last wrote it), and remembers it until the
    /// cache shows it.
    pub async fn save<K: OwnStatus<Status = S>>(
        &self,
        client: &Client,
        obj: &K,
        status: &S,
        action: &'static str,
    ) -> Result<(), Error> {
        let uid = obj.meta().uid.clone().unwrap_or_default();
        if self.status(&uid, obj.cached_status()).as_ref() == Some(status) {
            return Ok(());
        }
        apply_status(client, obj, status, action).await?;
        self.remember(&uid, status);
        Ok(())
    }
}

impl<S> std::fmt::Debug for Written<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Written").finish_non_exhaustive()
    }
}

/// Reconciles of one kind that run at once. Unbounded, the first pass over 1,000
/// BackupConfigurations ran all 1,000 at once, their requests and responses in flight
/// together, and left the process at 250 MiB resident when it was done (130 MiB with 16);
/// the API server bounds the throughput either way.
pub const MAX_CONCURRENT_RECONCILES: u16 = 16;

/// What every controller does with a failed reconcile: counted by kind and category, logged,
/// and tried again — soon when a retry can help, later when the object must change.
pub fn after_error(
    ctx: &Ctx,
    kind: &'static str,
    error: &Error,
    retryable: u64,
    permanent: u64,
) -> kube::runtime::controller::Action {
    ctx.metrics
        .errors
        .get_or_create(&crate::metrics::ErrorLabels {
            kind,
            category: error.category(),
        })
        .inc();
    tracing::warn!(%error, kind, "reconcile failed");
    kube::runtime::controller::Action::requeue(std::time::Duration::from_secs(
        if error.is_retryable() {
            retryable
        } else {
            permanent
        },
    ))
}

/// The settings every controller of the operator runs with.
pub fn controller_config() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES)
}

pub struct Ctx {
    pub client: Client,
    pub args: RunArgs,
    /// Who the operator's Events say reported them.
    reporter: Reporter,
    pub metrics: Arc<Metrics>,
    /// The node agents' pods, kept by a watch: every session checks for a Ready agent on its
    /// nodes, and listing hundreds of agent pods per session cost the API server more than
    /// the rest of planning (500 sessions at once: 100,000 pods served).
    pub agents: Store<Pod>,
    /// Every BackupConfiguration: the BackupConfiguration controller's own cache, from which
    /// a Repository's references are computed. Listing them on each Repository reconcile (and
    /// every configuration's change starts one) listed 1,000 configurations some 900 times
    /// while 1,000 became Ready.
    pub configs: Store<BackupConfiguration>,
    /// One async lock per repository in this (the leader) process: retention holds it
    /// exclusively; initialisation and the planning of sessions share it, so no assignment is
    /// created while a prune runs, yet sessions of one repository are planned side by side.
    repo_locks: RepoLocks,
}

/// The per-repository locks of this process, shared by the reconcilers and the Snapshot
/// API's delete (which prunes like retention does).
#[derive(Debug, Clone, Default)]
pub struct RepoLocks(Arc<Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>>);

impl RepoLocks {
    pub fn get(&self, key: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut locks = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        locks.entry(key.to_owned()).or_default().clone()
    }
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").finish_non_exhaustive()
    }
}

impl Ctx {
    pub fn new(
        client: Client,
        args: RunArgs,
        metrics: Arc<Metrics>,
        agents: Store<Pod>,
        configs: Store<BackupConfiguration>,
        repo_locks: RepoLocks,
    ) -> Self {
        let reporter = Reporter {
            controller: "stash-operator".into(),
            instance: Some(args.pod_name.clone()),
        };
        Self {
            client,
            args,
            reporter,
            metrics,
            agents,
            configs,
            repo_locks,
        }
    }

    /// Records an Event about `regarding`; a failure to record is logged, never fatal.
    ///
    /// Each Event is its own: kube's `Recorder` folds Events that share a reason (its key
    /// leaves the note out) into one series that keeps the first note, so three hosts'
    /// `HostBackupSucceeded` showed as host-1's, three times, and a second host's failure
    /// would have shown the first host's error. The operator records an Event once per
    /// change of state, so there are no repeats to fold.
    pub async fn event(&self, ev: &kube::runtime::events::Event, regarding: &ObjectReference) {
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        if let Err(error) = recorder.publish(ev, regarding).await {
            tracing::debug!(%error, reason = %ev.reason, "cannot record an event");
        }
    }

    pub fn repo_lock(&self, key: &str) -> Arc<tokio::sync::RwLock<()>> {
        self.repo_locks.get(key)
    }
}

/// Everything a cache holds, once its first listing is in (an empty cache before then would
/// look like "nothing exists").
pub async fn cached<K>(store: &Store<K>, what: &'static str) -> Result<Vec<Arc<K>>, Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    store
        .wait_until_ready()
        .await
        .map_err(|_| Error::CacheStopped { what })?;
    Ok(store.state())
}

/// A cache of the objects `api` and `config` select, and the watch that fills it, which
/// runs as long as it is polled.
pub(crate) fn watch_into_store<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
) -> (Store<K>, impl Future<Output = ()> + use<K>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let watch =
        reflector::reflector(writer, watcher(api, config).default_backoff()).for_each(move |r| {
            if let Err(error) = r {
                tracing::warn!(%error, what, "a cache's watch failed; retrying");
            }
            std::future::ready(())
        });
    (reader, watch)
}

/// Waits until every CRD the operator serves is `Established`.
async fn wait_for_crds(client: &Client) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in stash_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let established = kube::runtime::wait::await_condition(
            api.clone(),
            &name,
            kube::runtime::wait::conditions::is_crd_established(),
        );
        match tokio::time::timeout(Duration::from_secs(300), established).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                return Err(Error::Invalid {
                    action: "wait for the CRDs",
                    reason: error.to_string(),
                });
            }
            Err(_) => return Err(Error::CrdsNotEstablished { name }),
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `stash-operator run`.
pub async fn run(args: Box<RunArgs>) -> Result<(), Error> {
    let args = *args;
    let client = Client::try_default()
        .await
        .map_err(Error::kube("connect to the API server"))?;
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let server = tokio::spawn(crate::server::serve(
        args.metrics_port,
        ready.clone(),
        metrics.clone(),
    ));
    std::fs::create_dir_all(&args.state_dir).map_err(|source| Error::Io {
        action: "create the state directory",
        source,
    })?;
    tokio::select! {
        r = wait_for_crds(&client) => r?,
        _ = shutdown_signal() => return Ok(()),
    }
    ready.store(true, Ordering::Relaxed);
    // Every replica serves the Snapshot API, leader or not: the Service may route to any.
    let repo_locks = RepoLocks::default();
    let leading = Arc::new(AtomicBool::new(false));
    let snapshot_api = {
        let (client, args, locks, leading) = (
            client.clone(),
            args.clone(),
            repo_locks.clone(),
            leading.clone(),
        );
        async move {
            if args.snapshot_api.secure_port == 0 {
                return std::future::pending().await;
            }
            crate::snapshots::run(client, args, locks, leading).await
        }
    };
    let snapshot_api = tokio::spawn(snapshot_api);
    let elector = args.leader_elect.then(|| {
        crate::leader::Elector::new(
            client.clone(),
            &args.namespace,
            &args.leader_election_lease,
            &args.pod_name,
        )
    });
    if let Some(e) = &elector {
        tokio::select! {
            _ = e.acquire() => {}
            _ = shutdown_signal() => return Ok(()),
        }
    }
    metrics.leader.set(1);
    leading.store(true, Ordering::Relaxed);
    let (agents, agent_watch) = watch_into_store(
        Api::<Pod>::namespaced(client.clone(), &args.namespace),
        watcher::Config::default().labels(&args.agent_selector),
        "node agents",
    );
    let configs = crate::backup_configuration::new_controller(&client);
    let ctx = Arc::new(Ctx::new(
        client,
        args,
        metrics.clone(),
        agents,
        configs.store(),
        repo_locks,
    ));
    let controllers = async {
        tokio::join!(
            agent_watch,
            crate::repository::controller(ctx.clone()),
            crate::backup_configuration::run(configs, ctx.clone()),
            crate::backup_session::controller(ctx.clone()),
            crate::restore_session::controller(ctx.clone()),
        );
    };
    let keep = async {
        match &elector {
            Some(e) => e.keep().await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        _ = controllers => Ok(()),
        e = keep => Err(e),
        _ = shutdown_signal() => {
            tracing::info!("SIGTERM: stopping");
            Ok(())
        }
        r = server => match r {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        },
        r = snapshot_api => match r {
            Ok(Err(e)) => Err(e),
            _ => Ok(()),
        },
    };
    metrics.leader.set(0);
    leading.store(false, Ordering::Relaxed);
    if let Some(e) = &elector
        && result.is_ok()
    {
        e.release().await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::Written;

    #[test]
    fn a_written_status_wins_over_a_cache_that_does_not_show_it_yet() {
        let written = Written::<u32>::default();
        assert_eq!(written.status("a", Some(&1)), Some(1));
        written.remember("a", &2);
        // The cache still holds the status before the write, or no status at all.
        assert_eq!(written.status("a", Some(&1)), Some(2));
        assert_eq!(written.status("a", None), Some(2));
        // Other objects are the cache's.
        assert_eq!(written.status("b", Some(&7)), Some(7));
        // Once the cache shows the write, the record goes and the cache is read again.
        assert_eq!(written.status("a", Some(&2)), Some(2));
        assert_eq!(written.status("a", Some(&3)), Some(3));
    }
}
