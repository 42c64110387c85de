//! The NATS connection, the JetStream resources, and the few bus operations every
//! service repeats: publishing an event, and a compare-and-set on a KV entry.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::HeaderMap;
use serde::{de::DeserializeOwned, Serialize};

use crate::config::NatsConfig;
use crate::error::{Error, ErrorCode};
use crate::msg::{Event, EventKind};
use crate::subject;
use crate::telemetry;

/// Assignments, one durable consumer per agent (work queue: an assignment is
/// removed once its agent acks it).
pub const STREAM_ASSIGN: &str = "COORD_ASSIGN";
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
/// The durable consumer an agent reads its assignments through.
pub fn agent_consumer(agent: &crate::AgentId) -> String {
    format!("agent-{agent}")
}

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
/// Last heartbeat per agent, kept apart so heartbeats never contend with allocations.
pub const KV_HEARTBEATS: &str = "coord_heartbeats";
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

/// Longest pause between two reconnect attempts. async-nats backs off up to
/// 4 s by default; a shorter cap brings everyone back within a heartbeat
/// interval of the server's return, at the cost of a few more attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Opens a connection that retries its first attempt in the background and
/// reconnects without limit afterwards. It returns at once; nothing is sent
/// before the server is reached (see [`connect`] and [`connect_until`]).
async fn open(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, Error> {
    let mut opts = match &cfg.nats_creds {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path.clone())
            .await
            .map_err(|e| {
                Error::bad_request(format!("cannot read credentials {}: {e}", path.display()))
            })?,
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(user), Some(pass)) = (&cfg.nats_user, &cfg.nats_password) {
        opts = opts.user_and_password(user.clone(), pass.clone());
    }
    if let Some(ca) = &cfg.nats_tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.nats_tls_cert, &cfg.nats_tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if cfg.nats_tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(prefix) = &cfg.nats_inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix);
    }
    let name = name.to_owned();
    let opts = opts
        .name(name.clone())
        .retry_on_initial_connect()
        .reconnect_delay_callback(|attempts| {
            let exp = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
            Duration::from_millis(2_u64.saturating_pow(exp)).min(MAX_RECONNECT_DELAY)
        })
        .request_timeout(Some(cfg.request_timeout()))
        .event_callback(move |event| {
            let name = name.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(client = %name, "connected to nats")
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(client = %name, "disconnected from nats")
                    }
                    other => tracing::debug!(client = %name, event = %other, "nats event"),
                }
            }
        });
    let urls = cfg.nats_url.as_str();
    // Several servers (a cluster) are a comma-separated list; the client
    // moves to another one when the server it is on goes away.
    let servers: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    opts.connect(servers).await.map_err(|e| {
        Error::new(
            ErrorCode::Unavailable,
            format!("cannot connect to nats at {urls}: {e}"),
        )
    })
}

/// Waits until `client` has reached the server, saying every few seconds
/// that it is still waiting.
async fn connected(client: &async_nats::Client, urls: &str) {
    let started = std::time::Instant::now();
    let mut said = started;
    while client.connection_state() != async_nats::connection::State::Connected {
        if said.elapsed() >= Duration::from_secs(5) {
            said = std::time::Instant::now();
            tracing::info!(
                url = urls,
                waited_s = started.elapsed().as_secs(),
                "waiting for nats"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects, waiting as long as it takes for the server to come up (a service
/// may start before NATS does), and reconnects without limit afterwards.
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, Error> {
    let client = open(cfg, name).await?;
    connected(&client, &cfg.nats_url).await;
    Ok(client)
}

/// [`connect`] for a service's start: gives up (with `None`) if `shutdown`
/// resolves first, so a service waiting for NATS still stops when asked.
pub async fn connect_until<F: std::future::Future>(
    cfg: &NatsConfig,
    name: &str,
    shutdown: std::pin::Pin<&mut F>,
) -> Result<Option<async_nats::Client>, Error> {
    let client = open(cfg, name).await?;
    tokio::select! {
        _ = connected(&client, &cfg.nats_url) => Ok(Some(client)),
        _ = shutdown => Ok(None),
    }
}

/// [`connect`] for a command someone waits on: fails with `unavailable` if
/// the server is not reached within `patience`.
pub async fn connect_within(
    cfg: &NatsConfig,
    name: &str,
    patience: Duration,
) -> Result<async_nats::Client, Error> {
    let client = open(cfg, name).await?;
    tokio::time::timeout(patience, connected(&client, &cfg.nats_url))
        .await
        .map_err(|_| {
            Error::new(
                ErrorCode::Unavailable,
                format!(
                    "cannot connect to nats at {}: no answer within {} ms",
                    cfg.nats_url,
                    patience.as_millis()
                ),
            )
        })?;
    Ok(client)
}

/// When a connection was last seen down, kept current by a background task
/// that polls the client's state.
///
/// A process that decides on silence (no heartbeat for a while) must not count
/// the time it could hear nothing: while it was disconnected, messages were
/// not lost by their senders but never reached it. Clones share one watcher,
/// which ends when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Outages {
    last_down_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Outages {
    /// How often the watcher looks at the connection: an outage shorter than
    /// this may go unseen, and one that short hides no heartbeat interval.
    pub const POLL: Duration = Duration::from_millis(50);

    /// Starts watching `client` (needs a Tokio runtime).
    pub fn watch(client: &async_nats::Client) -> Outages {
        let last_down_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (client, down) = (client.clone(), std::sync::Arc::downgrade(&last_down_ms));
        tokio::spawn(async move {
            loop {
                let Some(down) = down.upgrade() else { return };
                if client.connection_state() != async_nats::connection::State::Connected {
                    down.store(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
                }
                drop(down);
                tokio::time::sleep(Self::POLL).await;
            }
        });
        Outages { last_down_ms }
    }

    /// The last moment (ms since the epoch) the connection was seen down, or
    /// JetStream stalled (see [`Outages::stalled`]), 0 if never.
    pub fn last_down_ms(&self) -> u64 {
        self.last_down_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts this moment as an outage although the connection is up:
    /// JetStream is not answering (a stream without a leader while a cluster
    /// fails over, or a node cut off from its peers), so what the process
    /// would have written or read, heartbeats among them, did not get through.
    pub fn stalled(&self) {
        self.last_down_ms
            .fetch_max(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs a JetStream operation, counting as stalled every moment it is
    /// still unanswered past `slow`, and the moment it fails.
    pub async fn observe<T, E>(
        &self,
        slow: Duration,
        op: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        tokio::pin!(op);
        let mut late = tokio::time::interval_at(tokio::time::Instant::now() + slow, Self::POLL);
        loop {
            tokio::select! {
                out = &mut op => {
                    if out.is_err() {
                        self.stalled();
                    }
                    return out;
                }
                _ = late.tick() => self.stalled(),
            }
        }
    }
}

/// The streams coordkit owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Assign,
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
            // covers the orchestrator's redelivered assignments (until 100 s)
            // and the events its replicas publish again from a flow's outbox
            // (2 s after they were stored, or at most 10 s after for a
            // replica that lives; see `orchestrator::outbox`).
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        match self {
            Stream::Assign => stream::Config {
                retention: stream::RetentionPolicy::WorkQueue,
                max_age: Duration::from_secs(7 * 24 * 3600),
                ..base(STREAM_ASSIGN, subject::ASSIGN_ALL)
            },
            Stream::Reports => stream::Config {
                retention: stream::RetentionPolicy::WorkQueue,
                max_age: Duration::from_secs(7 * 24 * 3600),
                ..base(STREAM_REPORTS, subject::REPORT_ALL)
            },
            Stream::Events => stream::Config {
                retention: stream::RetentionPolicy::Limits,
                max_age: Duration::from_secs(7 * 24 * 3600),
                max_bytes: 1 << 30,
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
    Heartbeats,
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
            Bucket::Heartbeats => (KV_HEARTBEATS, 1),
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
            .map_err(|e| {
                Error::new(
                    ErrorCode::Unavailable,
                    format!("cannot open stream {name}: {e}"),
                )
            })
    })
    .await
}

/// Opening a stream or bucket right after another service created it (on a
/// cluster, before it has a leader) can fail for a moment: tried again with
/// back-off for about ten seconds before the service gives up.
async fn opening<T, F, Fut>(mut open: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let mut pause = Duration::from_millis(200);
    let mut tries = 0;
    loop {
        match open().await {
            Ok(v) => return Ok(v),
            Err(e) if tries < 8 => {
                tries += 1;
                tracing::debug!(error = %e, "not open yet, trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

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
        match js.create_key_value(which.config(replicas)).await {
            Ok(store) => Ok(store),
            Err(create_err) => js.get_key_value(&name).await.map_err(|_| {
                Error::new(
                    ErrorCode::Unavailable,
                    format!("cannot open bucket {name}: {create_err}"),
                )
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
                Error::new(
                    ErrorCode::Unavailable,
                    format!("cannot open object store {OBJ_UPLOADS}: {create_err}"),
                )
            }),
        }
    })
    .await
}

/// Publishes domain events with the current trace context.
#[derive(Clone, Debug)]
pub struct EventPublisher {
    client: async_nats::Client,
    source: &'static str,
}

impl EventPublisher {
    pub fn new(client: async_nats::Client, source: &'static str) -> Self {
        EventPublisher { client, source }
    }

    /// Publishes one event. Core publish (no ack round trip) keeps events off the
    /// hot path's latency; the events stream captures them.
    pub async fn publish(&self, kind: EventKind) {
        let event = Event {
            event_id: uuid::Uuid::now_v7().simple().to_string(),
            at_ms: crate::now_ms(),
            source: self.source.to_owned(),
            kind,
        };
        let subject = event.kind.subject();
        let mut headers = telemetry::headers();
        headers.insert("Nats-Msg-Id", event.event_id.as_str());
        match serde_json::to_vec(&event) {
            Ok(body) => {
                if let Err(e) = self
                    .client
                    .publish_with_headers(subject, headers, body.into())
                    .await
                {
                    tracing::warn!(error = %e, subject, "event publish failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "event encode failed"),
        }
    }
}

/// How many times a compare-and-set is retried from fresh state before giving up.
pub const CAS_ATTEMPTS: usize = 64;

/// Reads a JSON value and its revision; `None` when the key is absent or deleted.
pub async fn get_json<T: DeserializeOwned>(
    kv: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64)>, Error> {
    Ok(get_json_raw(kv, key)
        .await?
        .map(|(value, revision, _)| (value, revision)))
}

/// [`get_json`] that also returns the stored bytes, for callers that tell a
/// change by comparing encodings instead of keeping a copy of the value.
pub async fn get_json_raw<T: DeserializeOwned>(
    kv: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64, bytes::Bytes)>, Error> {
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| Error::new(ErrorCode::Unavailable, format!("kv read {key}: {e}")))?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let value = serde_json::from_slice(&e.value)
                .map_err(|err| Error::internal(format!("stored value {key} unreadable: {err}")))?;
            Ok(Some((value, e.revision, e.value)))
        }
        _ => Ok(None),
    }
}

/// The outcome of one step of [`cas_update`].
pub enum Step<T, R> {
    /// Write this value, then return `R`.
    Write(T, R),
    /// Leave the entry as it is and return `R`.
    Keep(R),
}

/// Compare-and-set loop: reads the entry, lets `f` decide, writes against the
/// revision it read, and on losing the race starts over from fresh state.
/// Returns `f`'s result and the revision now stored.
pub async fn cas_update<T, R, F>(kv: &kv::Store, key: &str, mut f: F) -> Result<(R, u64), Error>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(Option<T>) -> Result<Step<T, R>, Error>,
{
    for attempt in 0..CAS_ATTEMPTS {
        let current = get_json::<T>(kv, key).await?;
        let revision = current.as_ref().map(|(_, r)| *r);
        match f(current.map(|(v, _)| v))? {
            Step::Keep(r) => return Ok((r, revision.unwrap_or(0))),
            Step::Write(value, r) => {
                let body = serde_json::to_vec(&value)
                    .map_err(|e| Error::internal(format!("encode {key}: {e}")))?;
                let written = match revision {
                    Some(rev) => {
                        kv.update(key, body.into(), rev)
                            .await
                            .map_err(|e| match e.kind() {
                                kv::UpdateErrorKind::WrongLastRevision => None,
                                _ => Some(Error::new(
                                    ErrorCode::Unavailable,
                                    format!("kv write {key}: {e}"),
                                )),
                            })
                    }
                    None => kv
                        .create(key, body.into())
                        .await
                        .map_err(|e| match e.kind() {
                            kv::CreateErrorKind::AlreadyExists => None,
                            _ => Some(Error::new(
                                ErrorCode::Unavailable,
                                format!("kv create {key}: {e}"),
                            )),
                        }),
                };
                match written {
                    Ok(rev) => return Ok((r, rev)),
                    Err(Some(err)) => return Err(err),
                    Err(None) => {
                        tracing::debug!(key, attempt, "compare-and-set lost, retrying");
                        if attempt > 4 {
                            tokio::time::sleep(Duration::from_millis(1 + fastrand_ms(attempt)))
                                .await;
                        }
                    }
                }
            }
        }
    }
    Err(Error::new(
        ErrorCode::Conflict,
        format!("{key}: too much contention, gave up"),
    ))
}

/// A small, spread-out back-off without pulling in a random number generator.
fn fastrand_ms(attempt: usize) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as u64;
    nanos % (attempt as u64 * 2).min(50)
}

/// Headers for a JetStream publish that must be stored once even if retried.
pub fn dedupe_headers(msg_id: &str) -> HeaderMap {
    let mut headers = telemetry::headers();
    headers.insert("Nats-Msg-Id", msg_id);
    headers
}
