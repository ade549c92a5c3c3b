//! The command line: standalone `backup` and `restore` of a directory, the same code paths
//! the agent uses for pod volumes. Each prints one JSON summary line on stdout.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use restic_wrapper::{Backend, Cache, Repository, Restic, Secrets};

use crate::budget::{IoBudget, Limits};
use crate::engine::{self, BackupRequest, ReadMode, RestoreRequest};

/// Command line of `stash-node-agent`.
#[derive(Debug, Parser)]
#[command(name = "stash-node-agent", version, about = "Stash node agent")]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "STASH_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, for example `info` or `stash_node_agent=debug`.
    #[arg(long, global = true, env = "STASH_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoUringMode {
    Auto,
    Off,
}

/// What a backup does with files it may not read (see `UnreadablePolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnUnreadable {
    /// Fail the backup and keep no snapshot of it.
    Fail,
    /// Leave them out, tag the snapshot `stash.unreadable=<count>`, and list them.
    Warn,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Back up a directory into a restic repository.
    Backup(BackupArgs),
    /// Restore a snapshot into a directory, in place.
    Restore(RestoreArgs),
    /// Run as the node's agent: work on the backup assignments of this node.
    Run(RunArgs),
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The node this agent serves (from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// This agent's pod, recorded in the assignments it takes.
    #[arg(long, env = "STASH_POD_NAME", default_value = "stash-node-agent")]
    pub pod_name: String,
    #[arg(long, env = "STASH_KUBELET_ROOT", default_value = "/var/lib/kubelet")]
    pub kubelet_root: PathBuf,
    /// restic's persistent cache and scratch files.
    #[arg(long, env = "STASH_STATE_DIR", default_value = "/var/lib/stash-agent")]
    pub state_dir: PathBuf,
    #[arg(long, env = "STASH_RESTIC", default_value = "restic")]
    pub restic: PathBuf,
    /// The node's read budget in bytes per second, a Kubernetes quantity (`100Mi`, `1G`);
    /// unlimited when unset. Both modes: in direct mode the kernel limits restic's reads (see
    /// `cgroup`).
    #[arg(long, env = "STASH_IO_BUDGET_BYTES_PER_SECOND", value_parser = parse_bytes)]
    pub io_budget: Option<u64>,
    #[arg(long, env = "STASH_IO_BUDGET_IOPS", value_parser = parse_count)]
    pub iops: Option<u64>,
    /// Lower the byte rate while the node's workloads stall on IO (Linux pressure stall
    /// information), and raise it again when they do not; `--io-budget` is the ceiling.
    #[arg(long, env = "STASH_IO_BUDGET_ADAPTIVE", requires = "io_budget")]
    pub io_budget_adaptive: bool,
    /// Volumes read at once on this node.
    #[arg(long, env = "STASH_MAX_CONCURRENT_VOLUMES", default_value_t = 2)]
    pub max_concurrent_volumes: usize,
    /// The read mode of assignments that do not name one (a raw block volume is always
    /// streamed). Direct is the default: paced and page-cache clean in restic's cgroup, it
    /// reads only what changed since the parent snapshot, and its snapshots list the files.
    #[arg(long, value_enum, env = "STASH_READ_MODE", default_value = "direct")]
    pub read_mode: ReadMode,
    #[arg(long, value_enum, env = "STASH_IO_URING", default_value = "auto")]
    pub io_uring: IoUringMode,
    /// The mount table used to refuse volumes that are not mounted.
    #[arg(long, env = "STASH_MOUNTINFO", default_value = "/proc/self/mountinfo")]
    pub mountinfo: PathBuf,
    /// Where the host's cgroup filesystem is mounted, for direct mode's restic cgroups when
    /// this container's own `/sys/fs/cgroup` is read-only (unset: that one).
    #[arg(long, env = "STASH_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Port of /healthz and /readyz.
    #[arg(long, env = "STASH_METRICS_PORT", default_value_t = 9090)]
    pub metrics_port: u16,
    /// Seconds between progress reports in an assignment's status.
    #[arg(long, env = "STASH_PROGRESS_SECONDS", default_value_t = 10)]
    pub progress_seconds: u64,
    /// Direct mode: restic's upload limit in KiB/s (`--limit-upload`).
    #[arg(long, env = "STASH_LIMIT_UPLOAD_KIB")]
    pub limit_upload_kib: Option<u64>,
    /// Direct mode: files restic reads at once (`--read-concurrency`).
    #[arg(long, env = "STASH_READ_CONCURRENCY")]
    pub read_concurrency: Option<u32>,
    /// How long after taking an assignment a retryable failure (a lock held by someone else,
    /// a backend or API server that does not answer) is still tried again.
    #[arg(long, env = "STASH_RETRY_DEADLINE_SECONDS", default_value_t = 1800)]
    pub retry_deadline_seconds: u64,
    /// The longest wait between two tries; the wait doubles from one second.
    #[arg(long, env = "STASH_RETRY_MAX_DELAY_SECONDS", default_value_t = 60)]
    pub retry_max_delay_seconds: u64,
    /// The deadline of every restic command, backups included: one still running then is
    /// interrupted (and retried while the retry deadline allows).
    #[arg(long, env = "STASH_RESTIC_TIMEOUT_SECONDS", default_value_t = 6 * 3600)]
    pub restic_timeout_seconds: u64,
    /// Host directories mounted into this pod (and the operator) at the same path, under
    /// which local (hostPath) repositories may live; comma-separated. An assignment into a
    /// local repository elsewhere fails instead of writing into the container.
    #[arg(long, env = "STASH_LOCAL_REPOSITORY_ROOTS", value_delimiter = ',')]
    pub local_repository_roots: Vec<PathBuf>,
}

/// Where the repository is and how restic runs; the password and credentials come from
/// restic's usual environment variables (RESTIC_PASSWORD, AWS_ACCESS_KEY_ID, …).
#[derive(Debug, Args)]
pub struct RepoArgs {
    /// The restic repository (`/path`, `s3:host/bucket/prefix`, …).
    #[arg(long, short = 'r', env = "RESTIC_REPOSITORY")]
    pub repo: String,
    /// The restic binary.
    #[arg(long, env = "STASH_RESTIC", default_value = "restic")]
    pub restic: PathBuf,
    /// A persistent restic cache directory; none when unset.
    #[arg(long, env = "STASH_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Give up on a restic command after this many seconds.
    #[arg(long, env = "STASH_RESTIC_TIMEOUT_SECONDS")]
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// The directory to back up.
    #[arg(long)]
    pub path: PathBuf,
    #[arg(long, value_enum, env = "STASH_READ_MODE", default_value = "direct")]
    pub mode: ReadMode,
    /// Read budget in bytes per second, a Kubernetes quantity (`50Mi`, `1.5Gi`, `500M`, `2e9`);
    /// unlimited when unset. In direct mode restic's reads are limited by the kernel, or,
    /// where the volume's disk cannot be limited, the volume is read in stream mode.
    #[arg(long, env = "STASH_IO_BUDGET_BYTES_PER_SECOND", value_parser = parse_bytes)]
    pub io_budget: Option<u64>,
    /// Read operations per second.
    #[arg(long, env = "STASH_IO_BUDGET_IOPS", value_parser = parse_count)]
    pub iops: Option<u64>,
    /// Lower the byte rate while the node's other workloads stall on IO, up to `--io-budget`
    /// (see `run --io-budget-adaptive`).
    #[arg(long, env = "STASH_IO_BUDGET_ADAPTIVE", requires = "io_budget")]
    pub io_budget_adaptive: bool,
    /// Read through io_uring when the runtime allows it (`auto`), or never (`off`).
    #[arg(long, value_enum, env = "STASH_IO_URING", default_value = "auto")]
    pub io_uring: IoUringMode,
    /// Files the backup may not read: fail it (`fail`), or leave them out and say so (`warn`).
    #[arg(long, value_enum, env = "STASH_ON_UNREADABLE", default_value = "fail")]
    pub on_unreadable: OnUnreadable,
    /// The restic host (Stash's `host-0`, `<alias>-<ordinal>`, …).
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// The volume's stable identity; snapshots of the same key are each other's parents.
    #[arg(long)]
    pub key: Option<String>,
    #[arg(long = "exclude")]
    pub excludes: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub repo: RepoArgs,
    /// Snapshot id (or unique prefix).
    #[arg(long)]
    pub snapshot: String,
    /// The directory to restore into.
    #[arg(long)]
    pub target: PathBuf,
    /// Delete files in the target that are not in the snapshot.
    #[arg(long)]
    pub delete: bool,
    /// Restore only what these restic patterns select (restic's `--include`, in both modes).
    #[arg(long = "include")]
    pub include: Vec<String>,
    /// Leave out what these restic patterns select (restic's `--exclude`, in both modes).
    #[arg(long = "exclude")]
    pub exclude: Vec<String>,
    /// Leave owners as the restore creates them (the agent's own). By default owners are
    /// restored whenever the agent may (as root), as restic and GNU tar do.
    #[arg(long, env = "STASH_RESTORE_NO_OWNERS", conflicts_with = "owners")]
    pub no_owners: bool,
    /// Restore owners: the default, kept for scripts that pass it.
    #[arg(long, hide = true)]
    pub owners: bool,
}

/// Parses a rate in bytes per second written as a Kubernetes quantity (`50Mi`, `1.5Gi`,
/// `500M`, `2e9`); zero is refused, leave the flag out for no limit.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    crate::budget::parse_rate(text).map_err(|e| e.to_string())
}

/// Parses a count per second that must not be zero.
pub fn parse_count(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err(format!(
            "{text:?}: a rate of zero would never read; leave it unset for no limit"
        )),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{text:?} is not a whole number")),
    }
}

/// Starts adapting `budget` to the node's IO pressure when asked to; the task ends when the
/// guard is dropped.
fn adaptive(budget: &IoBudget, wanted: bool) -> Option<AbortOnDrop> {
    let ceiling = budget.limits().bytes_per_second.filter(|_| wanted)?;
    let files = crate::pressure::PressureFiles::of_this_process();
    tracing::info!(ceiling, node = %files.node.display(),
        own = ?files.own.as_ref().map(|p| p.display().to_string()),
        "the IO budget follows the node's IO pressure");
    Some(AbortOnDrop(tokio::spawn(crate::pressure::adapt(
        budget.clone(),
        files,
        ceiling,
    ))))
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn restic_for(args: &RepoArgs) -> anyhow::Result<Restic> {
    let backend = Backend::parse(&args.repo)?;
    let scratch = std::env::temp_dir();
    let repo = Repository::new(backend, Secrets::from_process_env(), &scratch)?;
    let mut restic =
        Restic::new(repo)
            .with_program(&args.restic)
            .with_cache(match &args.cache_dir {
                Some(dir) => Cache::Dir(dir.clone()),
                None => Cache::Disabled,
            });
    if let Some(s) = args.timeout_seconds {
        restic = restic.with_timeout(Duration::from_secs(s));
    }
    Ok(restic)
}

/// Answers `/healthz` and `/readyz` for the kubelet's probes and `/metrics` for Prometheus.
async fn serve_health(
    port: u16,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = conn.read(&mut buf).await.unwrap_or(0);
            let line = String::from_utf8_lossy(&buf[..n]);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, content_type, body) = match path {
                "/healthz" | "/readyz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                "/metrics" => (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    metrics.encode(),
                ),
                _ => ("404 Not Found", "text/plain", String::new()),
            };
            let reply = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
        });
    }
}

/// Runs a parsed command and returns the JSON summary line.
pub async fn run(command: Command) -> anyhow::Result<String> {
    match command {
        Command::Run(a) => {
            let client = kube::Client::try_default().await?;
            if let Some(root) = a.cgroup_root.clone() {
                crate::cgroup::use_host_root(root);
            }
            crate::cgroup::use_owner(&a.node_name);
            let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
            // Probe once at start, so the log and metrics say which engine reads.
            let (engine, fallback) = crate::uring::choose(a.io_uring == IoUringMode::Auto);
            if let Some(reason) = &fallback {
                tracing::warn!(%reason, "not reading through io_uring");
            }
            metrics
                .read_engine
                .get_or_create(&crate::metrics::EngineLabels {
                    engine: engine.name(),
                })
                .set(1);
            drop(engine);
            let budget = IoBudget::new(Limits {
                bytes_per_second: a.io_budget,
                iops: a.iops,
            });
            let _adapting = adaptive(&budget, a.io_budget_adaptive);
            let cfg = crate::worker::WorkerConfig {
                node_name: a.node_name,
                pod_name: a.pod_name,
                kubelet_root: a.kubelet_root,
                state_dir: a.state_dir,
                restic: a.restic,
                budget: budget.clone(),
                max_volumes: a.max_concurrent_volumes,
                default_mode: a.read_mode,
                io_uring: a.io_uring == IoUringMode::Auto,
                mountinfo: a.mountinfo,
                progress_every: Duration::from_secs(a.progress_seconds.max(1)),
                metrics: metrics.clone(),
                limit_upload_kib: a.limit_upload_kib,
                read_concurrency: a.read_concurrency,
                retry: crate::worker::RetryPolicy {
                    initial: Duration::from_secs(1),
                    max: Duration::from_secs(a.retry_max_delay_seconds.max(1)),
                    deadline: Duration::from_secs(a.retry_deadline_seconds),
                },
                restic_timeout: Duration::from_secs(a.restic_timeout_seconds.max(1)),
                local_roots: a
                    .local_repository_roots
                    .into_iter()
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect(),
            };
            let health = tokio::spawn(serve_health(a.metrics_port, metrics));
            // Kubernetes stops pods with SIGTERM; a terminal sends SIGINT.
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let shutdown = async move {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            };
            crate::worker::run(client, cfg, shutdown).await?;
            health.abort();
            Ok(serde_json::to_string(
                &serde_json::json!({"stopped": true}),
            )?)
        }
        Command::Backup(a) => {
            let restic = restic_for(&a.repo)?;
            let (version, initialized) =
                tokio::join!(restic.version(), restic.ensure_initialized());
            version?;
            initialized?;
            let node = IoBudget::new(Limits {
                bytes_per_second: a.io_budget,
                iops: a.iops,
            });
            let _adapting = adaptive(&node, a.io_budget_adaptive);
            let budget = node.for_assignment(Limits::default());
            let req = BackupRequest {
                path: a.path,
                mode: a.mode,
                host: a.host,
                tags: a.tags,
                key: a.key,
                excludes: a.excludes,
                paths: vec![],
                restic_args: vec![],
                budget,
                read_concurrency: None,
                limit_upload_kib: None,
                io_uring: a.io_uring == IoUringMode::Auto,
                on_unreadable: match a.on_unreadable {
                    OnUnreadable::Fail => engine::UnreadablePolicy::Fail,
                    OnUnreadable::Warn => engine::UnreadablePolicy::Warn,
                },
                progress: Default::default(),
                // Beside the persistent cache, when there is one: the agent's state lives there.
                pending_dir: a
                    .repo
                    .cache_dir
                    .as_ref()
                    .map(|c| c.with_extension("pending")),
            };
            Ok(serde_json::to_string(&engine::backup(&restic, req).await?)?)
        }
        Command::Restore(a) => {
            let restic = restic_for(&a.repo)?;
            restic.version().await?;
            let req = RestoreRequest {
                snapshot: a.snapshot,
                target: a.target,
                delete: a.delete,
                include: a.include,
                exclude: a.exclude,
                budget: crate::budget::AssignmentBudget::unlimited(),
                owners: !a.no_owners,
            };
            Ok(serde_json::to_string(
                &engine::restore(&restic, req).await?,
            )?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// `stash-node-agent backup` of a path that need not exist, with `extra` flags.
    fn backup(extra: &[&str]) -> Result<Cli, clap::Error> {
        let base = ["stash-node-agent", "backup", "--repo", "/nonexistent/repo"];
        let path = ["--path", "/nonexistent/volume"];
        Cli::try_parse_from(base.iter().chain(&path).chain(extra))
    }

    #[test]
    fn budgets_are_quantities_and_zero_is_refused() {
        assert_eq!(parse_bytes("50Mi"), Ok(50 << 20));
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert!(parse_bytes("0").is_err_and(|e| e.contains("zero")));
        assert!(parse_bytes("10 parsecs").is_err());
        assert_eq!(parse_count("100"), Ok(100));
        assert!(parse_count("0").is_err());
        let err = backup(&["--io-budget", "64K"])
            .expect_err("K is not a quantity suffix")
            .to_string();
        assert!(err.contains("use k for 1000 or Ki for 1024"), "{err}");
        assert!(backup(&["--iops", "0"]).is_err_and(|e| e.to_string().contains("zero")));
        assert!(backup(&["--io-budget", "1.5Gi", "--iops", "100"]).is_ok());
        // An adaptive budget needs its ceiling.
        let err = backup(&["--io-budget-adaptive"])
            .expect_err("no ceiling")
            .to_string();
        assert!(err.contains("--io-budget <IO_BUDGET>"), "{err}");
        assert!(backup(&["--io-budget", "50Mi", "--io-budget-adaptive"]).is_ok());
    }
}
