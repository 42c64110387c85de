//! `coord-monitor`: runs the monitor service as a process.

use clap::Parser;

/// coordkit monitor: metrics of the coordination plane.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Check that this instance answers, then exit (0 healthy, 1 not): for container health checks.
    #[arg(long)]
    healthcheck: bool,
    #[command(flatten)]
    config: monitor::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if cli.healthcheck {
        let ok = common::service::healthcheck(&cli.config.nats, "monitor").await;
        std::process::exit(if ok { 0 } else { 1 });
    }
    let _telemetry = common::telemetry::init("coord-monitor");
    monitor::run(cli.config, common::shutdown::signal()).await
}
