//! The operator's errors: named after the failed action, each with a fixed category (a metric
//! label and Event reason) and whether trying again can help. Permanent errors become a
//! condition and wait for the object to change; transient ones are retried with backoff.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to render the CRD {name}: {source}")]
    RenderCrd {
        name: String,
        source: serde_yaml::Error,
    },
    #[error("failed to write to the output: {0}")]
    Write(std::io::Error),
    #[error("failed to {action}: {source}")]
    Kube {
        action: &'static str,
        source: kube::Error,
    },
    #[error("failed to {action}: {source}")]
    Restic {
        action: &'static str,
        source: Box<restic_wrapper::Error>,
    },
    #[error("failed to {action}: {reason}")]
    Invalid {
        action: &'static str,
        reason: String,
    },
    #[error("failed to serve {what} on port {port}: {source}")]
    Serve {
        what: &'static str,
        port: u16,
        source: std::io::Error,
    },
    #[error("failed to {action}: {source}")]
    Io {
        action: &'static str,
        source: std::io::Error,
    },
    #[error("lost the leader Lease {lease}: another replica took over")]
    LostLeadership { lease: String },
    #[error("failed to read the cache of {what}: its watch stopped")]
    CacheStopped { what: &'static str },
    #[error("timed out waiting for the CRD {name} to be established")]
    CrdsNotEstablished { name: String },
}

impl Error {
    pub fn kube(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Kube { action, source }
    }

    pub fn restic(action: &'static str) -> impl FnOnce(restic_wrapper::Error) -> Error {
        move |source| Error::Restic {
            action,
            source: Box::new(source),
        }
    }

    pub fn category(&self) -> &'static str {
        match self {
            Error::RenderCrd { .. } | Error::Write(_) => "output",
            Error::Kube { .. } => "kubernetes",
            Error::Restic { source, .. } => source.category(),
            Error::Invalid { .. } => "invalid",
            Error::Serve { .. } | Error::Io { .. } => "io",
            Error::LostLeadership { .. } => "leadership",
            Error::CrdsNotEstablished { .. } => "crds",
            Error::CacheStopped { .. } => "cache",
        }
    }

    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Kube { source, .. } => match source {
                kube::Error::Api(s) => s.code >= 500 || s.code == 409 || s.code == 429,
                _ => true,
            },
            Error::Restic { source, .. } => source.is_retryable(),
            Error::Io { .. } | Error::CrdsNotEstablished { .. } | Error::CacheStopped { .. } => {
                true
            }
            _ => false,
        }
    }
}

/// Whether a Kubernetes error is "not found".
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Whether a Kubernetes error is "already exists".
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}
