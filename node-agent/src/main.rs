use clap::Parser;

fn main() {
    let _cli = stash_node_agent::Cli::parse();
    eprintln!("stash-node-agent: no mode is available in this build yet; see --help");
    std::process::exit(2);
}
