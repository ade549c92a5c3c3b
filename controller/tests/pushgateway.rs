//! Pushes to the real Prometheus pushgateway (`.tools/bin/pushgateway`) and reads back what it
//! serves: grouping key, labels, values, replacement on a second push, and how failures are
//! classified.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stash_controller::pushgateway::{
    BackupSessionMetrics, HostMetrics, PushError, Pushgateway, RepositoryMetrics,
    RestoreHostMetrics, RestoreSessionMetrics, RestoreTargetMetrics, TargetMetrics, job_name,
    render_backup, render_restore,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pushgateway_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/pushgateway");
    assert!(
        p.exists(),
        "the pushgateway is not installed at {}: run `make setup`",
        p.display()
    );
    p
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A pushgateway process of this test, killed on drop so none outlives a failed assertion.
struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// Starts an in-memory pushgateway and waits until `/-/ready` answers 200.
    async fn start() -> anyhow::Result<Self> {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let child = Command::new(pushgateway_bin())
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut gw = Gateway { child, addr };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = gw.child.try_wait()? {
                anyhow::bail!("the pushgateway exited before it was ready: {status}");
            }
            if let Ok((200, _)) = get(addr, "/-/ready").await {
                return Ok(gw);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the pushgateway at {addr} was not ready within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn client(&self) -> anyhow::Result<Pushgateway> {
        Ok(Pushgateway::new(&format!("http://{}", self.addr))?)
    }

    async fn scrape(&self) -> anyhow::Result<Vec<Sample>> {
        let (status, body) = get(self.addr, "/metrics").await?;
        anyhow::ensure!(status == 200, "scrape answered {status}: {body}");
        parse(&body)
    }
}

/// A plain HTTP/1.0 GET, independent of the client under test.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of headers in {raw:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no status in {head:?}"))?
        .parse()?;
    Ok((status, body.to_owned()))
}

#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the sample lines of the text format, unescaping label values.
fn parse(text: &str) -> anyhow::Result<Vec<Sample>> {
    let mut out = Vec::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut labels = BTreeMap::new();
        let (name, rest) = match line.split_once('{') {
            Some((name, mut rest)) => {
                while !rest.starts_with('}') {
                    let (key, after) = rest
                        .split_once("=\"")
                        .ok_or_else(|| anyhow::anyhow!("bad label in {line}"))?;
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let end = loop {
                        match chars.next() {
                            Some((i, '"')) => break i,
                            Some((_, '\\')) => match chars.next() {
                                Some((_, 'n')) => value.push('\n'),
                                Some((_, c)) => value.push(c),
                                None => anyhow::bail!("bad escape in {line}"),
                            },
                            Some((_, c)) => value.push(c),
                            None => anyhow::bail!("unterminated value in {line}"),
                        }
                    };
                    labels.insert(key.trim_start_matches(',').to_owned(), value);
                    rest = &after[end + 1..];
                }
                (name, &rest[1..])
            }
            None => line
                .split_once(' ')
                .ok_or_else(|| anyhow::anyhow!("no value in {line}"))?,
        };
        let value = rest.trim().split(' ').next().unwrap_or_default().parse()?;
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    Ok(out)
}

/// The samples named `name` whose labels include every pair of `with`.
fn find<'a>(samples: &'a [Sample], name: &str, with: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    let found = find(samples, name, with);
    assert_eq!(found.len(), 1, "{name} {with:?}: {found:?}");
    found[0].value
}

/// Asserts one sample for each `(name, value)` among those with the labels `with`.
fn assert_values(samples: &[Sample], with: &[(&str, &str)], want: &[(&str, f64)]) {
    for (name, expected) in want {
        assert_eq!(value(samples, name, with), *expected, "{name} {with:?}");
    }
}

/// The error of a push that must fail.
async fn push_error(client: Pushgateway, body: String) -> anyhow::Result<PushError> {
    match client.push(BACKUP_JOB, body).await {
        Ok(()) => anyhow::bail!("the push succeeded"),
        Err(err) => Ok(err),
    }
}

fn host(name: &str, size: f64) -> HostMetrics {
    HostMetrics {
        hostname: name.into(),
        success: true,
        duration_seconds: 3.5,
        data_size_bytes: size,
        uploaded_bytes: size / 2.0,
        processing_time_seconds: 3.0,
        files_total: 100,
        files_new: 10,
        files_modified: 5,
        files_unmodified: 85,
    }
}

fn backup() -> BackupSessionMetrics {
    BackupSessionMetrics {
        invoker_kind: "BackupConfiguration".into(),
        invoker_name: "nightly".into(),
        namespace: "demo".into(),
        driver: "Restic".into(),
        repository: "minio-repo".into(),
        success: true,
        duration_seconds: 61.0,
        finished_at: 1_800_000_000,
        targets: vec![TargetMetrics {
            kind: "StatefulSet".into(),
            group: "apps".into(),
            name: "db".into(),
            success: true,
            host_count: 2,
            hosts: vec![host("host-0", 4096.0), host("host-1", 8192.0)],
        }],
        repository_metrics: Some(RepositoryMetrics {
            name: "minio-repo".into(),
            namespace: "storage".into(),
            backend: "s3".into(),
            bucket: "backups".into(),
            prefix: "demo".into(),
            integrity: Some(true),
            size_bytes: 123456.0,
            snapshot_count: 4,
            snapshots_removed: 1,
        }),
    }
}

const BACKUP_JOB: &str = "backupconfiguration-demo-nightly";

#[tokio::test]
async fn backup_and_restore_metrics_land_in_the_gateway_and_a_second_push_replaces_them()
-> anyhow::Result<()> {
    let gw = Gateway::start().await?;
    let client = gw.client()?;
    let job = job_name("BackupConfiguration", "demo", "nightly");
    assert_eq!(job, BACKUP_JOB);
    let team = "db \"ops\"\nnight\\shift";
    let extra = [("team".to_owned(), team.to_owned())];

    client.push(&job, render_backup(&backup(), &extra)).await?;
    let s = gw.scrape().await?;
    let session = [
        ("job", BACKUP_JOB),
        ("instance", ""),
        ("invoker_kind", "BackupConfiguration"),
        ("invoker_name", "nightly"),
        ("namespace", "demo"),
        ("driver", "Restic"),
        ("repository", "minio-repo"),
        ("team", team),
    ];
    for name in [
        "stash_appscode_com_backupsession_success",
        "stash_backup_session_success",
    ] {
        let found = find(&s, name, &[("job", BACKUP_JOB)]);
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        let want: BTreeMap<String, String> = session
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        assert_eq!(found[0].labels, want, "{name}: exactly the session labels");
        assert_eq!(found[0].value, 1.0);
    }
    assert_values(
        &s,
        &session,
        &[
            ("stash_appscode_com_backupsession_duration_seconds", 61.0),
            ("stash_backup_last_success_time_seconds", 1.8e9),
            ("stash_backup_target_count_total", 1.0),
        ],
    );
    let target = [
        ("job", BACKUP_JOB),
        ("kind", "StatefulSet"),
        ("group", "apps"),
        ("name", "db"),
        ("namespace", "demo"),
        ("team", team),
    ];
    assert_values(
        &s,
        &target,
        &[
            ("stash_appscode_com_backupsession_target_success", 1.0),
            ("stash_backup_target_host_count_total", 2.0),
            (
                "stash_appscode_com_backupsession_target_last_success_time_seconds",
                1.8e9,
            ),
        ],
    );
    let host1 = [("job", BACKUP_JOB), ("name", "db"), ("hostname", "host-1")];
    assert_values(
        &s,
        &host1,
        &[
            (
                "stash_appscode_com_backupsession_host_data_size_bytes",
                8192.0,
            ),
            ("stash_backup_host_data_uploaded_bytes", 4096.0),
            ("stash_backup_host_files_unmodified", 85.0),
        ],
    );
    let hosts = find(
        &s,
        "stash_backup_host_backup_success",
        &[("job", BACKUP_JOB)],
    );
    assert_eq!(hosts.len(), 2);
    let repo = [
        ("job", BACKUP_JOB),
        ("invoker_name", "nightly"),
        ("name", "minio-repo"),
        ("namespace", "storage"),
        ("backend", "s3"),
        ("bucket", "backups"),
        ("prefix", "demo"),
    ];
    assert_values(
        &s,
        &repo,
        &[
            ("stash_appscode_com_repository_integrity", 1.0),
            ("stash_repository_size_bytes", 123456.0),
            ("stash_repository_snapshot_count", 4.0),
            ("stash_appscode_com_repository_snapshot_cleaned", 1.0),
        ],
    );

    // The next session fails on host-1 and only host-0 reports sizes: the pushed metrics are
    // replaced within the group, and the metrics a failure leaves out keep the last success.
    let mut second = backup();
    second.success = false;
    second.finished_at = 1_800_003_600;
    second.targets[0].success = false;
    second.targets[0].hosts[0].data_size_bytes = 5000.0;
    second.targets[0].hosts[1].success = false;
    client.push(&job, render_backup(&second, &extra)).await?;
    let s = gw.scrape().await?;
    assert_values(
        &s,
        &session,
        &[
            ("stash_appscode_com_backupsession_success", 0.0),
            ("stash_backup_session_success", 0.0),
            // Not pushed by a failure, so still the last success's.
            ("stash_backup_last_success_time_seconds", 1.8e9),
            ("stash_backup_session_duration_seconds", 61.0),
        ],
    );
    assert_values(&s, &target, &[("stash_backup_target_success", 0.0)]);
    let host0 = [("job", BACKUP_JOB), ("hostname", "host-0")];
    assert_values(&s, &host0, &[("stash_backup_host_data_size_bytes", 5000.0)]);
    assert!(
        find(&s, "stash_backup_host_data_size_bytes", &host1).is_empty(),
        "host-1's size was replaced along with the rest of that metric"
    );
    assert_values(&s, &host1, &[("stash_backup_host_backup_success", 0.0)]);

    // A restore session has a group of its own; the backup's group stays.
    let restore = RestoreSessionMetrics {
        invoker_kind: "RestoreSession".into(),
        invoker_name: "db-restore".into(),
        namespace: "demo".into(),
        driver: "Restic".into(),
        repository: "minio-repo".into(),
        success: true,
        duration_seconds: 17.0,
        targets: vec![RestoreTargetMetrics {
            kind: "StatefulSet".into(),
            group: "apps".into(),
            name: "db".into(),
            success: true,
            host_count: 1,
            hosts: vec![RestoreHostMetrics {
                hostname: "host-0".into(),
                success: true,
                duration_seconds: 16.5,
            }],
        }],
    };
    let restore_job = job_name(
        &restore.invoker_kind,
        &restore.namespace,
        &restore.invoker_name,
    );
    client
        .push(&restore_job, render_restore(&restore, &[]))
        .await?;
    let s = gw.scrape().await?;
    let rs = [
        ("job", "restoresession-demo-db-restore"),
        ("invoker_kind", "RestoreSession"),
        ("invoker_name", "db-restore"),
        ("repository", "minio-repo"),
    ];
    assert_values(
        &s,
        &rs,
        &[
            ("stash_appscode_com_restoresession_success", 1.0),
            ("stash_restore_session_success", 1.0),
            ("stash_restore_session_duration_seconds", 17.0),
            ("stash_restore_target_count_total", 1.0),
            ("stash_restore_target_host_count_total", 1.0),
        ],
    );
    let rs_host = [
        ("job", "restoresession-demo-db-restore"),
        ("kind", "StatefulSet"),
        ("hostname", "host-0"),
    ];
    assert_values(
        &s,
        &rs_host,
        &[
            (
                "stash_appscode_com_restoresession_host_restore_duration_seconds",
                16.5,
            ),
            ("stash_restore_host_restore_success", 1.0),
        ],
    );
    assert_values(&s, &session, &[("stash_backup_session_success", 0.0)]);
    Ok(())
}

#[tokio::test]
async fn a_push_the_gateway_refuses_is_not_retryable() -> anyhow::Result<()> {
    let gw = Gateway::start().await?;
    let err = push_error(gw.client()?, "this is { not the text format\n".into()).await?;
    assert!(
        matches!(err, PushError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert_eq!(err.category(), "rejected");
    assert!(err.to_string().starts_with("failed to "), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_push_to_a_closed_port_is_retryable() -> anyhow::Result<()> {
    let client = Pushgateway::new(&format!("http://127.0.0.1:{}", free_port()?))?;
    let err = push_error(client, render_backup(&backup(), &[])).await?;
    assert!(matches!(err, PushError::Connect { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(err.category(), "unreachable");
    assert!(err.to_string().starts_with("failed to "), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_gateway_that_never_answers_times_out_retryably() -> anyhow::Result<()> {
    // Accepts the connection but never reads or answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = silent.local_addr()?;
    let hold = tokio::spawn(async move {
        let conn = silent.accept().await;
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(conn);
    });
    let started = Instant::now();
    let client =
        Pushgateway::new(&format!("http://{addr}"))?.with_timeout(Duration::from_millis(300));
    let err = push_error(client, render_backup(&backup(), &[])).await?;
    hold.abort();
    assert!(matches!(err, PushError::Timeout { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert_eq!(err.category(), "timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    Ok(())
}
