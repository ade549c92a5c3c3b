//! Repository: checks the backend and its Secret, initialises the restic repository once
//! (before any assignment may use it: two agents initialising one repository at once leave it
//! unreadable), and keeps its status — snapshot count and times from the native reader, the
//! invokers that reference it — with conditions that say what is wrong.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use restic_wrapper::{Cache, Restic};
use stash_api::conditions::{Condition, reasons, set_condition, types};
use stash_api::repository::{Repository, RepositoryStatus, ResourceRef};
use stash_api::{BackupConfiguration, RestoreSession};

use crate::context::Ctx;
use crate::error::{Error, is_not_found};

/// A repository opened for the operator's own restic commands.
#[derive(Debug)]
pub struct Opened {
    pub restic: Restic,
    pub backend: restic_wrapper::Backend,
    pub secrets: restic_wrapper::Secrets,
    /// `<namespace>/<name>`: the key of the per-repository lock and Lease.
    pub key: String,
}

/// Why a repository cannot be opened, as the condition it becomes.
#[derive(Debug)]
pub enum OpenError {
    /// The spec or the Secret must change; the message says how.
    Invalid {
        reason: &'static str,
        message: String,
    },
    Failed(Error),
}

impl From<Error> for OpenError {
    fn from(e: Error) -> Self {
        OpenError::Failed(e)
    }
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Invalid { message, .. } => f.write_str(message),
            OpenError::Failed(e) => write!(f, "{e}"),
        }
    }
}

pub fn repo_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

/// Opens a Repository's restic repository with its Secret (not yet checked to exist).
pub async fn open(ctx: &Ctx, repo: &Repository) -> Result<Opened, OpenError> {
    open_with(&ctx.client, &ctx.args, repo).await
}

/// [`open`] for callers without a reconciler's context (the Snapshot API's index, which runs
/// on every replica, leader or not).
pub async fn open_with(
    client: &kube::Client,
    args: &crate::cli::RunArgs,
    repo: &Repository,
) -> Result<Opened, OpenError> {
    let ns = repo.namespace().unwrap_or_default();
    let name = repo.name_any();
    let invalid = |reason, e: stash_rules::repository::InvalidRepository| OpenError::Invalid {
        reason,
        message: format!("Repository {ns}/{name}: {e}"),
    };
    let backend = stash_rules::repository::backend(&repo.spec.backend)
        .map_err(|e| invalid(reasons::REPOSITORY_NOT_AVAILABLE, e))?;
    stash_rules::repository::check_reachable(&backend, &args.local_roots())
        .map_err(|e| invalid(reasons::REPOSITORY_NOT_AVAILABLE, e))?;
    let secret_name = stash_rules::repository::secret_name(&repo.spec.backend)
        .map_err(|e| invalid(reasons::BACKEND_SECRET_NOT_AVAILABLE, e))?;
    let secret = match Api::<Secret>::namespaced(client.clone(), &ns)
        .get(secret_name)
        .await
    {
        Ok(s) => s,
        Err(e) if is_not_found(&e) => {
            return Err(OpenError::Invalid {
                reason: reasons::BACKEND_SECRET_NOT_AVAILABLE,
                message: format!(
                    "the storage Secret {ns}/{secret_name} of Repository {name} does not exist"
                ),
            });
        }
        Err(e) => return Err(Error::kube("read the storage Secret")(e).into()),
    };
    let secrets = stash_rules::repository::checked_secrets(&secret)
        .map_err(|e| invalid(reasons::BACKEND_SECRET_NOT_AVAILABLE, e))?;
    let key = repo_key(&ns, &name);
    let scratch =
        args.state_dir
            .join("scratch")
            .join(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                key.as_bytes(),
            )));
    std::fs::create_dir_all(&scratch).map_err(|source| Error::Io {
        action: "create the scratch directory",
        source,
    })?;
    let repository = restic_wrapper::Repository::new(backend.clone(), secrets.clone(), &scratch)
        .map_err(Error::restic("open the repository"))?;
    let restic = Restic::new(repository)
        .with_program(&args.restic)
        .with_cache(Cache::Dir(args.state_dir.join("restic-cache")))
        .with_tmp_dir(&scratch)
        .with_timeout(Duration::from_secs(args.restic_timeout_seconds));
    Ok(Opened {
        restic,
        backend,
        secrets,
        key,
    })
}

/// Initialises the repository unless it exists, never while retention holds it. Two
/// initialisations of one repository never overlap: `Restic::ensure_initialized` checks and
/// initialises under its own per-repository lock, so this one is shared.
pub async fn ensure_initialized(ctx: &Ctx, opened: &Opened) -> Result<(), Error> {
    let lock = ctx.repo_lock(&opened.key);
    let _held = lock.read().await;
    opened
        .restic
        .ensure_initialized()
        .await
        .map_err(Error::restic("initialise the repository"))
}

/// The invokers that name this repository.
fn references(
    repo: &Repository,
    configs: &[Arc<BackupConfiguration>],
    restores: &[RestoreSession],
) -> Vec<ResourceRef> {
    let ns = repo.namespace().unwrap_or_default();
    let name = repo.name_any();
    let names_it = |r: &stash_api::common::ObjectRef, own_ns: &str| {
        r.name == name && r.namespace.as_deref().unwrap_or(own_ns) == ns
    };
    let mut out: Vec<ResourceRef> = configs
        .iter()
        .filter(|c| {
            c.spec
                .repository
                .as_ref()
                .is_some_and(|r| names_it(r, &c.namespace().unwrap_or_default()))
        })
        .map(|c| ResourceRef {
            kind: "BackupConfiguration".into(),
            namespace: c.namespace(),
            name: c.name_any(),
        })
        .chain(
            restores
                .iter()
                .filter(|r| {
                    r.spec
                        .repository
                        .as_ref()
                        .is_some_and(|x| names_it(x, &r.namespace().unwrap_or_default()))
                })
                .map(|r| ResourceRef {
                    kind: "RestoreSession".into(),
                    namespace: r.namespace(),
                    name: r.name_any(),
                }),
        )
        .collect();
    out.sort_by(|a, b| (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name)));
    out
}

fn parse_time(t: &str) -> Option<Timestamp> {
    t.parse().ok()
}

/// The snapshot count and the first and last backup times, from the native reader, into
/// the status; on failure the last good figures stay.
pub async fn record_listing(
    status: &mut RepositoryStatus,
    native: &restic_wrapper::NativeRepository,
) {
    match native.snapshots().await {
        Ok(snaps) => {
            let times: Vec<Timestamp> = snaps.iter().filter_map(|s| parse_time(&s.time)).collect();
            status.snapshot_count = Some(i64::try_from(snaps.len()).unwrap_or(i64::MAX));
            // The first backup stays the first even once its snapshot is forgotten, and a
            // later backup of an unchanged volume (no new snapshot) keeps the last time.
            let first = status.first_backup_time.take().map(|t| t.0);
            let last = status.last_backup_time.take().map(|t| t.0);
            status.first_backup_time = times.iter().copied().chain(first).min().map(Time);
            status.last_backup_time = times.iter().copied().chain(last).max().map(Time);
        }
        Err(error) => tracing::warn!(%error, "cannot list the repository's snapshots"),
    }
}

/// The initialised condition's message; for a hostPath repository it names the one node
/// whose directory it is, because on every other node the same path is another directory.
fn usable_message(backend: &restic_wrapper::Backend, node: &str) -> String {
    let plain = "the restic repository exists and opens with the password";
    match backend {
        restic_wrapper::Backend::Local { path } if !node.is_empty() => format!(
            "{plain}; it is the hostPath {} of node {node}, where the operator runs: only \
             workloads on that node can back up into it",
            path.display()
        ),
        _ => plain.to_owned(),
    }
}

/// The message for a repository whose password opens no key.
pub fn wrong_password(opened: &Opened) -> String {
    format!(
        "the password in the storage Secret does not open the repository {} (no key file opens \
         with it); fix RESTIC_PASSWORD",
        opened.restic.repository().display_name()
    )
}

/// Initialises the repository if needed and checks that the password opens it: an existing
/// repository is recognised by its config file alone, which says nothing about the password.
/// Returns the process's native reader of the repository.
pub async fn ensure_usable(
    ctx: &Ctx,
    opened: &Opened,
) -> Result<std::sync::Arc<restic_wrapper::NativeRepository>, Error> {
    ensure_initialized(ctx, opened).await?;
    match restic_wrapper::native::reader(&opened.backend, &opened.secrets).await {
        Ok(native) => Ok(native),
        Err(restic_wrapper::NativeError::WrongPassword) => Err(Error::Invalid {
            action: "open the repository",
            reason: wrong_password(opened),
        }),
        Err(e) if e.is_retryable() => Err(Error::Io {
            action: "open the repository",
            source: std::io::Error::other(e.to_string()),
        }),
        Err(e) => Err(Error::Invalid {
            action: "open the repository",
            reason: e.to_string(),
        }),
    }
}

pub async fn write_status(
    ctx: &Ctx,
    repo: &Repository,
    status: RepositoryStatus,
) -> Result<(), Error> {
    crate::context::apply_status(&ctx.client, repo, &status, "write the Repository status").await
}

/// Deletes every object of the repository from its backend (`wipeOut`).
async fn wipe(opened: &Opened) -> Result<usize, Error> {
    use futures::TryStreamExt;
    let failed = |e: String| Error::Invalid {
        action: "wipe the repository's data",
        reason: e,
    };
    let (store, prefix) = restic_wrapper::native::store_for(&opened.backend, &opened.secrets)
        .map_err(|e| failed(e.to_string()))?;
    let objects: Vec<object_store::path::Path> = store
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await
        .map_err(|e| failed(e.to_string()))?;
    for location in &objects {
        store
            .delete(location)
            .await
            .map_err(|e| failed(e.to_string()))?;
    }
    Ok(objects.len())
}

async fn set_finalizer(ctx: &Ctx, repo: &Repository, present: bool) -> Result<(), Error> {
    let mut finalizers: Vec<String> = repo
        .finalizers()
        .iter()
        .filter(|f| f.as_str() != stash_api::labels::REPOSITORY_FINALIZER)
        .cloned()
        .collect();
    if present {
        finalizers.push(stash_api::labels::REPOSITORY_FINALIZER.to_owned());
    }
    // The resourceVersion makes this a compare-and-swap with other finalizer holders.
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": repo.resource_version()}
    });
    Api::<Repository>::namespaced(ctx.client.clone(), &repo.namespace().unwrap_or_default())
        .patch(
            &repo.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(Error::kube("update the Repository's finalizers"))?;
    Ok(())
}

/// `wipeOut`: the finalizer `stash` is held while the Repository asks for its data to go with
/// it; on deletion the data is deleted from the backend (under the repository's Lease, so no
/// backup writes meanwhile), then the finalizer is released.
async fn finalize(ctx: &Ctx, repo: &Repository) -> Result<Option<Action>, Error> {
    let holds = repo
        .finalizers()
        .iter()
        .any(|f| f == stash_api::labels::REPOSITORY_FINALIZER);
    let wipe_out = repo.spec.wipe_out.unwrap_or(false);
    if repo.meta().deletion_timestamp.is_none() {
        if wipe_out != holds {
            set_finalizer(ctx, repo, wipe_out).await?;
        }
        return Ok(None);
    }
    if !holds {
        return Ok(Some(Action::await_change()));
    }
    if wipe_out {
        match open(ctx, repo).await {
            Ok(opened) => {
                let lock = ctx.repo_lock(&opened.key);
                let _in_process = lock.write().await;
                let Some(_lease) = crate::repo_lease::acquire(ctx, &opened.key).await? else {
                    return Ok(Some(Action::requeue(Duration::from_secs(5))));
                };
                let removed = wipe(&opened).await?;
                tracing::info!(repository = %opened.key, removed, "wiped the repository's data");
            }
            Err(OpenError::Invalid { message, .. }) => {
                // Nothing can reach the data; keeping the Repository forever would not help.
                tracing::warn!(%message, "cannot wipe the repository's data; releasing it");
                let ev = kube::runtime::events::Event {
                    type_: kube::runtime::events::EventType::Warning,
                    reason: "WipeOutFailed".into(),
                    note: Some(format!("the repository's data was not deleted: {message}")),
                    action: "WipeOut".into(),
                    secondary: None,
                };
                ctx.event(&ev, &repo.object_ref(&())).await;
            }
            Err(OpenError::Failed(e)) => return Err(e),
        }
    }
    set_finalizer(ctx, repo, false).await?;
    Ok(Some(Action::await_change()))
}

#[tracing::instrument(skip_all, fields(kind = "Repository", ns = %repo.namespace().unwrap_or_default(), name = %repo.name_any()))]
async fn reconcile(repo: Arc<Repository>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.metrics
        .reconciles
        .get_or_create(&crate::metrics::KindLabels { kind: "Repository" })
        .inc();
    if let Some(done) = finalize(&ctx, &repo).await? {
        return Ok(done);
    }
    let now = Time(Timestamp::now());
    let generation = repo.meta().generation;
    let mut status = repo.status.clone().unwrap_or_default();
    let mut conds = status.conditions.clone().unwrap_or_default();
    let mut set = |c: Condition| {
        let mut c = c;
        c.observed_generation = generation;
        set_condition(&mut conds, c, now.clone());
    };
    let requeue = match open(&ctx, &repo).await {
        Err(OpenError::Invalid { reason, message }) => {
            set(Condition::new(
                types::BACKEND_SECRET_FOUND,
                false,
                reason,
                message.clone(),
            ));
            set(Condition::new(
                types::BACKEND_REPOSITORY_INITIALIZED,
                false,
                reasons::FAILED_TO_INITIALIZE_BACKEND,
                message,
            ));
            Duration::from_secs(15)
        }
        Err(OpenError::Failed(e)) => return Err(e),
        Ok(opened) => {
            set(Condition::new(
                types::BACKEND_SECRET_FOUND,
                true,
                reasons::BACKEND_SECRET_AVAILABLE,
                "the storage Secret holds the repository password",
            ));
            match ensure_usable(&ctx, &opened).await {
                Err(e) => {
                    set(Condition::new(
                        types::BACKEND_REPOSITORY_INITIALIZED,
                        false,
                        reasons::FAILED_TO_INITIALIZE_BACKEND,
                        e.to_string(),
                    ));
                    if e.is_retryable() {
                        Duration::from_secs(30)
                    } else {
                        Duration::from_secs(120)
                    }
                }
                Ok(native) => {
                    set(Condition::new(
                        types::BACKEND_REPOSITORY_INITIALIZED,
                        true,
                        reasons::SUCCESSFULLY_INITIALIZED_BACKEND,
                        usable_message(&opened.backend, &ctx.args.node_name),
                    ));
                    record_listing(&mut status, &native).await;
                    Duration::from_secs(300)
                }
            }
        }
    };
    let configs = crate::context::cached(&ctx.configs, "BackupConfigurations").await?;
    let restores = Api::<RestoreSession>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list the RestoreSessions"))?
        .items;
    status.references = Some(references(&repo, &configs, &restores));
    status.conditions = Some(conds);
    status.observed_generation = generation;
    if repo.status.as_ref() != Some(&status) {
        write_status(&ctx, &repo, status).await?;
    }
    Ok(Action::requeue(requeue))
}

fn error_policy(_: Arc<Repository>, error: &Error, ctx: Arc<Ctx>) -> Action {
    crate::context::after_error(&ctx, "Repository", error, 10, 120)
}

pub async fn controller(ctx: Arc<Ctx>) {
    let repos: Api<Repository> = Api::all(ctx.client.clone());
    let configs: Api<BackupConfiguration> = Api::all(ctx.client.clone());
    Controller::new(repos, watcher::Config::default())
        .with_config(crate::context::controller_config())
        // A new, re-pointed or deleted BackupConfiguration changes the references; its
        // status, which references do not depend on, does not.
        .watches_stream(
            crate::spec_changes::watch(configs, watcher::Config::default()),
            |c: BackupConfiguration| {
                let ns = c.namespace().unwrap_or_default();
                c.spec.repository.map(|r| {
                    kube::runtime::reflector::ObjectRef::new(&r.name)
                        .within(r.namespace.as_deref().unwrap_or(&ns))
                })
            },
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {})
        .await;
}
