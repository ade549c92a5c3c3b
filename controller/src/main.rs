use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = stash_controller::Cli::parse();
    stash_controller::main(cli)
}
