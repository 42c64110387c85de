//! `coord-allocator`: runs the allocator service as a process.

/// Why not the system's: see [`common::service::main`].
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::service::main(
        "coord-allocator",
        "coordkit allocator: agents, capacity and placement",
        |c: &allocator::Config| &c.nats,
        allocator::run,
    )
    .await
}
