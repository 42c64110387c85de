//! Agent events in flows: wait tasks find their event in the agent events
//! stream, and triggers start one flow per matching stored event.
//!
//! **Waits.** A wait task's event is looked up, not delivered: when a flow
//! with waiting tasks is ticked (by the sweep every second, or at once when
//! any replica sees an event of a type it waits for stored), its actor reads
//! the agent events stream from the moment the task began waiting (an
//! ephemeral consumer filtered on the event type and agent), and the first
//! event that matches completes the task in the same step as the tick, so a
//! tick never times out a wait whose event was stored before its deadline.
//! Nothing is consumed: any replica may look, every replica finds the same
//! first match, and the compare-and-set on the flow lets one step record it.
//!
//! **Triggers.** One durable consumer with explicit acknowledgement, shared by
//! the replicas, hands each stored event to one replica at a time. For each
//! trigger that matches, the replica creates the trigger's flow under an id
//! derived from the trigger's name and the event's `Nats-Msg-Id`, and
//! acknowledges the event once every such flow exists. A replica that dies in
//! between leaves the event unacknowledged; it is delivered again, and a
//! create that finds the flow already there counts as done: one flow per
//! (trigger, event).

use common::msg::{
    AgentEvent, FlowOrigin, Trigger, TriggerDeleted, TriggerList, TriggerListRequest, TriggerRef,
    WaitFor, MAX_TRIGGER_NAME, TRIGGER_EVENT_KEY,
};
use serde::{Deserialize, Serialize};

use super::*;

/// Per actor: for each wait (task, when it began), the stream's last
/// sequence when it was last looked for, so a tick with no new event in the
/// stream costs one stream info request and no consumer.
#[derive(Default)]
pub(super) struct Looked(HashMap<(TaskId, u64), u64>);

/// A trigger as stored: with when it was set, since only events stored
/// from then on start it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredTrigger {
    trigger: Trigger,
    set_ms: u64,
}

/// Registers the `coord.orchestrator.trigger.*` endpoints.
pub(super) async fn serve_triggers(
    orch: &Arc<Orchestrator>,
    service: &mut Service,
) -> anyhow::Result<()> {
    let o = orch.clone();
    service
        .serve(subject::TRIGGER_SET, move |t: Trigger| {
            let o = o.clone();
            async move { o.set_trigger(t).await }
        })
        .await?;
    let o = orch.clone();
    service
        .serve(subject::TRIGGER_GET, move |r: TriggerRef| {
            let o = o.clone();
            async move {
                valid_name(&r.name)?;
                match o.stored_trigger(&r.name).await? {
                    Some(s) => Ok(s.trigger),
                    None => Err(Error::new(
                        ErrorCode::NotFound,
                        format!("no trigger {}", r.name),
                    )),
                }
            }
        })
        .await?;
    let o = orch.clone();
    service
        .serve(subject::TRIGGER_LIST, move |_: TriggerListRequest| {
            let o = o.clone();
            async move {
                let triggers = o.stored_triggers().await?;
                Ok(TriggerList {
                    triggers: triggers.into_iter().map(|s| s.trigger).collect(),
                })
            }
        })
        .await?;
    let o = orch.clone();
    service
        .serve(subject::TRIGGER_DELETE, move |r: TriggerRef| {
            let o = o.clone();
            async move {
                valid_name(&r.name)?;
                let deleted = o.stored_trigger(&r.name).await?.is_some();
                if deleted {
                    o.triggers
                        .delete(&r.name)
                        .await
                        .map_err(|e| Error::unavailable("delete trigger", e))?;
                }
                Ok(TriggerDeleted {
                    name: r.name,
                    deleted,
                })
            }
        })
        .await?;
    Ok(())
}

fn valid_name(name: &str) -> Result<(), Error> {
    common::id::validate(name)?;
    if name.len() > MAX_TRIGGER_NAME {
        return Err(Error::new(
            ErrorCode::InvalidId,
            format!(
                "trigger name is {} bytes, at most {MAX_TRIGGER_NAME} allowed",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// Every problem of a trigger, as `flow.create` reports a flow's.
fn trigger_problems(t: &Trigger) -> Vec<common::msg::ValidationProblem> {
    let problem = |code: &str, message: String| common::msg::ValidationProblem {
        code: code.to_owned(),
        message,
        task_id: None,
        path: Vec::new(),
    };
    let mut problems = Vec::new();
    if let Some(why) = common::msg::event_filter_problem(&t.event_type, t.field.as_ref()) {
        problems.push(problem("invalid_event_match", why));
    }
    if t.flow.id.is_some() {
        problems.push(problem(
            "invalid_trigger_flow",
            "a trigger's flow has no id: each flow's id comes from the trigger and the event"
                .into(),
        ));
    }
    if t.flow.tasks_object.is_some() {
        problems.push(problem(
            "invalid_trigger_flow",
            "a trigger's flow holds its tasks inline (no tasks_object)".into(),
        ));
    }
    for task in &t.flow.tasks {
        let fits = match &task.input {
            Value::Null => true,
            Value::Object(m) => !m.contains_key(TRIGGER_EVENT_KEY),
            _ => false,
        };
        if !fits {
            problems.push(common::msg::ValidationProblem {
                task_id: Some(task.id.clone()),
                ..problem(
                    "invalid_trigger_flow",
                    format!(
                        "task {}: input must be an object without `{TRIGGER_EVENT_KEY}` (or absent): the event goes there",
                        task.id
                    ),
                )
            });
        }
    }
    if let Err(more) = machine::validate(&t.flow) {
        problems.extend(more);
    }
    problems
}

/// The id of the flow `trigger` starts for the event stored under
/// `msg_id` (`{agent}.{event id}`): the same on every delivery, in every
/// replica. FNV-1a, written out so that it never changes under us.
pub(crate) fn triggered_flow_id(trigger: &str, msg_id: &str) -> Result<FlowId, Error> {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in trigger.bytes().chain([b'\n']).chain(msg_id.bytes()) {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(FlowId::new(format!("trg-{trigger}-{hash:016x}"))?)
}

/// The trigger's flow for one event: every task finds the event in its
/// input under [`TRIGGER_EVENT_KEY`].
fn triggered_spec(t: &Trigger, event: &AgentEvent, id: FlowId) -> FlowSpec {
    let mut spec = t.flow.clone();
    spec.id = Some(id);
    let value = serde_json::to_value(event).unwrap_or(Value::Null);
    for task in &mut spec.tasks {
        match &mut task.input {
            Value::Object(m) => {
                m.insert(TRIGGER_EVENT_KEY.to_owned(), value.clone());
            }
            other => *other = serde_json::json!({ TRIGGER_EVENT_KEY: value.clone() }),
        }
    }
    spec
}

pub(super) fn stored_ms_of(info: &jetstream::message::Info<'_>) -> u64 {
    u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

impl Orchestrator {
    async fn set_trigger(&self, t: Trigger) -> Result<Trigger, Error> {
        valid_name(&t.name)?;
        let problems = trigger_problems(&t);
        if !problems.is_empty() {
            let summary: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
            return Err(Error::new(
                ErrorCode::ValidationFailed,
                format!("trigger is invalid: {}", summary.join("; ")),
            )
            .with_details(serde_json::json!({ "problems": problems })));
        }
        let stored = StoredTrigger {
            trigger: t,
            set_ms: common::now_ms(),
        };
        let body =
            serde_json::to_vec(&stored).map_err(|e| Error::internal_from("encode trigger", e))?;
        self.triggers
            .put(&stored.trigger.name, body.into())
            .await
            .map_err(|e| Error::unavailable("store trigger", e))?;
        Ok(stored.trigger)
    }

    async fn stored_trigger(&self, name: &str) -> Result<Option<StoredTrigger>, Error> {
        let found = self
            .triggers
            .get(name)
            .await
            .map_err(|e| Error::unavailable("read trigger", e))?;
        Ok(found.and_then(|b| serde_json::from_slice(&b).ok()))
    }

    /// Every trigger, by name.
    async fn stored_triggers(&self) -> Result<Vec<StoredTrigger>, Error> {
        let mut names = bus::keys(&self.triggers).await?;
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if let Some(t) = self.stored_trigger(&name).await? {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Starts the flows of matching triggers for each stored agent event,
    /// through the replicas' shared durable consumer.
    pub(super) async fn consume_triggers(self: Arc<Self>, ack_wait: Duration) {
        keep_running("triggers", || self.clone().consume_triggers_once(ack_wait)).await;
    }

    async fn consume_triggers_once(self: Arc<Self>, ack_wait: Duration) -> Result<(), Error> {
        let mut messages = self
            .durable_messages(
                common::nats::STREAM_AGENT_EVENTS,
                consumer::pull::Config {
                    durable_name: Some(common::nats::CONSUMER_ORCHESTRATOR_TRIGGERS.to_owned()),
                    // Every stored event, from before the consumer was first
                    // made too: a trigger takes only events stored after it
                    // was set, so older ones pass through without effect.
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait,
                    max_ack_pending: 1_000,
                    ..Default::default()
                },
            )
            .await?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| Error::unavailable("agent events", e))?;
            let span = telemetry::consumer_span(&msg.subject, msg.headers.as_ref());
            let done = self.trigger_flows(&msg).instrument(span).await;
            let _ = match done {
                Ok(()) => msg.ack().await,
                // Tried again on another delivery.
                Err(e) => {
                    tracing::warn!(subject = %msg.subject, error = %e, "triggered flows not started yet");
                    msg.ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                        .await
                }
            };
        }
        Ok(())
    }

    /// Creates the flow of every trigger the event in `msg` matches; an
    /// error means some may be missing and the event must come again.
    async fn trigger_flows(self: &Arc<Self>, msg: &jetstream::Message) -> Result<(), Error> {
        let event: AgentEvent = match serde_json::from_slice(&msg.payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "unreadable agent event skipped");
                return Ok(());
            }
        };
        let (stored_ms, seq) = match msg.info() {
            Ok(info) => (stored_ms_of(&info), info.stream_sequence),
            Err(_) => (common::now_ms(), 0),
        };
        let msg_id = common::msg::event_msg_id(&event.agent_id, &event.event_id);
        let mut started = Vec::new();
        for stored in self.stored_triggers().await? {
            let t = &stored.trigger;
            if stored.set_ms > stored_ms
                || !t.matches(&event.event_type, &event.agent_id, &event.data)
            {
                continue;
            }
            let id = triggered_flow_id(&t.name, &msg_id)?;
            let origin = FlowOrigin {
                trigger: t.name.clone(),
                event_type: event.event_type.clone(),
                agent_id: event.agent_id.clone(),
                event_id: event.event_id.clone(),
                stream_seq: seq,
            };
            match self
                .create_from(triggered_spec(t, &event, id.clone()), Some(origin))
                .await
            {
                Ok(_) => tracing::info!(trigger = %t.name, flow = %id, "flow started by a trigger"),
                // Started on an earlier delivery (its replica died before the
                // acknowledgement, or it was slow).
                Err(e) if e.code == ErrorCode::Conflict => {
                    tracing::debug!(trigger = %t.name, flow = %id, "triggered flow exists already");
                }
                // The same on every delivery: said once, not retried.
                Err(e)
                    if matches!(
                        e.code,
                        ErrorCode::ValidationFailed
                            | ErrorCode::PayloadTooLarge
                            | ErrorCode::BadRequest
                            | ErrorCode::InvalidId
                    ) =>
                {
                    tracing::warn!(trigger = %t.name, error = %e, "trigger's flow refused");
                }
                Err(e) => return Err(e),
            }
            started.push(t.name.clone());
        }
        #[cfg(feature = "failpoints")]
        crate::failpoints::before_trigger_ack(&started).await;
        let _ = started;
        Ok(())
    }

    /// Keeps this replica's index of the event types `flow`'s wait tasks
    /// wait for (`None`: the flow has no actor here any more).
    pub(super) fn note_waiting(&self, flow: &FlowId, now: Option<&Flow>) {
        let types: HashSet<String> = now
            .map(|f| {
                f.waiting_tasks()
                    .filter_map(|t| t.spec.wait_for.as_ref())
                    .map(|w| w.event_type.clone())
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(mut waiting) = self.waiting.lock() {
            if types.is_empty() {
                waiting.remove(flow);
            } else {
                waiting.insert(flow.clone(), types);
            }
        }
    }

    /// Ticks, at once, every flow with an actor here that waits for an event
    /// of the type just stored (core messages: a missed one waits for the
    /// sweep's next tick).
    pub(super) async fn wake_waiting(self: Arc<Self>) {
        let mut sub = match self.nats.subscribe(subject::AGENT_EVENTS_ALL).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(error = %e, "not subscribed to agent events; waits rely on the sweep");
                return;
            }
        };
        while let Some(msg) = sub.next().await {
            // coord.agent_events.{type}.{agent}
            let Some(kind) = msg.subject.split('.').nth(2) else {
                continue;
            };
            let flows: Vec<FlowId> = match self.waiting.lock() {
                Ok(w) => w
                    .iter()
                    .filter(|(_, types)| types.contains(kind))
                    .map(|(f, _)| f.clone())
                    .collect(),
                Err(_) => continue,
            };
            for flow in flows {
                self.send(&flow, Cmd::Tick);
            }
        }
    }

    /// The events the flow's waiting tasks wait for, found in the stream, as
    /// commands to apply before the tick.
    pub(super) async fn events_for_waits(
        &self,
        flow: &FlowId,
        cache: &mut Option<Stored>,
        looked: &mut Looked,
    ) -> Vec<Cmd> {
        if cache.is_none() {
            // The step reads it anyway; reading it here lets a fresh actor
            // find events before its first tick times a wait out.
            *cache = store::read(&self.flows, flow).await.ok().flatten();
        }
        let Some((f, _, _)) = cache.as_ref() else {
            return Vec::new();
        };
        if f.waiting == 0 || f.state.is_terminal() {
            looked.0.clear();
            return Vec::new();
        }
        let stream = match self.js.get_stream(common::nats::STREAM_AGENT_EVENTS).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "agent events stream not readable");
                return Vec::new();
            }
        };
        let last = stream.cached_info().state.last_sequence;
        let mut out = Vec::new();
        let mut keep = HashSet::new();
        for t in f.waiting_tasks() {
            let Some(wait) = &t.spec.wait_for else {
                continue;
            };
            let since = t.started_ms.unwrap_or(t.since_ms);
            let key = (t.spec.id.clone(), since);
            let from = looked.0.get(&key).copied();
            keep.insert(key.clone());
            if from == Some(last) {
                continue;
            }
            match find_event(&stream, wait, since, from, t.deadline_ms).await {
                Ok(Some((event, stored_ms))) => out.push(Cmd::Event {
                    task: t.spec.id.clone(),
                    event: Box::new(event),
                    stored_ms,
                }),
                Ok(None) => {
                    looked.0.insert(key, last);
                }
                Err(e) => {
                    tracing::warn!(flow = %flow, task = %t.spec.id, error = %e, "agent events not read")
                }
            }
        }
        looked.0.retain(|k, _| keep.contains(k));
        out
    }
}

/// The first stored event `wait` takes: stored at or after `since_ms` (or
/// after sequence `after` when the stream was read up to there before), and
/// not after `until_ms`; with the time it was stored.
async fn find_event(
    stream: &jetstream::stream::Stream,
    wait: &WaitFor,
    since_ms: u64,
    after: Option<u64>,
    until_ms: Option<u64>,
) -> Result<Option<(AgentEvent, u64)>, Error> {
    let deliver_policy = match after {
        Some(seq) => consumer::DeliverPolicy::ByStartSequence {
            start_sequence: seq + 1,
        },
        None => consumer::DeliverPolicy::ByStartTime {
            start_time: async_nats::datetime::from_nanos(i128::from(since_ms) * 1_000_000)
                .map_err(|e| Error::unavailable("start time", e))?,
        },
    };
    let filter_subject =
        subject::agent_events_filter(Some(&wait.event_type), wait.agent_id.as_ref())?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy,
            filter_subject,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::unavailable("agent events consumer", e))?;
    let mut pending = consumer.cached_info().num_pending;
    let mut found = None;
    while pending > 0 && found.is_none() {
        let mut batch = consumer
            .fetch()
            .max_messages(256)
            .messages()
            .await
            .map_err(|e| Error::unavailable("agent events fetch", e))?;
        let mut got = 0;
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| Error::unavailable("agent events fetch", e))?;
            got += 1;
            let Ok(info) = msg.info() else { continue };
            pending = info.pending;
            let stored_ms = stored_ms_of(&info);
            if until_ms.is_some_and(|d| stored_ms > d) {
                pending = 0;
                break;
            }
            if stored_ms < since_ms {
                continue;
            }
            if let Ok(event) = serde_json::from_slice::<AgentEvent>(&msg.payload) {
                if wait.matches(&event.event_type, &event.agent_id, &event.data) {
                    found = Some((event, stored_ms));
                    break;
                }
            }
        }
        if got == 0 {
            break;
        }
    }
    let name = consumer.cached_info().name.clone();
    let _ = stream.delete_consumer(&name).await;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_triggered_flow_id_is_stable_and_fits_the_id_grammar() {
        let long = "t".repeat(MAX_TRIGGER_NAME);
        let a = triggered_flow_id(&long, "w-1.evt:0001").unwrap();
        assert_eq!(a, triggered_flow_id(&long, "w-1.evt:0001").unwrap());
        assert_ne!(a, triggered_flow_id(&long, "w-1.evt:0002").unwrap());
        assert_ne!(a, triggered_flow_id("other", "w-1.evt:0001").unwrap());
        // Written out: it must never change between builds.
        assert_eq!(
            triggered_flow_id("approve", "w-1.e1").unwrap().as_str(),
            format!("trg-approve-{:016x}", {
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in "approve\nw-1.e1".bytes() {
                    h ^= u64::from(b);
                    h = h.wrapping_mul(0x0100_0000_01b3);
                }
                h
            })
        );
    }
}
