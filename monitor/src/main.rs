//! `coord-monitor`: runs the monitor service as a process.

/// Why not the system's: see [`common::service::main`].
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::service::main(
        "coord-monitor",
        "coordkit monitor: metrics of the coordination plane",
        |c: &monitor::Config| &c.nats,
        monitor::run,
    )
    .await
}
