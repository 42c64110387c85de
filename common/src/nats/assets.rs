//! The JetStream resources coordkit owns: their names, how each stream and
//! bucket is configured, and creating them (idempotently, by any replica).

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};

use crate::error::Error;
use crate::subject;

/// Agent reports, consumed by the orchestrators through one shared durable consumer.
pub const STREAM_REPORTS: &str = "COORD_REPORTS";
/// Every domain event: the audit log.
pub const STREAM_EVENTS: &str = "COORD_EVENTS";
/// Events external agents published and the synchronizer accepted
/// (`coord.agent_events.{type}.{agent}`), with limits of their own.
pub const STREAM_AGENT_EVENTS: &str = "COORD_AGENT_EVENTS";
/// How long agent events are kept by default.
pub const AGENT_EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How many bytes of agent events are kept by default (oldest dropped first).
pub const AGENT_EVENTS_MAX_BYTES: i64 = 1 << 30;
/// The orchestrators' shared durable consumer on [`STREAM_REPORTS`].
pub const CONSUMER_ORCHESTRATOR: &str = "orchestrator";
/// The orchestrators' shared durable consumer of the allocator's `agent.lost`
/// and `allocation.preempted` events on [`STREAM_EVENTS`].
pub const CONSUMER_ORCHESTRATOR_ALLOCATOR_EVENTS: &str = "orchestrator-allocator-events";
/// The orchestrators' shared durable consumer of stored agent events, which
/// starts the flows of matching triggers.
pub const CONSUMER_ORCHESTRATOR_TRIGGERS: &str = "orchestrator-triggers";

/// Flows and their tasks' states, one entry per flow.
pub const KV_FLOWS: &str = "coord_flows";
/// Holders of each concurrency key's slots, one entry per key.
pub const KV_CONCURRENCY: &str = "coord_concurrency";
/// Agents with their capacity and live allocations, one entry per agent.
pub const KV_AGENTS: &str = "coord_agents";
/// Owner quotas and the allocations counted against them, one document (`pool`).
pub const KV_QUOTAS: &str = "coord_quotas";
/// Triggers: flows started by matching agent events, one entry per trigger name.
pub const KV_TRIGGERS: &str = "coord_triggers";
/// Agent state documents, with history for three-way merges and reads at a revision.
pub const KV_STATE: &str = "coord_state";
/// Per-scope synchronizer configuration (policy, schema, invariants), one entry per scope.
pub const KV_SYNC_SCOPES: &str = "coord_sync_scopes";
/// Sync points (`sp.{id}`), their cut documents (`cut.{id}.{agent}`) and the
/// agents' acknowledgements (`ack.{notice}.{agent}`, one key each so acks never contend).
pub const KV_SYNC_POINTS: &str = "coord_sync_points";
/// Registered JSON Schemas of agent event types, one entry per type.
pub const KV_EVENT_SCHEMAS: &str = "coord_event_schemas";

/// The streams coordkit owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Reports,
    Events,
    /// Agent events, with the default limits (the synchronizer applies its
    /// configured ones).
    AgentEvents,
}

impl Stream {
    pub fn config(self, replicas: usize) -> stream::Config {
        let base = |name: &str, subject: &str| stream::Config {
            name: name.to_owned(),
            subjects: vec![subject.to_owned()],
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            // A repeat of a `Nats-Msg-Id` within this is stored once: it
            // covers an agent's report published again through an outage
            // and the events its replicas publish again from a flow's outbox
            // (2 s after they were stored, or at most 10 s after for a
            // replica that lives; see `orchestrator::outbox`).
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        match self {
            Stream::Reports => stream::Config {
                retention: stream::RetentionPolicy::WorkQueue,
                max_age: Duration::from_secs(7 * 24 * 3600),
                ..base(STREAM_REPORTS, subject::REPORT_ALL)
            },
            // Events are telemetry and an audit log; the buckets are the
            // truth. On one node they are stored without waiting for the
            // disk (`persist_mode: async`), so that at `sync_interval:
            // always` the events of a task (six of its ten stored messages)
            // cost no fsync: a server that dies loses at most its last
            // unflushed events. A replicated stream has the Raft log for that
            // (and the server allows async persistence on one replica only).
            Stream::Events => stream::Config {
                retention: stream::RetentionPolicy::Limits,
                max_age: Duration::from_secs(7 * 24 * 3600),
                max_bytes: 1 << 30,
                persist_mode: (replicas <= 1).then_some(stream::PersistenceMode::Async),
                ..base(STREAM_EVENTS, subject::EVENTS_ALL)
            },
            // A re-sent agent event (same `{agent}.{event id}`) within the
            // duplicate window is stored once.
            Stream::AgentEvents => stream::Config {
                retention: stream::RetentionPolicy::Limits,
                max_age: AGENT_EVENTS_MAX_AGE,
                max_bytes: AGENT_EVENTS_MAX_BYTES,
                ..base(STREAM_AGENT_EVENTS, subject::AGENT_EVENTS_ALL)
            },
        }
    }
}

/// The KV buckets coordkit owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Flows,
    Concurrency,
    Agents,
    State,
    SyncScopes,
    SyncPoints,
    Quotas,
    Triggers,
    EventSchemas,
}

impl Bucket {
    pub fn config(self, replicas: usize) -> kv::Config {
        let (bucket, history) = match self {
            Bucket::Flows => (KV_FLOWS, 1),
            Bucket::Concurrency => (KV_CONCURRENCY, 1),
            // History lets a checker replay every revision of an agent's ledger.
            Bucket::Agents => (KV_AGENTS, 64),
            Bucket::State => (KV_STATE, 64),
            Bucket::SyncScopes => (KV_SYNC_SCOPES, 1),
            Bucket::SyncPoints => (KV_SYNC_POINTS, 1),
            // History lets a checker replay the quota ledger beside the agents'.
            Bucket::Quotas => (KV_QUOTAS, 64),
            Bucket::Triggers => (KV_TRIGGERS, 1),
            Bucket::EventSchemas => (KV_EVENT_SCHEMAS, 1),
        };
        // The server republishes every state write on the watch subjects, in
        // the same step as the write: watchers see each change exactly once,
        // whichever synchronizer replica made it.
        let republish = (self == Bucket::State).then(|| stream::Republish {
            source: format!("$KV.{KV_STATE}.>"),
            destination: format!("{}.>", subject::STATE_WATCH_PREFIX),
            headers_only: false,
        });
        kv::Config {
            bucket: bucket.to_owned(),
            history,
            storage: stream::StorageType::File,
            num_replicas: replicas.max(1),
            republish,
            ..Default::default()
        }
    }
}

/// Gets the stream, creating it if missing. An existing stream keeps the
/// operator's settings.
pub async fn ensure_stream(
    js: &jetstream::Context,
    which: Stream,
    replicas: usize,
) -> Result<stream::Stream, Error> {
    let name = which.config(replicas).name;
    opening(|| async {
        js.get_or_create_stream(which.config(replicas))
            .await
            .map_err(|e| Error::unavailable(format_args!("cannot open stream {name}"), e))
    })
    .await
}

/// Opening a stream or bucket right after another service created it (on a
/// cluster, before it has a leader, or while a loaded cluster is still
/// electing one for each of several new assets) can fail for a while: tried
/// again with back-off for up to [`OPENING_PATIENCE`] before the service gives
/// up, saying at `warn` what it still waits for once that takes long. Every
/// JetStream call a service makes before it serves (a first read, a watch, a
/// setting) goes through this, so a new cluster's elections never end a start.
pub async fn opening<T, F, Fut>(mut open: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let started = std::time::Instant::now();
    let mut pause = Duration::from_millis(200);
    loop {
        match open().await {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() < OPENING_PATIENCE => {
                if started.elapsed() < OPENING_QUIET {
                    tracing::debug!(error = %e, "not open yet, trying again");
                } else {
                    tracing::warn!(error = %e, waited_s = started.elapsed().as_secs(), "still not open, trying again");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long a service keeps trying to open one stream or bucket at start.
pub const OPENING_PATIENCE: Duration = Duration::from_secs(60);
/// Failures to open before this are routine (a new asset's election).
const OPENING_QUIET: Duration = Duration::from_secs(5);

/// Gets the bucket, creating it if missing (replicas racing to create it is fine).
pub async fn ensure_bucket(
    js: &jetstream::Context,
    which: Bucket,
    replicas: usize,
) -> Result<kv::Store, Error> {
    let name = which.config(replicas).bucket;
    opening(|| async {
        if let Ok(store) = js.get_key_value(&name).await {
            return Ok(store);
        }
        let created = js.create_key_value(which.config(replicas)).await;
        match created {
            Ok(store) => Ok(store),
            Err(create_err) => js.get_key_value(&name).await.map_err(|_| {
                Error::unavailable(format_args!("cannot open bucket {name}"), create_err)
            }),
        }
    })
    .await
}

/// Object store holding flow specs too large for one message until
/// `flow.create` reads them.
pub const OBJ_UPLOADS: &str = "coord_uploads";
/// An upload nobody created a flow from is dropped after this long.
pub const UPLOAD_MAX_AGE: Duration = Duration::from_secs(3600);

/// Gets the uploads object store, creating it if missing.
pub async fn ensure_uploads(
    js: &jetstream::Context,
) -> Result<jetstream::object_store::ObjectStore, Error> {
    opening(|| async {
        if let Ok(store) = js.get_object_store(OBJ_UPLOADS).await {
            return Ok(store);
        }
        let config = jetstream::object_store::Config {
            bucket: OBJ_UPLOADS.to_owned(),
            max_age: UPLOAD_MAX_AGE,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        match js.create_object_store(config).await {
            Ok(store) => Ok(store),
            Err(create_err) => js.get_object_store(OBJ_UPLOADS).await.map_err(|_| {
                Error::unavailable(
                    format_args!("cannot open object store {OBJ_UPLOADS}"),
                    create_err,
                )
            }),
        }
    })
    .await
}
