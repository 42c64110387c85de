//! What every service binary does: `--healthcheck` for container health
//! checks (ping this replica, exit 0 or 1), or telemetry and the service
//! until SIGINT or SIGTERM.

use std::future::Future;
use std::pin::Pin;

use clap::{Args, CommandFactory, FromArgMatches, Parser};

use crate::config::NatsConfig;

#[derive(Parser, Debug)]
#[command(version)]
struct Cli<C: Args> {
    /// Check that this instance answers, then exit (0 healthy, 1 not): for container health checks.
    #[arg(long)]
    healthcheck: bool,
    #[command(flatten)]
    config: C,
}

/// What resolves when the process is asked to stop (see [`crate::shutdown`]).
pub type Shutdown = Pin<Box<dyn Future<Output = &'static str> + Send>>;

/// The `main` of a service's binary (`coord-{service}`) described by
/// `about`: its settings from flags and environment (`C`), whose NATS
/// connection `nats` picks, run by `run` until the process is asked to stop.
///
/// Each binary also sets mimalloc as its global allocator: a service
/// allocates and frees many small buffers (messages, JSON) from several
/// threads, and with glibc's allocator a busy process spent about a third of
/// its time there, much of it waiting on arena locks (profiled under
/// `coord-bench dispatch`; mimalloc took pipelined dispatch from 2.4 k to
/// 4.4 k tasks/s at the page-cache setting). A library cannot choose the
/// allocator for its users, so it is set in the binaries, not here.
pub async fn main<C, Fut>(
    binary: &'static str,
    about: &'static str,
    nats: fn(&C) -> &NatsConfig,
    run: impl FnOnce(C, Shutdown) -> Fut,
) -> anyhow::Result<()>
where
    C: Args + FromArgMatches,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let name = binary.strip_prefix("coord-").unwrap_or(binary);
    let matches = Cli::<C>::command()
        .name(binary)
        .bin_name(binary)
        .about(about)
        .get_matches();
    let cli = Cli::<C>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if cli.healthcheck {
        let ok = super::healthcheck(nats(&cli.config), name).await;
        std::process::exit(if ok { 0 } else { 1 });
    }
    let _telemetry = crate::telemetry::init(binary);
    run(cli.config, Box::pin(crate::shutdown::signal())).await
}
