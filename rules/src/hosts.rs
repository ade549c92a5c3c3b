//! Stash's host names (the restic `--host` of each backed-up replica) and which pod volumes a
//! target's `volumeMounts` and `paths` select. The operator plans with these; the agent's
//! sidecar mode will name its host with the same function.

use k8s_openapi::api::core::v1::{Pod, VolumeMount};
use stash_api::labels::DEFAULT_HOST;

/// The host a pod of a target backs up as (STASH-API.md §4.4): a Deployment, ReplicaSet,
/// ReplicationController or standalone PVC is one host (`host-0` or the alias); a StatefulSet
/// replica is `host-<ordinal>` (`<alias>-<ordinal>`); a DaemonSet pod is its node's name
/// (`<alias>-<node>`).
pub fn host_name(
    target_kind: &str,
    alias: Option<&str>,
    pod_name: &str,
    node_name: &str,
) -> String {
    let alias = alias.filter(|a| !a.is_empty());
    match target_kind {
        "StatefulSet" => {
            let ordinal = ordinal(pod_name).map_or_else(|| "0".to_owned(), |o| o.to_string());
            match alias {
                Some(a) => format!("{a}-{ordinal}"),
                None => format!("host-{ordinal}"),
            }
        }
        "DaemonSet" => match alias {
            Some(a) => format!("{a}-{node_name}"),
            None => node_name.to_owned(),
        },
        _ => alias.unwrap_or(DEFAULT_HOST).to_owned(),
    }
}

/// The ordinal at the end of a StatefulSet pod's name (`web-2` → 2).
pub fn ordinal(pod_name: &str) -> Option<u32> {
    pod_name.rsplit_once('-')?.1.parse().ok()
}

/// One pod volume to back up, and the directories inside it (all of it when empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectedVolume {
    pub volume: String,
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("the target names neither volumeMounts nor paths, so there is nothing to back up")]
    NothingSelected,
    #[error("path {path} is not absolute; target paths are paths inside the pod's containers")]
    RelativePath { path: String },
    #[error("path {path} is not on any volume mounted in pod {pod}")]
    NotOnAVolume { path: String, pod: String },
    #[error("pod {pod} has no volume named {volume}")]
    NoSuchVolume { pod: String, volume: String },
}

fn trim_slashes(p: &str) -> &str {
    p.trim_matches('/')
}

/// The volumes a target selects in one pod. `paths` are container paths: each is mapped to the
/// mount that holds it (from the target's `volumeMounts`, or else the pod's own containers) and
/// becomes a directory inside that volume. Without `paths`, every volume of the target's
/// `volumeMounts` is backed up whole (its `subPath` if it has one).
pub fn select_volumes(
    pod: &Pod,
    volume_mounts: &[VolumeMount],
    paths: &[String],
) -> Result<Vec<SelectedVolume>, SelectError> {
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let declared = |v: &str| {
        spec.and_then(|s| s.volumes.as_ref())
            .is_some_and(|vs| vs.iter().any(|x| x.name == v))
    };
    for m in volume_mounts {
        if !declared(&m.name) {
            return Err(SelectError::NoSuchVolume {
                pod: pod_name,
                volume: m.name.clone(),
            });
        }
    }
    let pod_mounts: Vec<VolumeMount> = spec
        .map(|s| {
            s.containers
                .iter()
                .flat_map(|c| c.volume_mounts.iter().flatten().cloned())
                .collect()
        })
        .unwrap_or_default();
    let mounts = if volume_mounts.is_empty() {
        &pod_mounts[..]
    } else {
        volume_mounts
    };
    // Per volume: None = the whole volume, Some(dirs) = only those.
    let mut out: Vec<(String, Option<Vec<String>>)> = Vec::new();
    let mut add = |volume: &str, dir: String| {
        let i = match out.iter().position(|(v, _)| v == volume) {
            Some(i) => i,
            None => {
                out.push((volume.to_owned(), Some(Vec::new())));
                out.len() - 1
            }
        };
        let entry = &mut out[i].1;
        if dir.is_empty() {
            *entry = None;
        } else if let Some(dirs) = entry
            && !dirs.contains(&dir)
        {
            dirs.push(dir);
        }
    };
    if paths.is_empty() {
        if volume_mounts.is_empty() {
            return Err(SelectError::NothingSelected);
        }
        for m in volume_mounts {
            add(
                &m.name,
                trim_slashes(m.sub_path.as_deref().unwrap_or("")).to_owned(),
            );
        }
    }
    for path in paths {
        if !path.starts_with('/') {
            return Err(SelectError::RelativePath { path: path.clone() });
        }
        let path_t = trim_slashes(path);
        let best = mounts
            .iter()
            .filter_map(|m| {
                let mp = trim_slashes(&m.mount_path);
                let rest = if mp.is_empty() {
                    Some(path_t)
                } else if path_t == mp {
                    Some("")
                } else {
                    path_t.strip_prefix(mp).and_then(|r| r.strip_prefix('/'))
                };
                rest.map(|r| (mp.len(), m, r))
            })
            .max_by_key(|(len, _, _)| *len);
        let Some((_, m, rest)) = best else {
            return Err(SelectError::NotOnAVolume {
                path: path.clone(),
                pod: pod_name,
            });
        };
        if !declared(&m.name) {
            return Err(SelectError::NoSuchVolume {
                pod: pod_name,
                volume: m.name.clone(),
            });
        }
        let sub = trim_slashes(m.sub_path.as_deref().unwrap_or(""));
        let dir = match (sub.is_empty(), rest.is_empty()) {
            (true, _) => rest.to_owned(),
            (false, true) => sub.to_owned(),
            (false, false) => format!("{sub}/{rest}"),
        };
        add(&m.name, dir);
    }
    Ok(out
        .into_iter()
        .map(|(volume, dirs)| SelectedVolume {
            volume,
            paths: dirs.unwrap_or_default(),
        })
        .collect())
}

/// Where a pod's containers see a volume: the target's own `volumeMounts` entry for it, or
/// else the first container mount of it, as Stash's users name the path in restore rules.
pub fn mount_path_of(pod: &Pod, volume_mounts: &[VolumeMount], volume: &str) -> Option<String> {
    volume_mounts
        .iter()
        .chain(
            pod.spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.volume_mounts.iter().flatten()),
        )
        .find(|m| m.name == volume)
        .map(|m| m.mount_path.clone())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::core::v1::{Container, EmptyDirVolumeSource, PodSpec, Volume};

    fn mount(name: &str, path: &str, sub: Option<&str>) -> VolumeMount {
        VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            sub_path: sub.map(Into::into),
            ..VolumeMount::default()
        }
    }

    fn pod(mounts: Vec<VolumeMount>) -> Pod {
        let volumes = mounts
            .iter()
            .map(|m| Volume {
                name: m.name.clone(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            })
            .collect();
        let mut p = Pod::default();
        p.metadata.name = Some("app-0".into());
        p.spec = Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                volume_mounts: Some(mounts),
                ..Container::default()
            }],
            volumes: Some(volumes),
            ..PodSpec::default()
        });
        p
    }

    #[test]
    fn hosts_follow_stash() {
        assert_eq!(host_name("Deployment", None, "app-x-y", "n1"), "host-0");
        assert_eq!(host_name("Deployment", Some("db"), "app-x-y", "n1"), "db");
        assert_eq!(host_name("StatefulSet", None, "web-2", "n1"), "host-2");
        assert_eq!(
            host_name("StatefulSet", Some("db"), "web-12", "n1"),
            "db-12"
        );
        assert_eq!(host_name("DaemonSet", None, "ds-abc", "node-1"), "node-1");
        assert_eq!(
            host_name("DaemonSet", Some("x"), "ds-abc", "node-1"),
            "x-node-1"
        );
        assert_eq!(ordinal("web-10"), Some(10));
        assert_eq!(ordinal("web"), None);
    }

    #[test]
    fn paths_map_to_the_volume_that_holds_them() {
        let p = pod(vec![
            mount("data", "/source/data", None),
            mount("logs", "/var/log/app", Some("app")),
        ]);
        let sel = select_volumes(
            &p,
            &[],
            &["/source/data".into(), "/var/log/app/today/".into()],
        )
        .unwrap();
        assert_eq!(
            sel,
            vec![
                SelectedVolume {
                    volume: "data".into(),
                    paths: vec![]
                },
                SelectedVolume {
                    volume: "logs".into(),
                    paths: vec!["app/today".into()]
                },
            ]
        );
        // A whole volume wins over a sub-directory of it.
        let sel =
            select_volumes(&p, &[], &["/source/data/a".into(), "/source/data".into()]).unwrap();
        assert_eq!(sel[0].paths, Vec::<String>::new());
        assert_eq!(
            select_volumes(&p, &[], &["/etc".into()]),
            Err(SelectError::NotOnAVolume {
                path: "/etc".into(),
                pod: "app-0".into()
            })
        );
        assert_eq!(
            select_volumes(&p, &[], &["data".into()]),
            Err(SelectError::RelativePath {
                path: "data".into()
            })
        );
    }

    #[test]
    fn volume_mounts_alone_select_whole_volumes() {
        let p = pod(vec![mount("data", "/data", None)]);
        let sel = select_volumes(&p, &[mount("data", "/anywhere", None)], &[]).unwrap();
        assert_eq!(
            sel,
            vec![SelectedVolume {
                volume: "data".into(),
                paths: vec![]
            }]
        );
        assert_eq!(
            select_volumes(&p, &[], &[]),
            Err(SelectError::NothingSelected)
        );
        assert!(matches!(
            select_volumes(&p, &[mount("nope", "/x", None)], &[]),
            Err(SelectError::NoSuchVolume { .. })
        ));
    }
}
