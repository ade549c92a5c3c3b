//! The persistent-volume controller and a CSI provisioner: claims bind to the smallest
//! matching available PV, or get one `pvc-<uid>` from the cluster's CSI driver (whose
//! volumes are directories under `<state>/csi`); released volumes are reclaimed.

use crate::error::{Error, Result};
use crate::util;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

pub const BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
pub const BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
pub const STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
pub const BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";

/// Parses a quantity such as `1Gi`, `500M` or `2` into bytes (enough for comparing sizes).
pub fn quantity_bytes(q: &Quantity) -> f64 {
    let s = q.0.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().unwrap_or(0.0);
    let mult = match unit {
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "m" => 1e-3,
        _ => 1.0,
    };
    n * mult
}

fn requested(pvc: &PersistentVolumeClaim) -> f64 {
    pvc.spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map_or(0.0, quantity_bytes)
}

fn capacity(pv: &PersistentVolume) -> f64 {
    pv.spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .map_or(0.0, quantity_bytes)
}

fn pv_phase(pv: &PersistentVolume) -> &str {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// `checkVolumeSatisfyClaim` and the selector: class, modes, size, volumeMode, labels.
fn satisfies(pv: &PersistentVolume, pvc: &PersistentVolumeClaim) -> bool {
    let (Some(ps), Some(cs)) = (pv.spec.as_ref(), pvc.spec.as_ref()) else {
        return false;
    };
    let class_ok = ps.storage_class_name.clone().unwrap_or_default()
        == cs.storage_class_name.clone().unwrap_or_default();
    let modes_ok = cs
        .access_modes
        .iter()
        .flatten()
        .all(|m| ps.access_modes.iter().flatten().any(|x| x == m));
    let mode = |m: &Option<String>| m.clone().unwrap_or_else(|| "Filesystem".into());
    let volume_mode_ok = mode(&ps.volume_mode) == mode(&cs.volume_mode);
    let selector_ok = cs
        .selector
        .as_ref()
        .is_none_or(|s| util::selector_matches(Some(s), pv.labels()));
    class_ok && modes_ok && volume_mode_ok && selector_ok && capacity(pv) >= requested(pvc)
}

fn claim_ref_matches(pv: &PersistentVolume, pvc: &PersistentVolumeClaim) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .is_some_and(|r| {
            r.name.as_deref() == pvc.metadata.name.as_deref()
                && r.namespace.as_deref() == pvc.metadata.namespace.as_deref()
                && r.uid
                    .as_ref()
                    .is_none_or(|u| Some(u) == pvc.metadata.uid.as_ref())
        })
}

pub async fn pass(client: &Client, driver: &str, csi_root: &Path) -> Result<()> {
    let pv_api: Api<PersistentVolume> = Api::all(client.clone());
    let mut pvs = util::list(&pv_api, "persistentvolumes").await?;
    let pvcs: Vec<PersistentVolumeClaim> =
        util::list(&Api::all(client.clone()), "persistentvolumeclaims").await?;
    let classes: Vec<StorageClass> =
        util::list(&Api::all(client.clone()), "storageclasses").await?;
    // Volumes whose claim is gone are Released, then reclaimed.
    for pv in &pvs {
        let Some(cr) = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref()) else {
            if pv_phase(pv) != "Available" && !util::is_deleting(pv) {
                util::patch_status(
                    &pv_api,
                    &pv.name_any(),
                    json!({"phase": "Available"}),
                    &format!("PV {}", pv.name_any()),
                )
                .await?;
            }
            continue;
        };
        if cr.uid.is_none() {
            continue;
        }
        let claim_exists = pvcs
            .iter()
            .any(|c| c.metadata.uid == cr.uid && c.namespace() == cr.namespace);
        if claim_exists || util::is_deleting(pv) {
            continue;
        }
        let policy = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            .unwrap_or("Retain");
        if policy == "Delete" {
            if let Some(csi) = pv
                .spec
                .as_ref()
                .and_then(|s| s.csi.as_ref())
                .filter(|c| c.driver == driver)
            {
                let dir = csi_root.join(&csi.volume_handle);
                match std::fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io("delete the volume data", dir)(e));
                    }
                    _ => {}
                }
            }
            util::delete(
                &pv_api,
                &pv.name_any(),
                &format!("released PV {}", pv.name_any()),
            )
            .await?;
        } else if pv_phase(pv) != "Released" {
            util::patch_status(
                &pv_api,
                &pv.name_any(),
                json!({"phase": "Released"}),
                &format!("PV {}", pv.name_any()),
            )
            .await?;
        }
    }
    let default_class = classes
        .iter()
        .find(|c| c.annotations().get(DEFAULT_CLASS).map(String::as_str) == Some("true"))
        .map(|c| c.name_any());
    for pvc in pvcs {
        if util::is_deleting(&pvc) {
            continue;
        }
        let ns = pvc.namespace().unwrap_or_default();
        let name = pvc.name_any();
        let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
        let what = format!("PVC {ns}/{name}");
        let spec = pvc.spec.clone().unwrap_or_default();
        let phase = pvc
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Pending".into());
        if phase == "Bound" {
            continue;
        }
        // Retroactive default class: a claim without a class gets the default one.
        if spec.storage_class_name.is_none()
            && spec.volume_name.is_none()
            && let Some(dc) = &default_class
        {
            util::merge_patch(
                &api,
                &name,
                json!({"spec": {"storageClassName": dc}}),
                &what,
            )
            .await?;
            continue;
        }
        let chosen = match &spec.volume_name {
            Some(v) => pvs
                .iter()
                .find(|p| p.name_any() == *v)
                .cloned()
                .map(|p| (p, false)),
            None => {
                let mut candidates: Vec<&PersistentVolume> = pvs
                    .iter()
                    .filter(|p| {
                        !util::is_deleting(*p)
                            && pv_phase(p) != "Released"
                            && pv_phase(p) != "Failed"
                    })
                    .filter(|p| {
                        let cr = p.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
                        (cr.is_none() || claim_ref_matches(p, &pvc)) && satisfies(p, &pvc)
                    })
                    .collect();
                // A volume pre-bound to this claim wins; otherwise the smallest that fits.
                candidates.sort_by(|a, b| {
                    claim_ref_matches(b, &pvc)
                        .cmp(&claim_ref_matches(a, &pvc))
                        .then(capacity(a).total_cmp(&capacity(b)))
                });
                candidates
                    .first()
                    .map(|p| ((*p).clone(), !claim_ref_matches(p, &pvc)))
            }
        };
        let (pv, by_controller) = match chosen {
            Some(c) => c,
            None => {
                let class = classes
                    .iter()
                    .find(|c| Some(c.name_any()) == spec.storage_class_name);
                let Some(class) = class.filter(|c| c.provisioner == driver) else {
                    continue;
                };
                let wait = class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
                if wait && !pvc.annotations().contains_key(SELECTED_NODE) {
                    continue;
                }
                if !pvc.annotations().contains_key(STORAGE_PROVISIONER) {
                    util::merge_patch(
                        &api,
                        &name,
                        json!({"metadata": {"annotations": {STORAGE_PROVISIONER: driver, BETA_STORAGE_PROVISIONER: driver}}}),
                        &what,
                    )
                    .await?;
                }
                let pv = provision(client, &pvc, class, driver, csi_root).await?;
                pvs.push(pv.clone());
                (pv, true)
            }
        };
        bind(client, &pv, &pvc, by_controller).await?;
    }
    Ok(())
}

/// CSI CreateVolume: a directory for the data, and the PV `pvc-<claim uid>` describing it.
async fn provision(
    client: &Client,
    pvc: &PersistentVolumeClaim,
    class: &StorageClass,
    driver: &str,
    csi_root: &Path,
) -> Result<PersistentVolume> {
    let uid = pvc.uid().unwrap_or_default();
    let name = format!("pvc-{uid}");
    let dir = csi_root.join(&name);
    std::fs::create_dir_all(&dir).map_err(Error::io("create the volume", dir.clone()))?;
    let spec = pvc.spec.clone().unwrap_or_default();
    let storage = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .cloned()
        .unwrap_or_else(|| Quantity("1Gi".into()));
    let pv = PersistentVolume {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            annotations: Some([(PROVISIONED_BY.to_owned(), driver.to_owned())].into()),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: spec.access_modes.clone(),
            capacity: Some(BTreeMap::from([("storage".to_owned(), storage)])),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                name: pvc.metadata.name.clone(),
                namespace: pvc.metadata.namespace.clone(),
                uid: pvc.metadata.uid.clone(),
                resource_version: pvc.metadata.resource_version.clone(),
                ..Default::default()
            }),
            csi: Some(CSIPersistentVolumeSource {
                driver: driver.to_owned(),
                volume_handle: name.clone(),
                fs_type: Some("ext4".into()),
                ..Default::default()
            }),
            persistent_volume_reclaim_policy: Some(
                class
                    .reclaim_policy
                    .clone()
                    .unwrap_or_else(|| "Delete".into()),
            ),
            storage_class_name: Some(class.name_any()),
            volume_mode: spec
                .volume_mode
                .clone()
                .or_else(|| Some("Filesystem".into())),
            mount_options: class.mount_options.clone(),
            ..Default::default()
        }),
        status: None,
    };
    let api: Api<PersistentVolume> = Api::all(client.clone());
    match api.create(&Default::default(), &pv).await {
        Ok(pv) => Ok(pv),
        Err(kube::Error::Api(s)) if s.code == 409 => api
            .get(&name)
            .await
            .map_err(Error::kube(format!("read PV {name}"))),
        Err(source) => Err(Error::Kube {
            action: format!("create PV {name}"),
            source,
        }),
    }
}

/// The bind order of `pv_controller.bind`: the volume's claimRef, its phase, the claim's
/// volumeName, its phase.
async fn bind(
    client: &Client,
    pv: &PersistentVolume,
    pvc: &PersistentVolumeClaim,
    by_controller: bool,
) -> Result<()> {
    let ns = pvc.namespace().unwrap_or_default();
    let pv_name = pv.name_any();
    let pv_api: Api<PersistentVolume> = Api::all(client.clone());
    let what = format!("PV {pv_name}");
    let bound_to_claim = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .is_some_and(|r| r.uid == pvc.metadata.uid);
    if !bound_to_claim {
        let mut patch = json!({"spec": {"claimRef": {
            "kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": ns, "name": pvc.name_any(),
            "uid": pvc.uid(), "resourceVersion": pvc.resource_version(),
        }}});
        if by_controller {
            patch["metadata"] = json!({"annotations": {BOUND_BY_CONTROLLER: "yes"}});
        }
        util::merge_patch(&pv_api, &pv_name, patch, &what).await?;
    }
    if pv_phase(pv) != "Bound" {
        util::patch_status(&pv_api, &pv_name, json!({"phase": "Bound"}), &what).await?;
    }
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let what = format!("PVC {ns}/{}", pvc.name_any());
    let mut ann = json!({BIND_COMPLETED: "yes"});
    if by_controller {
        ann[BOUND_BY_CONTROLLER] = json!("yes");
    }
    util::merge_patch(
        &api,
        &pvc.name_any(),
        json!({"metadata": {"annotations": ann}, "spec": {"volumeName": pv_name}}),
        &what,
    )
    .await?;
    let ps = pv.spec.clone().unwrap_or_default();
    util::patch_status(
        &api,
        &pvc.name_any(),
        json!({"phase": "Bound", "accessModes": ps.access_modes, "capacity": ps.capacity}),
        &what,
    )
    .await?;
    Ok(())
}
