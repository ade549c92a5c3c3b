//! How the kubelet lays a pod volume out on the node: its source kind, its directory under
//! `pods/<uid>/volumes/<plugin>/`, and its PV and claim. Pure (pod, claims and volumes in, a
//! plan out), so the operator plans exactly the volume the agent then looks for.

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Volume};
use stash_api::assignment::VolumeSourceKind;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("pod {pod} has no volume named {volume}")]
    NoSuchVolume { pod: String, volume: String },
    #[error("volume {volume} of pod {pod}: the claim {claim} is not found")]
    ClaimNotFound {
        pod: String,
        volume: String,
        claim: String,
    },
    #[error("volume {volume} of pod {pod}: the claim {claim} is not bound yet")]
    ClaimNotBound {
        pod: String,
        volume: String,
        claim: String,
    },
    #[error("volume {volume} of pod {pod}: the persistent volume {pv} is not found")]
    VolumeNotFound {
        pod: String,
        volume: String,
        pv: String,
    },
    #[error(
        "volume {volume} of pod {pod} is a {kind} volume, which the agent cannot read from the \
         kubelet's directories; use executor: sidecar for it"
    )]
    Unsupported {
        pod: String,
        volume: String,
        kind: &'static str,
    },
    #[error("pod {pod} has no UID yet")]
    NoUid { pod: String },
    #[error("volume {volume}: nothing at {pattern} on this node (is the pod running here?)")]
    NotFound { volume: String, pattern: String },
    #[error("volume {volume}: {count} candidates match {pattern}, expected exactly one")]
    Ambiguous {
        volume: String,
        pattern: String,
        count: usize,
    },
    #[error("volume {volume}: {path} is not mounted; backing it up would save an empty directory")]
    NotMounted { volume: String, path: String },
    #[error("volume {volume}: {path} is not a block device")]
    NotBlockDevice { volume: String, path: String },
    #[error("failed to read {path}: {reason}")]
    Io { path: String, reason: String },
}

/// What to look for on the node for one pod volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumePlan {
    pub volume: String,
    pub kind: VolumeSourceKind,
    /// The directory name under the plugin directory.
    pub dir_name: String,
    /// The plugin directory when it is known (`kubernetes.io~empty-dir`); any otherwise.
    pub plugin: Option<String>,
    /// CSI volumes are mounted one level down, at `<dir>/mount`.
    pub mount_suffix: Option<&'static str>,
    /// The PV, for persistent volumes.
    pub persistent_volume: Option<String>,
    /// The claim's UID: a stable identity across pod restarts.
    pub claim_uid: Option<String>,
}

/// Plans one volume. `Ok(None)` means the volume holds no user data and is skipped (Secrets,
/// ConfigMaps, projected, downward API and token volumes).
pub fn plan_volume(
    pod: &Pod,
    volume: &str,
    claims: &[PersistentVolumeClaim],
    volumes: &[PersistentVolume],
) -> Result<Option<VolumePlan>, ResolveError> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let spec_volume: &Volume = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .and_then(|vs| vs.iter().find(|v| v.name == volume))
        .ok_or_else(|| ResolveError::NoSuchVolume {
            pod: pod_name.clone(),
            volume: volume.to_owned(),
        })?;
    let unsupported = |kind| ResolveError::Unsupported {
        pod: pod_name.clone(),
        volume: volume.to_owned(),
        kind,
    };
    let v = spec_volume;
    if v.secret.is_some()
        || v.config_map.is_some()
        || v.projected.is_some()
        || v.downward_api.is_some()
    {
        return Ok(None);
    }
    let is_block = is_block_device_in_pod(pod, volume);
    if v.empty_dir.is_some() {
        return Ok(Some(VolumePlan {
            volume: volume.to_owned(),
            kind: VolumeSourceKind::EmptyDir,
            dir_name: volume.to_owned(),
            plugin: Some("kubernetes.io~empty-dir".into()),
            mount_suffix: None,
            persistent_volume: None,
            claim_uid: None,
        }));
    }
    if v.csi.is_some() {
        return Ok(Some(VolumePlan {
            volume: volume.to_owned(),
            kind: VolumeSourceKind::CsiEphemeral,
            dir_name: volume.to_owned(),
            plugin: Some("kubernetes.io~csi".into()),
            mount_suffix: Some("mount"),
            persistent_volume: None,
            claim_uid: None,
        }));
    }
    if v.host_path.is_some() {
        return Err(unsupported("hostPath"));
    }
    // A generic ephemeral volume is a PVC named <pod>-<volume>, owned by the pod.
    let claim_name = match (&v.persistent_volume_claim, &v.ephemeral) {
        (Some(pvc), _) => pvc.claim_name.clone(),
        (None, Some(_)) => format!("{pod_name}-{volume}"),
        _ => return Err(unsupported(other_kind(v))),
    };
    let namespace = pod.metadata.namespace.as_deref();
    let claim = claims
        .iter()
        .find(|c| {
            c.metadata.name.as_deref() == Some(&claim_name)
                && c.metadata.namespace.as_deref() == namespace
        })
        .ok_or_else(|| ResolveError::ClaimNotFound {
            pod: pod_name.clone(),
            volume: volume.to_owned(),
            claim: claim_name.clone(),
        })?;
    let pv_name = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ResolveError::ClaimNotBound {
            pod: pod_name.clone(),
            volume: volume.to_owned(),
            claim: claim_name.clone(),
        })?;
    let pv = volumes
        .iter()
        .find(|p| p.metadata.name.as_deref() == Some(&pv_name))
        .ok_or_else(|| ResolveError::VolumeNotFound {
            pod: pod_name.clone(),
            volume: volume.to_owned(),
            pv: pv_name.clone(),
        })?;
    let pv_spec = pv.spec.clone().unwrap_or_default();
    if pv_spec.host_path.is_some() {
        return Err(unsupported("hostPath persistent"));
    }
    let csi = pv_spec.csi.is_some();
    let (kind, plugin, suffix) = match (is_block, csi, v.ephemeral.is_some()) {
        (true, _, _) => (VolumeSourceKind::Block, None, None),
        (false, true, true) => (
            VolumeSourceKind::Ephemeral,
            Some("kubernetes.io~csi".to_owned()),
            Some("mount"),
        ),
        (false, true, false) => (
            VolumeSourceKind::CsiPersistentVolume,
            Some("kubernetes.io~csi".to_owned()),
            Some("mount"),
        ),
        (false, false, _) => (
            VolumeSourceKind::PersistentVolume,
            in_tree_plugin(&pv_spec),
            None,
        ),
    };
    Ok(Some(VolumePlan {
        volume: volume.to_owned(),
        kind,
        dir_name: pv_name.clone(),
        plugin,
        mount_suffix: suffix,
        persistent_volume: Some(pv_name),
        claim_uid: claim.metadata.uid.clone(),
    }))
}

fn other_kind(v: &Volume) -> &'static str {
    if v.nfs.is_some() {
        "inline nfs"
    } else if v.iscsi.is_some() {
        "inline iscsi"
    } else if v.fc.is_some() {
        "inline fc"
    } else {
        "inline"
    }
}

/// The in-tree plugin directory of a non-CSI PV, where it is unambiguous.
fn in_tree_plugin(spec: &k8s_openapi::api::core::v1::PersistentVolumeSpec) -> Option<String> {
    if spec.local.is_some() {
        Some("kubernetes.io~local-volume".into())
    } else if spec.nfs.is_some() {
        Some("kubernetes.io~nfs".into())
    } else {
        None
    }
}

/// Whether the pod consumes the volume as a raw block device (`volumeDevices`).
fn is_block_device_in_pod(pod: &Pod, volume: &str) -> bool {
    let spec = pod.spec.as_ref();
    let containers = spec
        .map(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
        })
        .into_iter()
        .flatten();
    containers
        .flat_map(|c| c.volume_devices.iter().flatten())
        .any(|d| d.name == volume)
}
