//! The agent's error type: one variant per kind of action that failed, each with a fixed
//! category (metric label, condition reason) and whether trying again later can help.

use crate::extract::Failure;
use crate::hostpath::ResolveError;
use crate::pattern::PatternError;
use crate::stream::StreamError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Restic(#[from] restic_wrapper::Error),
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// A request to the Kubernetes API.
    #[error("failed to {action}: {source}")]
    Kube {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("failed to resolve the volume: {0}")]
    Resolve(#[from] ResolveError),
    /// The repository's snapshot listing (which decides parents and `latest`) could not be
    /// read: never taken for "no snapshots".
    #[error("failed to list the snapshots: {0}")]
    ListSnapshots(#[source] restic_wrapper::NativeError),
    /// A snapshot's index, trees or data could not be read by the agent's own reader.
    #[error("failed to read the snapshot from the repository: {0}")]
    ReadSnapshot(#[source] restic_wrapper::NativeError),
    /// The assignment or command asks for something the agent cannot do; it fails at once
    /// and says what to change.
    #[error("failed to accept the {what}: {reason}")]
    InvalidSpec { what: &'static str, reason: String },
    /// The Repository object or its Secret cannot be used as they are.
    #[error("failed to use the repository: {reason}")]
    InvalidRepository { reason: String },
    /// A local file operation of the agent (scratch directories, pipes).
    #[error("failed to {action}: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The agent's own machinery (a thread, a task) failed: a bug or resource exhaustion.
    #[error("failed to {action}: {reason}")]
    Other {
        action: &'static str,
        reason: String,
    },
    #[error("snapshot {0} not found")]
    NoSnapshot(String),
    /// An include or exclude pattern that cannot be parsed or can match nothing.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// Some entries of a restore could not be written; the rest were, and each failure is
    /// named: a user has to fix each.
    #[error("failed to restore {}: {}", failed_count(failed), failed_list(failed))]
    RestoreIncomplete { failed: Vec<Failure> },
    #[error("failed to restore anything: no entry of the snapshot matches {patterns:?}")]
    NothingMatched { patterns: Vec<String> },
    /// A stream snapshot whose agent died mid-backup: it lacks the stream's data.
    #[error(
        "failed to restore snapshot {0}: it is incomplete (the agent that made it died \
         mid-backup); restore an earlier one"
    )]
    IncompleteSnapshot(String),
}

fn failed_count(failed: &[Failure]) -> String {
    match failed.len() {
        1 => "1 entry".into(),
        n => format!("{n} entries"),
    }
}

fn failed_list(failed: &[Failure]) -> String {
    failed
        .iter()
        .map(|f| format!("{}: {}", f.path, f.error))
        .collect::<Vec<_>>()
        .join("; ")
}

impl AgentError {
    pub fn kube(action: &'static str) -> impl Fn(kube::Error) -> AgentError {
        move |source| AgentError::Kube { action, source }
    }

    pub fn invalid(what: &'static str, reason: impl Into<String>) -> AgentError {
        AgentError::InvalidSpec {
            what,
            reason: reason.into(),
        }
    }

    /// A short fixed name for metrics, Event reasons and the status.
    pub fn category(&self) -> &'static str {
        match self {
            AgentError::Restic(e) => e.category(),
            AgentError::Stream(StreamError::Read { .. }) => "read",
            AgentError::Stream(StreamError::Unsafe { .. }) => "unsafe-path",
            AgentError::Stream(_) => "stream",
            AgentError::Kube { .. } => "kubernetes-api",
            AgentError::Resolve(_) => "resolve",
            AgentError::ListSnapshots(restic_wrapper::NativeError::WrongPassword) => {
                "wrong-password"
            }
            AgentError::ListSnapshots(restic_wrapper::NativeError::NotFound(_)) => {
                "repository-not-found"
            }
            AgentError::ListSnapshots(_) => "list-snapshots",
            AgentError::ReadSnapshot(_) => "read-snapshot",
            AgentError::InvalidSpec { .. } => "invalid-spec",
            AgentError::InvalidRepository { .. } => "invalid-config",
            AgentError::Io { .. } => "io",
            AgentError::Other { .. } => "internal",
            AgentError::NoSnapshot(_) => "not-found",
            AgentError::Pattern(e) => e.category(),
            AgentError::RestoreIncomplete { .. } => "restore-incomplete",
            AgentError::NothingMatched { .. } => "bad-pattern",
            AgentError::IncompleteSnapshot(_) => "incomplete-snapshot",
        }
    }

    /// Whether the same work may succeed later without anyone changing anything: a lock
    /// another process holds, a backend or API server that does not answer, a volume the
    /// kubelet has not mounted yet. A wrong password, a missing repository or a spec the
    /// agent cannot carry out stay as they are until someone fixes them.
    pub fn is_retryable(&self) -> bool {
        match self {
            AgentError::Restic(e) => e.is_retryable(),
            AgentError::Kube { source, .. } => kube_retryable(source),
            // A claim that is binding, or a read of the node's tree that failed. A volume
            // missing or not mounted on this node stays so for this assignment: the pod runs
            // elsewhere, or the plan is stale.
            AgentError::Resolve(e) => matches!(
                e,
                ResolveError::ClaimNotBound { .. } | ResolveError::Io { .. }
            ),
            AgentError::ListSnapshots(e) | AgentError::ReadSnapshot(e) => e.is_retryable(),
            AgentError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
            ),
            AgentError::Stream(_)
            | AgentError::InvalidSpec { .. }
            | AgentError::InvalidRepository { .. }
            | AgentError::Other { .. }
            | AgentError::NoSnapshot(_) => false,
            AgentError::Pattern(e) => e.is_retryable(),
            // What stopped those entries (ENOSPC, an immutable file) needs someone to act.
            AgentError::RestoreIncomplete { .. } | AgentError::NothingMatched { .. } => false,
            AgentError::IncompleteSnapshot(_) => false,
        }
    }
}

/// Server errors, throttling, conflicts and a connection that failed are worth another try;
/// what the server refused (not found, forbidden, invalid) is not.
fn kube_retryable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => {
            status.code >= 500 || status.code == 429 || status.code == 409 || status.code == 0
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> AgentError {
        AgentError::Kube {
            action: "read the pod",
            source: kube::Error::Api(
                kube::core::Status::failure("x", "y")
                    .with_code(code)
                    .boxed(),
            ),
        }
    }

    #[test]
    fn retryable_errors_are_the_transient_ones() {
        for code in [500, 503, 429, 409] {
            assert!(api(code).is_retryable(), "{code}");
        }
        for code in [400, 403, 404, 422] {
            assert!(!api(code).is_retryable(), "{code}");
        }
        assert_eq!(api(503).category(), "kubernetes-api");
        let locked = AgentError::Restic(restic_wrapper::Error::Locked {
            action: "back up",
            holder: None,
            message: String::new(),
        });
        assert!(locked.is_retryable());
        let wrong = AgentError::Restic(restic_wrapper::Error::WrongPassword { action: "back up" });
        assert!(!wrong.is_retryable());
        assert_eq!(wrong.category(), "wrong-password");
        let missing = AgentError::ListSnapshots(restic_wrapper::NativeError::WrongPassword);
        assert!(!missing.is_retryable());
        let spec = AgentError::invalid("assignment", "bad");
        assert!(!spec.is_retryable());
        assert_eq!(spec.category(), "invalid-spec");
        assert_eq!(spec.to_string(), "failed to accept the assignment: bad");
        let unmounted = AgentError::Resolve(ResolveError::NotMounted {
            volume: "v".into(),
            path: "p".into(),
        });
        assert!(!unmounted.is_retryable());
        assert_eq!(unmounted.category(), "resolve");
    }
}
