//! The Deployment controller: one ReplicaSet per pod template (`<name>-<pod-template-hash>`),
//! rolling or recreating from the old ones to the new one within maxSurge/maxUnavailable,
//! revision annotations, history cleanup and the status `kubectl rollout status` reads.

use super::log_failure;
use crate::error::Result;
use crate::hash::pod_template_hash;
use crate::util::{self, controller_ref, is_controlled_by, scaled, set_condition};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub const HASH_LABEL: &str = "pod-template-hash";
const REVISION: &str = "deployment.kubernetes.io/revision";
const DESIRED: &str = "deployment.kubernetes.io/desired-replicas";
const MAX: &str = "deployment.kubernetes.io/max-replicas";
const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
/// Deployment annotations the ReplicaSet does not inherit (`annotationsToSkip`).
const SKIPPED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED,
    MAX,
    "deprecated.deployment.rollback.to",
];

pub async fn pass(client: &Client) -> Result<()> {
    let all: Api<Deployment> = Api::all(client.clone());
    let rses: Vec<ReplicaSet> = util::list(&Api::all(client.clone()), "replicasets").await?;
    for d in util::list(&all, "deployments").await? {
        if util::is_deleting(&d) {
            continue;
        }
        if let Err(e) = sync(client, &d, &rses).await {
            log_failure(
                "Deployment",
                &d.namespace().unwrap_or_default(),
                &d.name_any(),
                &e,
            );
        }
    }
    Ok(())
}

fn without_hash(t: Option<&PodTemplateSpec>) -> Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    if let Some(l) = v
        .pointer_mut("/metadata/labels")
        .and_then(Value::as_object_mut)
    {
        l.remove(HASH_LABEL);
        if l.is_empty()
            && let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut)
        {
            m.remove("labels");
        }
    }
    v
}

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn status_of(rs: &ReplicaSet) -> (i32, i32, i32) {
    rs.status.as_ref().map_or((0, 0, 0), |s| {
        (
            s.replicas,
            s.ready_replicas.unwrap_or(0),
            s.available_replicas.unwrap_or(0),
        )
    })
}

fn with_hash(mut m: BTreeMap<String, String>, hash: &str) -> BTreeMap<String, String> {
    m.insert(HASH_LABEL.into(), hash.into());
    m
}

struct Plan<'a> {
    d: &'a Deployment,
    api: Api<ReplicaSet>,
    replicas: i32,
    surge: i32,
    unavailable: i32,
}

impl Plan<'_> {
    fn rs_annotations(&self, revision: i64) -> BTreeMap<String, String> {
        let mut a: BTreeMap<String, String> = self
            .d
            .annotations()
            .iter()
            .filter(|(k, _)| !SKIPPED.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        a.insert(REVISION.into(), revision.to_string());
        a.insert(DESIRED.into(), self.replicas.to_string());
        a.insert(MAX.into(), (self.replicas + self.surge).to_string());
        a
    }

    async fn scale(&self, rs: &ReplicaSet, to: i32) -> Result<()> {
        if spec_replicas(rs) == to
            && rs.annotations().get(DESIRED) == Some(&self.replicas.to_string())
        {
            return Ok(());
        }
        let name = rs.name_any();
        util::merge_patch(
            &self.api,
            &name,
            json!({
                "metadata": {"annotations": {
                    DESIRED: self.replicas.to_string(),
                    MAX: (self.replicas + self.surge).to_string(),
                }},
                "spec": {"replicas": to},
            }),
            &format!("ReplicaSet {name}"),
        )
        .await?;
        Ok(())
    }
}

async fn sync(client: &Client, d: &Deployment, all_rs: &[ReplicaSet]) -> Result<()> {
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let uid = d.uid().unwrap_or_default();
    let Some(spec) = d.spec.clone() else {
        return Ok(());
    };
    let replicas = spec.replicas.unwrap_or(1);
    let rolling = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) != Some("Recreate");
    let ru = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let (mut surge, mut unavailable) = if rolling {
        (
            scaled(
                ru.and_then(|r| r.max_surge.as_ref()),
                replicas,
                true,
                (replicas + 3) / 4,
            ),
            scaled(
                ru.and_then(|r| r.max_unavailable.as_ref()),
                replicas,
                false,
                replicas / 4,
            ),
        )
    } else {
        (0, 0)
    };
    if rolling && surge == 0 && unavailable == 0 {
        // `ResolveFenceposts`: both zero would stall, so one may be unavailable.
        unavailable = 1;
    }
    surge = surge.max(0);
    let api: Api<ReplicaSet> = Api::namespaced(client.clone(), &ns);
    let mut owned: Vec<ReplicaSet> = all_rs
        .iter()
        .filter(|r| r.namespace().as_deref() == Some(ns.as_str()) && is_controlled_by(*r, &uid))
        .cloned()
        .collect();
    owned.sort_by_key(|r| r.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let want_template = without_hash(Some(&spec.template));
    let new_idx = owned.iter().position(|r| {
        without_hash(r.spec.as_ref().and_then(|s| s.template.as_ref())) == want_template
    });
    let plan = Plan {
        d,
        api: api.clone(),
        replicas,
        surge,
        unavailable,
    };
    let max_revision = owned.iter().map(revision_of).max().unwrap_or(0);
    let paused = spec.paused == Some(true);
    let mut created = None;
    let new_rs: Option<ReplicaSet> = match new_idx {
        Some(i) => {
            let rs = owned.remove(i);
            // A rollback to an old template makes that ReplicaSet the newest revision.
            let rev = revision_of(&rs);
            if rev < max_revision && !paused {
                let mut history: Vec<String> = rs
                    .annotations()
                    .get(REVISION_HISTORY)
                    .map(|h| h.split(',').map(str::to_owned).collect())
                    .unwrap_or_default();
                history.push(rev.to_string());
                let patched = util::merge_patch(
                    &api,
                    &rs.name_any(),
                    json!({"metadata": {"annotations": {
                        REVISION: (max_revision + 1).to_string(),
                        REVISION_HISTORY: history.join(","),
                    }}}),
                    &format!("ReplicaSet {ns}/{}", rs.name_any()),
                )
                .await?;
                Some(patched)
            } else {
                Some(rs)
            }
        }
        None if paused => None,
        None => {
            let collision = d.status.as_ref().and_then(|s| s.collision_count);
            let hash = pod_template_hash(&want_template, collision);
            let rs_name = format!("{name}-{hash}");
            let old_total: i32 = owned.iter().map(spec_replicas).sum();
            let old_pods: i32 = owned.iter().map(|r| status_of(r).0).sum();
            let initial = if !rolling {
                if old_total > 0 || old_pods > 0 {
                    0
                } else {
                    replicas
                }
            } else if old_total == 0 {
                replicas
            } else {
                (replicas + surge - old_total).clamp(0, replicas)
            };
            let mut template = spec.template.clone();
            let tm = template.metadata.get_or_insert_with(ObjectMeta::default);
            tm.labels = Some(with_hash(tm.labels.clone().unwrap_or_default(), &hash));
            let mut selector = spec.selector.clone();
            selector.match_labels =
                Some(with_hash(selector.match_labels.unwrap_or_default(), &hash));
            let rs = ReplicaSet {
                metadata: ObjectMeta {
                    name: Some(rs_name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(with_hash(
                        spec.template
                            .metadata
                            .as_ref()
                            .and_then(|m| m.labels.clone())
                            .unwrap_or_default(),
                        &hash,
                    )),
                    annotations: Some(plan.rs_annotations(max_revision + 1)),
                    owner_references: Some(vec![controller_ref(d)]),
                    ..Default::default()
                },
                spec: Some(ReplicaSetSpec {
                    replicas: Some(initial),
                    min_ready_seconds: spec.min_ready_seconds,
                    selector,
                    template: Some(template),
                }),
                status: None,
            };
            match api.create(&Default::default(), &rs).await {
                Ok(rs) => {
                    created = Some(rs_name);
                    Some(rs)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // A ReplicaSet of that name with another template: a hash collision.
                    let dapi: Api<Deployment> = Api::namespaced(client.clone(), &ns);
                    util::patch_status(
                        &dapi,
                        &name,
                        json!({"collisionCount": collision.unwrap_or(0) + 1}),
                        &format!("Deployment {ns}/{name}"),
                    )
                    .await?;
                    return Ok(());
                }
                Err(source) => {
                    return Err(crate::error::Error::Kube {
                        action: format!("create ReplicaSet {ns}/{rs_name}"),
                        source,
                    });
                }
            }
        }
    };
    let old = owned;
    if !paused && let Some(new_rs) = &new_rs {
        if rolling {
            roll(&plan, new_rs, &old).await?;
        } else {
            recreate(&plan, new_rs, &old).await?;
        }
    }
    cleanup(&api, &old, spec.revision_history_limit.unwrap_or(10)).await?;
    write_status(client, d, new_rs.as_ref(), &old, &plan, created, paused).await
}

/// `rolloutRolling`: grow the new ReplicaSet within the surge, then shrink old ones as far
/// as availability allows (unhealthy old pods first).
async fn roll(plan: &Plan<'_>, new_rs: &ReplicaSet, old: &[ReplicaSet]) -> Result<()> {
    let replicas = plan.replicas;
    let new_spec = spec_replicas(new_rs);
    let all_spec: i32 = new_spec + old.iter().map(spec_replicas).sum::<i32>();
    let new_target = if new_spec > replicas {
        replicas
    } else if new_spec < replicas {
        let room = replicas + plan.surge - all_spec;
        (new_spec + room.max(0)).min(replicas)
    } else {
        new_spec
    };
    plan.scale(new_rs, new_target).await?;
    let min_available = replicas - plan.unavailable;
    let new_unavailable = new_target - status_of(new_rs).2;
    let all_spec = new_target + old.iter().map(spec_replicas).sum::<i32>();
    let mut cleanup_budget = all_spec - min_available - new_unavailable;
    let mut targets: Vec<i32> = old.iter().map(spec_replicas).collect();
    for (i, rs) in old.iter().enumerate() {
        if cleanup_budget <= 0 {
            break;
        }
        let unhealthy = (targets[i] - status_of(rs).2).max(0);
        let cut = unhealthy.min(cleanup_budget);
        targets[i] -= cut;
        cleanup_budget -= cut;
    }
    let available: i32 = status_of(new_rs).2
        + old
            .iter()
            .zip(&targets)
            .map(|(r, t)| status_of(r).2.min(*t))
            .sum::<i32>();
    let mut budget = available - min_available;
    for t in targets.iter_mut() {
        if budget <= 0 {
            break;
        }
        let cut = (*t).min(budget);
        *t -= cut;
        budget -= cut;
    }
    for (rs, t) in old.iter().zip(targets) {
        plan.scale(rs, t).await?;
    }
    Ok(())
}

/// `rolloutRecreate`: old ReplicaSets to zero, and the new one up only once their pods
/// are gone.
async fn recreate(plan: &Plan<'_>, new_rs: &ReplicaSet, old: &[ReplicaSet]) -> Result<()> {
    for rs in old {
        plan.scale(rs, 0).await?;
    }
    if old.iter().all(|r| status_of(r).0 == 0) {
        plan.scale(new_rs, plan.replicas).await?;
    }
    Ok(())
}

/// Old ReplicaSets at zero beyond `revisionHistoryLimit` go, oldest revision first.
async fn cleanup(api: &Api<ReplicaSet>, old: &[ReplicaSet], limit: i32) -> Result<()> {
    let mut idle: Vec<&ReplicaSet> = old
        .iter()
        .filter(|r| spec_replicas(r) == 0 && status_of(r).0 == 0 && !util::is_deleting(*r))
        .collect();
    let keep = usize::try_from(limit).unwrap_or(0);
    if idle.len() <= keep {
        return Ok(());
    }
    idle.sort_by_key(|r| revision_of(r));
    for rs in &idle[..idle.len() - keep] {
        util::delete(
            api,
            &rs.name_any(),
            &format!("old ReplicaSet {}", rs.name_any()),
        )
        .await?;
    }
    Ok(())
}

async fn write_status(
    client: &Client,
    d: &Deployment,
    new_rs: Option<&ReplicaSet>,
    old: &[ReplicaSet],
    plan: &Plan<'_>,
    created: Option<String>,
    paused: bool,
) -> Result<()> {
    let ns = d.namespace().unwrap_or_default();
    let name = d.name_any();
    let all: Vec<&ReplicaSet> = new_rs.into_iter().chain(old.iter()).collect();
    let replicas: i32 = all.iter().map(|r| status_of(r).0).sum();
    let ready: i32 = all.iter().map(|r| status_of(r).1).sum();
    let available: i32 = all.iter().map(|r| status_of(r).2).sum();
    let updated = new_rs.map_or(0, |r| status_of(r).0);
    let total_spec: i32 = all.iter().map(|r| spec_replicas(r)).sum();
    let current = serde_json::to_value(&d.status).unwrap_or_default();
    let mut conditions = util::conditions_of(Some(&current));
    let min_available = plan.replicas - plan.unavailable;
    if available >= min_available {
        set_condition(
            &mut conditions,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.",
        );
    } else {
        set_condition(
            &mut conditions,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.",
        );
    }
    let rs_name = new_rs.map(|r| r.name_any()).unwrap_or_default();
    let old_pods: i32 = old.iter().map(|r| status_of(r).0).sum();
    let complete = updated == plan.replicas
        && new_rs.is_some_and(|r| status_of(r).2 == plan.replicas)
        && old_pods == 0;
    let progressing = conditions
        .iter()
        .find(|c| c["type"] == "Progressing")
        .cloned();
    if paused {
        set_condition(
            &mut conditions,
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused",
        );
    } else if let Some(c) = &created {
        set_condition(
            &mut conditions,
            "Progressing",
            "True",
            "NewReplicaSetCreated",
            &format!("Created new replica set \"{c}\""),
        );
        stamp_update(&mut conditions);
    } else if complete {
        set_condition(
            &mut conditions,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            &format!("ReplicaSet \"{rs_name}\" has successfully progressed."),
        );
    } else if new_rs.is_some() {
        let deadline = d
            .spec
            .as_ref()
            .and_then(|s| s.progress_deadline_seconds)
            .unwrap_or(600);
        let last = progressing
            .as_ref()
            .and_then(|c| c.get("lastUpdateTime"))
            .and_then(|t| {
                serde_json::from_value::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>(
                    t.clone(),
                )
                .ok()
            });
        let timed_out = progressing
            .as_ref()
            .is_some_and(|c| c["reason"] != "NewReplicaSetAvailable")
            && last.is_some_and(|t| {
                t.0 + jiff::SignedDuration::from_secs(i64::from(deadline)) < util::now().0
            });
        if timed_out {
            set_condition(
                &mut conditions,
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                &format!("ReplicaSet \"{rs_name}\" has timed out progressing."),
            );
        } else if progressing
            .as_ref()
            .is_none_or(|c| c["reason"] != "ProgressDeadlineExceeded")
        {
            let before = conditions.clone();
            set_condition(
                &mut conditions,
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                &format!("ReplicaSet \"{rs_name}\" is progressing."),
            );
            if before != conditions {
                stamp_update(&mut conditions);
            }
        }
    }
    let mut status = json!({
        "observedGeneration": d.metadata.generation.unwrap_or(0),
        "replicas": replicas,
        "updatedReplicas": updated,
        "readyReplicas": ready,
        "availableReplicas": available,
        "unavailableReplicas": (total_spec - available).max(0),
        "conditions": conditions,
    });
    if let Some(cc) = current.get("collisionCount") {
        status["collisionCount"] = cc.clone();
    }
    let differs = util::status_differs(&current, &status);
    let dapi: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    if let Some(rs) = new_rs {
        let rev = revision_of(rs).to_string();
        if d.annotations().get(REVISION) != Some(&rev) {
            util::merge_patch(
                &dapi,
                &name,
                json!({"metadata": {"annotations": {REVISION: rev}}}),
                &format!("Deployment {ns}/{name}"),
            )
            .await?;
        }
    }
    if differs {
        util::patch_status(&dapi, &name, status, &format!("Deployment {ns}/{name}")).await?;
    }
    Ok(())
}

/// The Progressing condition also carries `lastUpdateTime`, which moves with progress.
fn stamp_update(conditions: &mut [Value]) {
    if let Some(c) = conditions.iter_mut().find(|c| c["type"] == "Progressing") {
        c["lastUpdateTime"] = serde_json::to_value(util::now()).unwrap_or_default();
    }
}
