//! `cluster-sim up`: a simulated cluster until Ctrl-C; `cluster-sim container-init`: the
//! first process of a container, which assembles its root and execs the container's
//! command (started by the kubelet, not by users).

use anyhow::Context;
use clap::{Parser, Subcommand};
use cluster_sim::{Cluster, Image, Images, Options};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "cluster-sim",
    about = "A simulated Kubernetes cluster behind kube-sim"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the API server, the controllers, the scheduler and the nodes; stay up until
    /// SIGINT or SIGTERM.
    Up(UpArgs),
    /// (internal) Become a container's process.
    #[command(hide = true)]
    ContainerInit { spec: PathBuf },
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    /// Where the nodes' filesystems, the volumes and the kubeconfig live.
    #[arg(long, env = "CLUSTER_SIM_STATE", default_value = ".cluster")]
    state: PathBuf,
    /// Number of nodes.
    #[arg(long, env = "NODES", default_value_t = 2)]
    nodes: usize,
    /// The API server's port (0 picks a free one).
    #[arg(long, env = "CLUSTER_SIM_PORT", default_value_t = 0)]
    port: u16,
    /// An image that runs as a process: `<repository>=<binary>` (its entrypoint is
    /// `/usr/local/bin/<repository>`, its CMD `run`), repeatable.
    #[arg(
        long = "image-binary",
        env = "CLUSTER_SIM_IMAGES",
        value_delimiter = ','
    )]
    images: Vec<String>,
    /// A file every image carries: `<container path>=<host file>` (e.g. restic), repeatable.
    #[arg(
        long = "image-file",
        env = "CLUSTER_SIM_IMAGE_FILES",
        value_delimiter = ','
    )]
    image_files: Vec<String>,
    /// A foreign image (such as busybox) whose container command runs on the host's tools.
    #[arg(
        long = "run-image",
        env = "CLUSTER_SIM_RUN_IMAGES",
        value_delimiter = ','
    )]
    run_images: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::ContainerInit { spec } = &cli.command {
        let text =
            std::fs::read(spec).with_context(|| format!("failed to read {}", spec.display()))?;
        let spec = serde_json::from_slice(&text).context("failed to parse the container spec")?;
        cluster_sim::kubelet::runtime::container_init(&spec)?;
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the runtime")?;
    match cli.command {
        Command::Up(args) => rt.block_on(up(args)),
        Command::ContainerInit { .. } => Ok(()),
    }
}

fn parse_images(args: &UpArgs) -> anyhow::Result<Images> {
    let mut extra = Vec::new();
    for f in &args.image_files {
        let (path, host) = f
            .split_once('=')
            .with_context(|| format!("--image-file {f:?} is not <container path>=<host file>"))?;
        extra.push((
            path.to_owned(),
            std::fs::canonicalize(host).with_context(|| format!("failed to find {host}"))?,
        ));
    }
    let mut images = Images {
        host_commands: args.run_images.clone(),
        ..Default::default()
    };
    for i in &args.images {
        let (repo, bin) = i
            .split_once('=')
            .with_context(|| format!("--image-binary {i:?} is not <repository>=<binary>"))?;
        let bin = std::fs::canonicalize(bin).with_context(|| format!("failed to find {bin}"))?;
        let mut image = Image::binary(bin, repo, &["run"]);
        image.files.extend(extra.clone());
        images.known.insert(repo.to_owned(), image);
    }
    Ok(images)
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let images = parse_images(&args)?;
    std::fs::create_dir_all(&args.state)
        .with_context(|| format!("failed to create {}", args.state.display()))?;
    let state = std::fs::canonicalize(&args.state)?;
    let cluster = Cluster::start(Options {
        state_dir: state.clone(),
        nodes: args.nodes,
        port: args.port,
        images,
        init_exe: std::env::current_exe().context("failed to find this program")?,
    })
    .await?;
    println!("The simulated cluster is up.");
    println!(
        "  export KUBECONFIG={}",
        cluster.kubeconfig_path().display()
    );
    for n in cluster.nodes() {
        println!(
            "  node {}: kubelet root {}",
            n.name,
            n.kubelet_root.display()
        );
    }
    println!("Stop it with Ctrl-C (or `make cluster-down`).");
    std::fs::write(
        state.join("cluster-sim.pid"),
        std::process::id().to_string(),
    )?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to listen for SIGTERM")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cluster.stop().await;
    let _ = std::fs::remove_file(state.join("cluster-sim.pid"));
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
