//! The Stash operator: `run` reconciles Repositories, BackupConfigurations and BackupSessions
//! (a session becomes one BackupAssignment per node, worked by that node's agent); `trigger`
//! is what a BackupConfiguration's CronJob runs; `crd` prints the CRDs. `run` also serves the
//! Snapshot API (`kubectl get snapshots`) as an aggregated API server.

pub mod backup_configuration;
pub mod backup_session;
pub mod cli;
pub mod context;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod pushgateway;
pub mod repo_lease;
pub mod repository;
pub mod restore_session;
pub mod schedule;
pub mod server;
pub mod snapshots;
pub mod spec_changes;
pub mod target;
pub mod trigger;

use std::io::Write;

pub use cli::{Cli, Command};
pub use error::Error;

/// Runs a parsed command line: the thin layer between `main` and the library.
pub fn main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Crd => {
            print_crds(&mut std::io::stdout().lock())?;
            Ok(())
        }
        Command::Run(args) => {
            cli::init_tracing(&args.log);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(context::run(args))?;
            Ok(())
        }
        Command::Trigger(args) => {
            cli::init_tracing(&args.log);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let name = rt.block_on(trigger::run(args))?;
            println!("backupsession/{name} created");
            Ok(())
        }
    }
}

/// Prints every CRD as one YAML stream, for `kubectl apply -f -`.
pub fn print_crds(out: &mut impl Write) -> Result<(), Error> {
    for crd in stash_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let yaml =
            serde_yaml::to_string(&crd).map_err(|source| Error::RenderCrd { name, source })?;
        writeln!(out, "---\n{}", yaml.trim_end()).map_err(Error::Write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn crd_prints_every_crd_as_a_yaml_stream() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["stash-operator", "crd"])?;
        assert!(matches!(cli.command, Command::Crd));
        let mut out = Vec::new();
        print_crds(&mut out)?;
        let text = String::from_utf8(out)?;
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(serde::Deserialize::deserialize)
            .collect::<Result<_, _>>()?;
        assert_eq!(docs.len(), stash_api::crds().len());
        assert!(docs.iter().all(|d| d["kind"] == "CustomResourceDefinition"));
        Ok(())
    }
}
