//! `coord-synchronizer`: runs the synchronizer service as a process.

use clap::Parser;

/// coordkit synchronizer: versioned agent state.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: synchronizer::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = common::telemetry::init("coord-synchronizer");
    synchronizer::run(cli.config, common::shutdown::signal()).await
}
