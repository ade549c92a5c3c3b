//! BackupSession: Stash's skip rules, then the target resolved to its Running pods and
//! volumes and planned as one BackupAssignment per node (the node agents do the backup),
//! the assignments' status aggregated into the session's, a deadline that cancels, and — once
//! every host is done — retention under the repository's Lease, the Repository's status, the
//! pushgateway push (the last step, as in Stash), history cleanup and retries.

pub mod plan;
pub mod post;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use stash_api::assignment::BackupAssignment;
use stash_api::backup_session::{
    BackupSessionPhase, BackupSessionStatus, BackupTargetStatus, HostBackupStats, HostPhase,
};
use stash_api::common::InvokerPhase;
use stash_api::conditions::{Condition, find_condition, reasons, set_condition, types};
use stash_api::repository::Repository;
use stash_api::{BackupSession, labels};

use crate::context::Ctx;
use crate::error::{Error, is_conflict};

/// The shared context plus what only sessions read, from watches: every session (this
/// controller's own cache) and every Repository. A burst of 500 sessions listed their
/// namespace's sessions and read their Repository and its Secret once each, which cost the
/// API server more than the planning.
pub struct SessionCtx {
    ctx: Arc<Ctx>,
    sessions: Store<BackupSession>,
    repositories: Store<Repository>,
    /// The Leases of the operator's namespace: the repositories' retention Leases.
    leases: Store<Lease>,
    /// The statuses this process wrote that the cache may not show yet.
    written: crate::context::Written<BackupSessionStatus>,
}

impl SessionCtx {
    /// Writes a session's status unless it is the status already, and remembers it until
    /// the cache shows it.
    async fn write(
        &self,
        session: &BackupSession,
        status: &BackupSessionStatus,
    ) -> Result<(), Error> {
        self.written
            .save(
                &self.client,
                session,
                status,
                "write the BackupSession status",
            )
            .await
    }
}

impl std::fmt::Debug for SessionCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCtx").finish_non_exhaustive()
    }
}

impl std::ops::Deref for SessionCtx {
    type Target = Ctx;
    fn deref(&self) -> &Ctx {
        &self.ctx
    }
}

/// An object from a cache, or from the API server when the cache does not hold it (yet):
/// an object created a moment ago must not look absent.
async fn cached_or_get<K>(
    store: &Store<K>,
    api: Api<K>,
    name: &str,
) -> Result<Option<K>, kube::Error>
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let key = ObjectRef::new(name).within(api.namespace().unwrap_or_default());
    match store.get(&key) {
        Some(o) => Ok(Some((*o).clone())),
        None => api.get_opt(name).await,
    }
}

/// The target's `BackupExecutorEnsured`: true once any node agent has work, false (and the
/// target failed, as Stash fails it) when no host could be given to one.
fn executor_condition(
    assigned: usize,
    problems: &[plan::HostProblem],
    now: Timestamp,
) -> Condition {
    let mut c = match (assigned, problems.first()) {
        (0, Some(p)) => Condition::new(
            types::BACKUP_EXECUTOR_ENSURED,
            false,
            reasons::FAILED_TO_ENSURE_BACKUP_EXECUTOR,
            format!(
                "no host could be assigned to a node agent ({} failed; {}: {})",
                problems.len(),
                p.host,
                p.error
            ),
        ),
        _ => Condition::new(
            types::BACKUP_EXECUTOR_ENSURED,
            true,
            reasons::ASSIGNED_TO_NODE_AGENT,
            match problems.len() {
                0 => format!("{assigned} BackupAssignment(s) for the node agents"),
                n => format!(
                    "{assigned} BackupAssignment(s) for the node agents; {n} host(s) could not \
                     be assigned"
                ),
            },
        ),
    };
    c.last_transition_time = Some(Time(now));
    c
}

/// A Go-style duration (`30m`, `1h30m`, `90s`, `1.5h`), as Stash's `timeOut` and
/// `retryConfig.delay` are written.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        let value: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let factor = match unit {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * factor;
        rest = tail;
    }
    Some(Duration::from_secs_f64(total))
}

fn is_final(phase: Option<BackupSessionPhase>) -> bool {
    matches!(
        phase,
        Some(
            BackupSessionPhase::Succeeded
                | BackupSessionPhase::Failed
                | BackupSessionPhase::Skipped
        )
    )
}

pub async fn event(ctx: &Ctx, s: &BackupSession, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(note),
        action: "Backup".into(),
        secondary: None,
    };
    ctx.event(&ev, &s.object_ref(&())).await;
}

/// The invoker of a session: `spec.invoker`, or Stash's labels on older sessions.
pub(crate) fn invoker_name(s: &BackupSession) -> Option<String> {
    s.spec
        .invoker
        .as_ref()
        .filter(|i| i.kind == "BackupConfiguration")
        .map(|i| i.name.clone())
        .or_else(|| s.labels().get(labels::INVOKER_NAME).cloned())
        .or_else(|| s.labels().get(labels::LEGACY_BACKUP_CONFIGURATION).cloned())
}

struct Step<'a> {
    ctx: &'a SessionCtx,
    session: &'a BackupSession,
    status: BackupSessionStatus,
    now: Time,
}

impl Step<'_> {
    fn set(&mut self, type_: &str, ok: bool, reason: &str, message: impl Into<String>) {
        let mut conds = self.status.conditions.clone().unwrap_or_default();
        set_condition(
            &mut conds,
            Condition::new(type_, ok, reason, message),
            self.now.clone(),
        );
        self.status.conditions = Some(conds);
    }

    fn cond(&self, type_: &str) -> Option<bool> {
        find_condition(self.status.conditions.as_deref().unwrap_or_default(), type_)
            .map(Condition::is_true)
    }

    async fn save(&mut self) -> Result<(), Error> {
        self.status.phase = Some(status::session_phase(
            self.status.conditions.as_deref().unwrap_or_default(),
            self.status.targets.as_deref().unwrap_or_default(),
        ));
        self.ctx.write(self.session, &self.status).await
    }
}

#[tracing::instrument(skip_all, fields(kind = "BackupSession", ns = %session.namespace().unwrap_or_default(), name = %session.name_any()))]
async fn reconcile(session: Arc<BackupSession>, ctx: Arc<SessionCtx>) -> Result<Action, Error> {
    ctx.metrics
        .reconciles
        .get_or_create(&crate::metrics::KindLabels {
            kind: "BackupSession",
        })
        .inc();
    let ns = session.namespace().unwrap_or_default();
    let now = Timestamp::now();
    let mut step = Step {
        ctx: &ctx,
        session: &session,
        status: ctx.written.status_of(&*session),
        now: Time(now),
    };
    let Some(bc_name) = invoker_name(&session) else {
        step.set(
            types::BACKUP_SKIPPED,
            true,
            reasons::SKIPPED_TAKING_NEW_BACKUP,
            "the session names no BackupConfiguration in spec.invoker",
        );
        step.save().await?;
        return Ok(Action::await_change());
    };
    let bc = cached_or_get(
        &ctx.configs,
        Api::namespaced(ctx.client.clone(), &ns),
        &bc_name,
    )
    .await
    .map_err(Error::kube("read the BackupConfiguration"))?;
    if is_final(step.status.phase) {
        return post::after_final(&ctx, &session, step.status, bc.as_ref()).await;
    }
    let Some(bc) = bc else {
        step.set(
            types::BACKUP_SKIPPED,
            true,
            reasons::SKIPPED_TAKING_NEW_BACKUP,
            format!("BackupConfiguration {ns}/{bc_name} does not exist"),
        );
        step.save().await?;
        return Ok(Action::await_change());
    };
    // Skip rules, decided once, before any work.
    if step.status.targets.is_none() {
        let phase = bc.status.as_ref().and_then(|s| s.phase);
        if phase != Some(InvokerPhase::Ready) {
            let why = bc
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| !c.is_true())
                        .and_then(|c| c.message.clone())
                })
                .unwrap_or_else(|| "it has not been reconciled yet".into());
            // A configuration created together with its first session gets a moment.
            let young = session
                .metadata
                .creation_timestamp
                .as_ref()
                .is_some_and(|t| now.duration_since(t.0).as_secs_f64() < 10.0);
            if young && phase.is_none() {
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            step.set(
                types::BACKUP_SKIPPED,
                true,
                reasons::SKIPPED_TAKING_NEW_BACKUP,
                format!(
                    "BackupConfiguration {bc_name} is not Ready ({}): {why}",
                    phase.map_or("no phase".into(), |p| format!("{p:?}"))
                ),
            );
            step.save().await?;
            event(
                &ctx,
                &session,
                true,
                "BackupSkipped",
                format!("BackupConfiguration {bc_name} is not Ready: {why}"),
            )
            .await;
            return Ok(Action::await_change());
        }
        // This controller's cache holds every session it was started for, older ones first.
        let others = ctx.sessions.state();
        let running = others.iter().find(|o| {
            o.name_any() != session.name_any()
                && o.namespace().as_deref() == Some(ns.as_str())
                && invoker_name(o).as_deref() == Some(bc_name.as_str())
                && o.status.as_ref().and_then(|s| s.phase) == Some(BackupSessionPhase::Running)
        });
        if let Some(r) = running {
            step.set(
                types::BACKUP_SKIPPED,
                true,
                reasons::SKIPPED_TAKING_NEW_BACKUP,
                format!(
                    "BackupSession {} of the same invoker is still running",
                    r.name_any()
                ),
            );
            step.save().await?;
            return Ok(Action::await_change());
        }
    }
    // The deadline.
    if step.status.session_deadline.is_none()
        && let Some(limit) = bc.spec.time_out.as_deref().and_then(parse_duration)
        && let Some(created) = &session.metadata.creation_timestamp
    {
        let deadline = created
            .0
            .checked_add(k8s_openapi::jiff::SignedDuration::try_from(limit).unwrap_or_default())
            .unwrap_or(created.0);
        step.status.session_deadline = Some(Time(deadline));
    }
    let assignments_api: Api<BackupAssignment> = Api::namespaced(ctx.client.clone(), &ns);
    let target_ref = bc
        .spec
        .target
        .as_ref()
        .map(|t| t.ref_.clone())
        .unwrap_or_default();
    let repo_ref = plan::repository_ref(&bc).unwrap_or_default();
    let repo_key =
        crate::repository::repo_key(repo_ref.namespace.as_deref().unwrap_or(&ns), &repo_ref.name);
    if step.status.targets.is_none() {
        // Pre-backup: the repository initialised once, by the operator, before any agent.
        let mut node_local = None;
        if step.cond(types::BACKEND_REPOSITORY_INITIALIZED) != Some(true) {
            let repo_ns = repo_ref.namespace.clone().unwrap_or_else(|| ns.clone());
            let repo = cached_or_get(
                &ctx.repositories,
                Api::namespaced(ctx.client.clone(), &repo_ns),
                &repo_ref.name,
            )
            .await
            .map_err(Error::kube("read the Repository"))?;
            match post::initialise(&ctx, &repo_ns, &repo_ref.name, repo).await {
                Ok(backend) => {
                    if let restic_wrapper::Backend::Local { path } = backend {
                        node_local = Some(path);
                    }
                    step.set(
                        types::BACKEND_REPOSITORY_INITIALIZED,
                        true,
                        reasons::SUCCESSFULLY_INITIALIZED_BACKEND,
                        "the repository is initialised",
                    )
                }
                Err(e) if e.is_retryable() => {
                    tracing::info!(error = %e, "repository not ready yet");
                    return Ok(Action::requeue(Duration::from_secs(5)));
                }
                Err(e) => {
                    step.set(
                        types::BACKEND_REPOSITORY_INITIALIZED,
                        false,
                        reasons::FAILED_TO_INITIALIZE_BACKEND,
                        e.to_string(),
                    );
                    step.status.targets = Some(vec![BackupTargetStatus {
                        ref_: target_ref.clone(),
                        total_hosts: Some(1),
                        stats: Some(vec![HostBackupStats {
                            hostname: "host-0".into(),
                            phase: Some(HostPhase::Failed),
                            error: Some(format!(
                                "failed to complete backup for host host-0. Reason: {e}"
                            )),
                            ..HostBackupStats::default()
                        }]),
                        ..BackupTargetStatus::default()
                    }]);
                    step.save().await?;
                    return Ok(Action::requeue(Duration::from_secs(1)));
                }
            }
        }
        // No backup starts while retention holds the repository; sessions share the lock
        // (held from the Lease check until their assignments exist), so they are planned
        // side by side.
        let lock = ctx.repo_lock(&repo_key);
        let held = lock.read().await;
        if crate::repo_lease::held_in(&ctx.leases, &ctx, &repo_key).await? {
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        let observed =
            crate::target::observe(&ctx, &ns, bc.spec.target.as_ref().map(|t| &t.ref_)).await?;
        let mut planned = plan::plan(&session, &bc, &observed);
        // The operator initialised the hostPath repository on its own node; hosts elsewhere
        // would write into another directory. Unknown node (not set): nothing to compare.
        let here = ctx.args.node_name.as_str();
        if let Some(path) = node_local.as_deref()
            && !here.is_empty()
        {
            plan::confine_to_node(&mut planned, here, |other| {
                stash_rules::repository::other_node_message(path, here, other)
            });
        }
        let created_secs = session
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0.0, |t| now.duration_since(t.0).as_secs_f64());
        if !planned.waiting_for_agent.is_empty()
            && created_secs < ctx.args.agent_wait_seconds as f64
        {
            tracing::info!(nodes = ?planned.waiting_for_agent, "waiting for node agents to be Ready");
            return Ok(Action::requeue(Duration::from_secs(3)));
        }
        let mut problems = planned.problems.clone();
        let mut assigned = 0;
        for a in &planned.assignments {
            if planned.waiting_for_agent.contains(&a.spec.node_name) {
                let mut hosts: Vec<String> =
                    a.spec.volumes.iter().map(|v| v.host.clone()).collect();
                hosts.dedup();
                for host in hosts {
                    problems.push(plan::HostProblem {
                        host,
                        node: Some(a.spec.node_name.clone()),
                        error: format!("no Ready node agent on node {}", a.spec.node_name),
                    });
                }
                continue;
            }
            match assignments_api.create(&PostParams::default(), a).await {
                Ok(_) => {
                    ctx.metrics.assignments_created.inc();
                }
                Err(e) if is_conflict(&e) => {}
                Err(e) => return Err(Error::kube("create a BackupAssignment")(e)),
            }
            assigned += 1;
        }
        drop(held);
        let stats: Vec<HostBackupStats> = problems
            .iter()
            .map(|p| HostBackupStats {
                hostname: p.host.clone(),
                phase: Some(HostPhase::Failed),
                error: Some(format!(
                    "failed to complete backup for host {}. Reason: {}",
                    p.host, p.error
                )),
                ..HostBackupStats::default()
            })
            .collect();
        let total = planned
            .total_hosts
            .max(i32::try_from(stats.len()).unwrap_or(0))
            .max(1);
        // What will run, as Stash lists it: the integrity check only when it is on.
        let mut post_actions = vec!["ApplyRetentionPolicy".to_owned()];
        if ctx.args.verify_integrity {
            post_actions.push("VerifyRepositoryIntegrity".to_owned());
        }
        post_actions.push("SendRepositoryMetrics".to_owned());
        step.status.targets = Some(vec![BackupTargetStatus {
            ref_: target_ref.clone(),
            total_hosts: Some(total),
            pre_backup_actions: Some(vec!["InitializeBackendRepository".into()]),
            post_backup_actions: Some(post_actions),
            conditions: Some(vec![executor_condition(assigned, &problems, now)]),
            stats: (!stats.is_empty()).then_some(stats),
            ..BackupTargetStatus::default()
        }]);
        step.save().await?;
        event(
            &ctx,
            &session,
            false,
            "BackupAssigned",
            format!("assigned to the node agents of {assigned} node(s)"),
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    // Aggregate what the agents report.
    let assignments = assignments_api
        .list(&ListParams::default().labels(&format!("{}={}", labels::SESSION, session.name_any())))
        .await
        .map_err(Error::kube("list the session's BackupAssignments"))?
        .items;
    let deadline_passed = step
        .status
        .session_deadline
        .as_ref()
        .is_some_and(|d| d.0 < now);
    let timeouts = status::Timeouts {
        heartbeat: Duration::from_secs(ctx.args.heartbeat_timeout_seconds),
        accept: Duration::from_secs(ctx.args.agent_wait_seconds),
    };
    if deadline_passed && step.cond(types::DEADLINE_EXCEEDED) != Some(true) {
        step.set(
            types::DEADLINE_EXCEEDED,
            true,
            reasons::FAILED_TO_COMPLETE_WITHIN_DEADLINE,
            format!(
                "the session did not finish within timeOut {}",
                bc.spec.time_out.clone().unwrap_or_default()
            ),
        );
    }
    let mounts: std::collections::BTreeMap<String, String> = bc
        .spec
        .target
        .iter()
        .flat_map(|t| t.volume_mounts.iter().flatten())
        .map(|m| (m.name.clone(), m.mount_path.clone()))
        .collect();
    let mut to_cancel = Vec::new();
    let previous: Vec<HostBackupStats> = step
        .status
        .targets
        .as_ref()
        .and_then(|t| t.first())
        .and_then(|t| t.stats.clone())
        .unwrap_or_default();
    let mut stats = previous.clone();
    for a in &assignments {
        let silent = status::silent_agent(a, now, timeouts).or_else(|| {
            deadline_passed.then(|| {
                "the session's deadline passed (timeOut); the backup was canceled".to_owned()
            })
        });
        if silent.is_some() && !status::unfinished(std::slice::from_ref(a)).is_empty() {
            to_cancel.push(a.name_any());
        }
        status::merge_stats(
            &mut stats,
            status::host_stats(a, silent.as_deref(), &mounts),
        );
    }
    for name in to_cancel {
        let patch = serde_json::json!({"metadata": {"annotations": {labels::CANCEL: "true"}}});
        if let Err(error) = assignments_api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!(%error, assignment = %name, "cannot cancel the assignment");
        }
    }
    for s in stats.iter().filter(|s| {
        !previous
            .iter()
            .any(|p| p.hostname == s.hostname && p.phase == s.phase)
    }) {
        let ok = s.phase == Some(HostPhase::Succeeded);
        event(
            &ctx,
            &session,
            !ok,
            if ok {
                "HostBackupSucceeded"
            } else {
                "HostBackupFailed"
            },
            match &s.error {
                Some(e) => e.clone(),
                None => format!("backup of host {} succeeded", s.hostname),
            },
        )
        .await;
    }
    if let Some(t) = step.status.targets.as_mut().and_then(|t| t.first_mut()) {
        t.stats = (!stats.is_empty()).then_some(stats);
        t.phase = Some(status::target_phase(t));
    }
    let targets = step.status.targets.clone().unwrap_or_default();
    if !status::targets_complete(&targets) {
        step.save().await?;
        return Ok(Action::requeue(Duration::from_secs(10)));
    }
    // Every host is done: the post-backup actions, once each, then the metrics push.
    post::post_backup(&mut step, &bc, &assignments, &repo_ref).await?;
    step.save().await?;
    Ok(Action::requeue(Duration::from_secs(1)))
}

fn error_policy(_: Arc<BackupSession>, error: &Error, ctx: Arc<SessionCtx>) -> Action {
    crate::context::after_error(&ctx, "BackupSession", error, 3, 30)
}

pub async fn controller(ctx: Arc<Ctx>) {
    let api: Api<BackupSession> = Api::all(ctx.client.clone());
    let assignments: Api<BackupAssignment> = Api::all(ctx.client.clone());
    let (repositories, repository_watch) = crate::context::watch_into_store(
        Api::<Repository>::all(ctx.client.clone()),
        watcher::Config::default(),
        "Repositories",
    );
    let (leases, lease_watch) = crate::context::watch_into_store(
        Api::<Lease>::namespaced(ctx.client.clone(), &ctx.args.namespace),
        watcher::Config::default(),
        "repository Leases",
    );
    let controller = Controller::new(api, watcher::Config::default())
        .with_config(crate::context::controller_config())
        .owns(assignments, watcher::Config::default());
    let sctx = Arc::new(SessionCtx {
        sessions: controller.store(),
        repositories,
        leases,
        written: Default::default(),
        ctx,
    });
    tokio::join!(
        repository_watch,
        lease_watch,
        controller
            .run(reconcile, error_policy, sctx)
            .for_each(|_| async {}),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executor_is_ensured_only_when_an_agent_has_work() {
        let now = Timestamp::UNIX_EPOCH;
        let problem = plan::HostProblem {
            host: "host-1".into(),
            node: Some("node-2".into()),
            error: "no Ready node agent on node node-2".into(),
        };
        let none = executor_condition(0, std::slice::from_ref(&problem), now);
        let message = none.message.clone().unwrap_or_default();
        assert!(!none.is_true());
        assert_eq!(
            none.reason.as_deref(),
            Some(reasons::FAILED_TO_ENSURE_BACKUP_EXECUTOR)
        );
        assert!(message.contains("host-1: no Ready node agent"), "{message}");
        let some = executor_condition(2, &[problem], now);
        assert!(some.is_true());
        assert_eq!(
            some.message.as_deref(),
            Some("2 BackupAssignment(s) for the node agents; 1 host(s) could not be assigned")
        );
        assert_eq!(
            executor_condition(1, &[], now).message.as_deref(),
            Some("1 BackupAssignment(s) for the node agents")
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("5d"), None);
        assert_eq!(parse_duration(""), None);
    }
}
