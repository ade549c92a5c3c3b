//! Status conditions: the shared condition type, the condition types and reasons Stash uses,
//! and the pure function that upserts a condition while keeping `lastTransitionTime` stable.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A metav1-style condition (kmapi.Condition): `reason` and `message` may be empty, as in Stash.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type, for example `RepositoryFound`.
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    /// The `metadata.generation` the condition was computed for.
    pub observed_generation: Option<i64>,
    /// When the status last changed; unchanged when the same status is written again.
    pub last_transition_time: Option<Time>,
    /// A CamelCase machine-readable reason.
    pub reason: Option<String>,
    /// A human-readable explanation.
    pub message: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    #[default]
    Unknown,
}

impl Condition {
    pub fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Condition {
            type_: type_.to_owned(),
            status: if status {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            observed_generation: None,
            last_transition_time: None,
            reason: Some(reason.to_owned()),
            message: Some(message.into()),
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Upserts `new` into `conditions` by type. The transition time moves only when the status
/// changes, so repeated reconciles do not make a condition look fresh.
pub fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition, now: Time) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            new.last_transition_time = if existing.status == new.status {
                existing.last_transition_time.clone().or(Some(now))
            } else {
                Some(now)
            };
            *existing = new;
        }
        None => {
            new.last_transition_time = Some(now);
            conditions.push(new);
        }
    }
}

/// Finds a condition by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Condition types (STASH-API.md §3).
pub mod types {
    // BackupConfiguration, BackupBatch, RestoreSession.
    pub const REPOSITORY_FOUND: &str = "RepositoryFound";
    pub const BACKEND_SECRET_FOUND: &str = "BackendSecretFound";
    pub const BACKUP_TARGET_FOUND: &str = "BackupTargetFound";
    pub const STASH_SIDECAR_INJECTED: &str = "StashSidecarInjected";
    pub const CRON_JOB_CREATED: &str = "CronJobCreated";
    pub const VALIDATION_PASSED: &str = "ValidationPassed";
    // BackupSession.
    pub const BACKEND_REPOSITORY_INITIALIZED: &str = "BackendRepositoryInitialized";
    pub const RETENTION_POLICY_APPLIED: &str = "RetentionPolicyApplied";
    pub const REPOSITORY_INTEGRITY_VERIFIED: &str = "RepositoryIntegrityVerified";
    pub const REPOSITORY_METRICS_PUSHED: &str = "RepositoryMetricsPushed";
    /// Not Stash's: whether the Snapshot API's index holds a current listing of the
    /// repository (False: it serves the last good one, and the message says why).
    pub const SNAPSHOTS_LISTED: &str = "SnapshotsListed";
    pub const BACKUP_SKIPPED: &str = "BackupSkipped";
    pub const BACKUP_HISTORY_CLEANED: &str = "BackupHistoryCleaned";
    pub const METRICS_PUSHED: &str = "MetricsPushed";
    pub const DEADLINE_EXCEEDED: &str = "DeadlineExceeded";
    pub const GLOBAL_PRE_BACKUP_HOOK_SUCCEEDED: &str = "GlobalPreBackupHookSucceeded";
    pub const GLOBAL_POST_BACKUP_HOOK_SUCCEEDED: &str = "GlobalPostBackupHookSucceeded";
    // BackupSession targets.
    pub const BACKUP_EXECUTOR_ENSURED: &str = "BackupExecutorEnsured";
    pub const PRE_BACKUP_HOOK_EXECUTION_SUCCEEDED: &str = "PreBackupHookExecutionSucceeded";
    pub const POST_BACKUP_HOOK_EXECUTION_SUCCEEDED: &str = "PostBackupHookExecutionSucceeded";
    pub const BACKUP_DISRUPTED: &str = "BackupDisrupted";
    // RestoreSession.
    pub const RESTORE_TARGET_FOUND: &str = "RestoreTargetFound";
    pub const STASH_INIT_CONTAINER_INJECTED: &str = "StashInitContainerInjected";
    pub const RESTORE_JOB_CREATED: &str = "RestoreJobCreated";
    pub const RESTORE_EXECUTOR_ENSURED: &str = "RestoreExecutorEnsured";
    pub const RESTORE_COMPLETED: &str = "RestoreCompleted";
    pub const PRE_RESTORE_HOOK_EXECUTION_SUCCEEDED: &str = "PreRestoreHookExecutionSucceeded";
    pub const POST_RESTORE_HOOK_EXECUTION_SUCCEEDED: &str = "PostRestoreHookExecutionSucceeded";
    // Assignments (this design).
    pub const ASSIGNMENT_ACCEPTED: &str = "Accepted";
    pub const ASSIGNMENT_PROGRESSING: &str = "Progressing";
}

/// Condition reasons (STASH-API.md §3.2 and the session sections).
pub mod reasons {
    pub const REPOSITORY_AVAILABLE: &str = "RepositoryAvailable";
    pub const REPOSITORY_NOT_AVAILABLE: &str = "RepositoryNotAvailable";
    pub const UNABLE_TO_CHECK_REPOSITORY_AVAILABILITY: &str = "UnableToCheckRepositoryAvailability";
    pub const BACKEND_SECRET_AVAILABLE: &str = "BackendSecretAvailable";
    pub const BACKEND_SECRET_NOT_AVAILABLE: &str = "BackendSecretNotAvailable";
    pub const UNABLE_TO_CHECK_BACKEND_SECRET_AVAILABILITY: &str =
        "UnableToCheckBackendSecretAvailability";
    pub const TARGET_AVAILABLE: &str = "TargetAvailable";
    pub const TARGET_NOT_AVAILABLE: &str = "TargetNotAvailable";
    pub const UNABLE_TO_CHECK_TARGET_AVAILABILITY: &str = "UnableToCheckTargetAvailability";
    pub const SIDECAR_INJECTION_SUCCEEDED: &str = "SidecarInjectionSucceeded";
    pub const SIDECAR_INJECTION_FAILED: &str = "SidecarInjectionFailed";
    pub const INIT_CONTAINER_INJECTION_SUCCEEDED: &str = "InitContainerInjectionSucceeded";
    pub const INIT_CONTAINER_INJECTION_FAILED: &str = "InitContainerInjectionFailed";
    pub const CRON_JOB_CREATION_SUCCEEDED: &str = "CronJobCreationSucceeded";
    pub const CRON_JOB_CREATION_FAILED: &str = "CronJobCreationFailed";
    pub const RESOURCE_VALIDATION_PASSED: &str = "ResourceValidationPassed";
    pub const RESOURCE_VALIDATION_FAILED: &str = "ResourceValidationFailed";
    pub const SUCCESSFULLY_INITIALIZED_BACKEND: &str = "SuccessfullyInitializedBackend";
    pub const FAILED_TO_INITIALIZE_BACKEND: &str = "FailedToInitializeBackend";
    pub const SNAPSHOT_LISTING_CURRENT: &str = "SnapshotListingCurrent";
    pub const SNAPSHOT_LISTING_STALE: &str = "SnapshotListingStale";
    pub const SUCCESSFULLY_CLEANED_RETENTION: &str = "SuccessfullyAppliedRetentionPolicy";
    pub const FAILED_TO_APPLY_RETENTION_POLICY: &str = "FailedToApplyRetentionPolicy";
    pub const SUCCESSFULLY_VERIFIED_INTEGRITY: &str = "SuccessfullyVerifiedRepositoryIntegrity";
    pub const FAILED_TO_VERIFY_INTEGRITY: &str = "FailedToVerifyRepositoryIntegrity";
    pub const SUCCESSFULLY_PUSHED_METRICS: &str = "SuccessfullyPushedMetrics";
    pub const FAILED_TO_PUSH_METRICS: &str = "FailedToPushMetrics";
    pub const SKIPPED_TAKING_NEW_BACKUP: &str = "SkippedTakingNewBackup";
    pub const SUCCESSFULLY_CLEANED_BACKUP_HISTORY: &str = "SuccessfullyCleanedBackupHistory";
    pub const FAILED_TO_CLEAN_BACKUP_HISTORY: &str = "FailedToCleanBackupHistory";
    pub const FAILED_TO_COMPLETE_WITHIN_DEADLINE: &str = "FailedToCompleteWithinDeadline";
    pub const SUCCESSFULLY_ENSURED_BACKUP_EXECUTOR: &str = "SuccessfullyEnsuredBackupExecutor";
    pub const FAILED_TO_ENSURE_BACKUP_EXECUTOR: &str = "FailedToEnsureBackupExecutor";
    pub const FAILED_TO_ENSURE_RESTORE_EXECUTOR: &str = "FailedToEnsureRestoreExecutor";
    pub const SUCCESSFULLY_EXECUTED_HOOK: &str = "SuccessfullyExecutedHook";
    pub const FAILED_TO_EXECUTE_HOOK: &str = "FailedToExecuteHook";
    pub const ASSIGNED_TO_NODE_AGENT: &str = "AssignedToNodeAgent";
    pub const NODE_AGENT_NOT_READY: &str = "NodeAgentNotReady";
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let mut conds = Vec::new();
        set_condition(
            &mut conds,
            Condition::new(types::REPOSITORY_FOUND, false, "A", "x"),
            at(1),
        );
        set_condition(
            &mut conds,
            Condition::new(types::REPOSITORY_FOUND, false, "B", "y"),
            at(2),
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].last_transition_time, Some(at(1)));
        assert_eq!(conds[0].reason.as_deref(), Some("B"));
        set_condition(
            &mut conds,
            Condition::new(types::REPOSITORY_FOUND, true, "C", "z"),
            at(3),
        );
        assert_eq!(conds[0].last_transition_time, Some(at(3)));
        assert!(find_condition(&conds, types::REPOSITORY_FOUND).is_some_and(Condition::is_true));
        set_condition(
            &mut conds,
            Condition::new(types::CRON_JOB_CREATED, true, "D", ""),
            at(4),
        );
        assert_eq!(conds.len(), 2);
    }
}
