//! `coord-orchestrator`: runs the orchestrator service as a process.

/// Why not the system's: see [`common::service::main`].
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::service::main(
        "coord-orchestrator",
        "coordkit orchestrator: task flows (DAGs of tasks) run on external agents",
        |c: &orchestrator::Config| &c.nats,
        orchestrator::run,
    )
    .await
}
