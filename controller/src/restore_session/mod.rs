//! RestoreSession: checked as Stash checks it, then — once its repository, Secret and target
//! are there — planned from one listing of the repository into one RestoreAssignment per
//! node (the node agents restore in place into the running pods, no restart), the
//! assignments' status aggregated into the session's, a deadline that cancels, and the
//! pushgateway push with Stash's restore metrics as the last step.

pub mod plan;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use stash_api::assignment::RestoreAssignment;
use stash_api::conditions::{Condition, find_condition, reasons, set_condition, types};
use stash_api::repository::Repository;
use stash_api::restore_session::{
    HostRestorePhase, HostRestoreStats, RestorePhase, RestoreSessionStatus,
};
use stash_api::{RestoreSession, labels};

use crate::backup_session::parse_duration;
use crate::backup_session::status::{Timeouts, go_duration};
use crate::context::Ctx;
use crate::error::{Error, is_conflict};
use crate::pushgateway;
use crate::repository::OpenError;

/// How long a session waits for its repository, Secret or target (a workload created with
/// it, as Stash's guides do) before it fails: the condition says what it waits for.
const WAIT_FOR_TARGET: Duration = Duration::from_secs(600);

fn is_final(phase: Option<RestorePhase>) -> bool {
    matches!(
        phase,
        Some(
            RestorePhase::Succeeded
                | RestorePhase::Failed
                | RestorePhase::Unknown
                | RestorePhase::Invalid
        )
    )
}

/// The shared context, and the statuses this controller wrote that its cache may not show
/// yet (see [`crate::context::Written`]): a reconcile on a stale cache pushed a finished
/// session's metrics and recorded its Event a second time.
pub struct RestoreCtx {
    ctx: Arc<Ctx>,
    written: crate::context::Written<RestoreSessionStatus>,
}

impl std::ops::Deref for RestoreCtx {
    type Target = Ctx;
    fn deref(&self) -> &Ctx {
        &self.ctx
    }
}

impl std::fmt::Debug for RestoreCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RestoreCtx").finish_non_exhaustive()
    }
}

struct Step<'a> {
    ctx: &'a RestoreCtx,
    session: &'a RestoreSession,
    status: RestoreSessionStatus,
    now: Time,
}

impl Step<'_> {
    fn set(&mut self, type_: &str, ok: bool, reason: &str, message: impl Into<String>) {
        let mut conds = self.status.conditions.clone().unwrap_or_default();
        let mut c = Condition::new(type_, ok, reason, message);
        c.observed_generation = self.session.metadata.generation;
        set_condition(&mut conds, c, self.now.clone());
        self.status.conditions = Some(conds);
    }

    fn cond(&self, type_: &str) -> Option<bool> {
        find_condition(self.status.conditions.as_deref().unwrap_or_default(), type_)
            .map(Condition::is_true)
    }

    fn total(&self) -> usize {
        usize::try_from(self.status.total_hosts.unwrap_or(0)).unwrap_or(0)
    }

    async fn save(&mut self) -> Result<(), Error> {
        self.status.phase = Some(status::session_phase(
            self.status.conditions.as_deref().unwrap_or_default(),
            self.status.stats.as_deref().unwrap_or_default(),
            self.total(),
        ));
        self.ctx
            .written
            .save(
                &self.ctx.client,
                self.session,
                &self.status,
                "write the RestoreSession status",
            )
            .await
    }

    async fn event(&self, warning: bool, reason: &str, note: String) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Restore".into(),
            secondary: None,
        };
        self.ctx.event(&ev, &self.session.object_ref(&())).await;
    }

    fn age(&self) -> Duration {
        self.session
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(Duration::ZERO, |t| {
                Duration::from_secs_f64(self.now.0.duration_since(t.0).as_secs_f64().max(0.0))
            })
    }

    /// Waits for something the session needs, with a condition that says what; fails the
    /// session once it has waited too long.
    async fn wait_for(
        &mut self,
        type_: &str,
        reason: &str,
        message: String,
    ) -> Result<Action, Error> {
        self.set(type_, false, reason, message.clone());
        if self.age() > WAIT_FOR_TARGET {
            self.fail_all(format!(
                "{message}; gave up after {}s",
                WAIT_FOR_TARGET.as_secs()
            ));
            return self.finish().await;
        }
        self.save().await?;
        Ok(Action::requeue(Duration::from_secs(5)))
    }

    /// Ends a session before any work: one failed host that says why.
    fn fail_all(&mut self, why: String) {
        self.status.total_hosts = Some(1);
        self.status.stats = Some(vec![HostRestoreStats {
            hostname: labels::DEFAULT_HOST.into(),
            phase: Some(HostRestorePhase::Failed),
            error: Some(why),
            ..HostRestoreStats::default()
        }]);
    }

    /// The last steps once every host is done: RestoreCompleted, the duration, the metrics
    /// push (whose outcome decides the phase), and an Event.
    async fn finish(&mut self) -> Result<Action, Error> {
        let stats = self.status.stats.clone().unwrap_or_default();
        let failed: Vec<&HostRestoreStats> = stats
            .iter()
            .filter(|s| s.phase != Some(HostRestorePhase::Succeeded))
            .collect();
        if self.cond(types::RESTORE_COMPLETED).is_none() {
            self.set(
                types::RESTORE_COMPLETED,
                true,
                "RestoreCompleted",
                format!(
                    "{} of {} host(s) restored",
                    stats.len() - failed.len(),
                    stats.len()
                ),
            );
        }
        let duration = self.age();
        self.status.session_duration = Some(go_duration(duration));
        let success = failed.is_empty() && self.cond(types::DEADLINE_EXCEEDED) != Some(true);
        if self.cond(types::METRICS_PUSHED).is_none() {
            match push(self.ctx, self.session, &stats, success, duration).await {
                Ok(message) => self.set(
                    types::METRICS_PUSHED,
                    true,
                    reasons::SUCCESSFULLY_PUSHED_METRICS,
                    message,
                ),
                Err(e) if e.is_retryable() && duration < Duration::from_secs(3600) => {
                    tracing::warn!(error = %e, "cannot push the restore metrics yet");
                    self.save().await?;
                    return Ok(Action::requeue(Duration::from_secs(10)));
                }
                Err(e) => self.set(
                    types::METRICS_PUSHED,
                    false,
                    reasons::FAILED_TO_PUSH_METRICS,
                    e.to_string(),
                ),
            }
        }
        self.save().await?;
        let phase = self.status.phase;
        let ok = phase == Some(RestorePhase::Succeeded);
        let note = if ok {
            format!(
                "restored {} host(s) in {}",
                stats.len(),
                go_duration(duration)
            )
        } else {
            failed
                .iter()
                .filter_map(|s| s.error.clone())
                .collect::<Vec<_>>()
                .join("; ")
        };
        self.event(
            !ok,
            if ok {
                "RestoreSessionSucceeded"
            } else {
                "RestoreSessionFailed"
            },
            note,
        )
        .await;
        Ok(Action::await_change())
    }
}

/// Stash's restore metrics, pushed under the session's own job.
async fn push(
    ctx: &Ctx,
    rs: &RestoreSession,
    stats: &[HostRestoreStats],
    success: bool,
    duration: Duration,
) -> Result<String, pushgateway::PushError> {
    if ctx.args.pushgateway_url.is_empty() {
        return Ok("no pushgateway is configured; nothing was pushed".into());
    }
    let ns = rs.namespace().unwrap_or_default();
    let target = rs.spec.target.as_ref().and_then(|t| t.ref_.clone());
    let secs = |d: Option<&str>| d.and_then(parse_duration).map_or(0.0, |d| d.as_secs_f64());
    let metrics = pushgateway::RestoreSessionMetrics {
        invoker_kind: "RestoreSession".into(),
        invoker_name: rs.name_any(),
        namespace: ns.clone(),
        driver: "Restic".into(),
        repository: rs
            .spec
            .repository
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default(),
        success,
        duration_seconds: duration.as_secs_f64(),
        targets: target
            .map(|t| pushgateway::RestoreTargetMetrics {
                // `apps/v1` → `apps`; the core group (`v1`) is empty.
                group: t
                    .api_version
                    .rsplit_once('/')
                    .map(|(g, _)| g.to_owned())
                    .unwrap_or_default(),
                kind: t.kind,
                name: t.name,
                success,
                host_count: i64::try_from(stats.len()).unwrap_or(0),
                hosts: stats
                    .iter()
                    .map(|s| pushgateway::RestoreHostMetrics {
                        hostname: s.hostname.clone(),
                        success: s.phase == Some(HostRestorePhase::Succeeded),
                        duration_seconds: secs(s.duration.as_deref()),
                    })
                    .collect(),
            })
            .into_iter()
            .collect(),
    };
    let body = pushgateway::render_restore(
        &metrics,
        &crate::cli::parse_labels(&ctx.args.metrics_labels),
    );
    let job = pushgateway::job_name("RestoreSession", &ns, &rs.name_any());
    pushgateway::Pushgateway::new(&ctx.args.pushgateway_url)?
        .push(&job, body)
        .await?;
    Ok(format!("pushed to {}", ctx.args.pushgateway_url))
}

/// Why a repository cannot be listed for a restore: the condition reason and the message.
struct Unusable {
    reason: &'static str,
    message: String,
}

/// The repository's snapshots, read once for planning; the repository must exist (a restore
/// never initialises one) and open with the Secret's password.
async fn list_snapshots(
    ctx: &Ctx,
    repo: &Repository,
) -> Result<Result<Vec<restic_wrapper::Snapshot>, Unusable>, Error> {
    let unusable = |message: String| {
        Ok(Err(Unusable {
            reason: reasons::REPOSITORY_NOT_AVAILABLE,
            message,
        }))
    };
    let opened = match crate::repository::open(ctx, repo).await {
        Ok(o) => o,
        Err(OpenError::Invalid { reason, message }) => {
            return Ok(Err(Unusable { reason, message }));
        }
        Err(OpenError::Failed(e)) => return Err(e),
    };
    let retry = |action: &'static str, e: restic_wrapper::NativeError| Error::Io {
        action,
        source: std::io::Error::other(e.to_string()),
    };
    let native = match restic_wrapper::native::reader(&opened.backend, &opened.secrets).await {
        Ok(n) => n,
        Err(restic_wrapper::NativeError::WrongPassword) => {
            return unusable(crate::repository::wrong_password(&opened));
        }
        Err(e) if e.is_retryable() => return Err(retry("open the repository", e)),
        Err(e) => {
            return unusable(format!(
                "the repository {} cannot be read (has anything been backed up to it?): {e}",
                opened.restic.repository().display_name()
            ));
        }
    };
    match native.snapshots().await {
        Ok(s) => Ok(Ok(s)),
        Err(e) if e.is_retryable() => Err(retry("list the repository's snapshots", e)),
        Err(e) => unusable(format!("cannot list the repository's snapshots: {e}")),
    }
}

#[tracing::instrument(skip_all, fields(kind = "RestoreSession", ns = %rs.namespace().unwrap_or_default(), name = %rs.name_any()))]
async fn reconcile(rs: Arc<RestoreSession>, ctx: Arc<RestoreCtx>) -> Result<Action, Error> {
    ctx.metrics
        .reconciles
        .get_or_create(&crate::metrics::KindLabels {
            kind: "RestoreSession",
        })
        .inc();
    let ns = rs.namespace().unwrap_or_default();
    let now = Timestamp::now();
    let mut step = Step {
        ctx: &ctx,
        session: &rs,
        status: ctx.written.status_of(&*rs),
        now: Time(now),
    };
    if is_final(step.status.phase) {
        return Ok(Action::await_change());
    }
    let checked = match plan::validate(&rs) {
        Ok(c) => c,
        Err(message) => {
            step.set(
                types::VALIDATION_PASSED,
                false,
                reasons::RESOURCE_VALIDATION_FAILED,
                message.clone(),
            );
            step.save().await?;
            step.event(true, "RestoreInvalid", message).await;
            return Ok(Action::await_change());
        }
    };
    step.set(
        types::VALIDATION_PASSED,
        true,
        reasons::RESOURCE_VALIDATION_PASSED,
        "the RestoreSession is valid",
    );
    if step.status.session_deadline.is_none()
        && let Some(limit) = rs.spec.time_out.as_deref().and_then(parse_duration)
        && let Some(created) = &rs.metadata.creation_timestamp
    {
        let deadline = created
            .0
            .checked_add(k8s_openapi::jiff::SignedDuration::try_from(limit).unwrap_or_default())
            .unwrap_or(created.0);
        step.status.session_deadline = Some(Time(deadline));
    }
    let deadline_passed = step
        .status
        .session_deadline
        .as_ref()
        .is_some_and(|d| d.0 < now);
    if deadline_passed && step.cond(types::DEADLINE_EXCEEDED) != Some(true) {
        step.set(
            types::DEADLINE_EXCEEDED,
            true,
            reasons::FAILED_TO_COMPLETE_WITHIN_DEADLINE,
            format!(
                "the session did not finish within timeOut {}",
                rs.spec.time_out.clone().unwrap_or_default()
            ),
        );
    }
    let assignments_api: Api<RestoreAssignment> = Api::namespaced(ctx.client.clone(), &ns);
    if step.cond(types::RESTORE_EXECUTOR_ENSURED) != Some(true) {
        if deadline_passed {
            step.fail_all("the session's deadline passed (timeOut) before it started".into());
            return step.finish().await;
        }
        return start(&mut step, &checked, &assignments_api).await;
    }
    // Aggregate what the agents report.
    let assignments = assignments_api
        .list(&ListParams::default().labels(&format!("{}={}", labels::SESSION, rs.name_any())))
        .await
        .map_err(Error::kube("list the session's RestoreAssignments"))?
        .items;
    let timeouts = Timeouts {
        heartbeat: Duration::from_secs(ctx.args.heartbeat_timeout_seconds),
        accept: Duration::from_secs(ctx.args.agent_wait_seconds),
    };
    let previous = step.status.stats.clone().unwrap_or_default();
    let mut stats = previous.clone();
    for a in &assignments {
        let hosts = status::host_stats(a, now, timeouts, deadline_passed);
        let unfinished = !a
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(stash_api::assignment::AssignmentPhase::is_final);
        if unfinished
            && hosts
                .iter()
                .any(|h| h.phase == Some(HostRestorePhase::Failed))
        {
            // Its agent went quiet or the deadline passed: make the agent stop, if it lives.
            let patch = serde_json::json!({"metadata": {"annotations": {labels::CANCEL: "true"}}});
            if let Err(error) = assignments_api
                .patch(
                    &a.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                tracing::warn!(%error, assignment = %a.name_any(), "cannot cancel the assignment");
            }
        }
        for h in hosts {
            match stats.iter_mut().find(|s| s.hostname == h.hostname) {
                Some(s) => *s = h,
                None => stats.push(h),
            }
        }
    }
    for s in stats.iter().filter(|s| {
        !previous
            .iter()
            .any(|p| p.hostname == s.hostname && p.phase == s.phase)
    }) {
        match s.phase {
            Some(HostRestorePhase::Succeeded) => {
                step.event(
                    false,
                    "HostRestoreSucceeded",
                    format!("restore of host {} succeeded", s.hostname),
                )
                .await;
            }
            Some(HostRestorePhase::Failed) => {
                step.event(
                    true,
                    "HostRestoreFailed",
                    s.error.clone().unwrap_or_default(),
                )
                .await;
            }
            _ => {}
        }
    }
    step.status.stats = Some(stats.clone());
    if !status::hosts_complete(&stats, step.total()) {
        step.save().await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    step.finish().await
}

/// Before any work: the repository and its Secret, the target's running pods, the snapshots
/// each host restores, then the assignments.
async fn start(
    step: &mut Step<'_>,
    checked: &plan::Checked,
    assignments_api: &Api<RestoreAssignment>,
) -> Result<Action, Error> {
    let ctx = step.ctx;
    let rs = step.session;
    let ns = rs.namespace().unwrap_or_default();
    let repo_ns = checked.repository.namespace.clone().unwrap_or(ns.clone());
    let repo_name = checked.repository.name.clone();
    let Some(repo) = Api::<Repository>::namespaced(ctx.client.clone(), &repo_ns)
        .get_opt(&repo_name)
        .await
        .map_err(Error::kube("read the Repository"))?
    else {
        return step
            .wait_for(
                types::REPOSITORY_FOUND,
                reasons::REPOSITORY_NOT_AVAILABLE,
                format!("waiting for Repository {repo_ns}/{repo_name} to exist"),
            )
            .await;
    };
    step.set(
        types::REPOSITORY_FOUND,
        true,
        reasons::REPOSITORY_AVAILABLE,
        format!("Repository {repo_ns}/{repo_name} exists"),
    );
    let target = &checked.target_ref;
    let observed = crate::target::observe(ctx, &ns, Some(target)).await?;
    let running = crate::target::running_pods(&target.kind, &observed.pods);
    if !observed.found || running.is_empty() {
        let what = if observed.found {
            "to have a Running pod"
        } else {
            "to exist"
        };
        return step
            .wait_for(
                types::RESTORE_TARGET_FOUND,
                reasons::TARGET_NOT_AVAILABLE,
                format!(
                    "waiting for {} {} {what}: the node agents restore into running pods",
                    target.kind, target.name
                ),
            )
            .await;
    }
    step.set(
        types::RESTORE_TARGET_FOUND,
        true,
        reasons::TARGET_AVAILABLE,
        format!(
            "{} {} has {} Running pod(s)",
            target.kind,
            target.name,
            running.len()
        ),
    );
    // Retention may be pruning the repository: a snapshot resolved now could be gone by the
    // time the agent reads it. Restores plan beside backups, under the shared lock.
    let key = crate::repository::repo_key(&repo_ns, &repo_name);
    let lock = ctx.repo_lock(&key);
    let held = lock.read().await;
    if crate::repo_lease::held(ctx, &key).await? {
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let snapshots = match list_snapshots(ctx, &repo).await? {
        Ok(s) => s,
        // A Secret may be created after the session, as a Repository may.
        Err(u) if u.reason == reasons::BACKEND_SECRET_NOT_AVAILABLE => {
            drop(held);
            return step
                .wait_for(types::BACKEND_SECRET_FOUND, u.reason, u.message)
                .await;
        }
        Err(u) => {
            step.set(
                types::BACKEND_SECRET_FOUND,
                true,
                reasons::BACKEND_SECRET_AVAILABLE,
                "the storage Secret exists",
            );
            step.fail_all(u.message);
            return step.finish().await;
        }
    };
    step.set(
        types::BACKEND_SECRET_FOUND,
        true,
        reasons::BACKEND_SECRET_AVAILABLE,
        "the storage Secret opens the repository",
    );
    let mut planned = plan::plan(rs, checked, &observed, &snapshots);
    // A hostPath repository is the directory of the operator's node: hosts elsewhere would
    // read another directory.
    let here = ctx.args.node_name.as_str();
    if let Ok(restic_wrapper::Backend::Local { path }) =
        stash_rules::repository::backend(&repo.spec.backend)
        && !here.is_empty()
    {
        crate::backup_session::plan::confine(
            &mut planned.assignments,
            &mut planned.problems,
            &mut planned.waiting_for_agent,
            here,
            |other| stash_rules::repository::other_node_message(&path, here, other),
        );
    }
    if !planned.waiting_for_agent.is_empty() && step.age().as_secs() < ctx.args.agent_wait_seconds {
        tracing::info!(nodes = ?planned.waiting_for_agent, "waiting for node agents to be Ready");
        step.save().await?;
        return Ok(Action::requeue(Duration::from_secs(3)));
    }
    let mut stats: Vec<HostRestoreStats> = Vec::new();
    let failed = |host: &str, why: &str| HostRestoreStats {
        hostname: host.to_owned(),
        phase: Some(HostRestorePhase::Failed),
        error: Some(format!("failed to restore host {host}. Reason: {why}")),
        ..HostRestoreStats::default()
    };
    for p in &planned.problems {
        stats.push(failed(&p.host, &p.error));
    }
    let mut created = 0;
    for a in &planned.assignments {
        if planned.waiting_for_agent.contains(&a.spec.node_name) {
            let mut hosts: Vec<&str> = a.spec.volumes.iter().map(|v| v.host.as_str()).collect();
            hosts.dedup();
            for h in hosts {
                stats.push(failed(
                    h,
                    &format!("no Ready node agent on node {}", a.spec.node_name),
                ));
            }
            continue;
        }
        match assignments_api.create(&PostParams::default(), a).await {
            Ok(_) => {
                ctx.metrics.assignments_created.inc();
                created += 1;
            }
            Err(e) if is_conflict(&e) => created += 1,
            Err(e) => return Err(Error::kube("create a RestoreAssignment")(e)),
        }
        for v in &a.spec.volumes {
            if !stats.iter().any(|s| s.hostname == v.host) {
                stats.push(HostRestoreStats {
                    hostname: v.host.clone(),
                    phase: Some(HostRestorePhase::Running),
                    ..HostRestoreStats::default()
                });
            }
        }
    }
    drop(held);
    if planned.hosts.is_empty() {
        step.fail_all(format!(
            "no rule applies to any host of {} {} (hosts: {})",
            target.kind,
            target.name,
            planned.skipped.join(", ")
        ));
        return step.finish().await;
    }
    step.status.total_hosts = Some(i32::try_from(stats.len()).unwrap_or(i32::MAX));
    step.status.stats = Some(stats);
    if created == 0 {
        // Every host failed before any agent had work: the stats say why, host by host.
        step.set(
            types::RESTORE_EXECUTOR_ENSURED,
            false,
            reasons::FAILED_TO_ENSURE_RESTORE_EXECUTOR,
            format!(
                "no host could be assigned to a node agent ({} failed)",
                step.status.stats.as_ref().map_or(0, Vec::len)
            ),
        );
        return step.finish().await;
    }
    step.set(
        types::RESTORE_EXECUTOR_ENSURED,
        true,
        reasons::ASSIGNED_TO_NODE_AGENT,
        format!("{created} RestoreAssignment(s) for the node agents"),
    );
    step.save().await?;
    step.event(
        false,
        "RestoreAssigned",
        format!("assigned to the node agents of {created} node(s)"),
    )
    .await;
    Ok(Action::requeue(Duration::from_secs(10)))
}

fn error_policy(_: Arc<RestoreSession>, error: &Error, ctx: Arc<RestoreCtx>) -> Action {
    crate::context::after_error(&ctx, "RestoreSession", error, 3, 30)
}

pub async fn controller(ctx: Arc<Ctx>) {
    let api: Api<RestoreSession> = Api::all(ctx.client.clone());
    let assignments: Api<RestoreAssignment> = Api::all(ctx.client.clone());
    Controller::new(api, watcher::Config::default())
        .with_config(crate::context::controller_config())
        .owns(assignments, watcher::Config::default())
        .run(
            reconcile,
            error_policy,
            Arc::new(RestoreCtx {
                ctx,
                written: Default::default(),
            }),
        )
        .for_each(|_| async {})
        .await;
}
