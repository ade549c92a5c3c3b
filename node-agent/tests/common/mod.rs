//! What the agent's integration tests share: the real restic, and a fresh local repository
//! for each test.

use std::path::{Path, PathBuf};

use restic_wrapper::{Backend, Repository, Restic, Secrets};

pub fn restic_bin() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/bin/restic");
    assert!(p.exists(), "restic is not installed: run `make setup`");
    p
}

/// A new repository in `dir/repo`, its cache beside it.
pub async fn repo(dir: &Path) -> anyhow::Result<Restic> {
    let repo = Repository::new(
        Backend::Local {
            path: dir.join("repo"),
        },
        Secrets::new().with("RESTIC_PASSWORD", "agent test"),
        dir,
    )?;
    let restic = Restic::new(repo).with_program(restic_bin());
    restic.init().await?;
    Ok(restic)
}

/// Sets a path's access and modification times without following a symlink.
pub fn set_mtime(path: &Path, secs: i64, nanos: i64) -> anyhow::Result<()> {
    let t = rustix::fs::Timespec {
        tv_sec: secs,
        tv_nsec: nanos,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}
