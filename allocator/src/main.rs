//! `coord-allocator`: runs the allocator service as a process.

use clap::Parser;

/// coordkit allocator: agents, capacity and placement.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: allocator::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = common::telemetry::init("coord-allocator");
    allocator::run(cli.config, common::shutdown::signal()).await
}
