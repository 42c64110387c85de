//! `coord-orchestrator`: runs the orchestrator service as a process.

use clap::Parser;

/// coordkit orchestrator: task flows (DAGs of tasks) run on external agents.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: orchestrator::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = common::telemetry::init("coord-orchestrator");
    orchestrator::run(cli.config, common::shutdown::signal()).await
}
