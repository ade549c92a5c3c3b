//! The StatefulSet controller: pods `<name>-<ordinal>` with stable identity and one PVC per
//! volumeClaimTemplate (`<claim>-<name>-<ordinal>`), created and removed in ordinal order
//! under OrderedReady, updated from the highest ordinal down through ControllerRevisions.

use super::{log_failure, pod_from_template};
use crate::error::Result;
use crate::hash::revision_hash;
use crate::util::{
    self, controller_ref, is_controlled_by, now, pod_is_active, pod_is_available, pod_is_ready,
};
use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub const REVISION_LABEL: &str = "controller-revision-hash";
const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
pub const HASH_LABEL: &str = "controller.kubernetes.io/hash";

pub async fn pass(client: &Client) -> Result<()> {
    let all: Api<StatefulSet> = Api::all(client.clone());
    let pods: Vec<Pod> = util::list(&Api::all(client.clone()), "pods").await?;
    let revs: Vec<ControllerRevision> =
        util::list(&Api::all(client.clone()), "controllerrevisions").await?;
    for s in util::list(&all, "statefulsets").await? {
        if util::is_deleting(&s) {
            continue;
        }
        if let Err(e) = sync(client, &s, &pods, &revs).await {
            log_failure(
                "StatefulSet",
                &s.namespace().unwrap_or_default(),
                &s.name_any(),
                &e,
            );
        }
    }
    Ok(())
}

/// The revision's data: the template as a strategic-merge patch that replaces it
/// (`getPatch`).
pub fn revision_data(template: &PodTemplateSpec) -> Value {
    let mut t = serde_json::to_value(template).unwrap_or_default();
    if let Some(m) = t.as_object_mut() {
        m.insert("$patch".into(), json!("replace"));
    }
    json!({"spec": {"template": t}})
}

/// Finds or creates the ControllerRevision of `template` for `owner`; returns its name.
pub async fn ensure_revision<K>(
    client: &Client,
    owner: &K,
    template: &PodTemplateSpec,
    collision: Option<i32>,
    revs: &[ControllerRevision],
) -> Result<(String, String)>
where
    K: kube::Resource<DynamicType = ()>,
{
    let ns = owner.namespace().unwrap_or_default();
    let uid = owner.uid().unwrap_or_default();
    let data = revision_data(template);
    let hash = revision_hash(&data, collision);
    let base: String = owner.name_any().chars().take(223).collect();
    let name = format!("{base}-{hash}");
    let owned: Vec<&ControllerRevision> = revs
        .iter()
        .filter(|r| r.namespace().as_deref() == Some(ns.as_str()) && is_controlled_by(*r, &uid))
        .collect();
    if !owned.iter().any(|r| r.name_any() == name) {
        let mut labels: BTreeMap<String, String> = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(HASH_LABEL.into(), hash.clone());
        let rev = ControllerRevision {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels),
                owner_references: Some(vec![controller_ref(owner)]),
                ..Default::default()
            },
            data: Some(RawExtension(data)),
            revision: owned.iter().map(|r| r.revision).max().unwrap_or(0) + 1,
        };
        let api: Api<ControllerRevision> = Api::namespaced(client.clone(), &ns);
        util::create_if_absent(&api, &rev, &format!("ControllerRevision {ns}/{name}")).await?;
    }
    Ok((name, hash))
}

/// The template a revision recorded.
fn revision_template(revs: &[ControllerRevision], ns: &str, name: &str) -> Option<PodTemplateSpec> {
    let r = revs
        .iter()
        .find(|r| r.namespace().as_deref() == Some(ns) && r.name_any() == name)?;
    let mut t = r.data.as_ref()?.0.pointer("/spec/template")?.clone();
    t.as_object_mut()?.remove("$patch");
    serde_json::from_value(t).ok()
}

fn ordinal_of(pod: &Pod, set: &str) -> Option<i32> {
    pod.name_any()
        .strip_prefix(set)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

fn is_healthy(p: &Pod) -> bool {
    util::pod_phase(p) == "Running" && pod_is_ready(p) && !util::is_deleting(p)
}

async fn sync(
    client: &Client,
    set: &StatefulSet,
    all_pods: &[Pod],
    revs: &[ControllerRevision],
) -> Result<()> {
    let ns = set.namespace().unwrap_or_default();
    let name = set.name_any();
    let uid = set.uid().unwrap_or_default();
    let Some(spec) = set.spec.clone() else {
        return Ok(());
    };
    let replicas = spec.replicas.unwrap_or(1);
    let start = spec.ordinals.as_ref().and_then(|o| o.start).unwrap_or(0);
    let ordered = spec.pod_management_policy.as_deref() != Some("Parallel");
    let on_delete = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        == Some("OnDelete");
    let partition = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0);
    // `getStatefulSetRevisions` hashes with a collision count that is never nil (0 until a
    // collision): hashing without one before the first status write, and with `0` after it,
    // made two revisions of one template and recreated the first pod a moment after it
    // started.
    let collision = Some(
        set.status
            .as_ref()
            .and_then(|s| s.collision_count)
            .unwrap_or(0),
    );
    let (update_rev, _) = ensure_revision(client, set, &spec.template, collision, revs).await?;
    let current_rev = set
        .status
        .as_ref()
        .and_then(|s| s.current_revision.clone())
        .filter(|r| revision_template(revs, &ns, r).is_some())
        .unwrap_or_else(|| update_rev.clone());
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut pods: BTreeMap<i32, &Pod> = BTreeMap::new();
    for p in all_pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && is_controlled_by(*p, &uid))
    {
        if let Some(o) = ordinal_of(p, &name) {
            pods.insert(o, p);
        }
    }
    let rev_of = |p: &Pod| p.labels().get(REVISION_LABEL).cloned().unwrap_or_default();
    let range = start..start + replicas;
    // Create or replace pods in range, lowest first.
    for ord in range.clone() {
        match pods.get(&ord) {
            Some(p) if util::pod_is_terminal(p) && !util::is_deleting(*p) => {
                util::delete(
                    &pods_api,
                    &p.name_any(),
                    &format!("failed pod {ns}/{}", p.name_any()),
                )
                .await?;
                if ordered {
                    break;
                }
            }
            Some(p) => {
                if ordered && !is_healthy(p) {
                    break;
                }
            }
            None => {
                let rev = if ord < start + partition && !on_delete {
                    current_rev.clone()
                } else {
                    update_rev.clone()
                };
                let template =
                    revision_template(revs, &ns, &rev).unwrap_or_else(|| spec.template.clone());
                create_pod(client, set, &template, ord, &rev).await?;
                if ordered {
                    break;
                }
            }
        }
    }
    // Scale down, highest ordinal first.
    let all_in_range_healthy = range
        .clone()
        .all(|o| pods.get(&o).is_some_and(|p| is_healthy(p)));
    let extra: Vec<&&Pod> = pods
        .iter()
        .rev()
        .filter(|(o, _)| !range.contains(o))
        .map(|(_, p)| p)
        .collect();
    for p in extra {
        if util::is_deleting(*p) {
            if ordered {
                break;
            }
            continue;
        }
        if ordered && !all_in_range_healthy {
            break;
        }
        util::delete(
            &pods_api,
            &p.name_any(),
            &format!("pod {ns}/{}", p.name_any()),
        )
        .await?;
        if ordered {
            break;
        }
    }
    // Rolling update: one pod at a time, highest ordinal first, at or above the partition.
    if !on_delete && all_in_range_healthy {
        let stale = range
            .clone()
            .rev()
            .filter(|o| *o >= start + partition)
            .find_map(|o| pods.get(&o).filter(|p| rev_of(p) != update_rev));
        if let Some(p) = stale {
            util::delete(
                &pods_api,
                &p.name_any(),
                &format!("pod {ns}/{}", p.name_any()),
            )
            .await?;
        }
    }
    // Status.
    let now = now();
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let active: Vec<&&Pod> = pods.values().filter(|p| pod_is_active(p)).collect();
    let updated = active.iter().filter(|p| rev_of(p) == update_rev).count();
    let ready = active.iter().filter(|p| pod_is_ready(p)).count();
    let mut current = active.iter().filter(|p| rev_of(p) == current_rev).count();
    let mut current_revision = current_rev;
    if updated == usize::try_from(replicas).unwrap_or(0) && ready == updated {
        current_revision = update_rev.clone();
        current = updated;
    }
    let status = json!({
        "observedGeneration": set.metadata.generation.unwrap_or(0),
        "replicas": active.len(),
        "readyReplicas": ready,
        "availableReplicas": active.iter().filter(|p| pod_is_available(p, min_ready, &now)).count(),
        "currentReplicas": current,
        "updatedReplicas": updated,
        "currentRevision": current_revision,
        "updateRevision": update_rev,
        "collisionCount": collision,
    });
    let cur = serde_json::to_value(&set.status).unwrap_or_default();
    let differs = util::status_differs(&cur, &status);
    if differs {
        let api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
        util::patch_status(&api, &name, status, &format!("StatefulSet {ns}/{name}")).await?;
    }
    Ok(())
}

async fn create_pod(
    client: &Client,
    set: &StatefulSet,
    template: &PodTemplateSpec,
    ord: i32,
    rev: &str,
) -> Result<()> {
    let ns = set.namespace().unwrap_or_default();
    let name = set.name_any();
    let Some(spec) = set.spec.as_ref() else {
        return Ok(());
    };
    let pod_name = format!("{name}-{ord}");
    let mut pod = pod_from_template(
        template,
        &ns,
        controller_ref(set),
        None,
        Some(pod_name.clone()),
    );
    let labels = pod.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(POD_NAME_LABEL.into(), pod_name.clone());
    labels.insert(POD_INDEX_LABEL.into(), ord.to_string());
    labels.insert(REVISION_LABEL.into(), rev.to_owned());
    let pvc_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let delete_with_set = spec
        .persistent_volume_claim_retention_policy
        .as_ref()
        .and_then(|p| p.when_deleted.as_deref())
        == Some("Delete");
    if let Some(ps) = pod.spec.as_mut() {
        ps.hostname = Some(pod_name.clone());
        if let Some(svc) = spec.service_name.as_ref().filter(|s| !s.is_empty()) {
            ps.subdomain = Some(svc.clone());
        }
        for claim in spec.volume_claim_templates.iter().flatten() {
            let cname = claim.metadata.name.clone().unwrap_or_default();
            let pvc_name = format!("{cname}-{name}-{ord}");
            let mut labels = claim.metadata.labels.clone().unwrap_or_default();
            labels.extend(spec.selector.match_labels.clone().unwrap_or_default());
            let pvc = PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(pvc_name.clone()),
                    namespace: Some(ns.clone()),
                    labels: Some(labels),
                    annotations: claim.metadata.annotations.clone(),
                    owner_references: delete_with_set.then(|| vec![controller_ref(set)]),
                    ..Default::default()
                },
                spec: claim.spec.clone(),
                status: None,
            };
            util::create_if_absent(&pvc_api, &pvc, &format!("PVC {ns}/{pvc_name}")).await?;
            let volumes = ps.volumes.get_or_insert_with(Vec::new);
            volumes.retain(|v| v.name != cname);
            volumes.push(Volume {
                name: cname.clone(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: pvc_name,
                    read_only: None,
                }),
                ..Default::default()
            });
        }
    }
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    util::create_if_absent(&pods_api, &pod, &format!("pod {ns}/{pod_name}")).await
}
