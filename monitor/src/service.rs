//! The monitor's NATS adapter: one subscription to everything, one metrics endpoint.

use std::future::Future;
use std::sync::{Arc, Mutex};

use common::msg::MetricsRequest;
use common::nats as bus;
use common::service::Service;
use common::{subject, Error, ErrorCode};
use futures::StreamExt;

use crate::machine::Counters;

/// Monitor settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub nats: common::config::NatsConfig,
}

impl Config {
    pub fn new(nats: common::config::NatsConfig) -> Self {
        Config { nats }
    }
}

const NAME: &str = "monitor";

/// Runs the monitor until `shutdown` resolves, then drains the connection.
///
/// Every replica sees all traffic (a plain subscription, not a queue group), so
/// each answers for the whole system.
pub async fn run(cfg: Config, shutdown: impl Future) -> anyhow::Result<()> {
    let nats = bus::connect(&cfg.nats, NAME).await?;
    let counters = Arc::new(Mutex::new(Counters::new(common::now_ms())));
    let mut all = nats.subscribe(subject::ALL).await.map_err(|e| {
        Error::new(
            ErrorCode::Unavailable,
            format!("subscribe {}: {e}", subject::ALL),
        )
    })?;
    let c = counters.clone();
    let collector = tokio::spawn(async move {
        while let Some(msg) = all.next().await {
            if let Ok(mut c) = c.lock() {
                c.observe(&msg.subject, &msg.payload);
            }
        }
    });

    let mut service = Service::start(
        &nats,
        NAME,
        "Metrics, anomalies and health of the coordination plane",
    )
    .await?;
    let c = counters.clone();
    service
        .serve(subject::MONITOR_METRICS, move |_: MetricsRequest| {
            let c = c.clone();
            async move {
                c.lock()
                    .map(|c| c.snapshot(common::now_ms()))
                    .map_err(|_| Error::internal("metrics lock poisoned"))
            }
        })
        .await?;
    tracing::info!(url = %cfg.nats.nats_url, "monitor running");

    shutdown.await;
    tracing::info!("monitor shutting down");
    service.stop().await;
    collector.abort();
    nats.drain().await.ok();
    Ok(())
}
