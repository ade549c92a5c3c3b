//! Stash's session metrics for the Prometheus pushgateway: a pure renderer that turns a
//! finished backup or restore session into the classic text format, and the HTTP push of it.
//!
//! Names, labels and which samples appear follow Stash's `apimachinery/pkg/metrics`: every
//! metric under its current (`stash_appscode_com_*`) and legacy (`stash_*`) name; a failed
//! session, target or host carries only its `*_success` sample, so the Add (POST) semantics of
//! the push keep the last successful values (duration, last success time) in the gateway.
//! Unlike Stash, which pushes the session, each target and each host separately (so the later
//! pushes replace the earlier ones' samples of the same names), one push carries the whole
//! session.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// The driver value for CSI snapshots; any other driver is Stash's default, restic.
pub const DRIVER_VOLUME_SNAPSHOTTER: &str = "VolumeSnapshotter";
pub const DRIVER_RESTIC: &str = "Restic";

/// How long a push may take, connect to last byte, before it counts as failed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Label keys, as Stash names them.
pub mod labels {
    pub const INVOKER_KIND: &str = "invoker_kind";
    pub const INVOKER_NAME: &str = "invoker_name";
    pub const NAMESPACE: &str = "namespace";
    pub const DRIVER: &str = "driver";
    pub const REPOSITORY: &str = "repository";
    pub const KIND: &str = "kind";
    pub const GROUP: &str = "group";
    pub const NAME: &str = "name";
    pub const HOSTNAME: &str = "hostname";
    pub const BACKEND: &str = "backend";
    pub const BUCKET: &str = "bucket";
    pub const PREFIX: &str = "prefix";
    /// The pushgateway's grouping key: set from the URL, so a pushed sample must not carry it.
    pub const JOB: &str = "job";
}

/// The outcome of a finished BackupSession, as the operator read it from the status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackupSessionMetrics {
    pub invoker_kind: String,
    pub invoker_name: String,
    pub namespace: String,
    /// `Restic` or `VolumeSnapshotter`.
    pub driver: String,
    /// The Repository's name (restic driver only).
    pub repository: String,
    pub success: bool,
    pub duration_seconds: f64,
    /// Unix seconds the session finished, for `*_last_success_time_seconds` (only when success).
    pub finished_at: i64,
    pub targets: Vec<TargetMetrics>,
    /// Present when the session ran the `SendRepositoryMetrics` post-backup action.
    pub repository_metrics: Option<RepositoryMetrics>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TargetMetrics {
    pub kind: String,
    /// The API group (empty for the core group), or the app's group for an AppBinding.
    pub group: String,
    pub name: String,
    pub success: bool,
    pub host_count: i64,
    pub hosts: Vec<HostMetrics>,
}

/// One host of a target, summed over that host's snapshots.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostMetrics {
    pub hostname: String,
    pub success: bool,
    pub duration_seconds: f64,
    pub data_size_bytes: f64,
    pub uploaded_bytes: f64,
    pub processing_time_seconds: f64,
    pub files_total: i64,
    pub files_new: i64,
    pub files_modified: i64,
    pub files_unmodified: i64,
}

/// The Repository's state after the post-backup actions.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RepositoryMetrics {
    pub name: String,
    pub namespace: String,
    /// The backend provider: `s3`, `gcs`, `local`, …
    pub backend: String,
    /// Empty for backends without one; the label is then left out, as Stash does.
    pub bucket: String,
    pub prefix: String,
    /// `None` when the integrity was not checked.
    pub integrity: Option<bool>,
    pub size_bytes: f64,
    pub snapshot_count: i64,
    pub snapshots_removed: i64,
}

/// The outcome of a finished RestoreSession.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RestoreSessionMetrics {
    pub invoker_kind: String,
    pub invoker_name: String,
    pub namespace: String,
    pub driver: String,
    pub repository: String,
    pub success: bool,
    pub duration_seconds: f64,
    pub targets: Vec<RestoreTargetMetrics>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RestoreTargetMetrics {
    pub kind: String,
    pub group: String,
    pub name: String,
    pub success: bool,
    pub host_count: i64,
    pub hosts: Vec<RestoreHostMetrics>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RestoreHostMetrics {
    pub hostname: String,
    pub success: bool,
    pub duration_seconds: f64,
}

/// The pushgateway job (grouping key) of an invoker's metrics: one group per invoker, so each
/// session's push replaces the previous session's values.
pub fn job_name(invoker_kind: &str, namespace: &str, invoker_name: &str) -> String {
    format!("{}-{namespace}-{invoker_name}", invoker_kind.to_lowercase())
}

/// Whether `name` may be a label name of a pushed sample: the Prometheus label syntax, and
/// not reserved (`__*`) nor the grouping key (`job`), which the pushgateway sets itself.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    let starts_well = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    starts_well
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
        && name != labels::JOB
}

/// A gauge under its two names.
struct Metric {
    current: &'static str,
    legacy: &'static str,
    help: &'static str,
}

macro_rules! metrics {
    ($($id:ident = $current:literal, $legacy:literal, $help:literal;)*) => {
        $(const $id: Metric = Metric { current: $current, legacy: $legacy, help: $help };)*
        #[cfg(test)]
        const ALL: &[Metric] = &[$($id),*];
    };
}

metrics! {
    BACKUP_SUCCESS = "stash_appscode_com_backupsession_success", "stash_backup_session_success",
        "1 if every target of the backup session succeeded, else 0";
    BACKUP_DURATION = "stash_appscode_com_backupsession_duration_seconds",
        "stash_backup_session_duration_seconds", "Seconds the last successful backup session took";
    BACKUP_TARGET_COUNT = "stash_appscode_com_backupsession_target_count_total",
        "stash_backup_target_count_total", "Targets of the last successful backup session";
    BACKUP_LAST_SUCCESS = "stash_appscode_com_backupsession_last_success_time_seconds",
        "stash_backup_last_success_time_seconds", "Unix time a backup session last succeeded";
    TARGET_SUCCESS = "stash_appscode_com_backupsession_target_success",
        "stash_backup_target_success", "1 if the target's backup succeeded, else 0";
    TARGET_HOST_COUNT = "stash_appscode_com_backupsession_target_host_count_total",
        "stash_backup_target_host_count_total", "Hosts of the target's last successful backup";
    TARGET_LAST_SUCCESS = "stash_appscode_com_backupsession_target_last_success_time_seconds",
        "stash_backup_target_last_success_time_seconds",
        "Unix time the target's backup last succeeded";
    HOST_SUCCESS = "stash_appscode_com_backupsession_host_backup_success",
        "stash_backup_host_backup_success", "1 if the host's backup succeeded, else 0";
    HOST_DURATION = "stash_appscode_com_backupsession_host_backup_duration_seconds",
        "stash_backup_host_backup_duration_seconds", "Seconds the host's last successful backup took";
    HOST_DATA_SIZE = "stash_appscode_com_backupsession_host_data_size_bytes",
        "stash_backup_host_data_size_bytes", "Bytes of the host's data in its last successful backup";
    HOST_UPLOADED = "stash_appscode_com_backupsession_host_data_uploaded_bytes",
        "stash_backup_host_data_uploaded_bytes", "Bytes the host's last successful backup uploaded";
    HOST_PROCESSING = "stash_appscode_com_backupsession_host_data_processing_time_seconds",
        "stash_backup_host_data_processing_time_seconds",
        "Seconds restic spent processing the host's data in its last successful backup";
    HOST_FILES_TOTAL = "stash_appscode_com_backupsession_host_files_total",
        "stash_backup_host_files_total", "Files of the host in its last successful backup";
    HOST_FILES_NEW = "stash_appscode_com_backupsession_host_files_new",
        "stash_backup_host_files_new", "Files new since the host's previous backup";
    HOST_FILES_MODIFIED = "stash_appscode_com_backupsession_host_files_modified",
        "stash_backup_host_files_modified", "Files modified since the host's previous backup";
    HOST_FILES_UNMODIFIED = "stash_appscode_com_backupsession_host_files_unmodified",
        "stash_backup_host_files_unmodified", "Files unchanged since the host's previous backup";
    REPO_INTEGRITY = "stash_appscode_com_repository_integrity", "stash_repository_integrity",
        "1 if the repository's last integrity check passed, else 0";
    REPO_SIZE = "stash_appscode_com_repository_size_bytes", "stash_repository_size_bytes",
        "Bytes the repository holds after the last backup";
    REPO_SNAPSHOTS = "stash_appscode_com_repository_snapshot_count",
        "stash_repository_snapshot_count", "Snapshots in the repository";
    REPO_CLEANED = "stash_appscode_com_repository_snapshot_cleaned",
        "stash_repository_snapshot_cleaned",
        "Snapshots the retention policy removed after the last backup";
    RESTORE_SUCCESS = "stash_appscode_com_restoresession_success", "stash_restore_session_success",
        "1 if the restore session succeeded, else 0";
    RESTORE_DURATION = "stash_appscode_com_restoresession_duration_seconds",
        "stash_restore_session_duration_seconds",
        "Seconds the last successful restore session took";
    RESTORE_TARGET_COUNT = "stash_appscode_com_restoresession_target_count_total",
        "stash_restore_target_count_total", "Targets of the last successful restore session";
    RESTORE_TARGET_SUCCESS = "stash_appscode_com_restoresession_target_success",
        "stash_restore_target_success", "1 if the target's restore succeeded, else 0";
    RESTORE_TARGET_HOST_COUNT = "stash_appscode_com_restoresession_target_host_count_total",
        "stash_restore_target_host_count_total", "Hosts of the target's last successful restore";
    RESTORE_HOST_SUCCESS = "stash_appscode_com_restoresession_host_restore_success",
        "stash_restore_host_restore_success", "1 if the host's restore succeeded, else 0";
    RESTORE_HOST_DURATION = "stash_appscode_com_restoresession_host_restore_duration_seconds",
        "stash_restore_host_restore_duration_seconds",
        "Seconds the host's last successful restore took";
}

/// Label name to value; sorted, as Prometheus clients write them, and a later insert
/// overrides an earlier one, which is how Stash layers its label sets.
type Labels = BTreeMap<String, String>;

fn with(mut base: Labels, pairs: &[(&str, &str)]) -> Labels {
    for (k, v) in pairs {
        base.insert((*k).to_owned(), (*v).to_owned());
    }
    base
}

/// The labels of every sample of an invoker. User labels go first so that Stash's own labels
/// win a clash, as in Stash; invalid names are dropped because one would make the gateway
/// refuse the whole push (the CLI should reject them up front with [`valid_label_name`]).
fn invoker_labels(
    kind: &str,
    name: &str,
    namespace: &str,
    driver: &str,
    repository: &str,
    extra: &[(String, String)],
) -> Labels {
    let user = extra
        .iter()
        .filter(|(k, _)| valid_label_name(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let invoker = with(
        user,
        &[
            (labels::INVOKER_KIND, kind),
            (labels::INVOKER_NAME, name),
            (labels::NAMESPACE, namespace),
        ],
    );
    if driver == DRIVER_VOLUME_SNAPSHOTTER {
        // A CSI snapshot has no repository; Stash marks its samples as PVC ones instead.
        with(
            invoker,
            &[
                (labels::DRIVER, DRIVER_VOLUME_SNAPSHOTTER),
                (labels::KIND, "PersistentVolumeClaim"),
                (labels::GROUP, ""),
            ],
        )
    } else {
        with(
            invoker,
            &[
                (labels::DRIVER, DRIVER_RESTIC),
                (labels::REPOSITORY, repository),
            ],
        )
    }
}

struct Sample {
    labels: Labels,
    value: f64,
}

/// Samples grouped by metric, in first-seen order: the text format wants each metric's
/// samples together under one HELP and TYPE.
#[derive(Default)]
struct Exposition {
    families: Vec<(&'static Metric, Vec<Sample>)>,
}

impl Exposition {
    fn add(&mut self, metric: &'static Metric, labels: &Labels, value: f64) {
        let sample = Sample {
            labels: labels.clone(),
            value,
        };
        match self
            .families
            .iter_mut()
            .find(|(m, _)| m.current == metric.current)
        {
            Some((_, samples)) => samples.push(sample),
            None => self.families.push((metric, vec![sample])),
        }
    }

    fn flag(&mut self, metric: &'static Metric, labels: &Labels, on: bool) {
        self.add(metric, labels, if on { 1.0 } else { 0.0 });
    }
}

/// A metric exists here only once it has a sample, so the text of a failure names only the
/// flags it sets and leaves the gateway's other values of the group alone.
impl fmt::Display for Exposition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (metric, samples) in &self.families {
            for name in [metric.current, metric.legacy] {
                writeln!(f, "# HELP {name} {}", metric.help)?;
                writeln!(f, "# TYPE {name} gauge")?;
                for sample in samples {
                    f.write_str(name)?;
                    write_labels(f, &sample.labels)?;
                    f.write_str(" ")?;
                    write_value(f, sample.value)?;
                    f.write_str("\n")?;
                }
            }
        }
        Ok(())
    }
}

fn write_labels(f: &mut fmt::Formatter<'_>, labels: &Labels) -> fmt::Result {
    if labels.is_empty() {
        return Ok(());
    }
    f.write_str("{")?;
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            f.write_str(",")?;
        }
        write!(f, "{k}=\"")?;
        for c in v.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")?;
    }
    f.write_str("}")
}

/// Rust writes infinities as `inf`; the text format spells them `+Inf` and `-Inf`.
fn write_value(f: &mut fmt::Formatter<'_>, v: f64) -> fmt::Result {
    if v == f64::INFINITY {
        f.write_str("+Inf")
    } else if v == f64::NEG_INFINITY {
        f.write_str("-Inf")
    } else {
        write!(f, "{v}")
    }
}

/// The text a backup session pushes (Prometheus text format 0.0.4).
pub fn render_backup(m: &BackupSessionMetrics, extra: &[(String, String)]) -> String {
    let mut out = Exposition::default();
    let base = invoker_labels(
        &m.invoker_kind,
        &m.invoker_name,
        &m.namespace,
        &m.driver,
        &m.repository,
        extra,
    );
    out.flag(&BACKUP_SUCCESS, &base, m.success);
    if m.success {
        out.add(&BACKUP_DURATION, &base, m.duration_seconds);
        out.add(&BACKUP_TARGET_COUNT, &base, m.targets.len() as f64);
        out.add(&BACKUP_LAST_SUCCESS, &base, m.finished_at as f64);
    }
    for t in &m.targets {
        let target = target_labels(&base, &t.kind, &t.group, &t.name);
        out.flag(&TARGET_SUCCESS, &target, t.success);
        if t.success {
            out.add(&TARGET_HOST_COUNT, &target, t.host_count as f64);
            out.add(&TARGET_LAST_SUCCESS, &target, m.finished_at as f64);
        }
        for h in &t.hosts {
            let host = with(target.clone(), &[(labels::HOSTNAME, &h.hostname)]);
            out.flag(&HOST_SUCCESS, &host, h.success);
            if h.success {
                out.add(&HOST_DURATION, &host, h.duration_seconds);
                out.add(&HOST_DATA_SIZE, &host, h.data_size_bytes);
                out.add(&HOST_UPLOADED, &host, h.uploaded_bytes);
                out.add(&HOST_PROCESSING, &host, h.processing_time_seconds);
                out.add(&HOST_FILES_TOTAL, &host, h.files_total as f64);
                out.add(&HOST_FILES_NEW, &host, h.files_new as f64);
                out.add(&HOST_FILES_MODIFIED, &host, h.files_modified as f64);
                out.add(&HOST_FILES_UNMODIFIED, &host, h.files_unmodified as f64);
            }
        }
    }
    if let Some(r) = &m.repository_metrics {
        // The Repository's own name and namespace replace the invoker's `namespace`, as in Stash.
        let mut repo = with(
            base,
            &[
                (labels::NAME, &r.name),
                (labels::NAMESPACE, &r.namespace),
                (labels::BACKEND, &r.backend),
            ],
        );
        for (key, value) in [(labels::BUCKET, &r.bucket), (labels::PREFIX, &r.prefix)] {
            if !value.is_empty() {
                repo.insert(key.to_owned(), value.clone());
            }
        }
        // Stash reports an unchecked repository as 0 (broken); leaving the sample out keeps
        // the last real check's result instead.
        if let Some(ok) = r.integrity {
            out.flag(&REPO_INTEGRITY, &repo, ok);
        }
        out.add(&REPO_SIZE, &repo, r.size_bytes);
        out.add(&REPO_SNAPSHOTS, &repo, r.snapshot_count as f64);
        out.add(&REPO_CLEANED, &repo, r.snapshots_removed as f64);
    }
    out.to_string()
}

/// The text a restore session pushes (Prometheus text format 0.0.4).
pub fn render_restore(m: &RestoreSessionMetrics, extra: &[(String, String)]) -> String {
    let mut out = Exposition::default();
    let base = invoker_labels(
        &m.invoker_kind,
        &m.invoker_name,
        &m.namespace,
        &m.driver,
        &m.repository,
        extra,
    );
    out.flag(&RESTORE_SUCCESS, &base, m.success);
    if m.success {
        out.add(&RESTORE_DURATION, &base, m.duration_seconds);
        out.add(&RESTORE_TARGET_COUNT, &base, m.targets.len() as f64);
    }
    for t in &m.targets {
        let target = target_labels(&base, &t.kind, &t.group, &t.name);
        out.flag(&RESTORE_TARGET_SUCCESS, &target, t.success);
        if t.success {
            out.add(&RESTORE_TARGET_HOST_COUNT, &target, t.host_count as f64);
        }
        for h in &t.hosts {
            let host = with(target.clone(), &[(labels::HOSTNAME, &h.hostname)]);
            out.flag(&RESTORE_HOST_SUCCESS, &host, h.success);
            if h.success {
                out.add(&RESTORE_HOST_DURATION, &host, h.duration_seconds);
            }
        }
    }
    out.to_string()
}

fn target_labels(base: &Labels, kind: &str, group: &str, name: &str) -> Labels {
    with(
        base.clone(),
        &[
            (labels::KIND, kind),
            (labels::GROUP, group),
            (labels::NAME, name),
        ],
    )
}

/// Errors of a push, named after what failed.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("failed to use the pushgateway URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: &'static str },
    #[error("failed to push metrics: the job name is empty")]
    EmptyJob,
    #[error("failed to build the push request: {0}")]
    BuildRequest(#[source] hyper::http::Error),
    #[error("failed to connect to the pushgateway at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to exchange the push with the pushgateway at {addr}: {source}")]
    Exchange {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("failed to push metrics to the pushgateway at {addr} within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("failed to push metrics: the pushgateway answered {status}: {body}")]
    Rejected { status: u16, body: String },
}

impl PushError {
    /// A fixed name for the kind of failure (metric label, Event reason).
    pub fn category(&self) -> &'static str {
        match self {
            PushError::InvalidUrl { .. } => "invalid_url",
            PushError::EmptyJob => "invalid_job",
            PushError::BuildRequest(_) => "invalid_request",
            PushError::Connect { .. } => "unreachable",
            PushError::Exchange { .. } => "exchange",
            PushError::Timeout { .. } => "timeout",
            PushError::Rejected { status, .. } if *status >= 500 => "server_error",
            PushError::Rejected { .. } => "rejected",
        }
    }

    /// Whether the same push may succeed later: the gateway down, slow or failing; not a
    /// push it refused or a URL that cannot work.
    pub fn is_retryable(&self) -> bool {
        match self {
            PushError::Connect { .. } | PushError::Exchange { .. } | PushError::Timeout { .. } => {
                true
            }
            PushError::Rejected { status, .. } => *status >= 500,
            PushError::InvalidUrl { .. } | PushError::EmptyJob | PushError::BuildRequest(_) => {
                false
            }
        }
    }
}

/// A pushgateway reached over plain HTTP: the operator's own sidecar container, never
/// user-configured (Stash issue #1162), so TLS is not needed.
#[derive(Clone, Debug)]
pub struct Pushgateway {
    /// `host:port` as given, for the Host header and messages.
    authority: String,
    /// The host to connect to, without IPv6 brackets.
    host: String,
    port: u16,
    /// A route prefix (`--web.route-prefix`), without the trailing slash.
    base_path: String,
    timeout: Duration,
}

/// The body of a refusal is the gateway's reason; a bounded piece of it is enough.
const MAX_ERROR_BODY: usize = 512;

impl Pushgateway {
    /// Parses the gateway's base URL; like Stash's Go client, a URL without a scheme means http.
    pub fn new(url: &str) -> Result<Self, PushError> {
        let invalid = |reason| PushError::InvalidUrl {
            url: url.to_owned(),
            reason,
        };
        let full = if url.contains("://") {
            url.to_owned()
        } else {
            format!("http://{url}")
        };
        let uri: hyper::Uri = full.parse().map_err(|_| invalid("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid("only http:// is supported"));
        }
        if uri.query().is_some() {
            return Err(invalid("a query has no meaning here"));
        }
        let authority = uri.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("credentials in the URL are not supported"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        Ok(Pushgateway {
            authority: authority.as_str().to_owned(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: authority.port_u16().unwrap_or(80),
            base_path: uri.path().trim_end_matches('/').to_owned(),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Adds the metrics in `body` (text format) to the group `job`: POST, which replaces the
    /// group's samples of the metrics named in `body` and keeps its other metrics.
    pub async fn push(&self, job: &str, body: String) -> Result<(), PushError> {
        let path = format!("{}{}", self.base_path, job_path(job)?);
        match tokio::time::timeout(self.timeout, self.post(&path, body)).await {
            Ok(result) => result,
            Err(_elapsed) => Err(PushError::Timeout {
                addr: self.authority.clone(),
                after: self.timeout,
            }),
        }
    }

    async fn post(&self, path: &str, body: String) -> Result<(), PushError> {
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, &self.authority)
            .header(
                hyper::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .map_err(PushError::BuildRequest)?;
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| PushError::Connect {
                addr: self.authority.clone(),
                source,
            })?;
        let exchange_error = |source| PushError::Exchange {
            addr: self.authority.clone(),
            source,
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(exchange_error)?;
        // The connection is driven here rather than spawned, so a timeout drops it with the
        // request; `sender` is dropped once the answer is read, which lets `conn` end.
        let exchange = async move {
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        };
        let (answer, _conn) = tokio::join!(exchange, conn);
        let (status, body) = answer.map_err(exchange_error)?;
        if status.is_success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&body);
        let text = text.trim();
        let cut = (0..=MAX_ERROR_BODY.min(text.len()))
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        Err(PushError::Rejected {
            status: status.as_u16(),
            body: text[..cut].to_owned(),
        })
    }
}

/// The grouping-key path of a job, the way the Go client builds it: percent-encoded, or
/// base64url under `job@base64` when it holds a `/`, which a path segment cannot carry.
fn job_path(job: &str) -> Result<String, PushError> {
    if job.is_empty() {
        return Err(PushError::EmptyJob);
    }
    if job.contains('/') {
        let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(job);
        return Ok(format!("/metrics/job@base64/{encoded}"));
    }
    let mut path = String::from("/metrics/job/");
    for b in job.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            path.push(char::from(b));
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, success: bool) -> HostMetrics {
        HostMetrics {
            hostname: name.into(),
            success,
            duration_seconds: 12.5,
            data_size_bytes: 1048576.0,
            uploaded_bytes: 2048.0,
            processing_time_seconds: 11.0,
            files_total: 10,
            files_new: 3,
            files_modified: 2,
            files_unmodified: 5,
        }
    }

    fn backup() -> BackupSessionMetrics {
        BackupSessionMetrics {
            invoker_kind: "BackupConfiguration".into(),
            invoker_name: "nightly".into(),
            namespace: "demo".into(),
            driver: "Restic".into(),
            repository: "gcs-repo".into(),
            success: true,
            duration_seconds: 42.0,
            finished_at: 1_700_000_000,
            targets: vec![TargetMetrics {
                kind: "Deployment".into(),
                group: "apps".into(),
                name: "web".into(),
                success: true,
                host_count: 1,
                hosts: vec![host("host-0", true)],
            }],
            repository_metrics: Some(RepositoryMetrics {
                name: "gcs-repo".into(),
                namespace: "storage".into(),
                backend: "gcs".into(),
                bucket: "stash-backup".into(),
                prefix: "demo/web".into(),
                integrity: Some(true),
                size_bytes: 5e6,
                snapshot_count: 7,
                snapshots_removed: 2,
            }),
        }
    }

    /// The sample lines of `text` with metric name `name`.
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .collect()
    }

    fn one<'a>(text: &'a str, name: &str) -> &'a str {
        let found = samples(text, name);
        assert_eq!(found.len(), 1, "{name} in:\n{text}");
        found[0]
    }

    #[test]
    fn job_name_is_the_lowercased_kind_namespace_and_name() {
        assert_eq!(
            job_name("BackupConfiguration", "demo", "nightly"),
            "backupconfiguration-demo-nightly"
        );
        assert_eq!(
            job_name("RestoreSession", "prod", "r-1"),
            "restoresession-prod-r-1"
        );
    }

    #[test]
    fn every_metric_appears_under_its_current_and_legacy_name() {
        let text = render_backup(&backup(), &[]);
        for name in [
            "stash_appscode_com_backupsession_success",
            "stash_backup_session_success",
            "stash_appscode_com_backupsession_duration_seconds",
            "stash_backup_session_duration_seconds",
            "stash_appscode_com_backupsession_target_count_total",
            "stash_backup_target_count_total",
            "stash_appscode_com_backupsession_last_success_time_seconds",
            "stash_backup_last_success_time_seconds",
            "stash_appscode_com_backupsession_target_success",
            "stash_backup_target_success",
            "stash_appscode_com_backupsession_target_host_count_total",
            "stash_backup_target_host_count_total",
            "stash_appscode_com_backupsession_target_last_success_time_seconds",
            "stash_backup_target_last_success_time_seconds",
            "stash_appscode_com_backupsession_host_backup_success",
            "stash_backup_host_backup_success",
            "stash_appscode_com_backupsession_host_backup_duration_seconds",
            "stash_backup_host_backup_duration_seconds",
            "stash_appscode_com_backupsession_host_data_size_bytes",
            "stash_backup_host_data_size_bytes",
            "stash_appscode_com_backupsession_host_data_uploaded_bytes",
            "stash_backup_host_data_uploaded_bytes",
            "stash_appscode_com_backupsession_host_data_processing_time_seconds",
            "stash_backup_host_data_processing_time_seconds",
            "stash_appscode_com_backupsession_host_files_total",
            "stash_backup_host_files_total",
            "stash_appscode_com_backupsession_host_files_new",
            "stash_backup_host_files_new",
            "stash_appscode_com_backupsession_host_files_modified",
            "stash_backup_host_files_modified",
            "stash_appscode_com_backupsession_host_files_unmodified",
            "stash_backup_host_files_unmodified",
            "stash_appscode_com_repository_integrity",
            "stash_repository_integrity",
            "stash_appscode_com_repository_size_bytes",
            "stash_repository_size_bytes",
            "stash_appscode_com_repository_snapshot_count",
            "stash_repository_snapshot_count",
            "stash_appscode_com_repository_snapshot_cleaned",
            "stash_repository_snapshot_cleaned",
        ] {
            one(&text, name);
            assert!(text.contains(&format!("# TYPE {name} gauge\n")), "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        // 20 backup metrics, twice each: no more than the list above.
        assert_eq!(text.lines().filter(|l| l.starts_with("# TYPE")).count(), 40);
    }

    #[test]
    fn session_target_host_and_repository_samples_carry_their_label_sets() {
        let text = render_backup(&backup(), &[]);
        let invoker = r#"driver="Restic",invoker_kind="BackupConfiguration",invoker_name="nightly",namespace="demo",repository="gcs-repo""#;
        assert_eq!(
            one(&text, "stash_appscode_com_backupsession_success"),
            format!("stash_appscode_com_backupsession_success{{{invoker}}} 1")
        );
        assert_eq!(
            one(&text, "stash_backup_target_success"),
            r#"stash_backup_target_success{driver="Restic",group="apps",invoker_kind="BackupConfiguration",invoker_name="nightly",kind="Deployment",name="web",namespace="demo",repository="gcs-repo"} 1"#
        );
        assert_eq!(
            one(
                &text,
                "stash_appscode_com_backupsession_host_data_size_bytes"
            ),
            r#"stash_appscode_com_backupsession_host_data_size_bytes{driver="Restic",group="apps",hostname="host-0",invoker_kind="BackupConfiguration",invoker_name="nightly",kind="Deployment",name="web",namespace="demo",repository="gcs-repo"} 1048576"#
        );
        // The Repository's namespace replaces the invoker's.
        assert_eq!(
            one(&text, "stash_repository_size_bytes"),
            r#"stash_repository_size_bytes{backend="gcs",bucket="stash-backup",driver="Restic",invoker_kind="BackupConfiguration",invoker_name="nightly",name="gcs-repo",namespace="storage",prefix="demo/web",repository="gcs-repo"} 5000000"#
        );
        assert!(one(&text, "stash_backup_host_files_new").ends_with("} 3"));
        assert!(one(&text, "stash_backup_session_duration_seconds").ends_with("} 42"));
        assert!(one(&text, "stash_backup_target_count_total").ends_with("} 1"));
        assert!(one(&text, "stash_repository_integrity").ends_with("} 1"));
        assert!(one(&text, "stash_repository_snapshot_cleaned").ends_with("} 2"));
    }

    #[test]
    fn last_success_times_are_the_finish_time_and_only_on_success() {
        let ok = render_backup(&backup(), &[]);
        assert!(one(&ok, "stash_backup_last_success_time_seconds").ends_with("} 1700000000"));
        assert!(
            one(&ok, "stash_backup_target_last_success_time_seconds").ends_with("} 1700000000")
        );

        let mut m = backup();
        m.success = false;
        m.targets[0].success = false;
        m.targets[0].hosts[0].success = false;
        let failed = render_backup(&m, &[]);
        assert!(one(&failed, "stash_appscode_com_backupsession_success").ends_with("} 0"));
        assert!(one(&failed, "stash_backup_target_success").ends_with("} 0"));
        assert!(one(&failed, "stash_backup_host_backup_success").ends_with("} 0"));
        // A failure pushes only the success flags, so the gateway keeps the last success's
        // other values, as Stash's pushes do.
        for gone in [
            "last_success_time_seconds",
            "session_duration_seconds",
            "target_count_total",
            "target_host_count_total",
            "host_backup_duration_seconds",
            "host_files_total",
        ] {
            assert!(!failed.contains(gone), "{gone} in:\n{failed}");
        }
    }

    #[test]
    fn a_failed_host_of_a_succeeded_target_has_only_its_flag() {
        let mut m = backup();
        m.targets[0].hosts.push(host("host-1", false));
        let text = render_backup(&m, &[]);
        assert_eq!(samples(&text, "stash_backup_host_backup_success").len(), 2);
        let sizes = samples(&text, "stash_backup_host_data_size_bytes");
        assert_eq!(sizes.len(), 1);
        assert!(sizes[0].contains(r#"hostname="host-0""#));
    }

    #[test]
    fn repository_labels_leave_out_an_empty_bucket_and_prefix_and_integrity_is_optional() {
        let mut m = backup();
        if let Some(r) = m.repository_metrics.as_mut() {
            r.backend = "local".into();
            r.bucket.clear();
            r.prefix.clear();
            r.integrity = None;
        }
        let text = render_backup(&m, &[]);
        let line = one(&text, "stash_appscode_com_repository_snapshot_count");
        assert!(
            !line.contains("bucket=") && !line.contains("prefix="),
            "{line}"
        );
        assert!(line.ends_with("} 7"));
        assert!(samples(&text, "stash_repository_integrity").is_empty());

        if let Some(r) = m.repository_metrics.as_mut() {
            r.integrity = Some(false);
        }
        let text = render_backup(&m, &[]);
        assert!(one(&text, "stash_repository_integrity").ends_with("} 0"));

        m.repository_metrics = None;
        assert!(!render_backup(&m, &[]).contains("repository_"));
    }

    #[test]
    fn volume_snapshotter_samples_are_pvc_ones_without_a_repository() {
        let mut m = backup();
        m.driver = DRIVER_VOLUME_SNAPSHOTTER.into();
        m.repository_metrics = None;
        m.targets[0].kind = "PersistentVolumeClaim".into();
        m.targets[0].group = String::new();
        let text = render_backup(&m, &[]);
        assert_eq!(
            one(&text, "stash_backup_session_success"),
            r#"stash_backup_session_success{driver="VolumeSnapshotter",group="",invoker_kind="BackupConfiguration",invoker_name="nightly",kind="PersistentVolumeClaim",namespace="demo"} 1"#
        );
        assert!(!text.contains("repository="));
    }

    #[test]
    fn any_driver_but_volume_snapshotter_is_restic() {
        let mut m = backup();
        m.driver = String::new();
        let text = render_backup(&m, &[]);
        assert!(one(&text, "stash_backup_session_success").contains(r#"driver="Restic""#));
    }

    #[test]
    fn extra_labels_are_on_every_sample_escaped_and_never_override_stash_labels() {
        let extra = [
            ("team".to_owned(), "a \"b\" \\ c\nd".to_owned()),
            ("namespace".to_owned(), "spoofed".to_owned()),
            ("job".to_owned(), "spoofed".to_owned()),
            ("__name__".to_owned(), "spoofed".to_owned()),
            ("bad-name".to_owned(), "x".to_owned()),
            ("9lives".to_owned(), "x".to_owned()),
        ];
        let text = render_backup(&backup(), &extra);
        let escaped = r#"team="a \"b\" \\ c\nd""#;
        let sample_lines: Vec<_> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(sample_lines.len(), 40);
        for line in sample_lines {
            assert!(line.contains(escaped), "{line}");
            assert!(
                !line.contains("spoofed") && !line.contains("=\"x\""),
                "{line}"
            );
        }
        // Escaping keeps one sample a line.
        assert_eq!(text.lines().count(), 40 * 3);
    }

    #[test]
    fn label_names_follow_the_prometheus_syntax() {
        for ok in ["a", "_a", "invoker_kind", "A9_b"] {
            assert!(valid_label_name(ok), "{ok}");
        }
        for bad in ["", "9a", "a-b", "a.b", "__reserved", "job", "é"] {
            assert!(!valid_label_name(bad), "{bad}");
        }
    }

    #[test]
    fn values_use_the_text_format_spelling() {
        let mut m = backup();
        m.duration_seconds = f64::INFINITY;
        m.targets[0].hosts[0].duration_seconds = 0.25;
        m.targets[0].hosts[0].uploaded_bytes = f64::NAN;
        let text = render_backup(&m, &[]);
        assert!(one(&text, "stash_backup_session_duration_seconds").ends_with("} +Inf"));
        assert!(one(&text, "stash_backup_host_backup_duration_seconds").ends_with("} 0.25"));
        assert!(one(&text, "stash_backup_host_data_uploaded_bytes").ends_with("} NaN"));
    }

    fn restore() -> RestoreSessionMetrics {
        RestoreSessionMetrics {
            invoker_kind: "RestoreSession".into(),
            invoker_name: "r-1".into(),
            namespace: "demo".into(),
            driver: "Restic".into(),
            repository: "gcs-repo".into(),
            success: true,
            duration_seconds: 30.0,
            targets: vec![RestoreTargetMetrics {
                kind: "StatefulSet".into(),
                group: "apps".into(),
                name: "db".into(),
                success: true,
                host_count: 2,
                hosts: vec![
                    RestoreHostMetrics {
                        hostname: "host-0".into(),
                        success: true,
                        duration_seconds: 9.5,
                    },
                    RestoreHostMetrics {
                        hostname: "host-1".into(),
                        success: false,
                        duration_seconds: 1.0,
                    },
                ],
            }],
        }
    }

    #[test]
    fn restore_metrics_have_both_names_and_their_labels() {
        let text = render_restore(&restore(), &[]);
        for name in [
            "stash_appscode_com_restoresession_success",
            "stash_restore_session_success",
            "stash_appscode_com_restoresession_duration_seconds",
            "stash_restore_session_duration_seconds",
            "stash_appscode_com_restoresession_target_count_total",
            "stash_restore_target_count_total",
            "stash_appscode_com_restoresession_target_success",
            "stash_restore_target_success",
            "stash_appscode_com_restoresession_target_host_count_total",
            "stash_restore_target_host_count_total",
            "stash_appscode_com_restoresession_host_restore_duration_seconds",
            "stash_restore_host_restore_duration_seconds",
        ] {
            one(&text, name);
        }
        assert_eq!(
            samples(
                &text,
                "stash_appscode_com_restoresession_host_restore_success"
            ),
            [
                r#"stash_appscode_com_restoresession_host_restore_success{driver="Restic",group="apps",hostname="host-0",invoker_kind="RestoreSession",invoker_name="r-1",kind="StatefulSet",name="db",namespace="demo",repository="gcs-repo"} 1"#,
                r#"stash_appscode_com_restoresession_host_restore_success{driver="Restic",group="apps",hostname="host-1",invoker_kind="RestoreSession",invoker_name="r-1",kind="StatefulSet",name="db",namespace="demo",repository="gcs-repo"} 0"#,
            ]
        );
        assert!(one(&text, "stash_restore_target_host_count_total").ends_with("} 2"));
        assert!(one(&text, "stash_restore_session_duration_seconds").ends_with("} 30"));
    }

    #[test]
    fn a_failed_restore_pushes_only_its_flags() {
        let mut m = restore();
        m.success = false;
        m.targets[0].success = false;
        let text = render_restore(&m, &[]);
        assert!(one(&text, "stash_restore_session_success").ends_with("} 0"));
        assert!(one(&text, "stash_restore_target_success").ends_with("} 0"));
        assert!(samples(&text, "stash_restore_session_duration_seconds").is_empty());
        assert!(samples(&text, "stash_restore_target_count_total").is_empty());
        assert!(samples(&text, "stash_restore_target_host_count_total").is_empty());
    }

    #[test]
    fn metric_names_are_unique_and_help_needs_no_escaping() {
        let mut names: Vec<_> = ALL.iter().flat_map(|m| [m.current, m.legacy]).collect();
        let count = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), count);
        for m in ALL {
            assert!(
                m.current.starts_with("stash_appscode_com_"),
                "{}",
                m.current
            );
            assert!(
                m.legacy.starts_with("stash_") && !m.legacy.starts_with("stash_appscode"),
                "{}",
                m.legacy
            );
            assert!(!m.help.contains(['\\', '\n']), "{}", m.help);
        }
    }

    #[test]
    fn job_paths_are_percent_encoded_or_base64_for_a_slash() -> anyhow::Result<()> {
        assert_eq!(
            job_path("backupconfiguration-demo-x.y")?,
            "/metrics/job/backupconfiguration-demo-x.y"
        );
        assert_eq!(job_path("a b%")?, "/metrics/job/a%20b%25");
        assert_eq!(job_path("a/b")?, "/metrics/job@base64/YS9i");
        assert!(matches!(job_path(""), Err(PushError::EmptyJob)));
        Ok(())
    }

    #[test]
    fn urls_are_http_with_a_host_and_an_optional_route_prefix() -> anyhow::Result<()> {
        let gw = Pushgateway::new("http://localhost:56789")?;
        assert_eq!(
            (gw.host.as_str(), gw.port, gw.base_path.as_str()),
            ("localhost", 56789, "")
        );
        let gw = Pushgateway::new("127.0.0.1:9091/prefix/")?;
        assert_eq!(
            (gw.host.as_str(), gw.port, gw.base_path.as_str()),
            ("127.0.0.1", 9091, "/prefix")
        );
        let gw = Pushgateway::new("http://[::1]/")?;
        assert_eq!(
            (gw.host.as_str(), gw.port, gw.authority.as_str()),
            ("::1", 80, "[::1]")
        );
        for bad in [
            "https://gw:9091",
            "ftp://gw",
            "http://",
            "http://gw:9091?x=1",
            "http://u:p@gw",
            "not a url",
        ] {
            let err = Pushgateway::new(bad).err();
            assert!(
                matches!(&err, Some(e) if !e.is_retryable() && e.category() == "invalid_url"
                    && e.to_string().starts_with("failed to ")),
                "{bad}: {err:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn only_a_gateway_that_fails_or_cannot_be_reached_is_worth_retrying() {
        let rejected = |status| PushError::Rejected {
            status,
            body: String::new(),
        };
        assert!(rejected(503).is_retryable());
        assert_eq!(rejected(503).category(), "server_error");
        assert!(!rejected(400).is_retryable());
        assert_eq!(rejected(400).category(), "rejected");
        assert!(!PushError::EmptyJob.is_retryable());
        let timeout = PushError::Timeout {
            addr: "gw:1".into(),
            after: DEFAULT_TIMEOUT,
        };
        assert!(timeout.is_retryable());
        assert!(timeout.to_string().starts_with("failed to "));
    }
}
