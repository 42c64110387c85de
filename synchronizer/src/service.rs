//! The synchronizer's NATS adapter: state get and put over the `coord_state` bucket.

use std::future::Future;
use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use common::msg::{EventKind, StateDoc, StateGet, StatePut};
use common::nats::{self as bus, Bucket, EventPublisher, Stream};
use common::service::Service;
use common::{subject, Error, ErrorCode};

use crate::machine;

/// Synchronizer settings.
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

const NAME: &str = "synchronizer";

struct Synchronizer {
    state: kv::Store,
    events: EventPublisher,
}

/// Runs the synchronizer until `shutdown` resolves, then drains the connection.
pub async fn run(cfg: Config, shutdown: impl Future) -> anyhow::Result<()> {
    let nats = bus::connect(&cfg.nats, NAME).await?;
    let js = jetstream::new(nats.clone());
    bus::ensure_stream(&js, Stream::Events, cfg.nats.js_replicas).await?;
    let state = bus::ensure_bucket(&js, Bucket::State, cfg.nats.js_replicas).await?;
    let sync = Arc::new(Synchronizer {
        state,
        events: EventPublisher::new(nats.clone(), NAME),
    });

    let mut service = Service::start(&nats, NAME, "Versioned agent state").await?;
    let s = sync.clone();
    service
        .serve(subject::STATE_GET, move |r: StateGet| {
            let s = s.clone();
            async move { s.get(r).await }
        })
        .await?;
    let s = sync.clone();
    service
        .serve(subject::STATE_PUT, move |r: StatePut| {
            let s = s.clone();
            async move { s.put(r).await }
        })
        .await?;
    tracing::info!(url = %cfg.nats.nats_url, "synchronizer running");

    shutdown.await;
    tracing::info!("synchronizer shutting down");
    service.stop().await;
    nats.drain().await.ok();
    Ok(())
}

impl Synchronizer {
    async fn get(&self, req: StateGet) -> Result<StateDoc, Error> {
        bus::get_json::<StateDoc>(&self.state, req.agent_id.as_str())
            .await?
            .map(|(doc, revision)| StateDoc { revision, ..doc })
            .ok_or_else(|| Error::not_found(format!("no state for agent {}", req.agent_id)))
    }

    async fn put(&self, req: StatePut) -> Result<StateDoc, Error> {
        machine::check_doc(&req.doc)?;
        let key = req.agent_id.as_str();
        let stored = StateDoc {
            agent_id: req.agent_id.clone(),
            revision: 0,
            doc: req.doc,
            updated_at_ms: common::now_ms(),
        };
        let body = serde_json::to_vec(&stored).map_err(|e| Error::internal(e.to_string()))?;
        let written = if req.expected_revision == 0 {
            self.state
                .create(key, body.into())
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => None,
                    _ => Some(Error::new(
                        ErrorCode::Unavailable,
                        format!("kv create: {e}"),
                    )),
                })
        } else {
            self.state
                .update(key, body.into(), req.expected_revision)
                .await
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => None,
                    _ => Some(Error::new(
                        ErrorCode::Unavailable,
                        format!("kv update: {e}"),
                    )),
                })
        };
        match written {
            Ok(revision) => {
                self.events
                    .publish(EventKind::StateUpdated {
                        agent_id: req.agent_id,
                        revision,
                    })
                    .await;
                Ok(StateDoc { revision, ..stored })
            }
            Err(Some(e)) => Err(e),
            Err(None) => {
                let current = bus::get_json::<StateDoc>(&self.state, key).await?;
                let current_revision = current.as_ref().map(|(_, r)| *r).unwrap_or(0);
                self.events
                    .publish(EventKind::StateConflict {
                        agent_id: req.agent_id.clone(),
                        expected_revision: req.expected_revision,
                        current_revision,
                    })
                    .await;
                Err(Error::new(
                    ErrorCode::Conflict,
                    format!(
                        "state of {} is at revision {current_revision}, not {}",
                        req.agent_id, req.expected_revision
                    ),
                )
                .with_details(serde_json::json!({
                    "current_revision": current_revision,
                    "current": current.map(|(d, _)| d.doc),
                })))
            }
        }
    }
}
