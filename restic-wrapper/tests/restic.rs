//! The wrapper against the real restic binary (≥ 0.17) on local repositories.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Endless, PASSWORD, local, pseudo_random, restic_bin, sample_tree};
use restic_wrapper::{
    BackupOptions, Error, ForgetOptions, Message, Overwrite, PruneOptions, RestoreOptions,
    SecretValue, SnapshotFilter, StatsMode,
};
use tokio::io::AsyncRead;

type Result<T = ()> = anyhow::Result<T>;

#[tokio::test]
async fn version_is_read_and_old_versions_are_refused() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    let v = restic.version().await?;
    assert!(v >= restic_wrapper::Version::MINIMUM, "{v}");

    let fake = dir.path().join("old-restic");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'restic 0.16.4 compiled with go1.21.6 on linux/amd64'\n",
    )?;
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let err = local(dir.path(), PASSWORD)
        .with_program(&fake)
        .version()
        .await;
    assert!(
        matches!(&err, Err(Error::UnsupportedVersion { found, .. }) if found == "0.16.4"),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn init_exists_backup_snapshots_ls_stats_restore_and_check() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD).with_progress_interval(Duration::from_millis(100));
    assert!(!restic.exists().await?);
    let id = restic.init().await?;
    assert_eq!(id.len(), 64);
    assert!(restic.exists().await?);
    restic.ensure_initialized().await?;

    let data = sample_tree(dir.path());
    let opts = BackupOptions {
        host: Some("host-0".into()),
        tags: vec!["key=demo/app/data".into()],
        excludes: vec!["*.tmp".into()],
        read_concurrency: Some(2),
        compression: Some("auto".into()),
        pack_size_mib: Some(16),
        ..BackupOptions::default()
    };
    let mut run = restic.backup(&[PathBuf::from(".")], Some(&data), &opts)?;
    let mut messages = run.messages().expect("messages once");
    let summary = run.finish().await?;
    let streamed: Vec<Message> = std::iter::from_fn(|| messages.try_recv().ok()).collect();
    assert!(
        streamed
            .iter()
            .any(|m| matches!(m, Message::BackupSummary(_)))
    );
    // Two regular files; restic counts the symlink as metadata, not as a file.
    assert_eq!(summary.files_new, 2, "{summary:?}");
    let first = summary.snapshot_id.clone().expect("snapshot id");

    // A second backup with an explicit parent and skip-if-unchanged saves nothing new.
    let again = BackupOptions {
        parent: Some(first.clone()),
        skip_if_unchanged: true,
        ..opts.clone()
    };
    let second = restic
        .backup(&[PathBuf::from(".")], Some(&data), &again)?
        .finish()
        .await?;
    assert_eq!(second.files_unmodified, 2);
    assert_eq!(second.snapshot_id, None, "an unchanged backup is skipped");

    let filter = SnapshotFilter {
        hosts: vec!["host-0".into()],
        tags: vec!["key=demo/app/data".into()],
        paths: vec![],
    };
    let snaps = restic.snapshots(&filter).await?;
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0].id, first);
    // restic records "." as the absolute path of the directory it ran in, but the tree holds
    // the directory's contents at its root: restores do not depend on where it was mounted.
    assert_eq!(snaps[0].paths, vec![data.display().to_string()]);
    let none = SnapshotFilter {
        hosts: vec!["host-9".into()],
        ..SnapshotFilter::default()
    };
    assert!(restic.snapshots(&none).await?.is_empty());

    let (snap, nodes) = restic.ls(&first).await?;
    assert_eq!(snap.id, first);
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    assert!(names.contains(&"a.txt") && names.contains(&"b.bin") && names.contains(&"link"));
    assert!(!names.contains(&"skip.tmp"), "excluded: {names:?}");
    assert!(
        nodes.iter().any(|n| n.path == "/sub/b.bin"),
        "paths are volume-relative"
    );

    let raw = restic.stats(StatsMode::RawData, None).await?;
    assert!(raw.total_size > 0 && raw.snapshots_count == 1);
    let size = restic.stats(StatsMode::RestoreSize, Some(&first)).await?;
    assert_eq!(size.total_size, 300_006, "the two files: {size:?}");

    let target = dir.path().join("restored");
    let mut restore = restic.restore(&RestoreOptions {
        snapshot: first.clone(),
        target: target.clone(),
        includes: vec![],
        excludes: vec![],
        overwrite: Overwrite::IfChanged,
        ..RestoreOptions::default()
    })?;
    let _progress = restore.messages();
    let restored = restore.finish().await?;
    assert_eq!(restored.files_restored, restored.total_files);
    let root = target.clone();
    assert_eq!(
        std::fs::read(root.join("sub/b.bin"))?,
        pseudo_random(300_000, 7)
    );
    assert_eq!(
        std::fs::read_link(root.join("link"))?,
        PathBuf::from("a.txt")
    );

    // Include and exclude patterns select what is restored.
    let partial = dir.path().join("partial");
    restic
        .restore(&RestoreOptions {
            snapshot: first.clone(),
            target: partial.clone(),
            includes: vec!["/a.txt".into()],
            ..RestoreOptions::default()
        })?
        .finish()
        .await?;
    assert!(partial.join("a.txt").exists());
    assert!(!partial.join("sub").exists() && !partial.join("link").exists());
    let excluded = dir.path().join("excluded");
    restic
        .restore(&RestoreOptions {
            snapshot: first.clone(),
            target: excluded.clone(),
            excludes: vec!["*.bin".into()],
            ..RestoreOptions::default()
        })?
        .finish()
        .await?;
    assert!(excluded.join("a.txt").exists() && !excluded.join("sub/b.bin").exists());
    let both = restic.restore(&RestoreOptions {
        snapshot: first.clone(),
        target: excluded.clone(),
        includes: vec!["/a.txt".into()],
        excludes: vec!["*.bin".into()],
        ..RestoreOptions::default()
    });
    assert!(matches!(both, Err(Error::InvalidOptions { .. })));

    // Restoring again with --delete removes files that are not in the snapshot.
    std::fs::write(root.join("extra"), b"x")?;
    restic
        .restore(&RestoreOptions {
            snapshot: first.clone(),
            target: target.clone(),
            delete: true,
            ..RestoreOptions::default()
        })?
        .finish()
        .await?;
    assert!(!root.join("extra").exists());

    let check = restic.check(Some("50%")).await?;
    assert_eq!(check.num_errors, 0);
    assert!(restic.list_locks().await?.is_empty(), "no lock left behind");
    Ok(())
}

#[tokio::test]
async fn stdin_backup_dumps_back_byte_for_byte() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    restic.init().await?;
    let payload = pseudo_random(2_000_000, 42);
    let opts = BackupOptions {
        host: Some("host-1".into()),
        tags: vec!["stream".into()],
        ..BackupOptions::default()
    };
    let summary = restic
        .backup_stdin("volume.tar", std::io::Cursor::new(payload.clone()), &opts)?
        .finish()
        .await?;
    let id = summary.snapshot_id.expect("snapshot");
    let out = dir.path().join("dumped");
    let file = tokio::fs::File::create(&out).await?;
    restic
        .dump(&id, "/volume.tar", &SnapshotFilter::default(), file)
        .await?;
    assert_eq!(std::fs::read(&out)?, payload);
    Ok(())
}

/// A reader that yields some data, then fails.
struct FailingReader {
    left: usize,
}

impl AsyncRead for FailingReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.left == 0 {
            return std::task::Poll::Ready(Err(std::io::Error::other("disk read failed")));
        }
        let n = self.left.min(buf.remaining()).min(64 * 1024);
        buf.put_slice(&pseudo_random(n, self.left as u64));
        self.left -= n;
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn a_failed_input_stream_leaves_no_snapshot_and_no_lock() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    restic.init().await?;
    let run = restic.backup_stdin(
        "volume.tar",
        FailingReader { left: 3_000_000 },
        &BackupOptions::default(),
    )?;
    let err = run.finish().await;
    assert!(matches!(err, Err(Error::Input { .. })), "{err:?}");
    assert!(
        restic
            .snapshots(&SnapshotFilter::default())
            .await?
            .is_empty()
    );
    assert!(restic.list_locks().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn wrong_password_and_missing_repository_are_named() -> Result {
    let dir = tempfile::tempdir()?;
    local(dir.path(), PASSWORD).init().await?;
    let err = local(dir.path(), "not the password")
        .snapshots(&SnapshotFilter::default())
        .await;
    assert!(matches!(err, Err(Error::WrongPassword { .. })), "{err:?}");
    assert!(!err.as_ref().is_err_and(Error::is_retryable));

    let empty = tempfile::tempdir()?;
    let err = local(empty.path(), PASSWORD)
        .snapshots(&SnapshotFilter::default())
        .await;
    assert!(
        matches!(err, Err(Error::RepositoryNotFound { .. })),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_locked_repository_names_the_holder_and_cancel_releases_it() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    restic.init().await?;
    let holder = restic.backup_stdin("x", Endless, &BackupOptions::default())?;
    let fin = tokio::spawn(holder.finish());
    // Wait until the backup has taken its lock.
    let mut locks = Vec::new();
    for _ in 0..100 {
        locks = restic.list_locks().await?;
        if !locks.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(locks.len(), 1, "the backup holds one lock");
    let err = restic.prune(&PruneOptions::default()).await;
    let Err(Error::Locked {
        holder: Some(holder),
        ..
    }) = &err
    else {
        panic!("expected a lock error, got {err:?}");
    };
    assert!(holder.pid.is_some() && holder.host.is_some(), "{holder:?}");
    assert!(err.as_ref().is_err_and(Error::is_retryable));
    // A live holder's lock is not stale: a plain unlock must keep it.
    restic.unlock().await?;
    assert_eq!(restic.list_locks().await?.len(), 1);

    fin.abort();
    // Dropping the run interrupts restic, which removes its own lock.
    let mut left = usize::MAX;
    for _ in 0..100 {
        left = restic.list_locks().await?.len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "restic released its lock after SIGINT");
    restic.prune(&PruneOptions::default()).await?;
    Ok(())
}

#[tokio::test]
async fn killing_a_backup_half_way_leaves_no_lock_and_a_sound_repository() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD).with_progress_interval(Duration::from_millis(100));
    restic.init().await?;
    let data = dir.path().join("big");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("blob"), pseudo_random(24 << 20, 3))?;
    // Throttled to 2 MiB/s so the backup is surely still running when it is cancelled.
    let opts = BackupOptions {
        limit_upload_kib: Some(2048),
        ..BackupOptions::default()
    };
    let mut run = restic.backup(std::slice::from_ref(&data), None, &opts)?;
    let mut messages = run.messages().expect("messages");
    let mut saw_progress = false;
    while let Some(msg) = messages.recv().await {
        if let Message::BackupStatus(s) = msg
            && s.bytes_done > 0
        {
            saw_progress = true;
            break;
        }
    }
    assert!(
        saw_progress,
        "the backup reported progress before it was cancelled"
    );
    run.cancel().await?;
    assert!(
        restic.list_locks().await?.is_empty(),
        "no lock after SIGINT"
    );
    assert!(
        restic
            .snapshots(&SnapshotFilter::default())
            .await?
            .is_empty()
    );
    assert_eq!(restic.check(None).await?.num_errors, 0);
    Ok(())
}

#[tokio::test]
async fn an_unreadable_file_makes_an_incomplete_backup() -> Result {
    // Root reads everything, so restic runs as nobody through a launcher, as the agent
    // runs it under nice/ionice.
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let bin = root.join("restic");
    std::fs::copy(restic_bin(), &bin)?;
    let data = sample_tree(root);
    std::fs::write(data.join("secret"), b"top secret")?;
    for entry in walk(root) {
        let mode = if entry.is_dir() { 0o777 } else { 0o755 };
        std::fs::set_permissions(&entry, std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    }
    std::fs::set_permissions(
        data.join("secret"),
        std::os::unix::fs::PermissionsExt::from_mode(0o000),
    )?;
    let restic = local(root, PASSWORD).with_program(&bin).with_launcher(vec![
        "setpriv".into(),
        "--reuid=65534".into(),
        "--regid=65534".into(),
        "--clear-groups".into(),
    ]);
    restic.init().await?;
    let err = restic
        .backup(std::slice::from_ref(&data), None, &BackupOptions::default())?
        .finish()
        .await;
    let Err(Error::IncompleteBackup {
        snapshot_id,
        unreadable,
    }) = &err
    else {
        panic!("expected an incomplete backup, got {err:?}");
    };
    assert!(
        unreadable.iter().any(|f| f.ends_with("/secret")),
        "{unreadable:?}"
    );
    assert!(
        snapshot_id.is_some(),
        "restic saved a partial snapshot and said which"
    );
    Ok(())
}

fn walk(root: &std::path::Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        if !p.is_symlink() {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn retention_reports_kept_and_removed_snapshots() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    restic.init().await?;
    for i in 0..4u8 {
        let opts = BackupOptions {
            host: Some("host-0".into()),
            tags: if i == 0 {
                vec!["keep-me".into()]
            } else {
                vec![]
            },
            ..BackupOptions::default()
        };
        restic
            .backup_stdin("f", std::io::Cursor::new(vec![i; 10]), &opts)?
            .finish()
            .await?;
    }
    let policy = ForgetOptions {
        keep_last: Some(2),
        keep_tags: vec!["keep-me".into()],
        dry_run: true,
        ..ForgetOptions::default()
    };
    let plan = restic.forget(&policy).await?;
    assert_eq!((plan.kept().count(), plan.removed().count()), (3, 1));
    assert_eq!(restic.snapshots(&SnapshotFilter::default()).await?.len(), 4);
    let done = restic
        .forget(&ForgetOptions {
            dry_run: false,
            prune: true,
            ..policy
        })
        .await?;
    assert_eq!(done.removed().count(), 1);
    let left = restic.snapshots(&SnapshotFilter::default()).await?;
    assert_eq!(left.len(), 3);
    assert!(left.iter().any(|s| s.has_tag("keep-me")));
    assert!(
        restic.forget(&ForgetOptions::default()).await.is_err(),
        "an empty policy"
    );

    let last = left.last().map(|s| s.id.clone()).unwrap_or_default();
    restic.forget_snapshots(&[last], true).await?;
    assert_eq!(restic.snapshots(&SnapshotFilter::default()).await?.len(), 2);
    Ok(())
}

#[tokio::test]
async fn keys_unlock_and_migration() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    restic.init().await?;
    let id = restic
        .key_add(
            &SecretValue::new("second password"),
            Some("agent"),
            Some("stash"),
        )
        .await?;
    let keys = restic.key_list().await?;
    assert_eq!(keys.len(), 2);
    assert!(
        keys.iter()
            .any(|k| k.id == id && k.host_name == "agent" && !k.current)
    );
    // The new key opens the repository.
    local(dir.path(), "second password")
        .snapshots(&SnapshotFilter::default())
        .await?;
    restic.key_remove(&id).await?;
    assert_eq!(restic.key_list().await?.len(), 1);

    restic.unlock().await?;
    restic.unlock_remove_all().await?;
    // restic 0.17+ creates v2 repositories; the migration says so rather than failing.
    let migrated = restic.migrate_to_v2().await;
    assert!(
        migrated.is_ok()
            || matches!(&migrated, Err(Error::Failed { stderr, .. }) if stderr.contains("already")),
        "{migrated:?}"
    );
    Ok(())
}

#[tokio::test]
async fn secrets_never_reach_arguments_or_logs() -> Result {
    let dir = tempfile::tempdir()?;
    let argv_log = dir.path().join("argv.log");
    let launcher = vec![
        "/bin/sh".into(),
        "-c".into(),
        format!(
            "printf '%s\\n' \"$*\" >> '{}'; exec \"$@\"",
            argv_log.display()
        )
        .into(),
        "sh".into(),
    ];
    let (logs, _guard) = capture_logs();
    let restic = local(dir.path(), PASSWORD).with_launcher(launcher);
    restic.init().await?;
    let data = sample_tree(dir.path());
    restic
        .backup(std::slice::from_ref(&data), None, &BackupOptions::default())?
        .finish()
        .await?;
    restic
        .key_add(&SecretValue::new("another secret"), None, None)
        .await?;
    let _ = local(dir.path(), "wrong-password-123")
        .with_launcher(restic_launcher_for_log(&argv_log))
        .snapshots(&SnapshotFilter::default())
        .await;
    let argv = std::fs::read_to_string(&argv_log)?;
    assert!(
        argv.contains("backup"),
        "the launcher saw the commands: {argv}"
    );
    let logged = String::from_utf8(logs.lock().expect("log buffer").clone())?;
    assert!(
        logged.contains("running restic"),
        "the logs were captured: {logged}"
    );
    for secret in [PASSWORD, "another secret", "wrong-password-123"] {
        assert!(!argv.contains(secret), "{secret} in arguments");
        assert!(!logged.contains(secret), "{secret} in logs");
    }
    Ok(())
}

fn restic_launcher_for_log(log: &std::path::Path) -> Vec<std::ffi::OsString> {
    vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("printf '%s\\n' \"$*\" >> '{}'; exec \"$@\"", log.display()).into(),
        "sh".into(),
    ]
}

type LogBuffer = std::sync::Arc<std::sync::Mutex<Vec<u8>>>;

/// Captures this test's tracing output (debug and up) into a buffer.
fn capture_logs() -> (LogBuffer, tracing::subscriber::DefaultGuard) {
    #[derive(Clone)]
    struct Writer(LogBuffer);
    impl std::io::Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = LogBuffer::default();
    let writer = Writer(buf.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    (buf, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn an_unreachable_backend_is_a_retryable_error_at_the_deadline() -> Result {
    let dir = tempfile::tempdir()?;
    let closed = common::free_port();
    let backend = restic_wrapper::Backend::S3 {
        endpoint: format!("http://127.0.0.1:{closed}"),
        bucket: "bucket".into(),
        prefix: "p".into(),
        region: None,
        insecure_tls: false,
    };
    let secrets = restic_wrapper::Secrets::new()
        .with("RESTIC_PASSWORD", PASSWORD)
        .with("AWS_ACCESS_KEY_ID", "id")
        .with("AWS_SECRET_ACCESS_KEY", "secret");
    let repo = restic_wrapper::Repository::new(backend, secrets, dir.path())?;
    let restic = restic_wrapper::Restic::new(repo)
        .with_program(restic_bin())
        .with_timeout(Duration::from_secs(4))
        .with_grace(Duration::from_secs(5));
    let err = restic.snapshots(&SnapshotFilter::default()).await;
    let Err(err) = err else {
        panic!("listing an unreachable repository succeeded");
    };
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
    Ok(())
}

/// Global flags (`--cache-dir`, `--no-cache`, `--retry-lock`) reach restic as flags, not as
/// paths after backup's `--`: what restic did says so, not the argument vector.
#[tokio::test]
async fn global_flags_are_taken_as_flags_by_every_command() -> Result {
    let dir = tempfile::tempdir()?;
    let data = sample_tree(dir.path());
    let cache = dir.path().join("cache");
    let restic = local(dir.path(), PASSWORD)
        .with_cache(restic_wrapper::Cache::Dir(cache.clone()))
        .with_retry_lock(Duration::from_secs(1));
    let repo_id = restic.init().await?;
    let summary = restic
        .backup(
            &[PathBuf::from(".")],
            Some(&data),
            &BackupOptions::default(),
        )?
        .finish()
        .await?;
    let id = summary.snapshot_id.clone().expect("snapshot id");
    let snaps = restic.snapshots(&SnapshotFilter::default()).await?;
    assert_eq!(snaps.len(), 1);
    // The volume only: not the cache directory, not `--retry-lock` or `1s`.
    assert_eq!(snaps[0].paths, vec![data.display().to_string()]);
    assert!(
        cache.join(&repo_id).join("snapshots").is_dir(),
        "restic's cache is in the cache directory"
    );

    // Every other command uses the cache directory it is given.
    let cached = |name: &str| {
        let dir = dir.path().join(format!("cache-{name}"));
        (
            local(dir.parent().expect("parent"), PASSWORD)
                .with_cache(restic_wrapper::Cache::Dir(dir.clone())),
            dir,
        )
    };
    let (r, c) = cached("snapshots");
    r.snapshots(&SnapshotFilter::default()).await?;
    assert!(c.join(&repo_id).is_dir(), "snapshots used {}", c.display());
    let (r, c) = cached("ls");
    r.ls(&id).await?;
    assert!(c.join(&repo_id).is_dir(), "ls used {}", c.display());
    let (r, c) = cached("stats");
    r.stats(StatsMode::RestoreSize, Some(&id)).await?;
    assert!(c.join(&repo_id).is_dir(), "stats used {}", c.display());
    let (r, c) = cached("restore");
    let target = dir.path().join("restored");
    r.restore(&RestoreOptions {
        snapshot: id.clone(),
        target: target.clone(),
        ..RestoreOptions::default()
    })?
    .finish()
    .await?;
    assert!(c.join(&repo_id).is_dir(), "restore used {}", c.display());
    assert!(target.join("a.txt").exists());

    // Without a cache: a clean backup (`--no-cache` as a path would be a missing source,
    // restic's exit 3) of the volume only.
    let uncached = local(dir.path(), PASSWORD);
    let summary = uncached
        .backup(
            &[PathBuf::from(".")],
            Some(&data),
            &BackupOptions::default(),
        )?
        .finish()
        .await?;
    let second = summary.snapshot_id.expect("snapshot id");
    let snaps = uncached.snapshots(&SnapshotFilter::default()).await?;
    let snap = snaps.iter().find(|s| s.id == second).expect("listed");
    assert_eq!(snap.paths, vec![data.display().to_string()]);
    Ok(())
}
