//! Where the kubelet keeps a pod's volumes on the node, and whether what is there is really the
//! volume. Planning is pure (pod, claims and volumes in, a plan out); locating and the mount
//! check read the filesystem, with the mount table passed in so tests can supply their own.
//!
//! Layout: `<kubelet-root>/pods/<pod-uid>/volumes/<plugin>/<dir>` where `<plugin>` is the
//! plugin name with `/` escaped as `~` (`kubernetes.io~empty-dir`, `kubernetes.io~csi`, …) and
//! `<dir>` is the volume name (emptyDir, inline CSI) or the PV name (persistent volumes; CSI
//! ones add `/mount`). Block volumes live under `volumeDevices/` instead.

use std::path::{Path, PathBuf};

use stash_api::assignment::VolumeSourceKind;
pub use stash_rules::volumes::{ResolveError, VolumePlan, plan_volume};

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

/// Decodes mountinfo's octal escapes (`\040` for a space).
pub(crate) fn unescape_octal(s: &str) -> String {
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
        EphemeralVolumeSource, HostPathVolumeSource, NFSVolumeSource, PersistentVolume,
        PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource,
        PersistentVolumeSpec, Pod, PodSpec, SecretVolumeSource, Volume, VolumeDevice,
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
