//! The native reader against repositories written by the real restic: its listing must equal
//! `restic snapshots --json` field by field, on a local path and on S3 (Garage), and the locks
//! it reads and removes are those restic writes and lists.

mod common;

use std::path::Path;
use std::process::Command;

use common::{
    Endless, GarageExt, PASSWORD, Spawns, garage, hostname, local, restic_bin, sample_tree,
};
use restic_wrapper::{
    BackupOptions, NativeError, NativeRepository, RepositoryFiles, Restic, Secrets, SnapshotFilter,
};
use serde_json::Value;

type Result<T = ()> = anyhow::Result<T>;

/// Snapshots from several hosts, tags and paths, a stdin one, and copies made by
/// `restic rewrite --new-host` (which records `original`).
async fn populate(restic: &Restic, root: &Path) -> Result {
    let data = sample_tree(root);
    let other = root.join("other");
    std::fs::create_dir_all(&other)?;
    std::fs::write(other.join("x"), b"x")?;
    for (host, tags, path) in [
        ("host-0", vec!["daily"], &data),
        ("host-1", vec!["daily", "key=ns/app/vol"], &data),
        ("host-1", vec![], &other),
        ("node-a", vec!["weekly"], &other),
    ] {
        let opts = BackupOptions {
            host: Some(host.into()),
            tags: tags.into_iter().map(String::from).collect(),
            ..BackupOptions::default()
        };
        restic
            .backup(std::slice::from_ref(path), None, &opts)?
            .finish()
            .await?;
    }
    let stream = BackupOptions {
        host: Some("db-0".into()),
        ..BackupOptions::default()
    };
    restic
        .backup_stdin(
            "dump.sql",
            std::io::Cursor::new(b"select 1;".to_vec()),
            &stream,
        )?
        .finish()
        .await?;
    Ok(())
}

/// restic orders snapshots by time and leaves ties (a snapshot and its rewritten copy) in
/// backend listing order, which is arbitrary: compare with ties ordered by id.
fn by_time_then_id(mut v: Value) -> Value {
    if let Some(list) = v.as_array_mut() {
        let key = |s: &Value| {
            let t = s["time"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok());
            (t, s["id"].as_str().unwrap_or_default().to_owned())
        };
        let before: Vec<_> = list.iter().map(|s| key(s).0).collect();
        assert!(before.windows(2).all(|w| w[0] <= w[1]), "sorted by time");
        list.sort_by_key(key);
    }
    v
}

/// Runs the restic binary directly, so the comparison does not go through our own types.
fn run_restic(args: &[&str], env: &[(&str, String)]) -> Result<Vec<u8>> {
    let out = Command::new(restic_bin())
        .args(args)
        .arg("--no-cache")
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

/// The environment stock restic needs for the repository `common::local` makes in `dir`.
fn local_env(dir: &Path) -> [(&'static str, String); 2] {
    [
        ("RESTIC_REPOSITORY", dir.join("repo").display().to_string()),
        ("RESTIC_PASSWORD", PASSWORD.to_owned()),
    ]
}

fn restic_snapshots_json(env: &[(&str, String)]) -> Result<Value> {
    Ok(serde_json::from_slice(&run_restic(
        &["snapshots", "--json", "--no-lock"],
        env,
    )?)?)
}

fn rewrite_new_host(env: &[(&str, String)], host: &str) -> Result {
    run_restic(&["rewrite", "--new-host", host], env).map(drop)
}

#[tokio::test]
async fn local_listing_equals_restic_field_by_field() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    restic.init().await?;
    populate(&restic, dir.path()).await?;
    let env = local_env(dir.path());
    rewrite_new_host(&env, "renamed")?;

    let repo = NativeRepository::open(restic.repository().backend(), restic.repository().secrets())
        .await?;
    assert_eq!(repo.config().version, 2);
    let ours = serde_json::to_value(repo.snapshots().await?)?;
    let theirs = restic_snapshots_json(&env)?;
    assert_eq!(theirs.as_array().map(Vec::len), Some(10));
    assert_eq!(by_time_then_id(ours), by_time_then_id(theirs.clone()));
    // The copies carry `original`, so the comparison covered that field too.
    assert!(
        theirs
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s.get("original").is_some())
    );

    // A second listing comes from memory and is still equal; a forgotten snapshot leaves it.
    let first = theirs[0]["id"].as_str().unwrap_or_default().to_owned();
    restic
        .forget_snapshots(std::slice::from_ref(&first), false)
        .await?;
    let after = repo.snapshots().await?;
    assert_eq!(after.len(), 9);
    assert!(after.iter().all(|s| s.id != first));
    assert_eq!(
        by_time_then_id(serde_json::to_value(after)?),
        by_time_then_id(restic_snapshots_json(&env)?)
    );

    let one = repo
        .snapshot(&theirs[1]["short_id"].as_str().unwrap_or_default()[..6])
        .await?;
    assert_eq!(serde_json::to_value(&one)?, theirs[1]);
    assert!(matches!(
        repo.snapshot("ffffffffff").await,
        Err(NativeError::NoSuchSnapshot(_))
    ));
    Ok(())
}

#[tokio::test]
async fn wrong_password_missing_repository_and_tampering_are_refused() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    restic.init().await?;
    populate(&restic, dir.path()).await?;
    let backend = restic.repository().backend().clone();

    let wrong = Secrets::new().with("RESTIC_PASSWORD", "nope");
    let err = NativeRepository::open(&backend, &wrong).await;
    assert!(matches!(err, Err(NativeError::WrongPassword)), "{err:?}");

    let empty = tempfile::tempdir()?;
    let missing = restic_wrapper::Backend::Local {
        path: empty.path().to_path_buf(),
    };
    let err = NativeRepository::open(&missing, restic.repository().secrets()).await;
    assert!(matches!(err, Err(NativeError::NotFound(_))), "{err:?}");

    // Flip one byte of one snapshot file: the listing must fail, not return garbage.
    let snaps = dir.path().join("repo/snapshots");
    let victim = std::fs::read_dir(&snaps)?
        .next()
        .expect("a snapshot")?
        .path();
    let mut bytes = std::fs::read(&victim)?;
    bytes[40] ^= 0xff;
    std::fs::write(&victim, bytes)?;
    let repo = NativeRepository::open(&backend, restic.repository().secrets()).await?;
    let err = repo.snapshots().await;
    assert!(
        matches!(err, Err(NativeError::HashMismatch { .. })),
        "{err:?}"
    );
    Ok(())
}

/// The process's shared reader: reused while the repository is the one it opened, and never
/// handed out for a repository wiped and initialised again in place (another master key).
#[tokio::test]
async fn the_shared_reader_follows_a_repository_recreated_in_place() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    restic.init().await?;
    populate(&restic, dir.path()).await?;
    let (backend, secrets) = (
        restic.repository().backend().clone(),
        restic.repository().secrets().clone(),
    );
    let first = restic_wrapper::native::reader(&backend, &secrets).await?;
    assert!(!first.snapshots().await?.is_empty());
    let again = restic_wrapper::native::reader(&backend, &secrets).await?;
    assert!(
        std::sync::Arc::ptr_eq(&first, &again),
        "a current reader is reused"
    );

    std::fs::remove_dir_all(dir.path().join("repo"))?;
    restic.init().await?;
    let second = dir.path().join("second");
    std::fs::create_dir(&second)?;
    populate(&restic, &second).await?;
    let want = restic.snapshots(&SnapshotFilter::default()).await?.len();
    // The cached reader cannot decrypt the new repository's snapshots: it is replaced.
    let (replaced, listed) =
        restic_wrapper::native::with_reader(&backend, &secrets, |r| async move {
            let listed = r.snapshots().await?;
            Ok((r, listed))
        })
        .await?;
    assert_eq!(listed.len(), want);
    assert_ne!(replaced.config().id, first.config().id);
    let current = restic_wrapper::native::reader(&backend, &secrets).await?;
    assert!(std::sync::Arc::ptr_eq(&current, &replaced));
    // Wiped and initialised once more: `reader` checks the config before handing one out.
    std::fs::remove_dir_all(dir.path().join("repo"))?;
    restic.init().await?;
    let fresh = restic_wrapper::native::reader(&backend, &secrets).await?;
    assert_ne!(fresh.config().id, replaced.config().id);
    assert!(fresh.snapshots().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn s3_listing_equals_restic_and_the_wrapper_works_on_s3() -> Result {
    let garage = garage();
    let dir = tempfile::tempdir()?;
    let repo =
        restic_wrapper::Repository::new(garage.backend("demo/app"), garage.secrets(), dir.path())?;
    let restic = Restic::new(repo).with_program(restic_bin());
    assert!(!restic.exists().await?);
    restic.init().await?;
    populate(&restic, dir.path()).await?;
    let filter = SnapshotFilter {
        hosts: vec!["host-1".into()],
        ..SnapshotFilter::default()
    };
    assert_eq!(restic.snapshots(&filter).await?.len(), 2);
    let target = dir.path().join("restored");
    restic
        .restore(&restic_wrapper::RestoreOptions {
            snapshot: "latest".into(),
            target: target.clone(),
            filter: SnapshotFilter {
                hosts: vec!["host-0".into()],
                ..SnapshotFilter::default()
            },
            ..Default::default()
        })?
        .finish()
        .await?;
    let restored_file = target.join(dir.path().join("data/a.txt").strip_prefix("/")?);
    assert_eq!(std::fs::read(restored_file)?, b"alpha\n");

    let native =
        NativeRepository::open(restic.repository().backend(), restic.repository().secrets())
            .await?;
    let env = [
        (
            "RESTIC_REPOSITORY",
            format!("s3:{}/{}/demo/app", garage.endpoint, garage.bucket),
        ),
        ("RESTIC_PASSWORD", PASSWORD.to_owned()),
        ("AWS_ACCESS_KEY_ID", garage.key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY", garage.secret.clone()),
        ("AWS_DEFAULT_REGION", "garage".to_owned()),
    ];
    let theirs = restic_snapshots_json(&env)?;
    assert_eq!(theirs.as_array().map(Vec::len), Some(5));
    assert_eq!(
        by_time_then_id(serde_json::to_value(native.snapshots().await?)?),
        by_time_then_id(theirs)
    );
    assert_eq!(restic.check(None).await?.num_errors, 0);
    Ok(())
}

/// Without the password: whether a repository is initialized and which snapshots it holds,
/// as restic leaves them, and `ensure_initialized` trusting a present config.
#[tokio::test]
async fn repository_files_are_listed_without_the_password() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    let nobody = Secrets::new();
    let files = RepositoryFiles::new(restic.repository().backend(), &nobody)?;
    assert!(!files.has_config().await?);
    assert!(files.snapshot_ids().await?.is_empty());

    restic.ensure_initialized().await?;
    assert!(files.has_config().await?);
    assert!(files.snapshot_ids().await?.is_empty());
    // A second call finds the config and leaves the repository as it is.
    let config = std::fs::read(dir.path().join("repo/config"))?;
    restic.ensure_initialized().await?;
    assert_eq!(std::fs::read(dir.path().join("repo/config"))?, config);

    populate(&restic, dir.path()).await?;
    let mut ids = files.snapshot_ids().await?;
    ids.sort();
    let mut listed: Vec<String> = restic
        .snapshots(&SnapshotFilter::default())
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    listed.sort();
    assert_eq!(ids, listed);
    assert_eq!(ids.len(), 5);
    Ok(())
}

/// Waits for the repository's first lock; a deadline so a broken test fails instead of
/// hanging, not a performance threshold.
async fn first_lock(repo: &NativeRepository) -> Result<restic_wrapper::Lock> {
    for _ in 0..300 {
        if let Some(lock) = repo.locks().await?.into_iter().next() {
            return Ok(lock);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    anyhow::bail!("no lock appeared")
}

/// A stdin backup started through the wrapper holds a lock; the spawn observer names its
/// pid, and the native reader finds that pid and this host in the lock, as `restic cat lock`
/// shows it. Killed with SIGKILL, restic cannot remove its lock: the observer hears of the
/// kill, and the native reader removes the stale lock, after which restic lists none.
async fn a_killed_backups_lock_is_read_and_removed(
    restic: Restic,
    env: &[(&str, String)],
) -> Result {
    let spawns = std::sync::Arc::new(Spawns::default());
    let restic = restic.with_spawn_observer(spawns.clone());
    restic.ensure_initialized().await?;
    let native =
        NativeRepository::open(restic.repository().backend(), restic.repository().secrets())
            .await?;
    assert!(native.locks().await?.is_empty());

    let holder = restic.backup_stdin("endless", Endless, &BackupOptions::default())?;
    let lock = first_lock(&native).await?;
    let pids = spawns.pids("back up a stream");
    assert_eq!(pids.len(), 1, "{:?}", spawns.all());
    assert_eq!(
        (lock.hostname.as_str(), lock.pid, lock.exclusive),
        (hostname().as_str(), i64::from(pids[0]), false)
    );
    assert!(lock.created().is_some(), "{lock:?}");
    assert_eq!(native.lock(&lock.id).await?.as_ref(), Some(&lock));

    // The same lock, as restic itself prints it.
    let theirs: Value =
        serde_json::from_slice(&run_restic(&["cat", "lock", &lock.id, "--no-lock"], env)?)?;
    assert_eq!(theirs["time"].as_str(), Some(lock.time.as_str()));
    assert_eq!(theirs["hostname"].as_str(), Some(lock.hostname.as_str()));
    assert_eq!(theirs["username"].as_str(), Some(lock.username.as_str()));
    assert_eq!(theirs["pid"].as_i64(), Some(lock.pid));
    assert_eq!(theirs["exclusive"].as_bool(), Some(false));
    // restic leaves out a zero uid and gid.
    assert_eq!(theirs["uid"].as_u64().unwrap_or(0), u64::from(lock.uid));
    assert_eq!(theirs["gid"].as_u64().unwrap_or(0), u64::from(lock.gid));

    let killed = Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status()?;
    assert!(killed.success());
    // Stopping the run reaps the process (its input never ends, so `finish` would wait).
    holder.cancel().await?;
    let status = spawns
        .exit(pids[0])
        .ok_or_else(|| anyhow::anyhow!("the kill was not reported"))?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert_eq!(
        native.locks().await?,
        vec![lock.clone()],
        "the killed restic left its lock"
    );

    native.remove_lock(&lock.id).await?;
    assert!(native.locks().await?.is_empty());
    assert!(run_restic(&["list", "locks", "--no-lock"], env)?.is_empty());
    // Already gone is no error; a name that is not a lock id is refused.
    native.remove_lock(&lock.id).await?;
    let err = native.remove_lock("../config").await;
    assert!(matches!(err, Err(NativeError::Format { .. })), "{err:?}");
    assert_eq!(native.lock(&lock.id).await?, None);

    // Commands that end on their own are reported with their exit code.
    restic.snapshots(&SnapshotFilter::default()).await?;
    let listed = spawns.pids("list snapshots");
    assert_eq!(listed.len(), 1, "{:?}", spawns.all());
    assert_eq!(spawns.exit(listed[0]).and_then(|s| s.code()), Some(0));
    Ok(())
}

#[tokio::test]
async fn locks_are_read_and_removed_on_a_local_repository() -> Result {
    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    let env = local_env(dir.path());
    a_killed_backups_lock_is_read_and_removed(restic, &env).await
}

#[tokio::test]
async fn locks_are_read_and_removed_on_s3() -> Result {
    let garage = garage();
    let dir = tempfile::tempdir()?;
    let repo =
        restic_wrapper::Repository::new(garage.backend("locks"), garage.secrets(), dir.path())?;
    let restic = Restic::new(repo).with_program(restic_bin());
    let env = [
        (
            "RESTIC_REPOSITORY",
            format!("s3:{}/{}/locks", garage.endpoint, garage.bucket),
        ),
        ("RESTIC_PASSWORD", PASSWORD.to_owned()),
        ("AWS_ACCESS_KEY_ID", garage.key_id.clone()),
        ("AWS_SECRET_ACCESS_KEY", garage.secret.clone()),
        ("AWS_DEFAULT_REGION", "garage".to_owned()),
    ];
    a_killed_backups_lock_is_read_and_removed(restic, &env).await
}

/// restic's Go `FileMode` as the unix permission bits the native reader reports.
fn unix_permissions(go_mode: u64) -> u32 {
    let mut mode = (go_mode & 0o777) as u32;
    for (go, unix) in [(1 << 23, 0o4000), (1 << 22, 0o2000), (1 << 20, 0o1000)] {
        if go_mode & go != 0 {
            mode |= unix;
        }
    }
    mode
}

#[tokio::test]
async fn trees_and_file_data_read_natively_equal_restic_ls_and_the_files() -> Result {
    use futures::StreamExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir()?;
    let restic = local(dir.path(), PASSWORD);
    restic.init().await?;
    // What a tree has to carry: odd bytes in names, several chunks, an empty file, a hard
    // link, a FIFO, setuid and sticky bits, an mtime before 1970.
    let data = sample_tree(dir.path());
    let odd = std::ffi::OsStr::from_bytes(b"odd \xff \"quoted\"\n\\name");
    std::fs::write(data.join(odd), b"odd")?;
    std::fs::write(data.join("big"), common::pseudo_random(9 << 20, 3))?;
    std::fs::write(data.join("empty"), b"")?;
    std::fs::hard_link(data.join("a.txt"), data.join("a-link"))?;
    let fifo = Command::new("mkfifo").arg(data.join("fifo")).status()?;
    anyhow::ensure!(fifo.success(), "mkfifo");
    std::fs::set_permissions(data.join("a.txt"), std::fs::Permissions::from_mode(0o4755))?;
    std::fs::set_permissions(data.join("sub"), std::fs::Permissions::from_mode(0o1777))?;
    let old = std::time::UNIX_EPOCH - std::time::Duration::from_millis(1_000_500);
    std::fs::File::options()
        .write(true)
        .open(data.join("empty"))?
        .set_modified(old)?;
    restic
        .backup(std::slice::from_ref(&data), None, &BackupOptions::default())?
        .finish()
        .await?;

    let repo = NativeRepository::open(restic.repository().backend(), restic.repository().secrets())
        .await?;
    let snap = repo
        .snapshots()
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
    let index = repo.load_index().await?;
    let mut ours = Vec::new();
    let mut todo = vec![(Vec::new(), restic_wrapper::native::blob_id(&snap.tree)?)];
    while let Some((parent, id)) = todo.pop() {
        for node in repo.tree(&index, &id).await? {
            let raw = [&parent[..], b"/", &node.name].concat();
            // As Go's JSON writes a name that is not UTF-8.
            let path = String::from_utf8_lossy(&raw).into_owned();
            let kind = match node.kind {
                restic_wrapper::native::NodeKind::File => "file",
                restic_wrapper::native::NodeKind::Dir => "dir",
                restic_wrapper::native::NodeKind::Symlink => "symlink",
                restic_wrapper::native::NodeKind::Fifo => "fifo",
                ref other => anyhow::bail!("{path}: unexpected {other:?}"),
            };
            if let Some(sub) = node.subtree {
                todo.push((raw.clone(), sub));
            }
            let nanos = i128::from(node.mtime_secs) * 1_000_000_000 + i128::from(node.mtime_nanos);
            let size = (kind == "file").then_some(node.size);
            ours.push((
                path.clone(),
                kind,
                node.mode,
                nanos,
                size,
                node.uid,
                node.inode,
            ));
            if kind == "file" {
                // The data, blob by blob, is the file on disk.
                let blobs: Vec<_> = repo.data_blobs(&index, node.content, 4).collect().await;
                let bytes = blobs
                    .into_iter()
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let on_disk = std::fs::read(std::ffi::OsStr::from_bytes(&raw))?;
                assert_eq!(bytes.concat(), on_disk, "{path}");
            }
            if kind == "symlink" {
                assert_eq!(node.link_target, b"a.txt", "{path}");
            }
        }
    }
    ours.sort();

    let env = local_env(dir.path());
    let listing = run_restic(&["ls", "--json", "--no-lock", &snap.id], &env)?;
    let mut theirs = Vec::new();
    for line in listing.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let v: Value = serde_json::from_slice(line)?;
        if v["struct_type"] != "node" {
            continue;
        }
        let kind = match v["type"].as_str().unwrap_or_default() {
            "file" => "file",
            "dir" => "dir",
            "symlink" => "symlink",
            "fifo" => "fifo",
            other => anyhow::bail!("restic ls: unexpected type {other}"),
        };
        let mtime: jiff::Timestamp = v["mtime"].as_str().unwrap_or_default().parse()?;
        theirs.push((
            v["path"].as_str().unwrap_or_default().to_owned(),
            kind,
            unix_permissions(v["mode"].as_u64().unwrap_or_default()),
            mtime.as_nanosecond(),
            (kind == "file").then(|| v["size"].as_u64().unwrap_or_default()),
            v["uid"].as_u64().unwrap_or_default(),
            v["inode"].as_u64().unwrap_or_default(),
        ));
    }
    theirs.sort();
    assert_eq!(ours, theirs);
    // The cases the tree was built for are in the comparison.
    assert!(ours.iter().any(|n| n.0.ends_with("/fifo") && n.1 == "fifo"));
    assert!(
        ours.iter()
            .any(|n| n.0.ends_with("/a.txt") && n.2 == 0o4755)
    );
    assert!(ours.iter().any(|n| n.0.ends_with("/sub") && n.2 == 0o1777));
    assert!(
        ours.iter()
            .any(|n| n.0.ends_with("/empty") && n.3 == -1_000_500_000_000)
    );
    assert!(ours.iter().any(|n| n.0.contains('\u{fffd}')));
    Ok(())
}
