//! Where the kubelet keeps a pod's volumes on the node, and whether what is there is really the
//! volume. Planning is pure (pod, claims and volumes in, a plan out); locating and the mount
//! check read the filesystem, with the mount table passed in so tests can supply their own.
//!
//! Layout: `<kubelet-root>/pods/<pod-uid>/volumes/<plugin>/<dir>` where `<plugin>` is the
//! plugin name with `/` escaped as `~` (`kubernetes.io~empty-dir`, `kubernetes.io~csi`, …) and
//! `<dir>` is the volume name (emptyDir, inline CSI) or the PV name (persistent volumes; CSI
//! ones add `/mount`). Block volumes live under `volumeDevices/` instead.

use std::path::{Path, PathBuf};

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

/// Finds the volume's directory (or device) on the node: exactly one candidate must exist.
pub fn locate(
    kubelet_root: &Path,
    pod_uid: &str,
    plan: &VolumePlan,
) -> Result<PathBuf, ResolveError> {
    if pod_uid.is_empty() {
        return Err(ResolveError::NoUid {
            pod: plan.volume.clone(),
        });
    }
    let pod_dir = kubelet_root.join("pods").join(pod_uid);
    let base = if plan.kind == VolumeSourceKind::Block {
        pod_dir.join("volumeDevices")
    } else {
        pod_dir.join("volumes")
    };
    let plugins: Vec<PathBuf> = match &plan.plugin {
        Some(p) => vec![base.join(p)],
        None => match std::fs::read_dir(&base) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => vec![],
        },
    };
    let pattern = base
        .join(plan.plugin.as_deref().unwrap_or("*"))
        .join(&plan.dir_name)
        .join(plan.mount_suffix.unwrap_or(""))
        .display()
        .to_string();
    let matches: Vec<PathBuf> = plugins
        .into_iter()
        .map(|p| {
            let dir = p.join(&plan.dir_name);
            match plan.mount_suffix {
                Some(s) => dir.join(s),
                None => dir,
            }
        })
        .filter(|p| p.symlink_metadata().is_ok())
        .collect();
    match matches.len() {
        1 => Ok(matches.into_iter().next().unwrap_or_default()),
        0 => Err(ResolveError::NotFound {
            volume: plan.volume.clone(),
            pattern,
        }),
        count => Err(ResolveError::Ambiguous {
            volume: plan.volume.clone(),
            pattern,
            count,
        }),
    }
}

/// The mount points in a `/proc/self/mountinfo` text (field 5, with octal escapes decoded).
pub fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_octal(p)))
        .collect()
}

fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Refuses a path that is not really the volume: persistent and CSI volumes must be mount
/// points (an unmounted one is an empty directory that would back up as "no data"); block
/// volumes must be block devices; emptyDirs must be directories.
pub fn check_mounted(
    path: &Path,
    plan: &VolumePlan,
    mounts: &[PathBuf],
) -> Result<(), ResolveError> {
    let meta = path.metadata().map_err(|e| ResolveError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    match plan.kind {
        VolumeSourceKind::Block => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_block_device() {
                return Err(ResolveError::NotBlockDevice {
                    volume: plan.volume.clone(),
                    path: path.display().to_string(),
                });
            }
        }
        VolumeSourceKind::EmptyDir => {
            if !meta.is_dir() {
                return Err(ResolveError::NotMounted {
                    volume: plan.volume.clone(),
                    path: path.display().to_string(),
                });
            }
        }
        _ => {
            if !meta.is_dir() || !mounts.iter().any(|m| m == path) {
                return Err(ResolveError::NotMounted {
                    volume: plan.volume.clone(),
                    path: path.display().to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        CSIPersistentVolumeSource, CSIVolumeSource, Container, EmptyDirVolumeSource,
        EphemeralVolumeSource, HostPathVolumeSource, NFSVolumeSource, PersistentVolumeClaimSpec,
        PersistentVolumeClaimVolumeSource, PersistentVolumeSpec, PodSpec, SecretVolumeSource,
        VolumeDevice,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(volumes: Vec<Volume>, devices: Vec<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-0".into()),
                namespace: Some("demo".into()),
                uid: Some("uid-1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    volume_devices: Some(
                        devices
                            .into_iter()
                            .map(|d| VolumeDevice {
                                name: d.into(),
                                device_path: "/dev/xvda".into(),
                            })
                            .collect(),
                    ),
                    ..Container::default()
                }],
                volumes: Some(volumes),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    fn vol(name: &str) -> Volume {
        Volume {
            name: name.into(),
            ..Volume::default()
        }
    }

    fn claim(name: &str, pv: Option<&str>) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("demo".into()),
                uid: Some(format!("uid-{name}")),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                volume_name: pv.map(String::from),
                ..PersistentVolumeClaimSpec::default()
            }),
            ..PersistentVolumeClaim::default()
        }
    }

    fn pv(name: &str, spec: PersistentVolumeSpec) -> PersistentVolume {
        PersistentVolume {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            ..PersistentVolume::default()
        }
    }

    fn csi_pv(name: &str) -> PersistentVolume {
        pv(
            name,
            PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: "ebs.csi.aws.com".into(),
                    volume_handle: "vol-1".into(),
                    ..CSIPersistentVolumeSource::default()
                }),
                ..PersistentVolumeSpec::default()
            },
        )
    }

    #[test]
    fn plans_follow_the_kubelet_layout() -> Result<(), ResolveError> {
        let mut data = vol("data");
        data.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: "data-web-0".into(),
            read_only: None,
        });
        let mut cache = vol("cache");
        cache.empty_dir = Some(EmptyDirVolumeSource::default());
        let mut inline = vol("inline");
        inline.csi = Some(CSIVolumeSource {
            driver: "secrets-store".into(),
            ..CSIVolumeSource::default()
        });
        let mut scratch = vol("scratch");
        scratch.ephemeral = Some(EphemeralVolumeSource::default());
        let mut shared = vol("shared");
        shared.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: "nfs".into(),
            read_only: None,
        });
        let mut raw = vol("raw");
        raw.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: "raw".into(),
            read_only: None,
        });
        let mut token = vol("token");
        token.secret = Some(SecretVolumeSource::default());
        let p = pod(
            vec![data, cache, inline, scratch, shared, raw, token],
            vec!["raw"],
        );
        let claims = [
            claim("data-web-0", Some("pv-data")),
            claim("web-0-scratch", Some("pv-scratch")),
            claim("nfs", Some("pv-nfs")),
            claim("raw", Some("pv-raw")),
        ];
        let nfs = pv(
            "pv-nfs",
            PersistentVolumeSpec {
                nfs: Some(NFSVolumeSource {
                    server: "nfs".into(),
                    path: "/export".into(),
                    read_only: None,
                }),
                ..PersistentVolumeSpec::default()
            },
        );
        let pvs = [
            csi_pv("pv-data"),
            csi_pv("pv-scratch"),
            nfs,
            csi_pv("pv-raw"),
        ];
        let plan = |v: &str| plan_volume(&p, v, &claims, &pvs);

        let data = plan("data")?.expect("planned");
        assert_eq!(data.kind, VolumeSourceKind::CsiPersistentVolume);
        assert_eq!(
            (data.dir_name.as_str(), data.mount_suffix),
            ("pv-data", Some("mount"))
        );
        assert_eq!(data.claim_uid.as_deref(), Some("uid-data-web-0"));
        let cache = plan("cache")?.expect("planned");
        assert_eq!(cache.plugin.as_deref(), Some("kubernetes.io~empty-dir"));
        assert_eq!(cache.dir_name, "cache");
        assert_eq!(
            plan("inline")?.map(|p| p.kind),
            Some(VolumeSourceKind::CsiEphemeral)
        );
        let scratch = plan("scratch")?.expect("planned");
        assert_eq!(scratch.kind, VolumeSourceKind::Ephemeral);
        assert_eq!(scratch.dir_name, "pv-scratch");
        let shared = plan("shared")?.expect("planned");
        assert_eq!(shared.kind, VolumeSourceKind::PersistentVolume);
        assert_eq!(shared.plugin.as_deref(), Some("kubernetes.io~nfs"));
        assert_eq!(plan("raw")?.map(|p| p.kind), Some(VolumeSourceKind::Block));
        assert_eq!(plan("token")?, None, "secrets are skipped");
        assert!(matches!(
            plan("nope"),
            Err(ResolveError::NoSuchVolume { .. })
        ));
        Ok(())
    }

    #[test]
    fn unbound_claims_and_host_paths_are_refused_with_a_reason() {
        let mut data = vol("data");
        data.persistent_volume_claim = Some(PersistentVolumeClaimVolumeSource {
            claim_name: "pending".into(),
            read_only: None,
        });
        let mut host = vol("host");
        host.host_path = Some(HostPathVolumeSource {
            path: "/srv".into(),
            type_: None,
        });
        let p = pod(vec![data, host], vec![]);
        let claims = [claim("pending", None)];
        assert!(matches!(
            plan_volume(&p, "data", &claims, &[]),
            Err(ResolveError::ClaimNotBound { .. })
        ));
        assert!(matches!(
            plan_volume(&p, "data", &[], &[]),
            Err(ResolveError::ClaimNotFound { .. })
        ));
        let err = plan_volume(&p, "host", &[], &[]);
        assert!(
            matches!(&err, Err(e) if e.to_string().contains("executor: sidecar")),
            "{err:?}"
        );
    }

    #[test]
    fn locate_needs_exactly_one_match_and_mounts_are_checked()
    -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let pods = root.path().join("pods/uid-1/volumes");
        std::fs::create_dir_all(pods.join("kubernetes.io~csi/pv-data/mount"))?;
        std::fs::create_dir_all(pods.join("kubernetes.io~empty-dir/cache"))?;
        std::fs::create_dir_all(pods.join("kubernetes.io~local-volume/pv-local"))?;
        let csi = VolumePlan {
            volume: "data".into(),
            kind: VolumeSourceKind::CsiPersistentVolume,
            dir_name: "pv-data".into(),
            plugin: Some("kubernetes.io~csi".into()),
            mount_suffix: Some("mount"),
            persistent_volume: Some("pv-data".into()),
            claim_uid: None,
        };
        let path = locate(root.path(), "uid-1", &csi)?;
        assert!(path.ends_with("kubernetes.io~csi/pv-data/mount"));
        // Not in the mount table: refused, because an unmounted volume looks empty.
        assert!(matches!(
            check_mounted(&path, &csi, &[]),
            Err(ResolveError::NotMounted { .. })
        ));
        let mountinfo = format!(
            "36 35 98:0 / {} rw,noatime master:1 - ext4 /dev/root rw\n",
            path.display()
        );
        check_mounted(&path, &csi, &mount_points(&mountinfo))?;

        // An in-tree PV of unknown plugin is searched across plugin directories.
        let local = VolumePlan {
            plugin: None,
            mount_suffix: None,
            kind: VolumeSourceKind::PersistentVolume,
            dir_name: "pv-local".into(),
            ..csi.clone()
        };
        assert!(
            locate(root.path(), "uid-1", &local)?.ends_with("kubernetes.io~local-volume/pv-local")
        );
        std::fs::create_dir_all(pods.join("kubernetes.io~other/pv-local"))?;
        assert!(matches!(
            locate(root.path(), "uid-1", &local),
            Err(ResolveError::Ambiguous { count: 2, .. })
        ));
        assert!(matches!(
            locate(root.path(), "uid-2", &csi),
            Err(ResolveError::NotFound { .. })
        ));
        let empty_dir = VolumePlan {
            kind: VolumeSourceKind::EmptyDir,
            plugin: Some("kubernetes.io~empty-dir".into()),
            dir_name: "cache".into(),
            mount_suffix: None,
            ..csi
        };
        let p = locate(root.path(), "uid-1", &empty_dir)?;
        check_mounted(&p, &empty_dir, &[])?;
        Ok(())
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let line = "1 2 0:1 / /var/lib/kubelet/pods/u/volumes/x/my\\040dir rw - tmpfs t rw";
        assert_eq!(
            mount_points(line),
            vec![PathBuf::from("/var/lib/kubelet/pods/u/volumes/x/my dir")]
        );
    }
}
