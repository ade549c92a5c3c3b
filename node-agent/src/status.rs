//! An assignment's status as data: one pure function builds all of it from the volumes asked
//! for, how far each got and where the work stands; the worker writes it whole (server-side apply).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use stash_api::assignment::{
    AssignedVolume, AssignmentPhase, AssignmentStatus, VolumePhase, VolumeProgress,
    condition_reasons as reasons, condition_types as types,
};
use stash_api::conditions::{Condition, set_condition};

/// Where the work on an assignment stands.
#[derive(Clone, Debug, PartialEq)]
pub enum Stage {
    /// Taken by this agent; the repository is being opened.
    Accepted,
    /// Volumes run; `retrying` says which wait to try again after a retryable failure.
    Running { retrying: Vec<String> },
    /// Every volume ended, each with its own outcome.
    Finished,
    /// Interrupted (deleted, or canceled by its session); `why` says which.
    Canceled { why: String },
    /// The assignment cannot be read or asks for what the agent cannot do; nothing ran.
    Invalid { reason: String },
}

/// One volume's result so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VolumeOutcome {
    pub phase: Option<VolumePhase>,
    pub snapshot_id: Option<String>,
    pub bytes: u64,
    pub files: u64,
    pub warnings: Vec<String>,
    pub error: Option<String>,
    /// The error's fixed category.
    pub reason: Option<&'static str>,
    pub start_time: Option<MicroTime>,
    pub completion_time: Option<MicroTime>,
}

/// The progress counters of one volume read at one moment, and how long it has run.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ProgressSnapshot {
    pub bytes: u64,
    pub files: u64,
    pub bytes_total: u64,
    pub files_total: u64,
    pub elapsed: Option<Duration>,
}

/// What the status is built for.
#[derive(Clone, Debug)]
pub struct Context<'a> {
    pub generation: Option<i64>,
    pub agent: &'a str,
    /// The status as it was: start time and conditions' transition times are kept from it.
    pub previous: Option<&'a AssignmentStatus>,
    pub now: Time,
}

/// Seconds left at the rate so far, once there is a rate to go by.
pub fn eta_seconds(done: u64, total: u64, elapsed: Duration) -> Option<u64> {
    let rate = done as f64 / elapsed.as_secs_f64();
    (done > 0 && total >= done && rate > 0.0).then(|| ((total - done) as f64 / rate).ceil() as u64)
}

fn int(n: u64) -> Option<i64> {
    i64::try_from(n).ok()
}

fn volume_status(
    v: &AssignedVolume,
    o: &VolumeOutcome,
    p: &ProgressSnapshot,
    canceled: bool,
) -> VolumeProgress {
    let mut phase = o.phase.unwrap_or_default();
    if canceled && !phase.is_final() {
        phase = VolumePhase::Canceled;
    }
    let done = phase.is_final();
    // A finished volume reports what it did; a running one, what its counters say now.
    let (bytes, files) = if done && phase != VolumePhase::Canceled {
        (o.bytes, o.files)
    } else {
        (p.bytes, p.files)
    };
    let eta = match (done, p.elapsed) {
        (false, Some(elapsed)) => eta_seconds(bytes, p.bytes_total, elapsed),
        _ => None,
    };
    VolumeProgress {
        pod_name: v.pod_name.clone(),
        volume_name: v.volume_name.clone(),
        phase: Some(phase),
        bytes_total: (p.bytes_total > 0).then(|| int(p.bytes_total)).flatten(),
        bytes_done: int(bytes),
        files_total: (p.files_total > 0).then(|| int(p.files_total)).flatten(),
        files_done: int(files),
        eta_seconds: eta.and_then(int),
        snapshot_id: o.snapshot_id.clone(),
        warnings: (!o.warnings.is_empty()).then(|| o.warnings.clone()),
        error: o.error.clone(),
        reason: o.reason.map(str::to_owned),
        start_time: o.start_time.clone(),
        completion_time: o.completion_time.clone(),
    }
}

/// The whole status of an assignment. Pure: the same inputs give the same status, and a
/// condition's `lastTransitionTime` moves only when its status does.
pub fn build_status(
    volumes: &[AssignedVolume],
    outcomes: &[VolumeOutcome],
    progress: &[ProgressSnapshot],
    stage: &Stage,
    ctx: &Context<'_>,
) -> AssignmentStatus {
    let canceled = matches!(stage, Stage::Canceled { .. });
    let none = VolumeOutcome::default();
    let still = ProgressSnapshot::default();
    let vols: Vec<VolumeProgress> = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            volume_status(
                v,
                outcomes.get(i).unwrap_or(&none),
                progress.get(i).unwrap_or(&still),
                canceled,
            )
        })
        .collect();
    let failures: Vec<String> = vols
        .iter()
        .filter_map(|v| {
            v.error
                .as_ref()
                .map(|e| format!("{}/{}: {e}", v.pod_name, v.volume_name))
        })
        .collect();
    let finished = vols
        .iter()
        .filter(|v| v.phase.is_some_and(VolumePhase::is_final))
        .count();
    let (phase, accepted, progressing, completed, error) = match stage {
        Stage::Accepted => (
            AssignmentPhase::Accepted,
            (true, reasons::ACCEPTED_BY_NODE_AGENT, accepted_by(ctx)),
            (false, reasons::WAITING, "opening the repository".to_owned()),
            (false, reasons::IN_PROGRESS, String::new()),
            None,
        ),
        Stage::Running { retrying } => (
            AssignmentPhase::Running,
            (true, reasons::ACCEPTED_BY_NODE_AGENT, accepted_by(ctx)),
            if retrying.is_empty() {
                (
                    true,
                    reasons::VOLUMES_RUNNING,
                    format!("{finished} of {} volumes done", vols.len()),
                )
            } else {
                (true, reasons::RETRYING, retrying.join("; "))
            },
            (false, reasons::IN_PROGRESS, String::new()),
            None,
        ),
        Stage::Finished => {
            let (phase, reason) = if failures.is_empty() {
                (AssignmentPhase::Succeeded, reasons::SUCCEEDED)
            } else {
                (AssignmentPhase::Failed, reasons::FAILED)
            };
            let message = if failures.is_empty() {
                format!("{} volumes done", vols.len())
            } else {
                failures.join("; ")
            };
            (
                phase,
                (true, reasons::ACCEPTED_BY_NODE_AGENT, accepted_by(ctx)),
                (false, reason, String::new()),
                (true, reason, message),
                (!failures.is_empty()).then(|| failures.join("; ")),
            )
        }
        Stage::Canceled { why } => (
            AssignmentPhase::Canceled,
            (true, reasons::ACCEPTED_BY_NODE_AGENT, accepted_by(ctx)),
            (false, reasons::CANCELED, why.clone()),
            (true, reasons::CANCELED, why.clone()),
            None,
        ),
        Stage::Invalid { reason } => (
            AssignmentPhase::Failed,
            (false, reasons::INVALID_ASSIGNMENT, reason.clone()),
            (false, reasons::INVALID_ASSIGNMENT, String::new()),
            (true, reasons::FAILED, reason.clone()),
            Some(reason.clone()),
        ),
    };
    let mut conditions = ctx
        .previous
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    for (type_, (status, reason, message)) in [
        (types::ACCEPTED, accepted),
        (types::PROGRESSING, progressing),
        (types::COMPLETED, completed),
    ] {
        let mut c = Condition::new(type_, status, reason, message);
        c.observed_generation = ctx.generation;
        set_condition(&mut conditions, c, ctx.now.clone());
    }
    let previous_final = ctx
        .previous
        .filter(|s| s.phase.is_some_and(AssignmentPhase::is_final));
    AssignmentStatus {
        observed_generation: ctx.generation,
        phase: Some(phase),
        agent: Some(ctx.agent.to_owned()),
        start_time: Some(
            ctx.previous
                .and_then(|s| s.start_time.clone())
                .unwrap_or_else(|| ctx.now.clone()),
        ),
        completion_time: phase.is_final().then(|| {
            previous_final
                .and_then(|s| s.completion_time.clone())
                .unwrap_or_else(|| ctx.now.clone())
        }),
        last_heartbeat_time: Some(ctx.now.clone()),
        volumes: (!vols.is_empty()).then_some(vols),
        error,
        conditions: Some(conditions),
    }
}

fn accepted_by(ctx: &Context<'_>) -> String {
    format!("taken by {}", ctx.agent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stash_api::conditions::{ConditionStatus, find_condition};

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    fn vols() -> Vec<AssignedVolume> {
        ["data", "logs"]
            .iter()
            .map(|n| AssignedVolume {
                pod_name: "app-0".into(),
                volume_name: (*n).into(),
                ..AssignedVolume::default()
            })
            .collect()
    }

    fn ctx<'a>(previous: Option<&'a AssignmentStatus>, now: i64) -> Context<'a> {
        Context {
            generation: Some(3),
            agent: "agent-1",
            previous,
            now: at(now),
        }
    }

    fn cond<'a>(s: &'a AssignmentStatus, t: &str) -> &'a Condition {
        find_condition(s.conditions.as_deref().unwrap_or_default(), t).unwrap()
    }

    #[test]
    fn a_backup_moves_from_accepted_to_succeeded_with_stable_transition_times() {
        let v = vols();
        let accepted = build_status(&v, &[], &[], &Stage::Accepted, &ctx(None, 10));
        assert_eq!(accepted.phase, Some(AssignmentPhase::Accepted));
        assert_eq!(accepted.observed_generation, Some(3));
        assert_eq!(accepted.start_time, Some(at(10)));
        assert_eq!(
            cond(&accepted, types::ACCEPTED).status,
            ConditionStatus::True
        );
        assert_eq!(
            cond(&accepted, types::ACCEPTED).observed_generation,
            Some(3)
        );
        assert_eq!(
            cond(&accepted, types::COMPLETED).status,
            ConditionStatus::False
        );

        let outcomes = vec![
            VolumeOutcome {
                phase: Some(VolumePhase::Succeeded),
                snapshot_id: Some("abc".into()),
                bytes: 100,
                files: 2,
                ..VolumeOutcome::default()
            },
            VolumeOutcome {
                phase: Some(VolumePhase::Running),
                ..VolumeOutcome::default()
            },
        ];
        let progress = vec![
            ProgressSnapshot::default(),
            ProgressSnapshot {
                bytes: 50,
                bytes_total: 200,
                elapsed: Some(Duration::from_secs(5)),
                ..ProgressSnapshot::default()
            },
        ];
        let running = Stage::Running { retrying: vec![] };
        let r1 = build_status(
            &v,
            &outcomes,
            &progress,
            &running,
            &ctx(Some(&accepted), 20),
        );
        assert_eq!(r1.phase, Some(AssignmentPhase::Running));
        assert_eq!(r1.start_time, Some(at(10)), "kept from the first write");
        let p = cond(&r1, types::PROGRESSING);
        assert_eq!(
            (p.status, p.last_transition_time.clone()),
            (ConditionStatus::True, Some(at(20)))
        );
        assert_eq!(p.message.as_deref(), Some("1 of 2 volumes done"));
        // Accepted did not change: its transition time stays.
        assert_eq!(
            cond(&r1, types::ACCEPTED).last_transition_time,
            Some(at(10))
        );
        let vs = r1.volumes.clone().unwrap();
        assert_eq!(
            (vs[0].bytes_done, vs[0].snapshot_id.as_deref()),
            (Some(100), Some("abc"))
        );
        assert_eq!(
            (vs[1].bytes_done, vs[1].bytes_total, vs[1].eta_seconds),
            (Some(50), Some(200), Some(15))
        );

        // Written again with nothing changed but the clock: every transition time stays.
        let r2 = build_status(&v, &outcomes, &progress, &running, &ctx(Some(&r1), 30));
        assert_eq!(r2.conditions, r1.conditions);
        assert_eq!(r2.last_heartbeat_time, Some(at(30)));

        let retrying = Stage::Running {
            retrying: vec!["logs: the repository is locked".into()],
        };
        let r3 = build_status(&v, &outcomes, &progress, &retrying, &ctx(Some(&r2), 35));
        let p = cond(&r3, types::PROGRESSING);
        assert_eq!(p.reason.as_deref(), Some(reasons::RETRYING));
        assert_eq!(p.last_transition_time, Some(at(20)), "still True");

        let mut done = outcomes.clone();
        done[1] = VolumeOutcome {
            phase: Some(VolumePhase::Unchanged),
            snapshot_id: Some("def".into()),
            ..VolumeOutcome::default()
        };
        let f = build_status(&v, &done, &progress, &Stage::Finished, &ctx(Some(&r3), 40));
        assert_eq!(f.phase, Some(AssignmentPhase::Succeeded));
        assert_eq!(f.completion_time, Some(at(40)));
        assert_eq!(f.error, None);
        let c = cond(&f, types::COMPLETED);
        assert_eq!(
            (c.status, c.reason.as_deref()),
            (ConditionStatus::True, Some(reasons::SUCCEEDED))
        );
        assert_eq!(c.last_transition_time, Some(at(40)));
        assert_eq!(
            cond(&f, types::PROGRESSING).last_transition_time,
            Some(at(40))
        );
        // A final status written again keeps its completion time.
        let f2 = build_status(&v, &done, &progress, &Stage::Finished, &ctx(Some(&f), 50));
        assert_eq!(f2.completion_time, Some(at(40)));
        assert_eq!(f2.conditions, f.conditions);
    }

    #[test]
    fn failures_cancellation_and_invalid_specs_have_their_own_phase_and_reason() {
        let v = vols();
        let outcomes = vec![
            VolumeOutcome {
                phase: Some(VolumePhase::Failed),
                error: Some("failed to back up: wrong password".into()),
                reason: Some("wrong-password"),
                ..VolumeOutcome::default()
            },
            VolumeOutcome {
                phase: Some(VolumePhase::Succeeded),
                ..VolumeOutcome::default()
            },
        ];
        let f = build_status(&v, &outcomes, &[], &Stage::Finished, &ctx(None, 5));
        assert_eq!(f.phase, Some(AssignmentPhase::Failed));
        assert_eq!(
            f.error.as_deref(),
            Some("app-0/data: failed to back up: wrong password")
        );
        assert_eq!(
            f.volumes.as_ref().unwrap()[0].reason.as_deref(),
            Some("wrong-password")
        );
        assert_eq!(
            cond(&f, types::COMPLETED).reason.as_deref(),
            Some(reasons::FAILED)
        );

        let running = vec![
            VolumeOutcome {
                phase: Some(VolumePhase::Succeeded),
                ..VolumeOutcome::default()
            },
            VolumeOutcome {
                phase: Some(VolumePhase::Running),
                ..VolumeOutcome::default()
            },
        ];
        let why = Stage::Canceled {
            why: "the assignment was deleted".into(),
        };
        let c = build_status(&v, &running, &[], &why, &ctx(None, 5));
        assert_eq!(c.phase, Some(AssignmentPhase::Canceled));
        let phases: Vec<_> = c.volumes.unwrap().iter().map(|v| v.phase).collect();
        assert_eq!(
            phases,
            vec![Some(VolumePhase::Succeeded), Some(VolumePhase::Canceled)]
        );
        assert_eq!(c.completion_time, Some(at(5)));

        let bad = Stage::Invalid {
            reason: "failed to read the assignment: unknown variant `Image`".into(),
        };
        let i = build_status(&[], &[], &[], &bad, &ctx(None, 5));
        assert_eq!(i.phase, Some(AssignmentPhase::Failed));
        assert_eq!(i.volumes, None);
        let a = cond(&i, types::ACCEPTED);
        assert_eq!(
            (a.status, a.reason.as_deref()),
            (ConditionStatus::False, Some(reasons::INVALID_ASSIGNMENT))
        );
        assert!(i.error.unwrap().contains("unknown variant"));
    }

    #[test]
    fn eta_follows_the_rate_so_far() {
        assert_eq!(eta_seconds(50, 100, Duration::from_secs(10)), Some(10));
        assert_eq!(eta_seconds(0, 100, Duration::from_secs(10)), None);
        assert_eq!(eta_seconds(100, 100, Duration::from_secs(10)), Some(0));
    }
}
