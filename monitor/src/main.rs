//! `coord-monitor`: runs the monitor service as a process.

use clap::Parser;

/// coordkit monitor: metrics of the coordination plane.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: monitor::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = common::telemetry::init("coord-monitor");
    monitor::run(cli.config, common::shutdown::signal()).await
}
