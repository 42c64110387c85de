//! `coord-synchronizer`: runs the synchronizer service as a process.

/// Why not the system's: see [`common::service::main`].
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::service::main(
        "coord-synchronizer",
        "coordkit synchronizer: versioned agent state",
        |c: &synchronizer::Config| &c.nats,
        synchronizer::run,
    )
    .await
}
