//! `coord-monitor`: runs the monitor service as a process.

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
