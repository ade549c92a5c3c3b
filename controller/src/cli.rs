//! The command line. Every flag has an environment variable, which is how the chart passes it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "stash-operator", version, about = "Stash operator")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions as YAML, for `kubectl apply -f -`.
    Crd,
    /// Run the operator: reconcile Repositories, BackupConfigurations and BackupSessions.
    Run(Box<RunArgs>),
    /// Create a BackupSession for a BackupConfiguration (what its CronJob runs).
    Trigger(TriggerArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log filter: `info`, `debug`, or a filter such as `info,stash_controller=debug`.
    #[arg(long, env = "STASH_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[arg(long, env = "STASH_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub log: LogArgs,
    /// The operator's own namespace: its leader Lease and the per-repository Leases live here.
    #[arg(long, env = "STASH_NAMESPACE", default_value = "stash")]
    pub namespace: String,
    /// This pod's name: the holder identity in Leases.
    #[arg(long, env = "STASH_POD_NAME", default_value = "stash-operator")]
    pub pod_name: String,
    /// Port of /healthz, /readyz and /metrics.
    #[arg(long, env = "STASH_METRICS_PORT", default_value_t = 8080)]
    pub metrics_port: u16,
    /// Where session metrics are pushed (Stash's pushgateway); empty: not pushed.
    #[arg(long, env = "STASH_PUSHGATEWAY_URL", default_value = "")]
    pub pushgateway_url: String,
    /// Extra `key=value` labels on every pushed metric, comma-separated.
    #[arg(long, env = "STASH_METRICS_LABELS", default_value = "")]
    pub metrics_labels: String,
    /// Elect a leader through a Lease, so only one replica reconciles and writes.
    #[arg(long, env = "STASH_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// The leader-election Lease, in the operator's namespace.
    #[arg(
        long,
        env = "STASH_LEADER_ELECTION_LEASE",
        default_value = "stash-operator"
    )]
    pub leader_election_lease: String,
    /// The label selector of the node agents' pods (in the operator's namespace).
    #[arg(
        long,
        env = "STASH_AGENT_SELECTOR",
        default_value = "app.kubernetes.io/component=node-agent"
    )]
    pub agent_selector: String,
    /// The image the trigger CronJobs run (this operator's image).
    #[arg(
        long,
        env = "STASH_OPERATOR_IMAGE",
        default_value = "ghcr.io/stash-rs/stash-operator:latest"
    )]
    pub operator_image: String,
    /// Image pull secrets for the CronJobs, comma-separated names.
    #[arg(long, env = "STASH_IMAGE_PULL_SECRETS", default_value = "")]
    pub image_pull_secrets: String,
    /// The ClusterRole a trigger CronJob's ServiceAccount is bound to in its namespace.
    #[arg(
        long,
        env = "STASH_TRIGGER_CLUSTER_ROLE",
        default_value = "stash-trigger"
    )]
    pub trigger_cluster_role: String,
    /// The restic binary, for repository initialisation and retention.
    #[arg(long, env = "STASH_RESTIC", default_value = "restic")]
    pub restic: PathBuf,
    /// A writable directory for restic's cache and temporary files.
    #[arg(long, env = "STASH_STATE_DIR", default_value = "/tmp/stash-operator")]
    pub state_dir: PathBuf,
    /// Seconds after which an assignment whose agent stopped reporting fails its hosts.
    #[arg(long, env = "STASH_HEARTBEAT_TIMEOUT_SECONDS", default_value_t = 120)]
    pub heartbeat_timeout_seconds: u64,
    /// Seconds a session waits for an agent to become Ready on a node before that host fails.
    #[arg(long, env = "STASH_AGENT_WAIT_SECONDS", default_value_t = 120)]
    pub agent_wait_seconds: u64,
    /// Run `restic check` after every session's retention (Stash's VerifyRepositoryIntegrity);
    /// off by default because it reads the repository's metadata every time.
    #[arg(long, env = "STASH_VERIFY_INTEGRITY", default_value_t = false, action = clap::ArgAction::Set)]
    pub verify_integrity: bool,
    /// Seconds a restic command of the operator may run before it is stopped.
    #[arg(long, env = "STASH_RESTIC_TIMEOUT_SECONDS", default_value_t = 1800)]
    pub restic_timeout_seconds: u64,
    /// Host directories mounted into this pod (and the node agents) at the same path, under
    /// which local (hostPath) repositories may live; comma-separated. A local repository
    /// elsewhere gets a condition instead of a repository in the container's filesystem.
    #[arg(long, env = "STASH_LOCAL_REPOSITORY_ROOTS", value_delimiter = ',')]
    pub local_repository_roots: Vec<PathBuf>,
    /// The node this pod runs on: a local repository is a directory of this node, so only
    /// hosts on it can back up into one.
    #[arg(long, env = "STASH_NODE_NAME", default_value = "")]
    pub node_name: String,
    #[command(flatten)]
    pub snapshot_api: SnapshotApiArgs,
}

/// Where the serving certificate of the Snapshot API comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CertSource {
    /// The operator issues it into the Secret and writes the APIService's caBundle.
    Operator,
    /// cert-manager issues it into the Secret, mounted at the certificate directory.
    CertManager,
}

/// The Snapshot API: an aggregated API server on its own HTTPS port.
#[derive(Debug, Clone, Args)]
pub struct SnapshotApiArgs {
    /// The HTTPS port of the Snapshot API (the APIService's Service targets it); 0: not served.
    #[arg(long, env = "STASH_SECURE_PORT", default_value_t = 8443)]
    pub secure_port: u16,
    /// The Service in front of the operator: its DNS names go into the serving certificate.
    #[arg(long, env = "STASH_SERVICE_NAME", default_value = "stash")]
    pub service_name: String,
    #[arg(
        long,
        env = "STASH_CERT_SOURCE",
        value_enum,
        default_value = "operator"
    )]
    pub cert_source: CertSource,
    /// The Secret (in the operator's namespace) that holds the serving certificate.
    #[arg(
        long,
        env = "STASH_CERT_SECRET_NAME",
        default_value = "stash-apiserver-cert"
    )]
    pub cert_secret_name: String,
    /// Where the Secret is mounted (`tls.crt`, `tls.key`), read with cert-manager.
    #[arg(long, env = "STASH_CERT_DIR", default_value = "/var/serving-cert")]
    pub cert_dir: PathBuf,
    /// Seconds between background listings of every Repository's snapshots (they are also
    /// listed at start and after each session that wrote to a repository).
    #[arg(
        long = "snapshot-index-interval-seconds",
        env = "STASH_SNAPSHOT_INDEX_INTERVAL_SECONDS",
        default_value_t = 300
    )]
    pub index_interval_seconds: u64,
    /// Repositories listed at once by the index.
    #[arg(
        long = "snapshot-index-concurrency",
        env = "STASH_SNAPSHOT_INDEX_CONCURRENCY",
        default_value_t = 4
    )]
    pub index_concurrency: usize,
}

impl RunArgs {
    /// The local repository roots, without the empty entries an empty variable leaves.
    pub fn local_roots(&self) -> Vec<PathBuf> {
        self.local_repository_roots
            .iter()
            .filter(|p| !p.as_os_str().is_empty())
            .cloned()
            .collect()
    }
}

#[derive(Debug, Clone, Args)]
pub struct TriggerArgs {
    #[command(flatten)]
    pub log: LogArgs,
    /// The invoker: a BackupConfiguration (BackupBatch is not served yet).
    #[arg(
        long,
        env = "STASH_INVOKER_KIND",
        default_value = "BackupConfiguration"
    )]
    pub invoker_kind: String,
    #[arg(long, env = "STASH_INVOKER_NAME")]
    pub invoker_name: String,
    /// The invoker's namespace (default: the pod's own, from its ServiceAccount).
    #[arg(long, env = "STASH_INVOKER_NAMESPACE")]
    pub namespace: Option<String>,
}

pub fn init_tracing(log: &LogArgs) {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.log_format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// `k=v,k2=v2` → pairs; entries without `=` are ignored.
pub fn parse_labels(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// `a,b` → `["a", "b"]`, empty entries dropped.
pub fn parse_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}
