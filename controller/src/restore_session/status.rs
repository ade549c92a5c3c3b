//! Pure aggregation: the RestoreAssignments' status becomes the session's per-host stats and
//! its phase, by Stash's rules (STASH-API.md §3.4).

use k8s_openapi::jiff::Timestamp;
use stash_api::assignment::{AssignmentPhase, RestoreAssignment, VolumePhase};
use stash_api::conditions::{Condition, find_condition, types};
use stash_api::restore_session::{HostRestorePhase, HostRestoreStats, RestorePhase};

use crate::backup_session::status::{Timeouts, go_duration, secs_between, silent};

fn duration(start: Option<Timestamp>, end: Option<Timestamp>) -> Option<String> {
    secs_between(start, end).map(go_duration)
}

/// The stats of every host an assignment covers; `interrupted` names why the assignment will
/// not finish (a silent agent, a passed deadline), failing its unfinished hosts.
pub fn host_stats(
    a: &RestoreAssignment,
    now: Timestamp,
    limits: Timeouts,
    deadline_passed: bool,
) -> Vec<HostRestoreStats> {
    let status = a.status.clone().unwrap_or_default();
    let interrupted = silent(
        a.status.as_ref(),
        &a.spec.node_name,
        a.metadata.creation_timestamp.as_ref(),
        now,
        limits,
    )
    .or_else(|| {
        (deadline_passed && !status.phase.is_some_and(AssignmentPhase::is_final))
            .then(|| "the session's deadline passed (timeOut); the restore was canceled".to_owned())
    });
    let mut hosts: Vec<&str> = a.spec.volumes.iter().map(|v| v.host.as_str()).collect();
    hosts.dedup();
    let assignment_failed = matches!(
        status.phase,
        Some(AssignmentPhase::Failed | AssignmentPhase::Canceled)
    );
    hosts
        .into_iter()
        .map(|host| {
            let progress: Vec<_> = a
                .spec
                .volumes
                .iter()
                .filter(|v| v.host == host)
                .map(|v| {
                    status
                        .volumes
                        .iter()
                        .flatten()
                        .find(|p| p.pod_name == v.pod_name && p.volume_name == v.volume_name)
                })
                .collect();
            let done = progress
                .iter()
                .all(|p| p.and_then(|p| p.phase).is_some_and(VolumePhase::is_final));
            let errors: Vec<String> = progress
                .iter()
                .flatten()
                .filter(|p| {
                    p.phase
                        .is_some_and(|ph| ph != VolumePhase::Succeeded && ph.is_final())
                })
                .map(|p| {
                    format!(
                        "volume {}: {}",
                        p.volume_name,
                        p.error.as_deref().unwrap_or("not restored")
                    )
                })
                .collect();
            let start = progress
                .iter()
                .flatten()
                .filter_map(|p| p.start_time.as_ref().map(|t| t.0))
                .min()
                .or(status.start_time.as_ref().map(|t| t.0));
            let end = progress
                .iter()
                .flatten()
                .filter_map(|p| p.completion_time.as_ref().map(|t| t.0))
                .max()
                .or(status.completion_time.as_ref().map(|t| t.0));
            let failed = |why: String| HostRestoreStats {
                hostname: host.to_owned(),
                phase: Some(HostRestorePhase::Failed),
                duration: duration(start, end),
                error: Some(format!("failed to restore host {host}. Reason: {why}")),
            };
            if let Some(why) = &interrupted
                && !done
            {
                return failed(why.clone());
            }
            if !errors.is_empty() {
                return failed(errors.join("; "));
            }
            if assignment_failed {
                return failed(
                    status
                        .error
                        .clone()
                        .unwrap_or_else(|| "the node agent gave up".into()),
                );
            }
            HostRestoreStats {
                hostname: host.to_owned(),
                phase: Some(if done {
                    HostRestorePhase::Succeeded
                } else {
                    HostRestorePhase::Running
                }),
                duration: done.then(|| duration(start, end)).flatten(),
                error: None,
            }
        })
        .collect()
}

/// Whether every host has an outcome.
pub fn hosts_complete(stats: &[HostRestoreStats], total: usize) -> bool {
    stats.len() >= total
        && stats.iter().all(|s| {
            matches!(
                s.phase,
                Some(
                    HostRestorePhase::Succeeded
                        | HostRestorePhase::Failed
                        | HostRestorePhase::Unknown
                )
            )
        })
}

fn cond(conds: &[Condition], t: &str) -> Option<bool> {
    find_condition(conds, t).map(Condition::is_true)
}

/// Stash's phase rule: Invalid when validation failed; Pending while the repository, its
/// Secret or the target is missing; Running until every host is done and the metrics push is
/// recorded; then Failed (a failed host, a failed push, a passed deadline), Unknown, or
/// Succeeded.
pub fn session_phase(
    conds: &[Condition],
    stats: &[HostRestoreStats],
    total: usize,
) -> RestorePhase {
    if cond(conds, types::VALIDATION_PASSED) == Some(false) {
        return RestorePhase::Invalid;
    }
    let missing = [
        types::REPOSITORY_FOUND,
        types::BACKEND_SECRET_FOUND,
        types::RESTORE_TARGET_FOUND,
    ]
    .iter()
    .any(|t| cond(conds, t) == Some(false));
    if missing && stats.is_empty() {
        return RestorePhase::Pending;
    }
    let Some(pushed) = cond(conds, types::METRICS_PUSHED) else {
        return RestorePhase::Running;
    };
    if !hosts_complete(stats, total) {
        return RestorePhase::Running;
    }
    if !pushed || cond(conds, types::DEADLINE_EXCEEDED) == Some(true) {
        return RestorePhase::Failed;
    }
    if stats
        .iter()
        .any(|s| s.phase == Some(HostRestorePhase::Failed))
    {
        RestorePhase::Failed
    } else if stats
        .iter()
        .any(|s| s.phase == Some(HostRestorePhase::Unknown))
    {
        RestorePhase::Unknown
    } else {
        RestorePhase::Succeeded
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
    use stash_api::assignment::{AssignedVolume, AssignmentStatus, VolumeProgress};
    use std::time::Duration;

    fn micro(ms: i64) -> MicroTime {
        MicroTime(Timestamp::from_millisecond(ms).unwrap())
    }

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn assignment(phases: &[(&str, Option<VolumePhase>)]) -> RestoreAssignment {
        let mut a = RestoreAssignment::new("rs-node-1", Default::default());
        a.metadata.creation_timestamp = Some(at(0));
        a.spec.node_name = "node-1".into();
        a.spec.volumes = phases
            .iter()
            .enumerate()
            .map(|(i, (host, _))| AssignedVolume {
                pod_name: format!("web-{i}"),
                volume_name: "data".into(),
                host: (*host).into(),
                ..AssignedVolume::default()
            })
            .collect();
        a.status = Some(AssignmentStatus {
            start_time: Some(at(1)),
            last_heartbeat_time: Some(at(100)),
            volumes: Some(
                phases
                    .iter()
                    .enumerate()
                    .map(|(i, (_, ph))| VolumeProgress {
                        pod_name: format!("web-{i}"),
                        volume_name: "data".into(),
                        phase: *ph,
                        error: (*ph == Some(VolumePhase::Failed)).then(|| "disk full".into()),
                        start_time: Some(micro(1_000)),
                        completion_time: ph
                            .is_some_and(VolumePhase::is_final)
                            .then(|| micro(1_667)),
                        ..VolumeProgress::default()
                    })
                    .collect(),
            ),
            ..AssignmentStatus::default()
        });
        a
    }

    const LIMITS: Timeouts = Timeouts {
        heartbeat: Duration::from_secs(60),
        accept: Duration::from_secs(60),
    };

    #[test]
    fn hosts_follow_their_volumes() {
        let a = assignment(&[
            ("host-0", Some(VolumePhase::Succeeded)),
            ("host-1", Some(VolumePhase::Failed)),
            ("host-2", Some(VolumePhase::Running)),
        ]);
        let stats = host_stats(&a, Timestamp::from_second(110).unwrap(), LIMITS, false);
        assert_eq!(stats[0].phase, Some(HostRestorePhase::Succeeded));
        // A restore quicker than a second reads as one, not as `0s`.
        assert_eq!(stats[0].duration.as_deref(), Some("0.667s"));
        assert_eq!(stats[1].phase, Some(HostRestorePhase::Failed));
        assert!(stats[1].error.as_deref().unwrap().contains("disk full"));
        assert_eq!(stats[2].phase, Some(HostRestorePhase::Running));
        // The agent goes quiet: the unfinished host fails, the finished ones stay.
        let stats = host_stats(&a, Timestamp::from_second(1000).unwrap(), LIMITS, false);
        assert_eq!(stats[0].phase, Some(HostRestorePhase::Succeeded));
        assert!(
            stats[2]
                .error
                .as_deref()
                .unwrap()
                .contains("stopped reporting")
        );
    }

    #[test]
    fn the_phase_waits_for_the_push() {
        let ok = HostRestoreStats {
            hostname: "host-0".into(),
            phase: Some(HostRestorePhase::Succeeded),
            ..HostRestoreStats::default()
        };
        let mut conds = vec![Condition::new(types::VALIDATION_PASSED, true, "", "")];
        assert_eq!(
            session_phase(&conds, std::slice::from_ref(&ok), 1),
            RestorePhase::Running
        );
        conds.push(Condition::new(types::METRICS_PUSHED, true, "", ""));
        assert_eq!(
            session_phase(&conds, std::slice::from_ref(&ok), 1),
            RestorePhase::Succeeded
        );
        assert_eq!(session_phase(&conds, &[ok], 2), RestorePhase::Running);
        conds[0] = Condition::new(types::VALIDATION_PASSED, false, "", "");
        assert_eq!(session_phase(&conds, &[], 1), RestorePhase::Invalid);
    }
}
