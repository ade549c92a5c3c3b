//! Errors of restic commands: exit codes and stderr mapped to what went wrong, each saying
//! whether retrying can help.

use std::path::PathBuf;

/// Who holds a lock that stopped a command, as restic reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockHolder {
    pub pid: Option<u32>,
    pub host: Option<String>,
    pub user: Option<String>,
    pub exclusive: bool,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("failed to start {program}: {source}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("failed to {action}: {source}")]
    Io {
        action: &'static str,
        source: std::io::Error,
    },
    #[error("failed to write {path}: {source}")]
    WriteScratchFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("restic {found} is too old: at least {minimum} is required")]
    UnsupportedVersion { found: String, minimum: String },
    #[error("failed to read the restic version from {output:?}")]
    UnknownVersion { output: String },
    #[error("the secret has no {key} key")]
    MissingSecret { key: &'static str },
    #[error("failed to {action}: {reason}")]
    InvalidOptions {
        action: &'static str,
        reason: &'static str,
    },
    #[error("invalid repository {repository:?}: {reason}")]
    InvalidRepository { repository: String, reason: String },
    #[error("failed to {action}: wrong password or no key found for the repository")]
    WrongPassword { action: &'static str },
    #[error("failed to {action}: the repository {repository} does not exist")]
    RepositoryNotFound {
        action: &'static str,
        repository: String,
    },
    #[error("failed to {action}: the repository is locked{}", holder_text(.holder))]
    Locked {
        action: &'static str,
        holder: Option<LockHolder>,
        message: String,
    },
    #[error(
        "backup incomplete: {} file(s) could not be read{}",
        .unreadable.len(),
        .snapshot_id.as_deref().map(|id| format!(" (snapshot {id} is partial)")).unwrap_or_default()
    )]
    IncompleteBackup {
        /// restic saved a snapshot without the unreadable files.
        snapshot_id: Option<String>,
        unreadable: Vec<String>,
    },
    #[error("failed to {action}: the backend failed: {message}")]
    Backend {
        action: &'static str,
        message: String,
        retryable: bool,
    },
    #[error("failed to {action}: restic was interrupted")]
    Interrupted { action: &'static str },
    #[error("failed to {action}: no result after {}s{}", .after.as_secs(), tail_text(.stderr))]
    TimedOut {
        action: &'static str,
        after: std::time::Duration,
        stderr: String,
    },
    #[error("failed to {action}: the input stream failed: {source}")]
    Input {
        action: &'static str,
        source: std::io::Error,
    },
    #[error("failed to {action}: restic exited with {code:?}: {stderr}")]
    Failed {
        action: &'static str,
        code: Option<i32>,
        /// The tail of stderr, with secrets removed.
        stderr: String,
    },
    #[error("failed to parse the output of {action}: {reason}")]
    Parse {
        action: &'static str,
        reason: String,
    },
    #[error("failed to read the repository: {0}")]
    Native(#[from] crate::native::NativeError),
}

fn tail_text(stderr: &str) -> String {
    match stderr.lines().last() {
        Some(line) if !line.is_empty() => format!(": {line}"),
        _ => String::new(),
    }
}

fn holder_text(holder: &Option<LockHolder>) -> String {
    match holder {
        Some(LockHolder {
            pid, host, user, ..
        }) => format!(
            " by PID {} on {} by {}",
            pid.map(|p| p.to_string()).unwrap_or_else(|| "?".into()),
            host.as_deref().unwrap_or("?"),
            user.as_deref().unwrap_or("?")
        ),
        None => String::new(),
    }
}

impl Error {
    /// Whether running the same command again later can succeed without anyone changing
    /// anything: locks go away, backends come back, interruptions are not permanent.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Locked { .. } | Error::Interrupted { .. } | Error::TimedOut { .. } => true,
            Error::Backend { retryable, .. } => *retryable,
            Error::Io { .. } => true,
            Error::Native(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// A short fixed name for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Spawn { .. }
            | Error::UnsupportedVersion { .. }
            | Error::UnknownVersion { .. } => "restic-unavailable",
            Error::Io { .. } | Error::WriteScratchFile { .. } => "io",
            Error::MissingSecret { .. }
            | Error::InvalidRepository { .. }
            | Error::InvalidOptions { .. } => "invalid-config",
            Error::WrongPassword { .. } => "wrong-password",
            Error::RepositoryNotFound { .. } => "repository-not-found",
            Error::Locked { .. } => "locked",
            Error::IncompleteBackup { .. } => "incomplete",
            Error::Backend { .. } => "backend",
            Error::Interrupted { .. } => "interrupted",
            Error::TimedOut { .. } => "timeout",
            Error::Input { .. } => "input",
            Error::Failed { .. } => "failed",
            Error::Parse { .. } => "parse",
            Error::Native(_) => "native-reader",
        }
    }
}

/// restic's documented exit codes (restic ≥ 0.17).
pub(crate) mod exit {
    pub const INCOMPLETE: i32 = 3;
    pub const REPOSITORY_NOT_FOUND: i32 = 10;
    pub const LOCKED: i32 = 11;
    pub const WRONG_PASSWORD: i32 = 12;
    pub const INTERRUPTED: i32 = 130;
}

/// What a finished restic process left behind, for classification.
#[derive(Debug, Default)]
pub(crate) struct Failure {
    pub code: Option<i32>,
    /// The `exit_error` message restic printed with `--json`, if any.
    pub exit_message: Option<String>,
    /// Items named by `error` messages (files that could not be read).
    pub unreadable: Vec<String>,
    /// The last lines of stderr, scrubbed of secrets.
    pub stderr_tail: String,
    pub snapshot_id: Option<String>,
    /// Whether we interrupted the process ourselves.
    pub interrupted: bool,
    /// Set when we stopped it because its deadline passed.
    pub timed_out: Option<std::time::Duration>,
}

/// Maps a failed run to an error. Exit codes decide first; the text only refines code 1,
/// which restic uses for every other fatal error.
pub(crate) fn classify(action: &'static str, repository: &str, f: Failure) -> Error {
    let text = f
        .exit_message
        .clone()
        .unwrap_or_else(|| f.stderr_tail.clone());
    let lower = text.to_lowercase();
    // restic retries an unreachable backend for many minutes and only says so in its retry
    // lines; when we stop it at a deadline, those lines are the real reason.
    if let Some(after) = f.timed_out {
        let reason = f
            .stderr_tail
            .lines()
            .rev()
            .find(|l| is_transient_backend_error(&l.to_lowercase()));
        if let Some(reason) = reason {
            return Error::Backend {
                action,
                message: format!("no answer after {}s: {reason}", after.as_secs()),
                retryable: true,
            };
        }
        return Error::TimedOut {
            action,
            after,
            stderr: f.stderr_tail,
        };
    }
    match f.code {
        _ if f.interrupted => Error::Interrupted { action },
        Some(exit::INTERRUPTED) => Error::Interrupted { action },
        Some(exit::INCOMPLETE) => Error::IncompleteBackup {
            snapshot_id: f.snapshot_id,
            unreadable: f.unreadable,
        },
        Some(exit::REPOSITORY_NOT_FOUND) => Error::RepositoryNotFound {
            action,
            repository: repository.to_owned(),
        },
        Some(exit::LOCKED) => Error::Locked {
            action,
            holder: parse_lock_holder(&text),
            message: text,
        },
        Some(exit::WRONG_PASSWORD) => Error::WrongPassword { action },
        _ if lower.contains("wrong password") => Error::WrongPassword { action },
        _ if lower.contains("repository does not exist") => Error::RepositoryNotFound {
            action,
            repository: repository.to_owned(),
        },
        _ if lower.contains("repository is already locked") => Error::Locked {
            action,
            holder: parse_lock_holder(&text),
            message: text,
        },
        _ if is_transient_backend_error(&lower) => Error::Backend {
            action,
            message: text,
            retryable: true,
        },
        _ if lower.contains("access denied") || lower.contains("forbidden") => Error::Backend {
            action,
            message: text,
            retryable: false,
        },
        code => Error::Failed {
            action,
            code,
            stderr: text,
        },
    }
}

fn is_transient_backend_error(lower: &str) -> bool {
    [
        "connection refused",
        "connection reset",
        "connection closed by foreign host",
        "no such host",
        "i/o timeout",
        "timeout",
        "temporary failure",
        "503 service unavailable",
        "502 bad gateway",
        "500 internal server error",
        "429",
        "slowdown",
        "slow down",
        "too many requests",
        "throttl",
    ]
    .iter()
    .any(|needle| lower.contains(needle))
}

/// Reads "locked [exclusively] by PID 123 on host by user (UID 0, GID 0)".
pub(crate) fn parse_lock_holder(text: &str) -> Option<LockHolder> {
    let start = text.find("locked ")?;
    let rest = &text[start..];
    let exclusive = rest.starts_with("locked exclusively");
    let after_pid = rest.split_once("by PID ")?.1;
    let mut words = after_pid.split_whitespace();
    let pid = words.next().and_then(|p| p.parse().ok());
    let mut host = None;
    let mut user = None;
    while let Some(w) = words.next() {
        match w {
            "on" if host.is_none() => host = words.next().map(str::to_owned),
            "by" if user.is_none() => user = words.next().map(str::to_owned),
            _ => {}
        }
    }
    Some(LockHolder {
        pid,
        host,
        user,
        exclusive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_map_to_errors() {
        let f = |code| Failure {
            code: Some(code),
            ..Failure::default()
        };
        assert!(matches!(
            classify("x", "r", f(12)),
            Error::WrongPassword { .. }
        ));
        assert!(matches!(
            classify("x", "r", f(10)),
            Error::RepositoryNotFound { .. }
        ));
        assert!(matches!(
            classify("x", "r", f(130)),
            Error::Interrupted { .. }
        ));
        assert!(matches!(
            classify("x", "r", f(3)),
            Error::IncompleteBackup { .. }
        ));
        let unknown = classify("x", "r", f(2));
        assert!(matches!(unknown, Error::Failed { code: Some(2), .. }));
        assert!(!unknown.is_retryable());
    }

    #[test]
    fn lock_messages_name_the_holder() {
        let msg = "unable to create lock in backend: repository is already locked exclusively \
                   by PID 32294 on vm by root (UID 0, GID 0)\nlock was created at …";
        let err = classify(
            "prune",
            "r",
            Failure {
                code: Some(11),
                exit_message: Some(msg.into()),
                ..Failure::default()
            },
        );
        let Error::Locked {
            holder: Some(holder),
            ..
        } = &err
        else {
            panic!("not a lock error: {err:?}");
        };
        assert_eq!(holder.pid, Some(32294));
        assert_eq!(holder.host.as_deref(), Some("vm"));
        assert_eq!(holder.user.as_deref(), Some("root"));
        assert!(holder.exclusive);
        assert!(err.is_retryable());
        assert!(err.to_string().contains("by PID 32294 on vm by root"));
    }

    #[test]
    fn an_unreachable_backend_stopped_at_its_deadline_is_a_retryable_backend_error() {
        // restic 0.18's stderr for an S3 endpoint that refuses connections, stopped by SIGINT.
        let stderr = include_str!("../tests/fixtures/unreachable-s3-0.18.stderr");
        let mut failure = Failure {
            code: Some(1),
            interrupted: true,
            timed_out: Some(std::time::Duration::from_secs(6)),
            ..Failure::default()
        };
        for line in stderr.lines() {
            match crate::message::Message::parse(crate::message::Stream::Other, line.as_bytes()) {
                crate::message::Message::ExitError(e) => failure.exit_message = Some(e.message),
                _ => {
                    failure.stderr_tail.push_str(line);
                    failure.stderr_tail.push('\n');
                }
            }
        }
        let err = classify("list snapshots", "s3:http://127.0.0.1:1/bucket/p", failure);
        assert!(
            matches!(
                err,
                Error::Backend {
                    retryable: true,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("connection refused"), "{err}");
    }

    #[test]
    fn transient_backend_errors_are_retryable() {
        let err = classify(
            "backup",
            "r",
            Failure {
                code: Some(1),
                stderr_tail: "Fatal: unable to open repository: Get \"http://x\": dial tcp: \
                              connect: connection refused"
                    .into(),
                ..Failure::default()
            },
        );
        assert!(matches!(
            err,
            Error::Backend {
                retryable: true,
                ..
            }
        ));
        assert!(err.is_retryable());
        assert_eq!(err.category(), "backend");
    }
}
