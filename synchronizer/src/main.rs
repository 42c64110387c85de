//! `coord-synchronizer`: runs the synchronizer service as a process.

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
