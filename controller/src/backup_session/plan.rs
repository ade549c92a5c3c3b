//! Pure planning: a session's target, as its Running pods and their volumes, becomes one
//! BackupAssignment per node. Names are deterministic (`<session>-<node>`), so a restarted
//! operator that plans again creates nothing twice.

use std::collections::{BTreeMap, BTreeSet};

use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use stash_api::assignment::{AssignedVolume, BackupAssignment, BackupAssignmentSpec};
use stash_api::backup_session::BackupInvokerRef;
use stash_api::common::ObjectRef;
use stash_api::{BackupConfiguration, BackupSession, labels};
use stash_rules::hosts::{host_name, mount_path_of, select_volumes};
use stash_rules::volumes::plan_volume;

use crate::backup_configuration::build::bounded_name;

pub use crate::target::Observed;

/// A host that cannot be backed up, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostProblem {
    pub host: String,
    pub node: Option<String>,
    pub error: String,
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub total_hosts: i32,
    pub assignments: Vec<BackupAssignment>,
    pub problems: Vec<HostProblem>,
    /// Nodes with work but no Ready agent (yet).
    pub waiting_for_agent: BTreeSet<String>,
}

pub fn assignment_name(session: &str, node: &str) -> String {
    bounded_name(&format!("{session}-{node}"), 253)
}

/// The metadata of a session's assignment for one node (backup or restore): its
/// deterministic name, the session's namespace, `labels` plus the node label the agent
/// selects by, and the session as controlling owner (deleting it cancels the work).
pub fn assignment_meta<K>(session: &K, labels: &BTreeMap<String, String>, node: &str) -> ObjectMeta
where
    K: Resource<DynamicType = ()>,
{
    let mut l = labels.clone();
    l.insert(labels::NODE.to_owned(), node.to_owned());
    ObjectMeta {
        name: Some(assignment_name(&session.name_any(), node)),
        namespace: session.namespace(),
        labels: Some(l),
        owner_references: session.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The target's repository, with its namespace made explicit.
pub fn repository_ref(bc: &BackupConfiguration) -> Option<ObjectRef> {
    let ns = bc.namespace().unwrap_or_default();
    bc.spec.repository.as_ref().map(|r| ObjectRef {
        name: r.name.clone(),
        namespace: Some(r.namespace.clone().unwrap_or(ns)),
    })
}

/// Plans the session. Only Running pods are backed up; for a Deployment, ReplicaSet,
/// ReplicationController or PVC one pod (the oldest) stands for the single host.
pub fn plan(session: &BackupSession, bc: &BackupConfiguration, observed: &Observed) -> Plan {
    let mut out = Plan {
        total_hosts: observed.total_hosts,
        ..Plan::default()
    };
    let Some(target) = &bc.spec.target else {
        return out;
    };
    let Some(repository) = repository_ref(bc) else {
        return out;
    };
    let kind = target.ref_.kind.as_str();
    let ns = session.namespace().unwrap_or_default();
    let pods = crate::target::running_pods(kind, &observed.pods);
    let alias = target.alias.as_deref();
    let mut by_node: BTreeMap<String, Vec<AssignedVolume>> = BTreeMap::new();
    let mut seen_hosts = BTreeSet::new();
    for pod in pods {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let pod_name = pod.name_any();
        let host = host_name(kind, alias, &pod_name, &node);
        seen_hosts.insert(host.clone());
        let fail = |error: String| HostProblem {
            host: host.clone(),
            node: Some(node.clone()),
            error,
        };
        let selected = if kind == "PersistentVolumeClaim" {
            let vol = pod
                .spec
                .as_ref()
                .and_then(|s| s.volumes.as_ref())
                .and_then(|vs| {
                    vs.iter().find(|v| {
                        v.persistent_volume_claim
                            .as_ref()
                            .is_some_and(|c| c.claim_name == target.ref_.name)
                    })
                });
            match vol {
                Some(v) => Ok(vec![stash_rules::hosts::SelectedVolume {
                    volume: v.name.clone(),
                    paths: vec![],
                }]),
                None => Err(format!(
                    "pod {pod_name} does not mount claim {}",
                    target.ref_.name
                )),
            }
        } else {
            select_volumes(
                pod,
                target.volume_mounts.as_deref().unwrap_or_default(),
                target.paths.as_deref().unwrap_or_default(),
            )
            .map_err(|e| e.to_string())
        };
        let selected = match selected {
            Ok(s) => s,
            Err(e) => {
                out.problems.push(fail(e));
                continue;
            }
        };
        let mut volumes = Vec::new();
        let mut failed = None;
        for sel in selected {
            match plan_volume(pod, &sel.volume, &observed.claims, &observed.volumes) {
                Ok(Some(vp)) => volumes.push(AssignedVolume {
                    pod_namespace: ns.clone(),
                    pod_name: pod_name.clone(),
                    pod_uid: pod.metadata.uid.clone().unwrap_or_default(),
                    volume_name: sel.volume.clone(),
                    source_kind: vp.kind,
                    persistent_volume: vp.persistent_volume.clone(),
                    host: host.clone(),
                    snapshot_key: vp
                        .claim_uid
                        .clone()
                        .unwrap_or_else(|| format!("{ns}/{}/{}", target.ref_.name, sel.volume)),
                    paths: (!sel.paths.is_empty()).then(|| sel.paths.clone()),
                    mount_path: mount_path_of(
                        pod,
                        target.volume_mounts.as_deref().unwrap_or_default(),
                        &sel.volume,
                    ),
                    ..AssignedVolume::default()
                }),
                Ok(None) => {
                    failed = Some(format!(
                        "volume {} of pod {pod_name} holds no data to back up (secret, configMap or projected)",
                        sel.volume
                    ));
                }
                Err(e) => failed = Some(e.to_string()),
            }
        }
        if let Some(e) = failed {
            out.problems.push(fail(e));
            continue;
        }
        if !observed.ready_agents.contains(&node) {
            out.waiting_for_agent.insert(node.clone());
        }
        by_node.entry(node).or_default().extend(volumes);
    }
    // Hosts the target should have but that have no Running pod.
    if kind == "StatefulSet" {
        for ordinal in 0..observed.total_hosts.max(0) {
            let host = host_name(kind, alias, &format!("x-{ordinal}"), "");
            if !seen_hosts.contains(&host) {
                out.problems.push(HostProblem {
                    host,
                    node: None,
                    error: format!("pod {}-{ordinal} is not running", target.ref_.name),
                });
            }
        }
    } else if seen_hosts.is_empty() && out.problems.is_empty() {
        out.problems.push(HostProblem {
            host: host_name(kind, alias, "", ""),
            node: None,
            error: format!(
                "{} {} has no Running pod to back up",
                target.ref_.kind, target.ref_.name
            ),
        });
    }
    let labels: BTreeMap<String, String> = [
        (labels::SESSION.to_owned(), session.name_any()),
        (
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_STASH.to_owned(),
        ),
        (
            labels::INVOKER_TYPE.to_owned(),
            "BackupConfiguration".to_owned(),
        ),
        (labels::INVOKER_NAME.to_owned(), bc.name_any()),
    ]
    .into();
    let mounts: Vec<String> = target
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.clone())
        .chain(observed.pods.iter().flat_map(|p| {
            p.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.volume_mounts.iter().flatten())
                .map(|m| m.mount_path.clone())
        }))
        .collect();
    for (node, volumes) in by_node {
        if volumes.is_empty() {
            continue;
        }
        out.assignments.push(BackupAssignment {
            metadata: assignment_meta(session, &labels, &node),
            spec: BackupAssignmentSpec {
                backup_session: session.name_any(),
                invoker: Some(BackupInvokerRef {
                    api_group: Some(labels::GROUP.to_owned()),
                    kind: "BackupConfiguration".into(),
                    name: bc.name_any(),
                }),
                target: Some(target.ref_.clone()),
                node_name: node,
                repository: repository.clone(),
                read_mode: bc.spec.read_mode,
                io_budget: bc.spec.io_budget.clone(),
                on_unreadable: bc.spec.on_unreadable,
                exclude: target
                    .exclude
                    .as_ref()
                    .map(|e| volume_patterns(e, &mounts))
                    .filter(|e| !e.is_empty()),
                args: target.args.clone().filter(|a| !a.is_empty()),
                volumes,
            },
            status: None,
        });
    }
    out
}

/// Keeps only the work on `node` for a repository that is a directory of that node (a
/// hostPath): the hosts on other nodes would write into another node's directory of the
/// same path, a repository the operator never initialised and never prunes. They become
/// problems, each with `message(their node)`.
pub fn confine_to_node(plan: &mut Plan, node: &str, message: impl Fn(&str) -> String) {
    confine(
        &mut plan.assignments,
        &mut plan.problems,
        &mut plan.waiting_for_agent,
        node,
        message,
    );
}

/// An assignment as node confinement sees it: its node and the hosts it serves.
pub trait OnNode {
    fn node(&self) -> &str;
    fn hosts(&self) -> BTreeSet<&str>;
}

impl OnNode for BackupAssignment {
    fn node(&self) -> &str {
        &self.spec.node_name
    }
    fn hosts(&self) -> BTreeSet<&str> {
        self.spec.volumes.iter().map(|v| v.host.as_str()).collect()
    }
}

impl OnNode for stash_api::assignment::RestoreAssignment {
    fn node(&self) -> &str {
        &self.spec.node_name
    }
    fn hosts(&self) -> BTreeSet<&str> {
        self.spec.volumes.iter().map(|v| v.host.as_str()).collect()
    }
}

/// Keeps the assignments of `node`; the others' hosts become problems with `message`.
pub fn confine<A: OnNode>(
    assignments: &mut Vec<A>,
    problems: &mut Vec<HostProblem>,
    waiting_for_agent: &mut BTreeSet<String>,
    node: &str,
    message: impl Fn(&str) -> String,
) {
    let (keep, away): (Vec<_>, Vec<_>) = std::mem::take(assignments)
        .into_iter()
        .partition(|a| a.node() == node);
    *assignments = keep;
    for a in away {
        let other = a.node();
        waiting_for_agent.remove(other);
        for host in a.hosts() {
            problems.push(HostProblem {
                host: host.to_owned(),
                node: Some(other.to_owned()),
                error: message(other),
            });
        }
    }
}

/// Stash's exclude patterns name container paths (`/source/data/tmp`); the agent matches
/// paths inside the volume, so an absolute pattern under a mount loses the mount's prefix.
pub fn volume_patterns(patterns: &[String], mounts: &[String]) -> Vec<String> {
    patterns
        .iter()
        .map(|p| {
            let best = mounts
                .iter()
                .map(|m| m.trim_end_matches('/'))
                .filter(|m| !m.is_empty())
                .filter(|m| p.strip_prefix(m).is_some_and(|r| r.starts_with('/')))
                .max_by_key(|m| m.len());
            match best {
                Some(m) => p[m.len()..].to_owned(),
                None => p.clone(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_local_repository_keeps_only_its_nodes_hosts() {
        let on = |node: &str, hosts: &[&str]| BackupAssignment {
            spec: BackupAssignmentSpec {
                node_name: node.into(),
                volumes: hosts
                    .iter()
                    .map(|h| AssignedVolume {
                        host: (*h).into(),
                        ..AssignedVolume::default()
                    })
                    .collect(),
                ..BackupAssignmentSpec::default()
            },
            ..BackupAssignment::default()
        };
        let mut p = Plan {
            assignments: vec![
                on("a", &["host-0"]),
                on("b", &["host-1", "host-1", "host-2"]),
            ],
            waiting_for_agent: ["b".to_owned()].into(),
            ..Plan::default()
        };
        confine_to_node(&mut p, "a", |n| format!("on {n}"));
        assert_eq!(p.assignments.len(), 1);
        assert_eq!(p.assignments[0].spec.node_name, "a");
        assert!(p.waiting_for_agent.is_empty());
        let problems: Vec<(&str, &str)> = p
            .problems
            .iter()
            .map(|x| (x.host.as_str(), x.error.as_str()))
            .collect();
        assert_eq!(problems, [("host-1", "on b"), ("host-2", "on b")]);
    }

    #[test]
    fn container_path_excludes_become_volume_paths() {
        let mounts = vec!["/source/data".to_owned(), "/source".to_owned()];
        assert_eq!(
            volume_patterns(
                &["/source/data/tmp".into(), "*.swp".into(), "/etc/x".into()],
                &mounts
            ),
            vec!["/tmp".to_owned(), "*.swp".into(), "/etc/x".into()]
        );
    }
}
