//! Pure aggregation: the assignments' status becomes the session's per-host stats, the
//! target's phase and the session's phase, by Stash's rules (STASH-API.md §3.3).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use stash_api::assignment::{
    AssignedVolume, AssignmentPhase, AssignmentStatus, BackupAssignment, VolumePhase,
    VolumeProgress,
};
use stash_api::backup_session::{
    BackupSessionPhase, BackupTargetStatus, FileStats, HostBackupStats, HostPhase, SnapshotStats,
    TargetPhase,
};
use stash_api::conditions::{Condition, find_condition, types};

/// Limits after which a silent agent fails its hosts.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// No status write for this long while work is unfinished.
    pub heartbeat: Duration,
    /// No agent took the assignment for this long.
    pub accept: Duration,
}

/// `1.5 MiB`, as Stash writes sizes.
pub fn human_size(bytes: i64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes.max(0) as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.3} {}", units[i])
    }
}

/// Go's duration format, as Stash writes `sessionDuration` (`1m2.5s`).
pub fn go_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    let h = (secs / 3600.0).floor();
    let m = ((secs - h * 3600.0) / 60.0).floor();
    let s = secs - h * 3600.0 - m * 60.0;
    let s = (s * 1000.0).round() / 1000.0;
    match (h > 0.0, m > 0.0) {
        (true, _) => format!("{h}h{m}m{s}s"),
        (false, true) => format!("{m}m{s}s"),
        _ => format!("{s}s"),
    }
}

/// From `a` to `b`, never negative. The agent's volume times are microseconds (`MicroTime`),
/// an assignment's seconds (`Time`): both are instants.
pub fn secs_between(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Duration> {
    let (Some(a), Some(b)) = (a, b) else {
        return None;
    };
    Some(Duration::from_secs_f64(
        b.duration_since(a).as_secs_f64().max(0.0),
    ))
}

fn age(t: Option<&Time>, now: Timestamp) -> Duration {
    t.map_or(Duration::ZERO, |t| {
        Duration::from_secs_f64(now.duration_since(t.0).as_secs_f64().max(0.0))
    })
}

/// Why an assignment will not report any more, if it will not: its agent went quiet.
pub fn silent_agent(a: &BackupAssignment, now: Timestamp, limits: Timeouts) -> Option<String> {
    silent(
        a.status.as_ref(),
        &a.spec.node_name,
        a.metadata.creation_timestamp.as_ref(),
        now,
        limits,
    )
}

/// [`silent_agent`] for any assignment: its status, node and creation time.
pub fn silent(
    status: Option<&AssignmentStatus>,
    node: &str,
    created: Option<&Time>,
    now: Timestamp,
    limits: Timeouts,
) -> Option<String> {
    if status
        .and_then(|s| s.phase)
        .is_some_and(AssignmentPhase::is_final)
    {
        return None;
    }
    match status.and_then(|s| s.last_heartbeat_time.as_ref().or(s.start_time.as_ref())) {
        Some(beat) if age(Some(beat), now) > limits.heartbeat => Some(format!(
            "the node agent on {node} stopped reporting (no heartbeat for {}s)",
            age(Some(beat), now).as_secs()
        )),
        Some(_) => None,
        None if age(created, now) > limits.accept => Some(format!(
            "no node agent on {node} took the assignment within {}s",
            limits.accept.as_secs()
        )),
        None => None,
    }
}

/// What the agent reported for one of the assignment's volumes.
pub fn progress_of<'a>(a: &'a BackupAssignment, v: &AssignedVolume) -> Option<&'a VolumeProgress> {
    a.status
        .as_ref()
        .and_then(|s| s.volumes.as_deref())
        .and_then(|ps| {
            ps.iter()
                .find(|p| p.pod_name == v.pod_name && p.volume_name == v.volume_name)
        })
}

/// What the agents reported for every volume of one host, across the assignments.
pub fn host_progress<'a>(
    assignments: &'a [BackupAssignment],
    host: &str,
) -> Vec<&'a VolumeProgress> {
    assignments
        .iter()
        .flat_map(|a| {
            a.spec
                .volumes
                .iter()
                .filter(move |v| v.host == host)
                .filter_map(move |v| progress_of(a, v))
        })
        .collect()
}

/// The stats of every host an assignment covers that is final, and the hosts still working.
/// `mounts`: where the target mounts each volume (`volumeMounts`), so a snapshot's `path` is
/// the path the user configured, as Stash reports it.
pub fn host_stats(
    a: &BackupAssignment,
    silent: Option<&str>,
    mounts: &std::collections::BTreeMap<String, String>,
) -> Vec<HostBackupStats> {
    let status = a.status.clone().unwrap_or_default();
    let assignment_failed = matches!(
        status.phase,
        Some(AssignmentPhase::Failed) | Some(AssignmentPhase::Canceled)
    );
    let mut hosts: Vec<String> = a.spec.volumes.iter().map(|v| v.host.clone()).collect();
    hosts.dedup();
    let mut out = Vec::new();
    for host in hosts {
        let vols: Vec<_> = a.spec.volumes.iter().filter(|v| v.host == host).collect();
        let mut errors = Vec::new();
        let mut snapshots = Vec::new();
        let mut all_final = true;
        let (mut start, mut end): (Option<Timestamp>, Option<Timestamp>) = (None, None);
        for v in &vols {
            let p = progress_of(a, v);
            let phase = p.and_then(|p| p.phase);
            match phase {
                Some(VolumePhase::Succeeded) | Some(VolumePhase::Unchanged) => {}
                Some(VolumePhase::Failed) | Some(VolumePhase::Canceled) => errors.push(format!(
                    "volume {}: {}",
                    v.volume_name,
                    p.and_then(|p| p.error.clone())
                        .unwrap_or_else(|| format!("{phase:?}").to_lowercase())
                )),
                _ if assignment_failed => errors.push(format!(
                    "volume {}: {}",
                    v.volume_name,
                    status
                        .error
                        .clone()
                        .unwrap_or_else(|| "the assignment failed".into())
                )),
                _ => all_final = false,
            }
            if let Some(p) = p {
                let (s, c) = (
                    p.start_time.as_ref().map(|t| t.0),
                    p.completion_time.as_ref().map(|t| t.0),
                );
                if s.is_some() && (start.is_none() || s < start) {
                    start = s;
                }
                if c > end {
                    end = c;
                }
                if let Some(id) = &p.snapshot_id {
                    snapshots.push(SnapshotStats {
                        name: Some(id.chars().take(8).collect()),
                        path: Some(snapshot_path(v, mounts)),
                        total_size: p.bytes_total.map(human_size),
                        uploaded: None,
                        processing_time: secs_between(s, c).map(go_duration),
                        file_stats: p.files_total.map(|t| FileStats {
                            total_files: Some(t),
                            ..FileStats::default()
                        }),
                    });
                }
            }
        }
        if !all_final {
            match silent {
                Some(why) => errors.push(why.to_owned()),
                None => continue,
            }
        }
        let duration = secs_between(
            start.or(status.start_time.as_ref().map(|t| t.0)),
            end.or(status.completion_time.as_ref().map(|t| t.0)),
        );
        out.push(HostBackupStats {
            hostname: host.clone(),
            phase: Some(if errors.is_empty() {
                HostPhase::Succeeded
            } else {
                HostPhase::Failed
            }),
            duration: duration.map(go_duration),
            error: (!errors.is_empty()).then(|| {
                format!(
                    "failed to complete backup for host {host}. Reason: {}",
                    errors.join("; ")
                )
            }),
            snapshots: (!snapshots.is_empty()).then_some(snapshots),
        });
    }
    out
}

/// The container path a volume's snapshot holds: its mount (and the sub-directories backed
/// up), or `/<volume>` when the target names no mount for it.
fn snapshot_path(
    v: &AssignedVolume,
    mounts: &std::collections::BTreeMap<String, String>,
) -> String {
    let Some(mount) = mounts.get(&v.volume_name) else {
        return format!("/{}", v.volume_name);
    };
    match v.paths.as_deref() {
        Some(dirs) if !dirs.is_empty() => dirs
            .iter()
            .map(|d| format!("{}/{d}", mount.trim_end_matches('/')))
            .collect::<Vec<_>>()
            .join(","),
        _ => mount.clone(),
    }
}

/// Upserts host stats by hostname, keeping the order hosts first appeared in.
pub fn merge_stats(existing: &mut Vec<HostBackupStats>, new: Vec<HostBackupStats>) {
    for s in new {
        match existing.iter_mut().find(|e| e.hostname == s.hostname) {
            Some(e) => *e = s,
            None => existing.push(s),
        }
    }
}

/// Stash's target phase rule.
pub fn target_phase(t: &BackupTargetStatus) -> TargetPhase {
    let failed_cond = t.conditions.iter().flatten().any(|c| {
        (c.type_ == types::BACKUP_EXECUTOR_ENSURED && !c.is_true())
            || (c.type_ == types::BACKUP_DISRUPTED && c.is_true())
    });
    if failed_cond {
        return TargetPhase::Failed;
    }
    let Some(total) = t.total_hosts else {
        return TargetPhase::Pending;
    };
    let stats = t.stats.clone().unwrap_or_default();
    let done = stats.iter().filter(|s| s.phase.is_some()).count();
    if i32::try_from(done).unwrap_or(i32::MAX) >= total {
        if stats.iter().any(|s| s.phase == Some(HostPhase::Failed)) {
            TargetPhase::Failed
        } else {
            TargetPhase::Succeeded
        }
    } else {
        TargetPhase::Running
    }
}

fn cond(conds: &[Condition], t: &str) -> Option<bool> {
    find_condition(conds, t).map(Condition::is_true)
}

/// Stash's session phase rule: the final phase appears only once metrics were pushed.
pub fn session_phase(conds: &[Condition], targets: &[BackupTargetStatus]) -> BackupSessionPhase {
    if cond(conds, types::METRICS_PUSHED) == Some(false) {
        return BackupSessionPhase::Failed;
    }
    if cond(conds, types::BACKUP_SKIPPED) == Some(true) {
        return BackupSessionPhase::Skipped;
    }
    let pushed = cond(conds, types::METRICS_PUSHED) == Some(true);
    if pushed
        && (cond(conds, types::DEADLINE_EXCEEDED) == Some(true)
            || cond(conds, types::BACKUP_HISTORY_CLEANED) == Some(false))
    {
        return BackupSessionPhase::Failed;
    }
    let phases: Vec<TargetPhase> = targets.iter().map(target_phase).collect();
    if phases.is_empty() || phases.iter().all(|p| *p == TargetPhase::Pending) {
        return BackupSessionPhase::Pending;
    }
    let complete = phases
        .iter()
        .all(|p| matches!(p, TargetPhase::Succeeded | TargetPhase::Failed));
    if complete && pushed {
        let post_failed = [
            types::RETENTION_POLICY_APPLIED,
            types::REPOSITORY_METRICS_PUSHED,
            types::REPOSITORY_INTEGRITY_VERIFIED,
        ]
        .iter()
        .any(|t| cond(conds, t) == Some(false));
        if phases.contains(&TargetPhase::Failed) || post_failed {
            return BackupSessionPhase::Failed;
        }
        return BackupSessionPhase::Succeeded;
    }
    BackupSessionPhase::Running
}

/// Whether every target is complete (all hosts final).
pub fn targets_complete(targets: &[BackupTargetStatus]) -> bool {
    !targets.is_empty()
        && targets.iter().all(|t| {
            matches!(
                target_phase(t),
                TargetPhase::Succeeded | TargetPhase::Failed
            )
        })
}

/// The names of assignments still working, for cancellation.
pub fn unfinished(assignments: &[BackupAssignment]) -> Vec<String> {
    assignments
        .iter()
        .filter(|a| {
            !a.status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(AssignmentPhase::is_final)
        })
        .map(ResourceExt::name_any)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use stash_api::assignment::{AssignedVolume, AssignmentStatus, VolumeProgress};
    use stash_api::common::TargetRef;

    fn micro(ms: i64) -> MicroTime {
        MicroTime(Timestamp::from_millisecond(ms).unwrap())
    }

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn assignment(hosts: &[(&str, &str)], phases: &[Option<VolumePhase>]) -> BackupAssignment {
        let mut a = BackupAssignment::new("s-node-1", Default::default());
        a.metadata.creation_timestamp = Some(at(0));
        a.spec.node_name = "node-1".into();
        a.spec.volumes = hosts
            .iter()
            .map(|(h, pod)| AssignedVolume {
                pod_name: (*pod).into(),
                volume_name: "data".into(),
                host: (*h).into(),
                ..AssignedVolume::default()
            })
            .collect();
        a.status = Some(AssignmentStatus {
            phase: Some(AssignmentPhase::Running),
            last_heartbeat_time: Some(at(100)),
            volumes: Some(
                hosts
                    .iter()
                    .zip(phases)
                    .map(|((_, pod), ph)| VolumeProgress {
                        pod_name: (*pod).into(),
                        volume_name: "data".into(),
                        phase: *ph,
                        snapshot_id: Some("0123456789abcdef".into()),
                        bytes_total: Some(2048),
                        error: Some("disk on fire".into()),
                        start_time: Some(micro(10_250)),
                        completion_time: Some(micro(75_750)),
                        ..VolumeProgress::default()
                    })
                    .collect(),
            ),
            ..AssignmentStatus::default()
        });
        a
    }

    #[test]
    fn hosts_report_once_final_and_silent_agents_fail_theirs() {
        let a = assignment(
            &[("host-0", "web-0"), ("host-1", "web-1")],
            &[Some(VolumePhase::Succeeded), Some(VolumePhase::Running)],
        );
        let stats = host_stats(&a, None, &Default::default());
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].hostname, "host-0");
        assert_eq!(stats[0].phase, Some(HostPhase::Succeeded));
        // To the millisecond, from the agent's microsecond volume times.
        assert_eq!(stats[0].duration.as_deref(), Some("1m5.5s"));
        let snap = &stats[0].snapshots.as_ref().unwrap()[0];
        assert_eq!(snap.name.as_deref(), Some("01234567"));
        assert_eq!(snap.total_size.as_deref(), Some("2.000 KiB"));
        let limits = Timeouts {
            heartbeat: Duration::from_secs(60),
            accept: Duration::from_secs(60),
        };
        let now = Timestamp::from_second(130).unwrap();
        assert_eq!(silent_agent(&a, now, limits), None);
        let later = Timestamp::from_second(200).unwrap();
        let why = silent_agent(&a, later, limits).unwrap();
        assert!(why.contains("stopped reporting"), "{why}");
        let stats = host_stats(&a, Some(&why), &Default::default());
        assert_eq!(stats[1].phase, Some(HostPhase::Failed));
        assert!(stats[1].error.as_ref().unwrap().contains("host host-1"));
    }

    #[test]
    fn a_failed_volume_fails_its_host_with_the_reason() {
        let a = assignment(&[("host-0", "app-x")], &[Some(VolumePhase::Failed)]);
        let stats = host_stats(&a, None, &Default::default());
        assert_eq!(stats[0].phase, Some(HostPhase::Failed));
        assert!(stats[0].error.as_ref().unwrap().contains("disk on fire"));
    }

    #[test]
    fn phases_follow_stash() {
        let mut t = BackupTargetStatus {
            ref_: TargetRef::default(),
            ..BackupTargetStatus::default()
        };
        assert_eq!(target_phase(&t), TargetPhase::Pending);
        t.total_hosts = Some(2);
        t.stats = Some(vec![HostBackupStats {
            hostname: "host-0".into(),
            phase: Some(HostPhase::Succeeded),
            ..HostBackupStats::default()
        }]);
        assert_eq!(target_phase(&t), TargetPhase::Running);
        assert_eq!(
            session_phase(&[], &[t.clone()]),
            BackupSessionPhase::Running
        );
        t.stats.as_mut().unwrap().push(HostBackupStats {
            hostname: "host-1".into(),
            phase: Some(HostPhase::Succeeded),
            ..HostBackupStats::default()
        });
        assert_eq!(target_phase(&t), TargetPhase::Succeeded);
        // Complete, but not final until metrics are pushed.
        assert_eq!(
            session_phase(&[], &[t.clone()]),
            BackupSessionPhase::Running
        );
        let pushed = Condition::new(types::METRICS_PUSHED, true, "R", "");
        assert_eq!(
            session_phase(std::slice::from_ref(&pushed), std::slice::from_ref(&t)),
            BackupSessionPhase::Succeeded
        );
        let retention = Condition::new(types::RETENTION_POLICY_APPLIED, false, "R", "");
        assert_eq!(
            session_phase(&[pushed, retention], &[t.clone()]),
            BackupSessionPhase::Failed
        );
        let skipped = Condition::new(types::BACKUP_SKIPPED, true, "R", "");
        assert_eq!(session_phase(&[skipped], &[]), BackupSessionPhase::Skipped);
    }

    #[test]
    fn snapshot_paths_are_the_container_paths_the_user_named() {
        let mounts = [("data".to_owned(), "/source/data".to_owned())].into();
        let mut v = AssignedVolume {
            volume_name: "data".into(),
            ..AssignedVolume::default()
        };
        assert_eq!(snapshot_path(&v, &mounts), "/source/data");
        v.paths = Some(vec!["a".into(), "b/c".into()]);
        assert_eq!(
            snapshot_path(&v, &mounts),
            "/source/data/a,/source/data/b/c"
        );
        v.volume_name = "other".into();
        assert_eq!(snapshot_path(&v, &mounts), "/other");
    }

    #[test]
    fn durations_and_sizes_read_like_stash() {
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(3725)), "1h2m5s");
        assert_eq!(human_size(41), "41 B");
        assert_eq!(human_size(1536 * 1024), "1.500 MiB");
    }
}
