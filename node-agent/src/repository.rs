//! A Stash Repository and its storage Secret, turned into what restic-wrapper needs.

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Secret;
use restic_wrapper::{Backend, Secrets};
use stash_api::common::Backend as StashBackend;

use crate::engine::AgentError;

fn invalid(reason: String) -> AgentError {
    AgentError::InvalidRepository { reason }
}

/// The restic backend of a Repository's `spec.backend`. A local repository is reachable
/// from the node only when it lives on a host path; other volume kinds need the job model.
pub fn backend(spec: &StashBackend) -> Result<Backend, AgentError> {
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
    if let Some(local) = &spec.local {
        return match &local.host_path {
            Some(hp) => {
                let mut path = PathBuf::from(&hp.path);
                if let Some(sub) = local.sub_path.as_deref().filter(|s| !s.is_empty()) {
                    path.push(sub.trim_start_matches('/'));
                }
                Ok(Backend::Local { path })
            }
            None => Err(invalid(
                "a local repository on a volume other than hostPath is not reachable from the \
                 node agent; use executor: job"
                    .into(),
            )),
        };
    }
    Err(invalid("the repository names no backend".into()))
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
