//! The node agent: resolves pod volumes to host paths, reads them under the node's IO budget
//! and stores them with restic. The data path arrives with the node-agent issue.

use clap::Parser;

/// Command line of `stash-node-agent`.
#[derive(Debug, Parser)]
#[command(name = "stash-node-agent", version, about = "Stash node agent")]
pub struct Cli {}
