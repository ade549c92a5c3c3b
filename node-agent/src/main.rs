use clap::Parser;
use stash_node_agent::cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

/// The hidden subcommand every restic of the agent is started through, so it dies with the
/// agent (`restic_wrapper::ExecShim`).
const EXEC_SHIM: &str = "__exec-restic";

fn main() -> anyhow::Result<()> {
    // Before any runtime: the shim only sets a signal and execs, on this one thread.
    let mut args = std::env::args_os().skip(1);
    if args.next().is_some_and(|a| a == EXEC_SHIM) {
        // Returns only if restic could not be started; the shell's exit code for that.
        let error = restic_wrapper::exec_with_parent_death(args);
        eprintln!("failed to start restic: {error}");
        std::process::exit(127);
    }
    restic_wrapper::install_exec_shim(restic_wrapper::ExecShim {
        subcommand: EXEC_SHIM.into(),
    });
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(agent())
}

async fn agent() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = EnvFilter::try_new(&cli.log_level)?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs.init(),
    }
    let summary = stash_node_agent::cli::run(cli.command).await?;
    println!("{summary}");
    Ok(())
}
