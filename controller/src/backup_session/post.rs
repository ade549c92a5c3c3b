//! What happens around the agents' work: the repository initialised before it, and after it
//! — once every host is done — retention under the repository's Lease, the Repository's
//! status, history cleanup and the pushgateway push (the last step: the session's final
//! phase appears only after it); and the retry of a failed session.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use restic_wrapper::{ForgetOptions, PruneOptions, SnapshotFilter, StatsMode};
use stash_api::assignment::{AssignmentPhase, BackupAssignment, VolumePhase, VolumeProgress};
use stash_api::backup_session::{
    BackupSessionPhase, BackupSessionSpec, BackupSessionStatus, HostPhase, TargetPhase,
};
use stash_api::common::ObjectRef;
use stash_api::conditions::{reasons, types};
use stash_api::repository::Repository;
use stash_api::{BackupConfiguration, BackupSession, labels};

use super::{Step, is_final, parse_duration};
use crate::context::Ctx;
use crate::error::{Error, is_conflict, is_not_found};
use crate::pushgateway;
use crate::repository::{OpenError, Opened};

async fn open_ref(ctx: &Ctx, r: &ObjectRef) -> Result<(Repository, Opened), Error> {
    let ns = r.namespace.clone().unwrap_or_default();
    let repo = Api::<Repository>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&r.name)
        .await
        .map_err(Error::kube("read the Repository"))?
        .ok_or_else(|| Error::Invalid {
            action: "open the repository",
            reason: format!("Repository {ns}/{} does not exist", r.name),
        })?;
    let opened = crate::repository::open(ctx, &repo)
        .await
        .map_err(open_failed)?;
    Ok((repo, opened))
}

fn open_failed(e: OpenError) -> Error {
    match e {
        OpenError::Invalid { message, .. } => Error::Invalid {
            action: "open the repository",
            reason: message,
        },
        OpenError::Failed(e) => e,
    }
}

/// Whether the Repository reconciler found this spec initialised and opening with its
/// password: then a session need not reach the backend to know.
fn known_usable(repo: &Repository) -> bool {
    repo.status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .and_then(|cs| {
            stash_api::conditions::find_condition(cs, types::BACKEND_REPOSITORY_INITIALIZED)
        })
        .is_some_and(|c| c.is_true() && c.observed_generation == repo.metadata.generation)
}

/// The session's repository initialised and opening with its password
/// (InitializeBackendRepository). What the Repository reconciler already established is
/// taken from its status, so a burst of sessions does not each go to the backend.
/// Returns the repository's backend. `repo` is the Repository as read (from a cache).
pub async fn initialise(
    ctx: &Ctx,
    ns: &str,
    name: &str,
    repo: Option<Repository>,
) -> Result<restic_wrapper::Backend, Error> {
    let repo = repo.ok_or_else(|| Error::Invalid {
        action: "open the repository",
        reason: format!("Repository {ns}/{name} does not exist"),
    })?;
    if known_usable(&repo) {
        // Nothing to initialise, so the storage Secret need not be read: the backend is
        // the spec's, checked as `open` checks it.
        let invalid = |e: stash_rules::repository::InvalidRepository| Error::Invalid {
            action: "open the repository",
            reason: format!("Repository {ns}/{name}: {e}"),
        };
        let backend = stash_rules::repository::backend(&repo.spec.backend).map_err(invalid)?;
        stash_rules::repository::check_reachable(&backend, &ctx.args.local_roots())
            .map_err(invalid)?;
        return Ok(backend);
    }
    let opened = crate::repository::open(ctx, &repo)
        .await
        .map_err(open_failed)?;
    crate::repository::ensure_usable(ctx, &opened).await?;
    Ok(opened.backend)
}

fn keep(n: Option<i64>) -> Option<u64> {
    n.and_then(|n| u64::try_from(n).ok()).filter(|n| *n > 0)
}

/// Whether any assignment, of any session, still works on this repository.
async fn repository_busy(ctx: &Ctx, r: &ObjectRef) -> Result<bool, Error> {
    let all = Api::<BackupAssignment>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list the BackupAssignments"))?
        .items;
    Ok(all.iter().any(|a| {
        let ns = a.namespace().unwrap_or_default();
        a.spec.repository.name == r.name
            && a.spec.repository.namespace.as_deref().unwrap_or(&ns)
                == r.namespace.as_deref().unwrap_or_default()
            && !a
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(AssignmentPhase::is_final)
    }))
}

/// Applies the retention policy to the snapshot keys this session wrote, each grouped by
/// host (the key tag keeps one volume's snapshots apart from another's on the same host).
/// Returns the number of snapshots removed.
async fn apply_retention(
    opened: &Opened,
    bc: &BackupConfiguration,
    assignments: &[BackupAssignment],
) -> Result<i64, Error> {
    let policy = &bc.spec.retention_policy;
    let keys: BTreeSet<String> = assignments
        .iter()
        .flat_map(|a| a.spec.volumes.iter().map(|v| v.snapshot_key.clone()))
        .collect();
    let mut removed = 0i64;
    for key in keys {
        let opts = ForgetOptions {
            keep_last: keep(policy.keep_last),
            keep_hourly: keep(policy.keep_hourly),
            keep_daily: keep(policy.keep_daily),
            keep_weekly: keep(policy.keep_weekly),
            keep_monthly: keep(policy.keep_monthly),
            keep_yearly: keep(policy.keep_yearly),
            keep_tags: policy.keep_tags.clone().unwrap_or_default(),
            prune: false,
            dry_run: policy.dry_run.unwrap_or(false),
            filter: SnapshotFilter {
                tags: vec![stash_rules::repository::key_tag(&key)],
                ..SnapshotFilter::default()
            },
            group_by: Some("host".into()),
        };
        let nothing_to_keep = opts.keep_last.is_none()
            && opts.keep_hourly.is_none()
            && opts.keep_daily.is_none()
            && opts.keep_weekly.is_none()
            && opts.keep_monthly.is_none()
            && opts.keep_yearly.is_none()
            && opts.keep_tags.is_empty();
        // restic refuses a forget without a policy; Stash's empty policy keeps everything.
        if nothing_to_keep {
            continue;
        }
        let result = opened
            .restic
            .forget(&opts)
            .await
            .map_err(Error::restic("apply the retention policy"))?;
        removed += i64::try_from(result.removed().count()).unwrap_or(0);
    }
    if policy.prune && removed > 0 && !policy.dry_run.unwrap_or(false) {
        opened
            .restic
            .prune(&PruneOptions::default())
            .await
            .map_err(Error::restic("prune the repository"))?;
    }
    Ok(removed)
}

/// The post-backup actions of a session whose hosts are all done; each runs once (its
/// condition records it), so a restarted operator continues where the last one stopped.
pub(super) async fn post_backup(
    step: &mut Step<'_>,
    bc: &BackupConfiguration,
    assignments: &[BackupAssignment],
    r: &ObjectRef,
) -> Result<(), Error> {
    let ctx = step.ctx;
    let session = step.session;
    let any_succeeded = step
        .status
        .targets
        .iter()
        .flatten()
        .flat_map(|t| t.stats.iter().flatten())
        .any(|s| s.phase == Some(HostPhase::Succeeded));
    let mut repo_metrics = None;
    if any_succeeded && step.cond(types::RETENTION_POLICY_APPLIED).is_none() {
        let key = crate::repository::repo_key(r.namespace.as_deref().unwrap_or_default(), &r.name);
        let opened = open_ref(ctx, r).await;
        let lock = ctx.repo_lock(&key);
        let _in_process = lock.write().await;
        if repository_busy(ctx, r).await? {
            // Another session is writing into the repository: prune after it.
            return Ok(());
        }
        let Some(_lease) = crate::repo_lease::acquire(ctx, &key).await? else {
            return Ok(());
        };
        match opened {
            Err(e) => step.set(
                types::RETENTION_POLICY_APPLIED,
                false,
                reasons::FAILED_TO_APPLY_RETENTION_POLICY,
                e.to_string(),
            ),
            Ok((repo, opened)) => match apply_retention(&opened, bc, assignments).await {
                Ok(removed) => {
                    step.set(
                        types::RETENTION_POLICY_APPLIED,
                        true,
                        reasons::SUCCESSFULLY_CLEANED_RETENTION,
                        format!(
                            "retention policy {} removed {removed} snapshot(s)",
                            bc.spec.retention_policy.name
                        ),
                    );
                    repo_metrics = Some(update_repository(ctx, &repo, &opened, removed).await);
                }
                Err(e) => step.set(
                    types::RETENTION_POLICY_APPLIED,
                    false,
                    reasons::FAILED_TO_APPLY_RETENTION_POLICY,
                    e.to_string(),
                ),
            },
        }
    }
    if step.cond(types::BACKUP_HISTORY_CLEANED).is_none() {
        match clean_history(ctx, session, bc).await {
            Ok(n) => step.set(
                types::BACKUP_HISTORY_CLEANED,
                true,
                reasons::SUCCESSFULLY_CLEANED_BACKUP_HISTORY,
                format!("removed {n} old BackupSession(s)"),
            ),
            Err(e) => step.set(
                types::BACKUP_HISTORY_CLEANED,
                false,
                reasons::FAILED_TO_CLEAN_BACKUP_HISTORY,
                e.to_string(),
            ),
        }
    }
    if step.cond(types::METRICS_PUSHED).is_none() {
        let now = Timestamp::now();
        let duration = session
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(Duration::ZERO, |t| {
                Duration::from_secs_f64(now.duration_since(t.0).as_secs_f64().max(0.0))
            });
        step.status.session_duration = Some(super::status::go_duration(duration));
        let metrics = session_metrics(step, bc, assignments, duration, now, repo_metrics);
        if ctx.args.pushgateway_url.is_empty() {
            step.set(
                types::METRICS_PUSHED,
                true,
                reasons::SUCCESSFULLY_PUSHED_METRICS,
                "no pushgateway is configured; nothing was pushed",
            );
        } else {
            let body = pushgateway::render_backup(
                &metrics,
                &crate::cli::parse_labels(&ctx.args.metrics_labels),
            );
            let job = pushgateway::job_name(
                "BackupConfiguration",
                &session.namespace().unwrap_or_default(),
                &bc.name_any(),
            );
            let pushed = match pushgateway::Pushgateway::new(&ctx.args.pushgateway_url) {
                Ok(gw) => gw.push(&job, body).await,
                Err(e) => Err(e),
            };
            match pushed {
                Ok(()) => {
                    step.set(
                        types::METRICS_PUSHED,
                        true,
                        reasons::SUCCESSFULLY_PUSHED_METRICS,
                        format!("pushed to {}", ctx.args.pushgateway_url),
                    );
                    if metrics.repository_metrics.is_some() {
                        step.set(
                            types::REPOSITORY_METRICS_PUSHED,
                            true,
                            reasons::SUCCESSFULLY_PUSHED_METRICS,
                            "repository metrics pushed",
                        );
                    }
                }
                Err(e)
                    if e.is_retryable()
                        && duration < Duration::from_secs(3600)
                        && step.cond(types::DEADLINE_EXCEEDED) != Some(true) =>
                {
                    tracing::warn!(error = %e, "cannot push the session's metrics yet");
                    return Ok(());
                }
                Err(e) => step.set(
                    types::METRICS_PUSHED,
                    false,
                    reasons::FAILED_TO_PUSH_METRICS,
                    e.to_string(),
                ),
            }
        }
        let phase = super::status::session_phase(
            step.status.conditions.as_deref().unwrap_or_default(),
            step.status.targets.as_deref().unwrap_or_default(),
        );
        let ok = phase == BackupSessionPhase::Succeeded;
        super::event(
            ctx,
            session,
            !ok,
            if ok {
                "BackupSessionSucceeded"
            } else {
                "BackupSessionFailed"
            },
            format!("backup session {} {phase:?}", session.name_any()),
        )
        .await;
    }
    Ok(())
}

/// Writes the Repository's status after retention; returns its metrics.
async fn update_repository(
    ctx: &Ctx,
    repo: &Repository,
    opened: &Opened,
    removed: i64,
) -> pushgateway::RepositoryMetrics {
    let mut status = repo.status.clone().unwrap_or_default();
    match restic_wrapper::native::reader(&opened.backend, &opened.secrets).await {
        Ok(native) => crate::repository::record_listing(&mut status, &native).await,
        Err(error) => tracing::warn!(%error, "cannot open the repository to count its snapshots"),
    }
    // This session backed up at least one host now; an unchanged volume writes no snapshot,
    // so the newest snapshot's time alone would make backups look stale.
    status.last_backup_time = Some(Time(Timestamp::now()));
    let size = match opened.restic.stats(StatsMode::RawData, None).await {
        Ok(s) => Some(s.total_size),
        Err(error) => {
            tracing::warn!(%error, "cannot measure the repository");
            None
        }
    };
    if let Some(size) = size {
        status.total_size = Some(super::status::human_size(
            i64::try_from(size).unwrap_or(i64::MAX),
        ));
    }
    if ctx.args.verify_integrity {
        status.integrity = Some(opened.restic.check(None).await.is_ok());
    }
    status.snapshots_removed_on_last_cleanup = Some(removed);
    if let Err(error) = crate::repository::write_status(ctx, repo, status.clone()).await {
        tracing::warn!(%error, "cannot write the Repository status");
    }
    let (backend, bucket, prefix) = stash_rules::repository::metric_location(&repo.spec.backend);
    pushgateway::RepositoryMetrics {
        name: repo.name_any(),
        namespace: repo.namespace().unwrap_or_default(),
        backend,
        bucket,
        prefix,
        integrity: status.integrity,
        size_bytes: size.map_or(0.0, |s| s as f64),
        snapshot_count: status.snapshot_count.unwrap_or(0),
        snapshots_removed: removed,
    }
}

/// A host's metrics: its stats, and the sums of what the agents reported for its volumes.
fn host_metrics(
    h: &stash_api::backup_session::HostBackupStats,
    assignments: &[BackupAssignment],
) -> pushgateway::HostMetrics {
    let vols = super::status::host_progress(assignments, &h.hostname);
    let sum = |f: fn(&VolumeProgress) -> Option<i64>| vols.iter().filter_map(|p| f(p)).sum::<i64>();
    let seconds = h
        .duration
        .as_deref()
        .and_then(parse_duration)
        .map_or(0.0, |d| d.as_secs_f64());
    pushgateway::HostMetrics {
        hostname: h.hostname.clone(),
        success: h.phase == Some(HostPhase::Succeeded),
        duration_seconds: seconds,
        data_size_bytes: sum(|p| p.bytes_total) as f64,
        // The agent reports neither uploaded bytes nor new and modified files yet.
        uploaded_bytes: 0.0,
        processing_time_seconds: seconds,
        files_total: sum(|p| p.files_total),
        files_new: 0,
        files_modified: 0,
        files_unmodified: sum(|p| {
            p.files_total
                .filter(|_| p.phase == Some(VolumePhase::Unchanged))
        }),
    }
}

fn session_metrics(
    step: &Step<'_>,
    bc: &BackupConfiguration,
    assignments: &[BackupAssignment],
    duration: Duration,
    now: Timestamp,
    repository_metrics: Option<pushgateway::RepositoryMetrics>,
) -> pushgateway::BackupSessionMetrics {
    let targets: Vec<pushgateway::TargetMetrics> = step
        .status
        .targets
        .iter()
        .flatten()
        .map(|t| pushgateway::TargetMetrics {
            kind: t.ref_.kind.clone(),
            // The API group: `apps` of `apps/v1`, empty for the core `v1`.
            group: t
                .ref_
                .api_version
                .rsplit_once('/')
                .map(|(g, _)| g.to_owned())
                .unwrap_or_default(),
            name: t.ref_.name.clone(),
            success: super::status::target_phase(t) == TargetPhase::Succeeded,
            host_count: i64::from(t.total_hosts.unwrap_or(0)),
            hosts: t
                .stats
                .iter()
                .flatten()
                .map(|h| host_metrics(h, assignments))
                .collect(),
        })
        .collect();
    // The phase the session gets once its metrics are out: the push is the last step, and
    // its success flag is that phase, by the one rule that decides it.
    let mut pushed = step.status.conditions.clone().unwrap_or_default();
    stash_api::conditions::set_condition(
        &mut pushed,
        stash_api::conditions::Condition::new(types::METRICS_PUSHED, true, "", ""),
        Time(now),
    );
    let phase =
        super::status::session_phase(&pushed, step.status.targets.as_deref().unwrap_or_default());
    pushgateway::BackupSessionMetrics {
        invoker_kind: "BackupConfiguration".into(),
        invoker_name: bc.name_any(),
        namespace: step.session.namespace().unwrap_or_default(),
        driver: pushgateway::DRIVER_RESTIC.into(),
        repository: bc
            .spec
            .repository
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default(),
        success: phase == BackupSessionPhase::Succeeded,
        duration_seconds: duration.as_secs_f64(),
        finished_at: now.as_second(),
        targets,
        repository_metrics,
    }
}

/// Deletes the invoker's completed sessions beyond `backupHistoryLimit` (default 1), newest
/// kept; this session counts as completed. Returns how many went.
async fn clean_history(
    ctx: &Ctx,
    session: &BackupSession,
    bc: &BackupConfiguration,
) -> Result<usize, Error> {
    let limit = usize::try_from(bc.spec.backup_history_limit.unwrap_or(1).max(0)).unwrap_or(0);
    let ns = session.namespace().unwrap_or_default();
    let api: Api<BackupSession> = Api::namespaced(ctx.client.clone(), &ns);
    // By invoker, not by label alone: a session a user created by hand may carry no labels.
    let mut done: Vec<BackupSession> = api
        .list(&ListParams::default())
        .await
        .map_err(Error::kube("list the invoker's sessions"))?
        .items
        .into_iter()
        .filter(|s| super::invoker_name(s).as_deref() == Some(bc.name_any().as_str()))
        .filter(|s| {
            s.name_any() == session.name_any()
                || is_final(s.status.as_ref().and_then(|st| st.phase))
        })
        .collect();
    done.sort_by(|a, b| {
        let t = |s: &BackupSession| s.metadata.creation_timestamp.clone().map(|t| t.0);
        t(b).cmp(&t(a))
            .then_with(|| b.name_any().cmp(&a.name_any()))
    });
    let mut removed = 0;
    for old in done.iter().skip(limit) {
        if old.name_any() == session.name_any() {
            // This session is deleted once it is final (after its metrics are out).
            continue;
        }
        match api
            .delete(&old.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => removed += 1,
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::kube("delete an old BackupSession")(e)),
        }
    }
    Ok(removed)
}

/// A final session: retried after `retryConfig.delay` when it failed and has retries left;
/// deleted when the history limit keeps no session at all.
pub(super) async fn after_final(
    ctx: &super::SessionCtx,
    session: &BackupSession,
    mut status: BackupSessionStatus,
    bc: Option<&BackupConfiguration>,
) -> Result<Action, Error> {
    let Some(bc) = bc else {
        return Ok(Action::await_change());
    };
    let failed = status.phase == Some(BackupSessionPhase::Failed);
    let retry_left = session.spec.retry_left.unwrap_or(0);
    if failed && retry_left > 0 && status.retried != Some(true) {
        let delay = bc
            .spec
            .retry_config
            .as_ref()
            .and_then(|r| r.delay.as_deref())
            .and_then(parse_duration)
            .unwrap_or(Duration::ZERO);
        let now = Timestamp::now();
        match &status.next_retry {
            None => {
                let at = now
                    .checked_add(
                        k8s_openapi::jiff::SignedDuration::try_from(delay).unwrap_or_default(),
                    )
                    .unwrap_or(now);
                status.next_retry = Some(Time(at));
                ctx.write(session, &status).await?;
                return Ok(Action::requeue(delay.max(Duration::from_secs(1))));
            }
            Some(at) if at.0 > now => {
                return Ok(Action::requeue(Duration::from_secs_f64(
                    at.0.duration_since(now).as_secs_f64().max(1.0),
                )));
            }
            Some(_) => {
                let ns = session.namespace().unwrap_or_default();
                let retry = new_session(bc, &ns, now.as_second(), retry_left - 1);
                match Api::<BackupSession>::namespaced(ctx.client.clone(), &ns)
                    .create(&PostParams::default(), &retry)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_conflict(&e) => {}
                    Err(e) => return Err(Error::kube("create the retry BackupSession")(e)),
                }
                status.retried = Some(true);
                ctx.write(session, &status).await?;
            }
        }
    }
    if bc.spec.backup_history_limit.is_some_and(|l| l <= 0) {
        let ns = session.namespace().unwrap_or_default();
        match Api::<BackupSession>::namespaced(ctx.client.clone(), &ns)
            .delete(&session.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(Error::kube("delete the finished BackupSession")(e)),
        }
    }
    Ok(Action::await_change())
}

/// A BackupSession as Stash names and labels it: `<bc>-<unix seconds>`, owned by the
/// BackupConfiguration.
pub fn new_session(
    bc: &BackupConfiguration,
    ns: &str,
    unix: i64,
    retry_left: i32,
) -> BackupSession {
    let target = bc
        .spec
        .target
        .as_ref()
        .map(|t| t.ref_.clone())
        .unwrap_or_default();
    let labels = [
        (labels::COMPONENT, labels::COMPONENT_BACKUP.to_owned()),
        (labels::MANAGED_BY, labels::MANAGED_BY_STASH.to_owned()),
        (labels::INVOKER_TYPE, "BackupConfiguration".to_owned()),
        (labels::INVOKER_NAME, bc.name_any()),
        (labels::TARGET_KIND, target.kind.clone()),
        (labels::TARGET_NAME, target.name.clone()),
        (
            labels::TARGET_NAMESPACE,
            target.namespace.clone().unwrap_or_else(|| ns.to_owned()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    BackupSession {
        metadata: ObjectMeta {
            name: Some(format!("{}-{unix}", bc.name_any())),
            namespace: Some(ns.to_owned()),
            labels: Some(labels),
            owner_references: bc.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: BackupSessionSpec {
            invoker: Some(stash_api::backup_session::BackupInvokerRef {
                api_group: Some(labels::GROUP.to_owned()),
                kind: "BackupConfiguration".into(),
                name: bc.name_any(),
            }),
            retry_left: Some(retry_left),
        },
        status: None,
    }
}
