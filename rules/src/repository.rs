//! A Stash Repository's `spec.backend` and its storage Secret, turned into what restic-wrapper
//! needs, so that the operator (which initialises repositories and applies retention) and the
//! node agent (which backs up into them) reach the same repository.

use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use restic_wrapper::{Backend, Secrets};
use stash_api::common::Backend as StashBackend;

/// The key of the repository password in the storage Secret.
pub const PASSWORD_KEY: &str = "RESTIC_PASSWORD";

/// The tag prefix that names a volume's snapshot key (its stable identity) on its snapshots.
pub const TAG_KEY_PREFIX: &str = "stash.key=";

/// The tag that names a volume's key on its snapshots: the agent writes it, retention groups
/// by it.
pub fn key_tag(key: &str) -> String {
    // restic separates tags with commas; keep the key one tag.
    format!("{TAG_KEY_PREFIX}{}", key.replace(',', "_"))
}

/// Why a Repository cannot be used as written. Never retryable: the spec or the Secret must
/// change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRepository {
    #[error("the repository names no backend (one of s3, gcs, azure, b2, swift, rest, local)")]
    NoBackend,
    #[error("the repository names {0} backends; exactly one is allowed")]
    SeveralBackends(usize),
    #[error(
        "a local repository on a volume other than hostPath is not reachable from the node \
         agent; use executor: job"
    )]
    LocalNotHostPath,
    #[error(
        "the local repository {path} is not under a host directory mounted into the operator \
         and the node agents ({mounted}); list its directory in the chart value \
         localRepositories.hostPaths, or use an object-store backend"
    )]
    LocalNotMounted { path: String, mounted: String },
    #[error("the local repository's hostPath {path} must be absolute, without `..`")]
    LocalPathNotPlain { path: String },
    #[error("the repository names no storageSecretName")]
    NoSecretName,
    #[error("the storage Secret {secret} has no key {key}")]
    MissingKey { secret: String, key: &'static str },
}

fn count_backends(spec: &StashBackend) -> usize {
    [
        spec.s3.is_some(),
        spec.gcs.is_some(),
        spec.azure.is_some(),
        spec.b2.is_some(),
        spec.swift.is_some(),
        spec.rest.is_some(),
        spec.local.is_some(),
    ]
    .into_iter()
    .filter(|b| *b)
    .count()
}

/// The restic backend of a Repository's `spec.backend`. A local repository is reachable
/// from the node only when it lives on a host path; other volume kinds need the job model.
pub fn backend(spec: &StashBackend) -> Result<Backend, InvalidRepository> {
    match count_backends(spec) {
        0 => return Err(InvalidRepository::NoBackend),
        1 => {}
        n => return Err(InvalidRepository::SeveralBackends(n)),
    }
    let prefix = |p: &Option<String>| p.clone().unwrap_or_default();
    if let Some(s3) = &spec.s3 {
        return Ok(Backend::S3 {
            endpoint: s3.endpoint.clone(),
            bucket: s3.bucket.clone(),
            prefix: prefix(&s3.prefix),
            region: s3.region.clone(),
            insecure_tls: s3.insecure_tls.unwrap_or(false),
        });
    }
    let conns = |n: Option<i64>| n.and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0);
    if let Some(g) = &spec.gcs {
        return Ok(Backend::Gcs {
            bucket: g.bucket.clone(),
            prefix: prefix(&g.prefix),
            max_connections: conns(g.max_connections),
        });
    }
    if let Some(a) = &spec.azure {
        return Ok(Backend::Azure {
            container: a.container.clone(),
            prefix: prefix(&a.prefix),
            max_connections: conns(a.max_connections),
        });
    }
    if let Some(b) = &spec.b2 {
        return Ok(Backend::B2 {
            bucket: b.bucket.clone(),
            prefix: prefix(&b.prefix),
            max_connections: conns(b.max_connections),
        });
    }
    if let Some(s) = &spec.swift {
        return Ok(Backend::Swift {
            container: s.container.clone(),
            prefix: prefix(&s.prefix),
        });
    }
    if let Some(r) = &spec.rest {
        return Ok(Backend::Rest { url: r.url.clone() });
    }
    match spec
        .local
        .as_ref()
        .and_then(|l| l.host_path.as_ref().map(|hp| (l, hp)))
    {
        Some((local, hp)) => {
            let mut path = PathBuf::from(&hp.path);
            if let Some(sub) = local.sub_path.as_deref().filter(|s| !s.is_empty()) {
                path.push(sub.trim_start_matches('/'));
            }
            Ok(Backend::Local { path })
        }
        None => Err(InvalidRepository::LocalNotHostPath),
    }
}

/// Whether the operator and the node agents can reach a local repository: its directory
/// must lie under one of the host directories the chart mounts into both at the same path
/// (`roots`). Anything else would be the container's own filesystem, where `restic init`
/// makes a repository nobody else sees. Other backends are always reachable from here.
pub fn check_reachable(backend: &Backend, roots: &[PathBuf]) -> Result<(), InvalidRepository> {
    let Backend::Local { path } = backend else {
        return Ok(());
    };
    let plain = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !plain {
        return Err(InvalidRepository::LocalPathNotPlain {
            path: path.display().to_string(),
        });
    }
    // Component-wise: `/repos-other` is not under `/repos`.
    if roots.iter().any(|r| path.starts_with(r)) {
        return Ok(());
    }
    let mounted = if roots.is_empty() {
        "none is".to_owned()
    } else {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        format!("mounted: {}", list.join(", "))
    };
    Err(InvalidRepository::LocalNotMounted {
        path: path.display().to_string(),
        mounted,
    })
}

/// Why a host on `node` cannot back up into a hostPath repository kept on `repository_node`
/// (the node the operator runs on, which initialised it and applies its retention).
pub fn other_node_message(path: &Path, repository_node: &str, node: &str) -> String {
    format!(
        "the local repository {} is a hostPath, a different directory on every node; the \
         operator keeps it on node {repository_node}, and this pod runs on node {node}: pin the \
         workload to node {repository_node} (nodeSelector kubernetes.io/hostname), or use an \
         NFS or object-store repository",
        path.display()
    )
}

/// The name of the storage Secret.
pub fn secret_name(spec: &StashBackend) -> Result<&str, InvalidRepository> {
    spec.storage_secret_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .ok_or(InvalidRepository::NoSecretName)
}

/// The storage Secret's keys.
pub fn secrets(secret: &Secret) -> Secrets {
    let mut out = Secrets::new();
    for (k, v) in secret.data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    for (k, v) in secret.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}

/// The storage Secret's keys, checked to hold what every repository needs: the password.
/// Provider credentials stay optional, as in Stash: a pod may get them from its identity.
pub fn checked_secrets(secret: &Secret) -> Result<Secrets, InvalidRepository> {
    let out = secrets(secret);
    if out.get(PASSWORD_KEY).is_none_or(|v| v.expose().is_empty()) {
        return Err(InvalidRepository::MissingKey {
            secret: secret.metadata.name.clone().unwrap_or_default(),
            key: PASSWORD_KEY,
        });
    }
    Ok(out)
}

/// The backend's labels for Stash's repository metrics: provider, bucket and prefix.
pub fn metric_location(spec: &StashBackend) -> (String, String, String) {
    let p = |s: &Option<String>| s.clone().unwrap_or_default();
    let provider = spec
        .provider()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let (bucket, prefix) = if let Some(s) = &spec.s3 {
        (s.bucket.clone(), p(&s.prefix))
    } else if let Some(g) = &spec.gcs {
        (g.bucket.clone(), p(&g.prefix))
    } else if let Some(a) = &spec.azure {
        (a.container.clone(), p(&a.prefix))
    } else if let Some(b) = &spec.b2 {
        (b.bucket.clone(), p(&b.prefix))
    } else if let Some(s) = &spec.swift {
        (s.container.clone(), p(&s.prefix))
    } else if let Some(l) = &spec.local {
        (l.mount_path.clone(), p(&l.sub_path))
    } else {
        (String::new(), String::new())
    };
    (provider, bucket, prefix)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::ByteString;
    use stash_api::common::{GcsSpec, S3Spec};

    #[test]
    fn exactly_one_backend_is_accepted() {
        assert_eq!(
            backend(&StashBackend::default()),
            Err(InvalidRepository::NoBackend)
        );
        let both = StashBackend {
            s3: Some(S3Spec::default()),
            gcs: Some(GcsSpec::default()),
            ..StashBackend::default()
        };
        assert_eq!(backend(&both), Err(InvalidRepository::SeveralBackends(2)));
        let s3 = StashBackend {
            s3: Some(S3Spec {
                endpoint: "http://s3:9000".into(),
                bucket: "b".into(),
                prefix: Some("p".into()),
                ..S3Spec::default()
            }),
            ..StashBackend::default()
        };
        assert!(
            matches!(backend(&s3), Ok(Backend::S3 { bucket, prefix, .. }) if bucket == "b" && prefix == "p")
        );
        assert_eq!(metric_location(&s3), ("s3".into(), "b".into(), "p".into()));
    }

    #[test]
    fn a_local_repository_must_be_under_a_mounted_root() {
        let local = |p: &str| Backend::Local { path: p.into() };
        let roots = [PathBuf::from("/var/lib/stash-repos")];
        assert_eq!(
            check_reachable(&local("/var/lib/stash-repos/demo/app"), &roots),
            Ok(())
        );
        assert_eq!(
            check_reachable(&local("/var/lib/stash-repos"), &roots),
            Ok(())
        );
        // A sibling with the root as a string prefix is not under it.
        assert!(matches!(
            check_reachable(&local("/var/lib/stash-repos-x/a"), &roots),
            Err(InvalidRepository::LocalNotMounted { .. })
        ));
        assert!(matches!(
            check_reachable(&local("/var/lib/stash-repos/../../etc"), &roots),
            Err(InvalidRepository::LocalPathNotPlain { .. })
        ));
        assert!(matches!(
            check_reachable(&local("relative/repo"), &roots),
            Err(InvalidRepository::LocalPathNotPlain { .. })
        ));
        let none = check_reachable(&local("/data/repo"), &[]).unwrap_err();
        assert!(none.to_string().contains("none is"), "{none}");
        assert!(
            none.to_string().contains("localRepositories.hostPaths"),
            "{none}"
        );
        let s3 = Backend::S3 {
            endpoint: "http://s3".into(),
            bucket: "b".into(),
            prefix: String::new(),
            region: None,
            insecure_tls: false,
        };
        assert_eq!(check_reachable(&s3, &[]), Ok(()));
    }

    #[test]
    fn the_password_key_is_required() {
        let mut secret = Secret::default();
        secret.metadata.name = Some("creds".into());
        assert_eq!(
            checked_secrets(&secret).err(),
            Some(InvalidRepository::MissingKey {
                secret: "creds".into(),
                key: PASSWORD_KEY
            })
        );
        secret.data = Some([(PASSWORD_KEY.to_owned(), ByteString(b"pw".to_vec()))].into());
        assert!(checked_secrets(&secret).is_ok());
    }
}
