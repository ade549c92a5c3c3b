//! `kube-sim serve`: runs the in-memory API server until stopped, writing a kubeconfig once
//! it is ready.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "kube-sim",
    about = "An in-memory Kubernetes API server for tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve until SIGINT or SIGTERM.
    Serve(ServeArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "KUBE_SIM_ADDR", default_value = "127.0.0.1:0")]
    addr: SocketAddr,
    /// Where to write the kubeconfig once the server is ready.
    #[arg(long, env = "KUBE_SIM_KUBECONFIG_OUT")]
    kubeconfig_out: Option<PathBuf>,
    /// Serve HTTPS with a generated certificate.
    #[arg(long, env = "KUBE_SIM_TLS")]
    tls: bool,
    /// Route a Service port to a local address: `namespace/name:port=host:port` (repeatable).
    #[arg(
        long = "service-address",
        env = "KUBE_SIM_SERVICE_ADDRESSES",
        value_delimiter = ','
    )]
    service_addresses: Vec<String>,
    /// Seconds between watch bookmarks.
    #[arg(long, env = "KUBE_SIM_BOOKMARK_SECONDS", default_value_t = 5)]
    bookmark_seconds: u64,
    /// Watch events kept per resource for resumption.
    #[arg(long, env = "KUBE_SIM_HISTORY", default_value_t = 20_000)]
    history: usize,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime")?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(args)),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut opts = kube_sim::Options {
        addr: args.addr,
        tls: args.tls,
        history_limit: args.history,
        bookmark_interval: std::time::Duration::from_secs(args.bookmark_seconds.max(1)),
        ..Default::default()
    };
    for m in &args.service_addresses {
        let (svc, to) = m.split_once('=').with_context(|| {
            format!("--service-address {m:?} is not namespace/name:port=host:port")
        })?;
        opts.service_addresses.insert(svc.to_owned(), to.to_owned());
    }
    let sim = kube_sim::KubeSim::start(opts).await?;
    if let Some(path) = &args.kubeconfig_out {
        sim.write_kubeconfig(path)?;
        tracing::info!(path = %path.display(), "wrote the kubeconfig");
    }
    println!("{}", sim.url());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to listen for SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    sim.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
