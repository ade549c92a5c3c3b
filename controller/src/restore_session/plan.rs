//! Pure restore planning: a RestoreSession checked as Stash checks it, then its target's
//! Running pods matched to their rules (STASH-API.md §7.3) and each volume to the snapshot it
//! restores, from one listing of the repository, as one RestoreAssignment per node. Names are
//! deterministic (`<session>-<node>`), so a restarted operator never creates two.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use restic_wrapper::Snapshot;
use stash_api::assignment::{AssignedVolume, RestoreAssignment, RestoreAssignmentSpec};
use stash_api::common::{Driver, Executor, ObjectRef, RestoreTarget, Rule, TargetRef};
use stash_api::{RestoreSession, labels};
use stash_rules::hosts::{host_name, mount_path_of};
use stash_rules::snapshots::{by_id, is_complete, latest_for, mount_of, normalise_mount};
use stash_rules::volumes::plan_volume;

use crate::backup_configuration::build::AGENT_TARGET_KINDS;
use crate::backup_session::plan::{HostProblem, assignment_meta, volume_patterns};
use crate::target::{Observed, running_pods};

/// The restic arguments a RestoreSession's `target.args` may carry.
const DELETE_ARG: &str = "--delete";

/// A RestoreSession as planning uses it, once checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked {
    pub target: RestoreTarget,
    pub target_ref: TargetRef,
    /// `target.rules`, or the deprecated `spec.rules` (which Stash's webhook moves there).
    pub rules: Vec<Rule>,
    pub repository: ObjectRef,
    /// `--delete` in `target.args`: files the snapshot does not hold are removed.
    pub delete: bool,
}

/// Checks a RestoreSession as Stash's validating webhook does (§7.4), and refuses plainly what
/// the node agents cannot do yet. The message says what to change.
pub fn validate(rs: &RestoreSession) -> Result<Checked, String> {
    let spec = &rs.spec;
    if spec.driver == Some(Driver::VolumeSnapshotter) {
        return Err(
            "driver VolumeSnapshotter is not supported yet; restore with driver Restic".into(),
        );
    }
    if spec
        .task
        .as_ref()
        .and_then(|t| t.name.as_deref())
        .is_some_and(|n| !n.is_empty())
    {
        return Err(
            "restores through a Task (the restore Job model, for databases and standalone \
             claims) are not supported yet; leave task empty to restore into a workload's volumes"
                .into(),
        );
    }
    if spec.executor == Some(Executor::Sidecar) || spec.executor == Some(Executor::Job) {
        return Err(format!(
            "executor {} is not supported yet (the init-container and Job restore paths come \
             later); executor agent restores in place into the running pods",
            match spec.executor {
                Some(Executor::Job) => "job",
                _ => "sidecar",
            }
        ));
    }
    let Some(target) = spec.target.clone() else {
        return Err("the RestoreSession names no target (spec.target)".into());
    };
    let Some(target_ref) = target.ref_.clone() else {
        return Err("the target names no workload (spec.target.ref)".into());
    };
    if !AGENT_TARGET_KINDS.contains(&target_ref.kind.as_str()) {
        return Err(format!(
            "target kind {} is not supported; the node agents restore into a {}",
            target_ref.kind,
            AGENT_TARGET_KINDS.join(", ")
        ));
    }
    if target
        .volume_claim_templates
        .as_ref()
        .is_some_and(|v| !v.is_empty())
    {
        return Err(
            "volumeClaimTemplates (restoring into new claims) need the restore Job model, which \
             is not supported yet; create the workload, then restore into its running pods"
                .into(),
        );
    }
    if spec.hooks.is_some() {
        return Err("restore hooks are not supported yet; remove spec.hooks".into());
    }
    let Some(repository) = spec.repository.clone() else {
        return Err("the RestoreSession names no repository (spec.repository)".into());
    };
    let rules = match (&target.rules, &spec.rules) {
        (Some(r), _) if !r.is_empty() => r.clone(),
        (_, Some(r)) => r.clone(),
        _ => Vec::new(),
    };
    check_rules(&rules)?;
    let mut delete = false;
    for a in target.args.iter().flatten() {
        if a == DELETE_ARG {
            delete = true;
        } else {
            return Err(format!(
                "target.args {a:?} is not supported; an in-place restore accepts only \
                 {DELETE_ARG} (remove files the snapshot does not hold)"
            ));
        }
    }
    let ns = rs.namespace().unwrap_or_default();
    Ok(Checked {
        target,
        target_ref,
        rules,
        repository: ObjectRef {
            name: repository.name,
            namespace: Some(repository.namespace.unwrap_or(ns)),
        },
        delete,
    })
}

/// Stash's `RestoreSession.IsValid` rules, with messages that say which rule broke.
pub fn check_rules(rules: &[Rule]) -> Result<(), String> {
    let catch_all = rules
        .iter()
        .filter(|r| r.target_hosts.as_ref().is_none_or(Vec::is_empty))
        .count();
    if catch_all > 1 {
        return Err(format!(
            "{catch_all} rules leave targetHosts empty; at most one rule may apply to every \
             other host"
        ));
    }
    let mut seen = BTreeSet::new();
    for (i, r) in rules.iter().enumerate() {
        for h in r.target_hosts.iter().flatten() {
            if !seen.insert(h.as_str()) {
                return Err(format!(
                    "host {h} appears in more than one rule (rule {i} again); a host takes \
                     exactly one rule"
                ));
            }
        }
        let has = |v: &Option<Vec<String>>| v.as_ref().is_some_and(|v| !v.is_empty());
        if has(&r.snapshots) && has(&r.paths) {
            return Err(format!(
                "rule {i} gives both snapshots and paths; they are mutually exclusive, because \
                 one snapshot holds exactly one path"
            ));
        }
        for p in r.paths.iter().flatten() {
            if !p.starts_with('/') {
                return Err(format!(
                    "rule {i}: path {p} is not absolute; paths are the container paths that \
                     were backed up"
                ));
            }
        }
    }
    Ok(())
}

/// The rule that applies to a host (§7.3): one naming it wins, else the one without
/// `targetHosts`; without rules at all, every host restores its own latest snapshots.
pub fn rule_for<'r>(rules: &'r [Rule], host: &str) -> Option<std::borrow::Cow<'r, Rule>> {
    if rules.is_empty() {
        return Some(std::borrow::Cow::Owned(Rule::default()));
    }
    rules
        .iter()
        .find(|r| r.target_hosts.iter().flatten().any(|h| h == host))
        .or_else(|| {
            rules
                .iter()
                .find(|r| r.target_hosts.as_ref().is_none_or(Vec::is_empty))
        })
        .map(std::borrow::Cow::Borrowed)
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub total_hosts: i32,
    /// Every host that restores something, in the order planned.
    pub hosts: Vec<String>,
    pub assignments: Vec<RestoreAssignment>,
    /// Hosts that fail before any work: nothing is written to them.
    pub problems: Vec<HostProblem>,
    /// Nodes with work but no Ready agent (yet).
    pub waiting_for_agent: BTreeSet<String>,
    /// Hosts no rule applies to: nothing is restored there, as in Stash.
    pub skipped: Vec<String>,
}

/// A pod volume the target restores into.
#[derive(Clone, Debug)]
struct TargetVolume {
    name: String,
    mount: String,
    /// Named in the target's `volumeMounts` (then it must get a snapshot).
    explicit: bool,
}

/// What one volume of one host restores.
#[derive(Clone, Debug, Default)]
struct Pick {
    snapshot: String,
    /// Directories inside the volume (`/sub`), all of it when empty.
    includes: Vec<String>,
    whole: bool,
}

/// The volumes of a pod the target restores into: its `volumeMounts`, or else every data
/// volume the pod's containers mount (a claim's volume for a PVC target).
fn target_volumes(
    pod: &Pod,
    checked: &Checked,
    observed: &Observed,
) -> Result<Vec<TargetVolume>, String> {
    let pod_name = pod.name_any();
    let declared = |v: &str| {
        pod.spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|vs| vs.iter().any(|x| x.name == v))
    };
    let mounts = checked.target.volume_mounts.as_deref().unwrap_or_default();
    if !mounts.is_empty() {
        return mounts
            .iter()
            .map(|m| {
                if declared(&m.name) {
                    Ok(TargetVolume {
                        name: m.name.clone(),
                        mount: normalise_mount(&m.mount_path),
                        explicit: true,
                    })
                } else {
                    Err(format!("pod {pod_name} has no volume named {}", m.name))
                }
            })
            .collect();
    }
    let spec_volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for v in &spec_volumes {
        if checked.target_ref.kind == "PersistentVolumeClaim"
            && v.persistent_volume_claim
                .as_ref()
                .is_none_or(|c| c.claim_name != checked.target_ref.name)
        {
            continue;
        }
        // Secrets, ConfigMaps and the like hold no data to restore; volumes the agent cannot
        // reach are reported when planned.
        if matches!(
            plan_volume(pod, &v.name, &observed.claims, &observed.volumes),
            Ok(None)
        ) {
            continue;
        }
        if let Some(mount) = mount_path_of(pod, &[], &v.name) {
            out.push(TargetVolume {
                name: v.name.clone(),
                mount: normalise_mount(&mount),
                explicit: checked.target_ref.kind == "PersistentVolumeClaim",
            });
        }
    }
    if out.is_empty() {
        return Err(format!(
            "pod {pod_name} mounts no volume to restore into; name one in target.volumeMounts"
        ));
    }
    Ok(out)
}

/// Whether `path` is `mount` or lies below it; the rest, as a path inside the volume.
fn below(path: &str, mount: &str) -> Option<String> {
    let path = normalise_mount(path);
    if path == mount {
        return Some(String::new());
    }
    let prefix = if mount == "/" {
        "/".to_owned()
    } else {
        format!("{mount}/")
    };
    path.strip_prefix(&prefix).map(|r| format!("/{r}"))
}

/// Each volume of one host matched to the snapshot it restores, by the host's rule.
fn picks(
    host: &str,
    rule: &Rule,
    volumes: &[TargetVolume],
    keys: &BTreeMap<String, String>,
    snapshots: &[Snapshot],
) -> Result<BTreeMap<String, Pick>, String> {
    let source = rule.source_host.as_deref().unwrap_or(host);
    let mut out: BTreeMap<String, Pick> = BTreeMap::new();
    let mut add = |volume: &str, snapshot: &str, include: Option<String>| -> Result<(), String> {
        let pick = out.entry(volume.to_owned()).or_insert_with(|| Pick {
            snapshot: snapshot.to_owned(),
            ..Pick::default()
        });
        if pick.snapshot != snapshot {
            return Err(format!(
                "volume {volume} would restore two snapshots ({} and {snapshot}); one volume \
                 restores one snapshot",
                short(&pick.snapshot)
            ));
        }
        match include {
            Some(i) if !i.is_empty() => pick.includes.push(i),
            _ => pick.whole = true,
        }
        Ok(())
    };
    let by_mount = |m: &str| volumes.iter().find(|v| v.mount == m);
    if let Some(ids) = rule.snapshots.as_ref().filter(|s| !s.is_empty()) {
        for id in ids {
            let snap = by_id(snapshots, id).map_err(|e| e.to_string())?;
            if !is_complete(snap) {
                return Err(format!(
                    "snapshot {} is incomplete (its backup was cut short) and cannot be restored",
                    short(&snap.id)
                ));
            }
            let volume = match mount_of(snap) {
                Some(m) => by_mount(m).ok_or_else(|| {
                    format!(
                        "snapshot {} holds the volume mounted at {m}, which the target does \
                         not mount",
                        short(&snap.id)
                    )
                })?,
                None if volumes.len() == 1 => &volumes[0],
                None => {
                    return Err(format!(
                        "snapshot {} does not record where its volume was mounted; name the \
                         one volume to restore into in target.volumeMounts",
                        short(&snap.id)
                    ));
                }
            };
            add(&volume.name, &snap.id, None)?;
        }
        return Ok(out);
    }
    if let Some(paths) = rule.paths.as_ref().filter(|p| !p.is_empty()) {
        for path in paths {
            // The snapshots of the source host whose volume holds the path; the deepest mount.
            let best = snapshots
                .iter()
                .filter(|s| s.hostname == source && is_complete(s))
                .filter_map(|s| mount_of(s).and_then(|m| below(path, m).map(|r| (m, r))))
                .max_by_key(|(m, _)| m.len());
            let Some((mount, _)) = best else {
                return Err(format!("no snapshot of host {source} holds path {path}"));
            };
            let volume = by_mount(mount).ok_or_else(|| {
                format!(
                    "path {path} was backed up from the volume mounted at {mount}, which the \
                     target does not mount"
                )
            })?;
            let snap = latest_for(snapshots, source, Some(mount), None)
                .ok_or_else(|| format!("no snapshot of host {source} holds path {path}"))?;
            add(&volume.name, &snap.id, below(path, mount))?;
        }
        return Ok(out);
    }
    for v in volumes {
        match latest_for(
            snapshots,
            source,
            Some(&v.mount),
            keys.get(&v.name).map(String::as_str),
        ) {
            Some(snap) => add(&v.name, &snap.id, None)?,
            None if v.explicit => {
                return Err(format!(
                    "no complete snapshot of host {source} for the volume mounted at {}",
                    v.mount
                ));
            }
            None => {}
        }
    }
    if out.is_empty() {
        return Err(format!(
            "no complete snapshot of host {source} for any volume the target mounts ({})",
            volumes
                .iter()
                .map(|v| v.mount.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(out)
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// Plans the session: every Running pod of the target (one for a single-host kind) gets its
/// volumes' snapshots, and each node one assignment.
pub fn plan(
    session: &RestoreSession,
    checked: &Checked,
    observed: &Observed,
    snapshots: &[Snapshot],
) -> Plan {
    let kind = checked.target_ref.kind.as_str();
    let ns = session.namespace().unwrap_or_default();
    let alias = checked.target.alias.as_deref();
    let mut out = Plan {
        total_hosts: observed.total_hosts.max(1),
        ..Plan::default()
    };
    let mut by_node: BTreeMap<String, Vec<AssignedVolume>> = BTreeMap::new();
    for pod in running_pods(kind, &observed.pods) {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let pod_name = pod.name_any();
        let host = host_name(kind, alias, &pod_name, &node);
        let fail = |error: String| HostProblem {
            host: host.clone(),
            node: Some(node.clone()),
            error,
        };
        let Some(rule) = rule_for(&checked.rules, &host) else {
            out.skipped.push(host.clone());
            continue;
        };
        out.hosts.push(host.clone());
        let volumes = match target_volumes(pod, checked, observed) {
            Ok(v) => v,
            Err(e) => {
                out.problems.push(fail(e));
                continue;
            }
        };
        let mut plans = BTreeMap::new();
        let mut failed = None;
        for v in &volumes {
            match plan_volume(pod, &v.name, &observed.claims, &observed.volumes) {
                Ok(Some(p)) => {
                    plans.insert(v.name.clone(), p);
                }
                Ok(None) => {
                    failed = Some(format!(
                        "volume {} of pod {pod_name} is a secret, configMap or projected \
                         volume; nothing is restored into it",
                        v.name
                    ));
                }
                Err(e) => failed = Some(e.to_string()),
            }
        }
        if let Some(e) = failed {
            out.problems.push(fail(e));
            continue;
        }
        let keys: BTreeMap<String, String> = plans
            .iter()
            .map(|(name, p)| {
                let key = p
                    .claim_uid
                    .clone()
                    .unwrap_or_else(|| format!("{ns}/{}/{name}", checked.target_ref.name));
                (name.clone(), key)
            })
            .collect();
        let picked = match picks(&host, &rule, &volumes, &keys, snapshots) {
            Ok(p) => p,
            Err(e) => {
                out.problems.push(fail(e));
                continue;
            }
        };
        let rule_patterns = |p: &Option<Vec<String>>, mount: &str| {
            p.as_ref()
                .map(|p| volume_patterns(p, &[mount.to_owned()]))
                .filter(|p| !p.is_empty())
        };
        let mut assigned = Vec::new();
        for (name, pick) in picked {
            let (Some(vp), Some(tv)) = (plans.get(&name), volumes.iter().find(|v| v.name == name))
            else {
                continue;
            };
            let rule_include = rule_patterns(&rule.include, &tv.mount);
            if rule_include.is_some() && !pick.whole {
                out.problems.push(fail(format!(
                    "rule include patterns together with a path inside the volume mounted at \
                     {} are not supported; give the patterns alone, or the paths alone",
                    tv.mount
                )));
                assigned.clear();
                break;
            }
            let include = if pick.whole {
                rule_include
            } else {
                Some(pick.includes.clone())
            };
            let exclude = rule_patterns(&rule.exclude, &tv.mount);
            if include.is_some() && exclude.is_some() {
                out.problems.push(fail(format!(
                    "the volume mounted at {} would restore with both include and exclude \
                     patterns (from the rule's include or paths); restic takes one or the other",
                    tv.mount
                )));
                assigned.clear();
                break;
            }
            assigned.push(AssignedVolume {
                pod_namespace: ns.clone(),
                pod_name: pod_name.clone(),
                pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
                volume_name: name.clone(),
                source_kind: vp.kind,
                persistent_volume: vp.persistent_volume.clone(),
                host: host.clone(),
                snapshot_key: keys.get(&name).cloned().unwrap_or_default(),
                mount_path: Some(tv.mount.clone()),
                snapshot: Some(pick.snapshot.clone()),
                include,
                exclude,
                delete_extraneous: checked.delete.then_some(true),
                ..AssignedVolume::default()
            });
        }
        if assigned.is_empty() {
            continue;
        }
        if !observed.ready_agents.contains(&node) {
            out.waiting_for_agent.insert(node.clone());
        }
        by_node.entry(node).or_default().extend(assigned);
    }
    let labels: BTreeMap<String, String> = [
        (labels::SESSION.to_owned(), session.name_any()),
        (
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_STASH.to_owned(),
        ),
        (
            labels::COMPONENT.to_owned(),
            labels::COMPONENT_RESTORE.to_owned(),
        ),
        (labels::INVOKER_TYPE.to_owned(), "RestoreSession".to_owned()),
        (labels::INVOKER_NAME.to_owned(), session.name_any()),
    ]
    .into();
    for (node, volumes) in by_node {
        out.assignments.push(RestoreAssignment {
            metadata: assignment_meta(session, &labels, &node),
            spec: RestoreAssignmentSpec {
                restore_session: session.name_any(),
                target: Some(checked.target_ref.clone()),
                node_name: node,
                repository: checked.repository.clone(),
                io_budget: session.spec.io_budget.clone(),
                volumes,
            },
            status: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, EmptyDirVolumeSource, PodSpec, PodStatus, Volume, VolumeMount,
    };
    use kube::api::ObjectMeta;
    use stash_rules::snapshots::{TAG_STREAM, mount_tag};

    fn pod(name: &str, node: &str, mounts: &[(&str, &str)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("demo".into()),
                uid: Some(format!("uid-{name}")),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                containers: vec![Container {
                    name: "app".into(),
                    volume_mounts: Some(
                        mounts
                            .iter()
                            .map(|(v, m)| VolumeMount {
                                name: (*v).into(),
                                mount_path: (*m).into(),
                                ..VolumeMount::default()
                            })
                            .collect(),
                    ),
                    ..Container::default()
                }],
                volumes: Some(
                    mounts
                        .iter()
                        .map(|(v, _)| Volume {
                            name: (*v).into(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Volume::default()
                        })
                        .collect(),
                ),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..PodStatus::default()
            }),
        }
    }

    fn snap(id: &str, time: &str, host: &str, mount: &str) -> Snapshot {
        let mut s: Snapshot = serde_json::from_value(serde_json::json!({
            "time": time, "tree": "t", "hostname": host, "id": id,
            "tags": [mount_tag(mount), TAG_STREAM],
        }))
        .unwrap();
        s.summary = Some(serde_json::json!({"total_files_processed": 2}));
        s
    }

    fn session(kind: &str, rules: Vec<Rule>) -> RestoreSession {
        let mut rs = RestoreSession::new(
            "rs",
            stash_api::restore_session::RestoreSessionSpec {
                repository: Some(ObjectRef {
                    name: "repo".into(),
                    namespace: None,
                }),
                target: Some(RestoreTarget {
                    ref_: Some(TargetRef {
                        api_version: "apps/v1".into(),
                        kind: kind.into(),
                        name: "web".into(),
                        namespace: None,
                    }),
                    rules: Some(rules),
                    ..RestoreTarget::default()
                }),
                ..Default::default()
            },
        );
        rs.metadata.namespace = Some("demo".into());
        rs.metadata.uid = Some("rs-uid".into());
        rs
    }

    fn observed(pods: Vec<Pod>) -> Observed {
        Observed {
            found: true,
            total_hosts: i32::try_from(pods.len()).unwrap(),
            ready_agents: pods
                .iter()
                .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
                .collect(),
            pods,
            ..Observed::default()
        }
    }

    #[test]
    fn stash_refuses_these_rule_sets() {
        let hosts = |h: &[&str]| Some(h.iter().map(|s| (*s).to_owned()).collect());
        let two_catch_all = vec![Rule::default(), Rule::default()];
        assert!(
            check_rules(&two_catch_all)
                .unwrap_err()
                .contains("at most one")
        );
        let twice = vec![
            Rule {
                target_hosts: hosts(&["host-0"]),
                ..Rule::default()
            },
            Rule {
                target_hosts: hosts(&["host-1", "host-0"]),
                ..Rule::default()
            },
        ];
        assert!(check_rules(&twice).unwrap_err().contains("host-0"));
        let both = vec![Rule {
            snapshots: hosts(&["abcdef01"]),
            paths: hosts(&["/data"]),
            ..Rule::default()
        }];
        assert!(
            check_rules(&both)
                .unwrap_err()
                .contains("mutually exclusive")
        );
        let relative = vec![Rule {
            paths: hosts(&["data"]),
            ..Rule::default()
        }];
        assert!(check_rules(&relative).unwrap_err().contains("absolute"));
    }

    #[test]
    fn a_rule_naming_the_host_wins_over_the_catch_all() {
        let rules = vec![
            Rule {
                source_host: Some("host-2".into()),
                ..Rule::default()
            },
            Rule {
                target_hosts: Some(vec!["host-1".into()]),
                source_host: Some("host-0".into()),
                ..Rule::default()
            },
        ];
        assert_eq!(
            rule_for(&rules, "host-1").unwrap().source_host.as_deref(),
            Some("host-0")
        );
        assert_eq!(
            rule_for(&rules, "host-5").unwrap().source_host.as_deref(),
            Some("host-2")
        );
        let only_named = vec![rules[1].clone()];
        assert!(rule_for(&only_named, "host-5").is_none());
        assert!(rule_for(&[], "host-5").unwrap().source_host.is_none());
    }

    #[test]
    fn statefulset_replicas_restore_their_own_host_or_one_source() {
        let pods = vec![
            pod("web-0", "node-1", &[("data", "/data")]),
            pod("web-1", "node-2", &[("data", "/data")]),
        ];
        let snaps = vec![
            snap("00000000aa", "2026-12-01T10:00:00Z", "host-0", "/data"),
            snap("11111111aa", "2026-12-01T10:00:00Z", "host-1", "/data"),
            snap("00000000bb", "2026-12-01T11:00:00Z", "host-0", "/data/"),
        ];
        let rs = session("StatefulSet", vec![]);
        let checked = validate(&rs).unwrap();
        let p = plan(&rs, &checked, &observed(pods.clone()), &snaps);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let got: Vec<(String, String)> = p
            .assignments
            .iter()
            .flat_map(|a| a.spec.volumes.iter())
            .map(|v| (v.host.clone(), v.snapshot.clone().unwrap()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("host-0".into(), "00000000bb".into()),
                ("host-1".into(), "11111111aa".into())
            ]
        );
        assert_eq!(p.assignments[0].metadata.name.as_deref(), Some("rs-node-1"));
        let one_source = session(
            "StatefulSet",
            vec![Rule {
                source_host: Some("host-1".into()),
                ..Rule::default()
            }],
        );
        let checked = validate(&one_source).unwrap();
        let p = plan(&one_source, &checked, &observed(pods), &snaps);
        assert!(
            p.assignments
                .iter()
                .flat_map(|a| a.spec.volumes.iter())
                .all(|v| v.snapshot.as_deref() == Some("11111111aa"))
        );
    }

    #[test]
    fn paths_and_named_snapshots_find_their_volume() {
        let pods = vec![pod(
            "web-x",
            "node-1",
            &[("data", "/data"), ("logs", "/var/log")],
        )];
        let snaps = vec![
            snap("aaaaaaaa01", "2026-12-01T10:00:00Z", "host-0", "/data"),
            snap("bbbbbbbb01", "2026-12-01T10:00:00Z", "host-0", "/var/log"),
        ];
        let rs = session(
            "Deployment",
            vec![Rule {
                paths: Some(vec!["/data/sub".into()]),
                ..Rule::default()
            }],
        );
        let p = plan(
            &rs,
            &validate(&rs).unwrap(),
            &observed(pods.clone()),
            &snaps,
        );
        let vols = &p.assignments[0].spec.volumes;
        assert_eq!(vols.len(), 1);
        assert_eq!(vols[0].volume_name, "data");
        assert_eq!(vols[0].include, Some(vec!["/sub".to_owned()]));
        let named = session(
            "Deployment",
            vec![Rule {
                snapshots: Some(vec!["bbbbbbbb".into()]),
                ..Rule::default()
            }],
        );
        let p = plan(
            &named,
            &validate(&named).unwrap(),
            &observed(pods.clone()),
            &snaps,
        );
        assert_eq!(p.assignments[0].spec.volumes[0].volume_name, "logs");
        let missing = session(
            "Deployment",
            vec![Rule {
                snapshots: Some(vec!["cccccccc".into()]),
                ..Rule::default()
            }],
        );
        let p = plan(
            &missing,
            &validate(&missing).unwrap(),
            &observed(pods),
            &snaps,
        );
        assert!(p.assignments.is_empty());
        assert!(
            p.problems[0].error.contains("does not exist"),
            "{:?}",
            p.problems
        );
    }

    #[test]
    fn what_the_agents_cannot_do_is_refused_plainly() {
        let mut rs = session("Deployment", vec![]);
        rs.spec.target.as_mut().unwrap().args = Some(vec!["--verify".into()]);
        assert!(validate(&rs).unwrap_err().contains("--delete"));
        let mut rs = session("Job", vec![]);
        assert!(validate(&rs).unwrap_err().contains("not supported"));
        rs = session("Deployment", vec![]);
        rs.spec.driver = Some(Driver::VolumeSnapshotter);
        assert!(validate(&rs).unwrap_err().contains("VolumeSnapshotter"));
    }
}
