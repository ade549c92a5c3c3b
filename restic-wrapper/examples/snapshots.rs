//! Lists a repository's snapshots with the native reader, printing the JSON array that
//! `restic snapshots --json` prints, without starting restic.
//!
//!     cargo run -p restic-wrapper --example snapshots -- --repo <repository string>
//!
//! The password and credentials come from the usual restic environment variables
//! (RESTIC_PASSWORD or RESTIC_PASSWORD_FILE, AWS_ACCESS_KEY_ID, …); `--repo` may also come
//! from RESTIC_REPOSITORY.

use anyhow::{Context, bail};
use restic_wrapper::{Backend, NativeRepository, Secrets};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut repo = std::env::var("RESTIC_REPOSITORY").ok();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--repo" | "-r" => repo = Some(args.next().context("--repo needs a value")?),
            other if other.starts_with("--repo=") => repo = Some(other[7..].to_owned()),
            "--help" | "-h" => {
                println!("usage: snapshots --repo <repository>");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let repo = repo.context("no repository: pass --repo or set RESTIC_REPOSITORY")?;
    let backend = Backend::parse(&repo)?;
    let secrets = Secrets::from_process_env();
    let repository = NativeRepository::open(&backend, &secrets)
        .await
        .with_context(|| format!("failed to open {repo}"))?;
    let snapshots = repository.snapshots().await?;
    println!("{}", serde_json::to_string(&snapshots)?);
    Ok(())
}
