//! What the scenarios expect of the operator, in one place. Names, labels, conditions and
//! metrics are Stash's (STASH-API.md §2–§4, issue 13) and written out literally, not taken
//! from the product's constants, so that a wrong constant fails here. Where the spec leaves
//! a detail open, the guess is marked GUESS with what it assumes: adjust it here.

/// Session phases a session never leaves.
pub const FINAL_SESSION_PHASES: [&str; 3] = ["Succeeded", "Failed", "Skipped"];
/// A RestoreSession's phases once it is over (STASH-API.md §3.4).
pub const FINAL_RESTORE_PHASES: [&str; 4] = ["Succeeded", "Failed", "Unknown", "Invalid"];
/// Stash's restore metric (§4.8).
pub const RESTORE_SUCCESS_METRIC: &str = "stash_appscode_com_restoresession_success";

/// BackupConfiguration phase once its Repository, Secret and CronJob are in place (§3.2).
pub const BC_READY: &str = "Ready";
/// BackupConfiguration phase while the Repository or its Secret is missing (§3.2).
pub const BC_NOT_READY: &str = "NotReady";

/// The trigger CronJob of a BackupConfiguration in the target's namespace (§2).
pub fn trigger_cronjob(bc: &str) -> String {
    format!("stash-trigger-{bc}")
}

/// Labels a triggered BackupSession carries (§2), besides the target ones.
pub fn session_labels(bc: &str) -> Vec<(&'static str, String)> {
    vec![
        ("app.kubernetes.io/component", "stash-backup".into()),
        ("app.kubernetes.io/managed-by", "stash.appscode.com".into()),
        (
            "stash.appscode.com/invoker-type",
            "BackupConfiguration".into(),
        ),
        ("stash.appscode.com/invoker-name", bc.into()),
    ]
}

/// The target labels of a triggered session (§2).
pub fn session_target_labels(kind: &str, name: &str, ns: &str) -> Vec<(&'static str, String)> {
    vec![
        ("stash.appscode.com/target-kind", kind.into()),
        ("stash.appscode.com/target-name", name.into()),
        ("stash.appscode.com/target-namespace", ns.into()),
    ]
}

/// The label that ties a BackupAssignment to its session. GUESS: the operator labels each
/// assignment with `stash.appscode.com/session=<session>` (api/src/labels.rs `SESSION`) and
/// `stash.appscode.com/node=<node>` (DESIGN.md names the node label).
pub const ASSIGNMENT_SESSION_LABEL: &str = "stash.appscode.com/session";
pub const ASSIGNMENT_NODE_LABEL: &str = "stash.appscode.com/node";

/// Condition of a BackupConfiguration whose Secret is missing (§3.2): `BackendSecretFound`
/// False with reason `BackendSecretNotAvailable`.
pub const SECRET_FOUND: &str = "BackendSecretFound";
pub const SECRET_NOT_AVAILABLE: &str = "BackendSecretNotAvailable";

/// Whether a host's error tells the user the password is what is wrong: it names the
/// password and says it does not work. GUESS at the wording, which is the operator's own
/// (restic says "wrong password or no key found"; the agent's category is `wrong-password`;
/// the operator says "the password in the storage Secret does not open the repository").
pub fn blames_the_password(error: &str) -> bool {
    let e = error.to_lowercase();
    e.contains("password")
        && ["wrong", "does not open", "no key", "incorrect"]
            .iter()
            .any(|w| e.contains(w))
}

/// Words that show a failure names the missing Secret. GUESS: the message names the Secret.
pub fn missing_secret_words(secret: &str) -> Vec<String> {
    vec![secret.to_owned()]
}

/// The session metric and the labels that name its invoker (§4.8).
pub const SESSION_SUCCESS_METRIC: &str = "stash_appscode_com_backupsession_success";
pub fn session_metric_labels(bc: &str, ns: &str) -> Vec<(&'static str, String)> {
    vec![
        ("invoker_kind", "BackupConfiguration".into()),
        ("invoker_name", bc.into()),
        ("namespace", ns.into()),
    ]
}
/// The push's job label (§4.8: `<lower(invokerKind)>-<namespace>-<invokerName>`).
pub fn pushgateway_job(bc: &str, ns: &str) -> String {
    format!("backupconfiguration-{ns}-{bc}")
}

/// restic `--host` of the replica with this ordinal of a StatefulSet without alias (§4.4).
pub fn statefulset_host(ordinal: usize) -> String {
    format!("host-{ordinal}")
}

/// restic `--host` of a Deployment without alias (§2 "Default host").
pub const DEPLOYMENT_HOST: &str = "host-0";

/// The Repository condition that says whether the restic repository is usable (§3.1).
pub const REPOSITORY_INITIALIZED: &str = "BackendRepositoryInitialized";
/// The session condition of the retention step (§4).
pub const RETENTION_APPLIED: &str = "RetentionPolicyApplied";

/// A BackupSession created by the trigger is named `<bc>-<unix seconds>` (§2).
pub fn is_triggered_session_name(bc: &str, name: &str) -> bool {
    name.strip_prefix(&format!("{bc}-"))
        .is_some_and(|s| s.len() >= 10 && s.chars().all(|c| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_failure_is_recognised_by_what_it_says() {
        assert!(blames_the_password("Fatal: wrong password or no key found"));
        assert!(blames_the_password(
            "the password in the storage Secret does not open the repository"
        ));
        assert!(!blames_the_password(
            "failed to open the repository: timeout"
        ));
        assert!(!blames_the_password("RESTIC_PASSWORD is set"));
    }

    #[test]
    fn triggered_names_end_in_unix_seconds() {
        assert!(is_triggered_session_name("app", "app-1732550400"));
        assert!(!is_triggered_session_name("app", "app-x1732550400"));
        assert!(!is_triggered_session_name("app", "other-1732550400"));
        assert!(!is_triggered_session_name("app", "app-12"));
    }
}
