//! Label, annotation and finalizer keys shared by the operator, the agent and users' manifests.
//! The values are Stash's (STASH-API.md §2) so that existing tooling and selectors keep working.

/// Prefix of every Stash-owned key.
pub const GROUP: &str = "stash.appscode.com";

// Labels on BackupSessions and objects the operator creates.
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_STASH: &str = "stash.appscode.com";
pub const COMPONENT_BACKUP: &str = "stash-backup";
pub const COMPONENT_RESTORE: &str = "stash-restore";
pub const INVOKER_TYPE: &str = "stash.appscode.com/invoker-type";
pub const INVOKER_NAME: &str = "stash.appscode.com/invoker-name";
pub const TARGET_KIND: &str = "stash.appscode.com/target-kind";
pub const TARGET_NAME: &str = "stash.appscode.com/target-name";
pub const TARGET_NAMESPACE: &str = "stash.appscode.com/target-namespace";
/// Older Stash versions labelled sessions with this key only; still read for compatibility.
pub const LEGACY_BACKUP_CONFIGURATION: &str = "stash.appscode.com/backup-configuration";
/// The operator deletes a succeeded Job that carries this label with value `true`.
pub const DELETE_JOB_ON_COMPLETION: &str = "stash.appscode.com/delete-job-on-completion";
/// The node an assignment belongs to; the agent on that node watches with this selector.
pub const NODE: &str = "stash.appscode.com/node";
/// The session an assignment was planned for.
pub const SESSION: &str = "stash.appscode.com/session";
/// Set to `true` on an assignment (by the operator, when its session is canceled), the
/// agent interrupts the work and ends the assignment `Canceled`. The spec is immutable, so
/// this is an annotation.
pub const CANCEL: &str = "stash.appscode.com/cancel";
/// Held on an assignment by the agent while it works on it, so that deleting the assignment
/// lets the agent stop restic, leave no partial snapshot or lock, and record `Canceled`
/// before the object goes.
pub const AGENT_FINALIZER: &str = "stash.appscode.com/node-agent";

// Labels on Snapshot objects served by the Snapshot API.
pub const SNAPSHOT_REPOSITORY: &str = "repository";
pub const SNAPSHOT_HOSTNAME: &str = "hostname";

// Annotations the operator writes on workloads and pod templates.
pub const LAST_APPLIED_BACKUP_INVOKER: &str = "stash.appscode.com/last-applied-backup-invoker";
pub const LAST_APPLIED_BACKUP_INVOKER_KIND: &str =
    "stash.appscode.com/last-applied-backup-invoker-kind";
pub const LAST_APPLIED_BACKUP_INVOKER_HASH: &str =
    "stash.appscode.com/last-applied-backup-invoker-hash";
pub const LAST_APPLIED_RESTORE_INVOKER: &str = "stash.appscode.com/last-applied-restore-invoker";
pub const LAST_APPLIED_RESTORE_INVOKER_KIND: &str =
    "stash.appscode.com/last-applied-restore-invoker-kind";
pub const LAST_APPLIED_RESTORE_INVOKER_HASH: &str =
    "stash.appscode.com/last-applied-restore-invoker-hash";

// Auto-backup annotations a user puts on a target (BackupBlueprint).
pub const BACKUP_BLUEPRINT: &str = "stash.appscode.com/backup-blueprint";
pub const TARGET_PATHS: &str = "stash.appscode.com/target-paths";
pub const VOLUME_MOUNTS: &str = "stash.appscode.com/volume-mounts";
pub const SCHEDULE: &str = "stash.appscode.com/schedule";
/// Prefix of `params.stash.appscode.com/<key>` annotations appended to task params.
pub const PARAMS_PREFIX: &str = "params.stash.appscode.com/";

/// Finalizer on BackupConfiguration and RestoreSession.
pub const FINALIZER: &str = "stash.appscode.com";
/// Finalizer on Repository (Stash's historical value, kept so old objects are released).
pub const REPOSITORY_FINALIZER: &str = "stash";

// Names of things Stash creates, needed to stay compatible with existing clusters.
pub const SIDECAR_CONTAINER: &str = "stash";
pub const INIT_CONTAINER: &str = "stash-init";
pub const TRIGGER_CONTAINER: &str = "stash-trigger";
pub const TMP_VOLUME: &str = "stash-tmp-dir";
pub const TMP_MOUNT_PATH: &str = "/stash-tmp";
pub const DEFAULT_HOST: &str = "host-0";
