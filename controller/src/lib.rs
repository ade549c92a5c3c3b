//! The Stash operator. So far it prints the CRDs it owns (`stash-operator crd`); the
//! reconcilers, webhooks and Snapshot API arrive with the controller issues.

use std::io::Write;

use clap::{Parser, Subcommand};

/// Command line of `stash-operator`.
#[derive(Debug, Parser)]
#[command(name = "stash-operator", version, about = "Stash operator")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions as YAML, for `kubectl apply -f -`.
    Crd,
}

/// Errors of the operator's commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to render the CRD {name}: {source}")]
    RenderCrd {
        name: String,
        source: serde_yaml::Error,
    },
    #[error("failed to write to the output: {0}")]
    Write(#[from] std::io::Error),
}

/// Runs a parsed command.
pub fn run(cli: Cli, out: &mut impl Write) -> Result<(), Error> {
    match cli.command {
        Command::Crd => print_crds(out),
    }
}

fn print_crds(out: &mut impl Write) -> Result<(), Error> {
    for crd in stash_api::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let yaml =
            serde_yaml::to_string(&crd).map_err(|source| Error::RenderCrd { name, source })?;
        writeln!(out, "---\n{}", yaml.trim_end())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn crd_prints_every_crd_as_a_yaml_stream() -> anyhow::Result<()> {
        let mut out = Vec::new();
        run(Cli::try_parse_from(["stash-operator", "crd"])?, &mut out)?;
        let text = String::from_utf8(out)?;
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(serde::Deserialize::deserialize)
            .collect::<Result<_, _>>()?;
        assert_eq!(docs.len(), stash_api::crds().len());
        assert!(docs.iter().all(|d| d["kind"] == "CustomResourceDefinition"));
        Ok(())
    }
}
