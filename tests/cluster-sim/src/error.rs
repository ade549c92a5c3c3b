//! The crate's one error type: every failure names the action that failed, says whether a
//! later pass may succeed, and carries a static category for logs.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    #[error("failed to {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start kube-sim: {0}")]
    StartApiServer(#[from] kube_sim::StartError),
    #[error("failed to build a client for kube-sim: {0}")]
    BuildClient(#[from] kube_sim::ClientError),
    #[error("failed to {action}: {message}")]
    Invalid {
        action: &'static str,
        message: String,
    },
}

impl Error {
    pub fn kube(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Self {
        let action = action.into();
        move |source| Self::Kube { action, source }
    }

    pub fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }

    pub fn category(&self) -> &'static str {
        match self {
            Self::Kube { .. } => "api",
            Self::Io { .. } => "io",
            Self::StartApiServer(_) | Self::BuildClient(_) => "start",
            Self::Invalid { .. } => "invalid",
        }
    }

    /// API errors (conflicts from stale reads above all) and IO errors clear up on a later
    /// pass; a start failure or an object the simulation cannot act on does not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Kube { .. } | Self::Io { .. })
    }

    /// Whether the API answered 404 (the object went away between a list and a write).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Kube { source: kube::Error::Api(s), .. } if s.code == 404)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
