//! The synchronizer's NATS adapter: moves requests, KV entries and notices in
//! and out of the pure `machine`.
//!
//! - `state`: documents (get, put with conflict resolution, delete, history) and
//!   scope configuration.
//! - `consistency`: validation and synchronize rounds.
//! - `points`: sync points, and the acknowledgements agents publish.
//! - `events`: agent events (ingest, the per-type schema registry, queries).
//!
//! Every write is a compare-and-set on a KV revision, and nothing is kept in
//! memory between requests except the hybrid logical clock, so replicas run
//! side by side and any of them may answer any request.

mod consistency;
mod events;
mod limits;
mod points;
mod state;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use common::msg::{Hlc, NoticeKind, StateDoc, SyncNotice};
use common::nats::{self as bus, Bucket, EventPublisher, Stream, Written};
use common::service::Service;
use common::{subject, AgentId, Error, ErrorCode, ScopeId, SyncPointId};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::machine;
use crate::machine::hlc::Clock;

/// Synchronizer settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub nats: common::config::NatsConfig,
    /// State puts one agent may make a second on its own subject (per
    /// replica); more are answered `rate_limited`. Operators' puts on
    /// `coord.sync.state.put` are not limited.
    #[arg(long, env = "COORD_SYNC_AGENT_PUT_RATE", default_value_t = 100.0)]
    pub agent_put_rate: f64,
    /// How many puts one agent may make at once above its rate.
    #[arg(long, env = "COORD_SYNC_AGENT_PUT_BURST", default_value_t = 200.0)]
    pub agent_put_burst: f64,
    /// In how many scopes one agent may have documents; a put creating one in
    /// a further scope is answered `quota_exceeded`.
    #[arg(long, env = "COORD_SYNC_AGENT_MAX_SCOPES", default_value_t = 16)]
    pub agent_max_scopes: usize,
    /// How long agent events are kept (seconds); applied to the stream at start.
    #[arg(long, env = "COORD_SYNC_AGENT_EVENTS_MAX_AGE_S", default_value_t = 7 * 24 * 3600)]
    pub agent_events_max_age_s: u64,
    /// How many bytes of agent events are kept (oldest dropped first).
    #[arg(long, env = "COORD_SYNC_AGENT_EVENTS_MAX_BYTES", default_value_t = bus::AGENT_EVENTS_MAX_BYTES)]
    pub agent_events_max_bytes: i64,
}

impl Config {
    pub fn new(nats: common::config::NatsConfig) -> Self {
        Config {
            nats,
            agent_put_rate: 100.0,
            agent_put_burst: 200.0,
            agent_max_scopes: 16,
            agent_events_max_age_s: bus::AGENT_EVENTS_MAX_AGE.as_secs(),
            agent_events_max_bytes: bus::AGENT_EVENTS_MAX_BYTES,
        }
    }
}

const NAME: &str = "synchronizer";
/// Queue group of the acknowledgement listener: each ack is stored once.
const ACK_GROUP: &str = "synchronizer-acks";
/// KV reads and writes in flight at once for one request over many agents.
const FAN_OUT: usize = 64;

pub(crate) struct Synchronizer {
    nats: async_nats::Client,
    client: common::Client,
    state: kv::Store,
    scopes: kv::Store,
    points: kv::Store,
    events: EventPublisher,
    clock: Mutex<Clock>,
    /// Compiled schemas of the scopes that enforce theirs on write, kept
    /// from a watch of the scopes bucket so a put costs no extra read.
    enforced: std::sync::RwLock<HashMap<ScopeId, Arc<machine::rules::Schema>>>,
    /// The stream under `state`, asked in which scopes an agent has documents.
    state_stream: jetstream::stream::Stream,
    /// Per-agent write limits (see [`limits`]).
    limits: limits::Limits,
    js: jetstream::Context,
    /// `COORD_AGENT_EVENTS`: agent events are stored in and listed from it.
    agent_events: jetstream::stream::Stream,
    /// The per-type event schema registry.
    event_schemas: kv::Store,
    /// Its compiled schemas, kept from a watch of the bucket.
    event_validators: events::Validators,
    cfg: Config,
}

/// An agent's acknowledgement as stored under `ack.{notice}.{agent}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct AckRecord {
    revision: u64,
    at_ms: u64,
}

/// Runs the synchronizer until `shutdown` resolves, then drains the connection.
pub async fn run(cfg: Config, shutdown: impl Future) -> anyhow::Result<()> {
    // NATS may not be up yet: wait for it, unless asked to stop first.
    tokio::pin!(shutdown);
    let Some(nats) = bus::connect_until(&cfg.nats, NAME, shutdown.as_mut()).await? else {
        return Ok(());
    };
    let js = jetstream::new(nats.clone());
    let replicas = cfg.nats.js_replicas;
    bus::ensure_stream(&js, Stream::Events, replicas).await?;
    let state = bus::ensure_bucket(&js, Bucket::State, replicas).await?;
    let scopes = bus::ensure_bucket(&js, Bucket::SyncScopes, replicas).await?;
    let points = bus::ensure_bucket(&js, Bucket::SyncPoints, replicas).await?;
    let state_stream = bus::opening(|| async {
        js.get_stream(format!("KV_{}", bus::KV_STATE))
            .await
            .map_err(|e| Error::unavailable("state stream", e))
    })
    .await?;
    let agent_events = bus::opening(|| events::open_stream(&js, &cfg)).await?;
    let event_schemas = bus::ensure_bucket(&js, Bucket::EventSchemas, replicas).await?;
    let node = format!("sync-{}", uuid::Uuid::now_v7().simple());
    let sync = Arc::new(Synchronizer {
        nats: nats.clone(),
        client: common::Client::new(nats.clone()),
        state,
        scopes,
        points,
        events: EventPublisher::new(nats.clone(), NAME),
        clock: Mutex::new(Clock::new(node)),
        enforced: Default::default(),
        state_stream,
        limits: Default::default(),
        js: js.clone(),
        agent_events,
        event_schemas,
        event_validators: Default::default(),
        cfg: cfg.clone(),
    });
    let enforcing = tokio::spawn(sync.clone().follow_scopes());
    let event_schemas = tokio::spawn(sync.clone().follow_event_schemas());

    let acks = nats
        .queue_subscribe(subject::SYNC_ACK_ALL, ACK_GROUP.to_owned())
        .await
        .map_err(|e| Error::unavailable("cannot subscribe to acknowledgements", e))?;
    let ack_task = tokio::spawn(points::store_acks(sync.clone(), acks));

    let mut service = Service::start(&nats, NAME, "Versioned agent state").await?;
    macro_rules! serve {
        ($subject:expr, $method:ident) => {
            serve!(serve, $subject, $method)
        };
        ($how:ident, $subject:expr, $method:ident) => {{
            let s = sync.clone();
            service
                .$how($subject, move |r| {
                    let s = s.clone();
                    async move { s.$method(r).await }
                })
                .await?;
        }};
    }
    // An agent's own documents, on its own subjects: it cannot write another's.
    serve!(serve_agent, subject::AGENT_STATE_GET_ALL, get);
    serve!(serve_agent, subject::AGENT_STATE_PUT_ALL, agent_put);
    serve!(serve_agent, subject::AGENT_STATE_DELETE_ALL, delete);
    serve!(serve_agent, subject::AGENT_STATE_HISTORY_ALL, history);
    // Any agent's documents by name, for operators' tools.
    serve!(subject::STATE_GET, get);
    serve!(subject::STATE_PUT, put);
    serve!(subject::STATE_DELETE, delete);
    serve!(subject::STATE_HISTORY, history);
    serve!(subject::SCOPE_SET, scope_set);
    serve!(subject::SCOPE_GET, scope_get);
    serve!(subject::VALIDATE, validate);
    serve!(subject::SYNCHRONIZE, synchronize);
    serve!(subject::SYNCPOINT_INITIATE, initiate);
    serve!(subject::SYNCPOINT_COMPLETE, complete);
    serve!(subject::SYNCPOINT_ROLLBACK, rollback);
    serve!(subject::SYNCPOINT_LIST, list);
    serve!(subject::SYNCPOINT_GET, get_point);
    serve!(subject::SYNCPOINT_DIFF, diff);
    // Agent events: each agent on its own subjects (requests or plain
    // publishes), the registry and queries for operators.
    serve!(
        serve_messages,
        subject::AGENT_EVENTS_PUBLISH_ALL,
        ingest_event
    );
    serve!(subject::AGENT_EVENTS_LIST, list_events);
    serve!(subject::EVENT_SCHEMA_SET, event_schema_set);
    serve!(subject::EVENT_SCHEMA_GET, event_schema_get);
    serve!(subject::EVENT_SCHEMA_LIST, event_schema_list);
    tracing::info!(url = %cfg.nats.nats_url, "synchronizer running");

    shutdown.await;
    tracing::info!("synchronizer shutting down");
    service.stop().await;
    ack_task.abort();
    enforcing.abort();
    event_schemas.abort();
    nats.drain().await.ok();
    Ok(())
}

/// The KV key of a document.
fn doc_key(scope: &ScopeId, agent: &AgentId) -> String {
    format!("{scope}.{agent}")
}

fn encode<T: Serialize>(value: &T) -> Result<bytes::Bytes, Error> {
    serde_json::to_vec(value)
        .map(Into::into)
        .map_err(|e| Error::internal_from("encode", e))
}

/// A KV entry's state document, with the revision filled in; `None` for a deletion.
fn decode_doc(entry: &kv::Entry) -> Result<Option<StateDoc>, Error> {
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let doc: StateDoc = serde_json::from_slice(&entry.value).map_err(|e| {
        Error::internal_from(format_args!("stored state {} unreadable", entry.key), e)
    })?;
    Ok(Some(StateDoc {
        revision: entry.revision,
        resolution: None,
        ..doc
    }))
}

impl Synchronizer {
    fn now_hlc(&self) -> Hlc {
        let now = common::now_ms();
        match self.clock.lock() {
            Ok(mut c) => c.tick(now),
            Err(poisoned) => poisoned.into_inner().tick(now),
        }
    }

    fn observe(&self, remote: &Hlc) {
        let now = common::now_ms();
        match self.clock.lock() {
            Ok(mut c) => c.observe(remote, now),
            Err(poisoned) => poisoned.into_inner().observe(remote, now),
        };
    }

    /// The raw latest entry of a key (puts and deletions alike).
    async fn entry(&self, key: &str) -> Result<Option<kv::Entry>, Error> {
        self.state
            .entry(key)
            .await
            .map_err(|e| Error::unavailable(format_args!("kv read {key}"), e))
    }

    /// The document of `key` at exactly `revision`: `Ok(None)` when that
    /// revision is not in the history (aged out, or another key's), and
    /// `Ok(Some(None))` when it was a deletion.
    async fn doc_at(&self, key: &str, revision: u64) -> Result<Option<Option<StateDoc>>, Error> {
        // The stream's message get, not `entry_for_revision`: it checks the
        // subject quietly and works whether or not direct gets are enabled.
        let msg = match self.state.stream.get_raw_message(revision).await {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.kind(),
                    jetstream::stream::RawMessageErrorKind::NoMessageFound
                ) =>
            {
                return Ok(None)
            }
            Err(e) => {
                return Err(Error::unavailable(
                    format_args!("kv read {key}@{revision}"),
                    e,
                ))
            }
        };
        if msg.subject.as_str() != format!("$KV.{}.{key}", common::nats::KV_STATE) {
            return Ok(None);
        }
        let deleted = msg
            .headers
            .get("KV-Operation")
            .is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE");
        if deleted {
            return Ok(Some(None));
        }
        let doc: StateDoc = serde_json::from_slice(&msg.payload)
            .map_err(|e| Error::internal_from(format_args!("stored state {key} unreadable"), e))?;
        Ok(Some(Some(StateDoc {
            revision,
            resolution: None,
            ..doc
        })))
    }

    /// Writes `doc` against `revision` (`None` = create). `Ok(None)` means the
    /// compare-and-set lost and the caller must re-read.
    async fn cas_write(
        &self,
        key: &str,
        doc: &StateDoc,
        revision: Option<u64>,
    ) -> Result<Option<u64>, Error> {
        let body = encode(&StateDoc {
            revision: 0,
            resolution: None,
            ..doc.clone()
        })?;
        Ok(
            match bus::write_at(&self.state, key, body, revision).await? {
                Written::Stored(r) => Some(r),
                Written::Lost => None,
            },
        )
    }

    /// Pushes a notice to each agent on its own subject.
    async fn notify(&self, notices: Vec<SyncNotice>) {
        for n in notices {
            let subject = subject::sync_notice(&n.agent_id);
            match serde_json::to_vec(&n) {
                Ok(body) => {
                    let headers = common::telemetry::producer_headers(&subject);
                    if let Err(e) = self
                        .nats
                        .publish_with_headers(subject, headers, body.into())
                        .await
                    {
                        tracing::warn!(error = %e, agent = %n.agent_id, "notice not sent");
                    }
                }
                Err(e) => tracing::error!(error = %e, "notice encode failed"),
            }
        }
        if let Err(e) = self.nats.flush().await {
            tracing::warn!(error = %e, "flush after notices failed");
        }
    }

    /// Waits until each agent in `expected` has acknowledged `notice` with the
    /// expected revision, or `timeout` passes. Returns when each acknowledged (ms).
    async fn wait_acks(
        &self,
        notice: &SyncPointId,
        expected: &BTreeMap<AgentId, u64>,
        timeout: Duration,
    ) -> Result<BTreeMap<AgentId, u64>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        // Watch first, so an acknowledgement stored while the existing ones
        // are read is not missed; then take what is already there.
        let mut watch = self
            .points
            .watch(format!("ack.{notice}.*"))
            .await
            .map_err(|e| Error::unavailable("watch acknowledgements", e))?;
        let mut got = BTreeMap::new();
        let keys: Vec<(AgentId, String)> = expected
            .keys()
            .map(|a| (a.clone(), format!("ack.{notice}.{a}")))
            .collect();
        let found = futures::stream::iter(keys)
            .map(|(agent, key)| async move {
                let rec = bus::get_json::<AckRecord>(&self.points, &key).await;
                (agent, rec)
            })
            .buffer_unordered(FAN_OUT)
            .collect::<Vec<_>>()
            .await;
        for (agent, rec) in found {
            if let Some((rec, _)) = rec? {
                accept(&mut got, expected, agent, &rec);
            }
        }
        while got.len() < expected.len() {
            let next = tokio::time::timeout_at(deadline, watch.next()).await;
            let entry = match next {
                Ok(Some(Ok(e))) => e,
                Ok(Some(Err(e))) => {
                    tracing::warn!(error = %e, "acknowledgement watch error");
                    continue;
                }
                Ok(None) | Err(_) => break,
            };
            let Some(agent) = entry
                .key
                .rsplit('.')
                .next()
                .and_then(|a| AgentId::new(a).ok())
            else {
                continue;
            };
            if let Ok(rec) = serde_json::from_slice::<AckRecord>(&entry.value) {
                accept(&mut got, expected, agent, &rec);
            }
        }
        Ok(got)
    }
}

/// Counts an acknowledgement when it is for the revision the agent was told
/// about (0 = "whatever you sent me", for agents that do not track revisions).
fn accept(
    got: &mut BTreeMap<AgentId, u64>,
    expected: &BTreeMap<AgentId, u64>,
    agent: AgentId,
    rec: &AckRecord,
) {
    if let Some(rev) = expected.get(&agent) {
        if rec.revision == 0 || rec.revision == *rev {
            got.insert(agent, rec.at_ms);
        }
    }
}

/// Notices of one kind for several agents.
fn notices(
    id: &SyncPointId,
    kind: NoticeKind,
    scope: &ScopeId,
    docs: impl IntoIterator<Item = StateDoc>,
) -> Vec<SyncNotice> {
    let at_ms = common::now_ms();
    docs.into_iter()
        .map(|d| SyncNotice {
            notice_id: id.clone(),
            kind,
            scope: scope.clone(),
            agent_id: d.agent_id,
            revision: d.revision,
            doc: d.doc,
            at_ms,
        })
        .collect()
}

/// Per-agent results of waiting for acknowledgements: a `timeout` for each missing one.
fn ack_results(
    expected: &BTreeMap<AgentId, u64>,
    acked: &BTreeMap<AgentId, u64>,
    timeout: Duration,
) -> Vec<common::msg::AgentSyncResult> {
    expected
        .iter()
        .map(|(agent, rev)| {
            let ok = acked.contains_key(agent);
            common::msg::AgentSyncResult {
                agent_id: agent.clone(),
                revision: *rev,
                acked: ok,
                error: (!ok).then(|| {
                    Error::new(
                        ErrorCode::Timeout,
                        format!("{agent} did not acknowledge revision {rev} within {timeout:?}"),
                    )
                }),
            }
        })
        .collect()
}
