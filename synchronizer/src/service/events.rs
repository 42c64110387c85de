//! Agent events: ingest (check, store once per `{agent}.{event id}`, answer
//! or tell the agent why not), the per-type schema registry, and the query
//! over the stored stream.
//!
//! The registry's compiled schemas are kept from a watch of its bucket, like
//! the scopes' enforced schemas, so checking an event costs no read.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream};
use common::msg::{
    event_msg_id, validate_event_type, AgentEvent, AgentEventList, AgentEventPublish,
    AgentEventQuery, AgentEventRecord, EventSchema, EventSchemaGet, EventSchemaList,
    EventSchemaListRequest, EventSchemaSet, ReportRejected,
};
use common::nats::{self as bus, Stream};
use common::{subject, Error};
use futures::StreamExt;

use super::{encode, Synchronizer};
use crate::machine;

/// Stored events one list request reads at most before answering with a
/// cursor, so a narrow `match` over a long stream cannot hold a replica.
const MAX_SCAN: usize = 20_000;
/// How long one list request reads at most before answering with a cursor.
const SCAN_BUDGET: Duration = Duration::from_secs(2);
/// Messages fetched from the list consumer at once.
const BATCH: usize = 256;
/// Most schemas one list answers with.
const MAX_SCHEMAS: usize = 1_000;

/// Compiled schemas by event type.
pub(super) type Validators = RwLock<HashMap<String, Arc<machine::rules::Schema>>>;

/// Opens the agent events stream with the configured limits; an existing
/// stream is brought to them, so a changed setting takes effect on restart.
pub(super) async fn open_stream(
    js: &jetstream::Context,
    cfg: &super::Config,
) -> Result<stream::Stream, Error> {
    let want = stream::Config {
        max_age: Duration::from_secs(cfg.agent_events_max_age_s),
        max_bytes: cfg.agent_events_max_bytes,
        ..Stream::AgentEvents.config(cfg.nats.js_replicas)
    };
    let mut s = bus::ensure_stream(js, Stream::AgentEvents, cfg.nats.js_replicas).await?;
    let have = s
        .info()
        .await
        .map_err(|e| Error::unavailable("agent events stream info", e))?
        .config
        .clone();
    if have.max_age != want.max_age || have.max_bytes != want.max_bytes {
        js.update_stream(stream::Config {
            max_age: want.max_age,
            max_bytes: want.max_bytes,
            ..have
        })
        .await
        .map_err(|e| Error::unavailable("agent events stream limits", e))?;
    }
    Ok(s)
}

impl Synchronizer {
    /// `coord.agents.{id}.events.{type}`: a request is answered with the
    /// stored event or the error; a refused plain publish is told on the
    /// agent's `rejected` subject.
    pub(super) async fn ingest_event(&self, msg: async_nats::Message) -> Result<AgentEvent, Error> {
        let result = self.accept_event(&msg).await;
        if let Err(e) = &result {
            tracing::debug!(subject = %msg.subject, code = %e.code, message = %e.message, "agent event refused");
            if msg.reply.is_none() {
                self.tell_refused(&msg, e).await;
            }
        }
        result
    }

    async fn accept_event(&self, msg: &async_nats::Message) -> Result<AgentEvent, Error> {
        let (agent, event_type) = subject::agent_event_of(&msg.subject)?;
        // An object only: serde's derive would also take `[data, id]`.
        let body: serde_json::Map<String, serde_json::Value> =
            common::service::decode(&msg.payload)?;
        let body: AgentEventPublish = serde_json::from_value(serde_json::Value::Object(body))
            .map_err(|e| Error::decode(&e))?;
        machine::events::check_publish(&body)?;
        let schema = self
            .event_validators
            .read()
            .ok()
            .and_then(|m| m.get(&event_type).cloned());
        if let Some(schema) = schema {
            machine::events::check_schema(&schema, &agent, &event_type, &body.data)?;
        }
        let event = AgentEvent {
            event_id: body
                .event_id
                .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string()),
            agent_id: agent,
            event_type,
            data: body.data,
            published_ms: common::now_ms(),
        };
        let on = subject::agent_event_stored(&event.event_type, &event.agent_id)?;
        let headers = bus::dedupe_headers(&on, &event_msg_id(&event.agent_id, &event.event_id));
        let ack = self
            .js
            .publish_with_headers(on, headers, encode(&event)?)
            .await
            .map_err(|e| Error::unavailable("store agent event", e))?
            .await
            .map_err(|e| Error::unavailable("store agent event", e))?;
        if ack.duplicate {
            // Stored before: answer with what was stored then.
            if let Ok(first) = self.agent_events.get_raw_message(ack.sequence).await {
                if let Ok(stored) = serde_json::from_slice::<AgentEvent>(&first.payload) {
                    if stored.agent_id == event.agent_id && stored.event_id == event.event_id {
                        return Ok(stored);
                    }
                }
            }
        }
        Ok(event)
    }

    /// A verdict on the agent's `rejected` subject (core NATS: an agent not
    /// listening loses only the explanation).
    async fn tell_refused(&self, msg: &async_nats::Message, e: &Error) {
        let Some(agent) = subject::agent_of(&msg.subject) else {
            return;
        };
        let event_type = msg.subject.rsplit('.').next().map(|t| {
            t.chars()
                .take(common::msg::MAX_EVENT_TYPE_LEN)
                .collect::<String>()
        });
        let event_id = serde_json::from_slice::<serde_json::Value>(&msg.payload)
            .ok()
            .and_then(|b| {
                b.get("event_id")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            })
            .map(|id| id.chars().take(common::msg::MAX_EVENT_ID_LEN).collect());
        let verdict = ReportRejected {
            flow_id: None,
            task_id: None,
            attempt: None,
            report_type: None,
            code: e.code,
            reason: machine::events::reject_reason(e.code),
            message: e.message.clone(),
            msg_id: None,
            at_ms: common::now_ms(),
            event_type,
            event_id,
        };
        let Ok(body) = encode(&verdict) else { return };
        if let Err(err) = self
            .nats
            .publish_with_headers(
                subject::rejected(&agent),
                common::telemetry::producer_headers(&subject::rejected(&agent)),
                body,
            )
            .await
        {
            tracing::warn!(agent = %agent, error = %err, "event verdict not sent");
        }
    }

    /// Keeps the compiled event schemas in step with the registry bucket.
    pub(super) async fn follow_event_schemas(self: Arc<Self>) {
        loop {
            match self.event_schemas.watch_with_history(">").await {
                Ok(mut watch) => {
                    // Stopped at the first error, as the scopes watch is.
                    while let Some(Ok(entry)) = watch.next().await {
                        let schema = match entry.operation {
                            kv::Operation::Put => {
                                serde_json::from_slice::<EventSchema>(&entry.value)
                                    .ok()
                                    .and_then(|s| s.schema)
                            }
                            _ => None,
                        };
                        self.remember_event_schema(&entry.key, schema.as_ref());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "event schemas watch not made yet"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn remember_event_schema(&self, event_type: &str, schema: Option<&serde_json::Value>) {
        let compiled = schema.and_then(|s| machine::rules::compile_schema(s).ok());
        if let Ok(mut m) = self.event_validators.write() {
            match compiled {
                Some(s) => {
                    m.insert(event_type.to_owned(), Arc::new(s));
                }
                None => {
                    m.remove(event_type);
                }
            }
        }
    }

    /// `coord.sync.events.schema.set`.
    pub(super) async fn event_schema_set(&self, req: EventSchemaSet) -> Result<EventSchema, Error> {
        validate_event_type(&req.event_type)?;
        if let Some(schema) = &req.schema {
            machine::rules::compile_schema(schema)?;
        }
        let stored = EventSchema {
            event_type: req.event_type.clone(),
            schema: req.schema.clone(),
            updated_ms: common::now_ms(),
        };
        match &req.schema {
            Some(_) => {
                self.event_schemas
                    .put(&req.event_type, encode(&stored)?)
                    .await
                    .map_err(|e| Error::unavailable("store event schema", e))?;
            }
            None => {
                self.event_schemas
                    .delete(&req.event_type)
                    .await
                    .map_err(|e| Error::unavailable("remove event schema", e))?;
            }
        }
        // In force here at once; other replicas follow through the watch.
        self.remember_event_schema(&req.event_type, req.schema.as_ref());
        Ok(stored)
    }

    /// `coord.sync.events.schema.get`.
    pub(super) async fn event_schema_get(&self, req: EventSchemaGet) -> Result<EventSchema, Error> {
        validate_event_type(&req.event_type)?;
        bus::get_json::<EventSchema>(&self.event_schemas, &req.event_type)
            .await?
            .map(|(s, _)| s)
            .ok_or_else(|| Error::not_found(format!("no schema registered for {}", req.event_type)))
    }

    /// `coord.sync.events.schema.list`.
    pub(super) async fn event_schema_list(
        &self,
        _: EventSchemaListRequest,
    ) -> Result<EventSchemaList, Error> {
        let mut keys: Vec<String> = match self.event_schemas.keys().await {
            Ok(keys) => keys.filter_map(|k| async { k.ok() }).collect().await,
            Err(e) => return Err(Error::unavailable("list event schemas", e)),
        };
        keys.sort();
        keys.truncate(MAX_SCHEMAS);
        let mut schemas = Vec::with_capacity(keys.len());
        for key in keys {
            if let Some((s, _)) = bus::get_json::<EventSchema>(&self.event_schemas, &key).await? {
                schemas.push(s);
            }
        }
        Ok(EventSchemaList { schemas })
    }

    /// `coord.sync.events.list`: reads the stream through an ephemeral
    /// consumer narrowed by subject (type, agent) and start (sequence or
    /// time), filters the rest here, and stops at the limit, the scan cap or
    /// the time budget, answering with where to go on.
    pub(super) async fn list_events(&self, q: AgentEventQuery) -> Result<AgentEventList, Error> {
        let query = machine::events::check_query(q)?;
        let filter =
            subject::agent_events_filter(query.q.event_type.as_deref(), query.q.agent_id.as_ref())?;
        let deliver_policy = match (query.q.from_seq, query.q.since_ms) {
            (Some(seq), _) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq,
            },
            (None, Some(since)) => consumer::DeliverPolicy::ByStartTime {
                start_time: time_of(since)?,
            },
            (None, None) => consumer::DeliverPolicy::All,
        };
        let consumer: consumer::PullConsumer = self
            .agent_events
            .create_consumer(consumer::pull::Config {
                filter_subject: filter,
                deliver_policy,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::unavailable("agent events consumer", e))?;
        let started = Instant::now();
        let mut out = AgentEventList::default();
        let mut scanned = 0usize;
        let mut last_seq = None;
        'scan: loop {
            let mut batch = consumer
                .fetch()
                .max_messages(BATCH)
                .messages()
                .await
                .map_err(|e| Error::unavailable("read agent events", e))?;
            let mut got = 0usize;
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| Error::unavailable("read agent events", e))?;
                got += 1;
                scanned += 1;
                let seq = m
                    .info()
                    .map(|i| i.stream_sequence)
                    .map_err(|e| Error::internal_from("agent event metadata", e))?;
                last_seq = Some(seq);
                let Ok(event) = serde_json::from_slice::<AgentEvent>(&m.payload) else {
                    continue;
                };
                if !query.matches(&event) {
                    // Stored in publishing order, give or take the clocks of
                    // the replicas: well past `until_ms`, nothing later can match.
                    if query
                        .q
                        .until_ms
                        .is_some_and(|u| event.published_ms > u.saturating_add(60_000))
                    {
                        break 'scan;
                    }
                    continue;
                }
                if out.events.len() == query.limit {
                    out.next_seq = Some(seq);
                    break 'scan;
                }
                out.events.push(AgentEventRecord { seq, event });
            }
            if got == 0 {
                break;
            }
            if scanned >= MAX_SCAN || started.elapsed() >= SCAN_BUDGET {
                out.next_seq = last_seq.map(|s| s + 1);
                break;
            }
        }
        let name = consumer.cached_info().name.clone();
        if let Err(e) = self.agent_events.delete_consumer(&name).await {
            tracing::debug!(error = %e, "list consumer left to expire");
        }
        Ok(out)
    }
}

/// A time in ms since the epoch as the consumer's start time.
fn time_of(ms: u64) -> Result<time::OffsetDateTime, Error> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| Error::bad_request(format!("since_ms {ms}: {e}")))
}
