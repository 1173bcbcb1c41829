//! The `gateway` binary: the public Osprey endpoint.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "Osprey gateway: the public gRPC API in front of the sam, vision and llm workers")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Serve `osprey.v1.Osprey` over gRPC.
    Serve(gateway::service::GatewayArgs),
    /// Run the whole pipeline on this machine and send a sample image through it.
    Local(gateway::local::LocalArgs),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match args.command {
        Command::Serve(args) => runtime.block_on(gateway::service::main(args)),
        Command::Local(args) => runtime.block_on(gateway::local::main(args)),
    }
}

#[cfg(test)]
mod tests {
    /// Every flag read from the environment reads `OSPREY_<FLAG>` (or OpenTelemetry's names).
    #[test]
    fn flags_read_their_osprey_variables() {
        osprey_test_support::assert_env_names(&<super::Args as clap::CommandFactory>::command());
    }
}
