//! Events at least once: the outbox.
//!
//! A step's events are numbered and stored in the flow record (its header's
//! [`crate::store::Kept::outbox`]) by the same compare-and-set that commits the step, then published on the
//! events stream with `Nats-Msg-Id` = the event id `{flow}.{n}`. Storing them
//! costs no message of its own: they ride in the write the step makes anyway.
//! A later write drops the batches JetStream has acknowledged to this replica;
//! a replica killed between its write and its publish leaves its batch in the
//! record, and any replica's actor publishes a batch again once it is
//! [`REPUBLISH_AFTER_MS`] old and not acknowledged here. The stream's
//! duplicate window (2 min) stores a repeat once; subscribers who read the
//! subjects directly may see it twice and tell by the id.
//!
//! The events stream stores without waiting for the disk on one node
//! (`persist_mode: async`): an acknowledged event reaches the file within
//! milliseconds, and a server killed meanwhile loses it. So an
//! acknowledgement that a connection of this process losing its server
//! followed counts for nothing: such a batch still in the record is published
//! again as unacknowledged, and one already dropped from it is kept in this
//! replica's memory for [`SETTLE_MS`] for the sweep to publish again
//! ([`Ledger::recheck`]). The duplicate window stores it once. (The replica and the server dying
//! together, the machine with them, loses those milliseconds of events.)
//!
//! A batch stays in the record until the flow's next write, so an idle flow
//! (a long task running) gets one write of its own [`CLEAR_AFTER_MS`] after
//! its last, and a finished flow one at once: a batch older than that is left
//! by a replica that died, never one that lives. The sweep keeps ticking a
//! finished flow until its outbox is empty.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_nats::jetstream;
use common::msg::{Event, EventKind};
use common::nats::dedupe_headers;
use common::FlowId;
use serde::{Deserialize, Serialize};

use crate::machine::Flow;

/// The events of one step, stored with it (the outbox) until a later write
/// drops them once the events stream has them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Staged {
    pub at_ms: u64,
    pub events: Vec<Numbered>,
}

/// An event with its number in the flow: its id is `{flow}.{n}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Numbered {
    pub n: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// A batch not acknowledged here is published again once this old (by its
/// writer too, if the stream did not acknowledge it then).
pub const REPUBLISH_AFTER_MS: u64 = 2_000;
/// An idle unfinished flow's acknowledged batches are dropped by a write of
/// their own this long after they were stored.
pub const CLEAR_AFTER_MS: u64 = 10_000;
/// How long a batch acknowledged by the stream is kept in memory, in case
/// the server dies before it reaches the file: far past the server's flush
/// of an async stream (8 ms at most) and the client's notice of a lost
/// connection.
pub const SETTLE_MS: u64 = 1_000;
/// Events are published again at most this long after they were stored,
/// inside the events stream's duplicate window (2 min).
const REPEAT_UNTIL_MS: u64 = 100_000;
/// Most events an outbox holds (about 200 bytes each). A step with more (a
/// large flow's creation, a cancel of thousands of tasks) stores every flow
/// event and the first task events that fit; the rest are published once,
/// under their ids, without the guarantee.
pub const MAX_EVENTS: usize = 512;

const SOURCE: &str = "orchestrator";

/// The id of event `n` of `flow`.
pub fn event_id(flow: &FlowId, n: u64) -> String {
    format!("{flow}.{n}")
}

/// What this replica published from each flow's outbox, by the number of a
/// batch's first event: when it last sent it, and whether the stream
/// acknowledged every event of it.
#[derive(Debug, Default)]
pub struct Ledger {
    flows: Mutex<HashMap<FlowId, Marks>>,
    /// Batches dropped from their record as acknowledged, less than
    /// [`SETTLE_MS`] ago.
    settling: Mutex<Vec<Settling>>,
}

#[derive(Debug, Default)]
struct Marks {
    sent: HashMap<u64, u64>,
    /// When the stream acknowledged each batch.
    acked: HashMap<u64, u64>,
}

#[derive(Debug)]
struct Settling {
    flow: FlowId,
    acked_ms: u64,
    batch: Staged,
}

/// The events of one step as they are published: each gets the number the
/// step stored it (or would have stored it) under.
#[derive(Debug)]
pub struct Cursor {
    flow: FlowId,
    next: u64,
    at_ms: u64,
    /// The stored batch, if any (its first number).
    batch: Option<u64>,
    /// The numbers stored in it: the rest (past [`MAX_EVENTS`]) go out once.
    kept: std::collections::HashSet<u64>,
    acks: Vec<Ack>,
}

/// An event's acknowledgement, read on a task of its own from the moment
/// the event is published. A JetStream context lends every publish one of a
/// bounded number of permits (5,000) until its acknowledgement is read: a
/// step that kept its acknowledgements unread while it published more
/// would, with enough events at once (a burst of wide flows' creations),
/// hold every permit and wait for one forever, and every flow write with
/// it.
type Ack = tokio::task::JoinHandle<bool>;

fn key(batch: &Staged) -> Option<u64> {
    batch.events.first().map(|e| e.n)
}

impl Ledger {
    fn with<R>(&self, flow: &FlowId, f: impl FnOnce(&mut Marks) -> R) -> Option<R> {
        let mut flows = self.flows.lock().ok()?;
        Some(f(flows.entry(flow.clone()).or_default()))
    }

    /// When the stream acknowledged the batch, unless a connection of this
    /// process found its server gone since (then it may be lost).
    fn acked(&self, flow: &FlowId, batch: u64) -> Option<u64> {
        let at = self
            .with(flow, |m| m.acked.get(&batch).copied())
            .flatten()?;
        (common::nats::last_disconnect_ms() < at).then_some(at)
    }

    /// Forgets a flow whose actor went away.
    pub fn forget(&self, flow: &FlowId) {
        if let Ok(mut flows) = self.flows.lock() {
            flows.remove(flow);
        }
    }

    /// Numbers the step's events (counted in the flow) and stores them in
    /// the flow's `outbox`, dropping the batches acknowledged here. Returns the cursor that
    /// publishes them and whether the outbox needs a write even if nothing
    /// else changed: new events, or acknowledged batches of a finished flow
    /// or older than [`CLEAR_AFTER_MS`].
    pub fn stage<'a>(
        &self,
        flow: &mut Flow,
        outbox: &mut Vec<Staged>,
        events: impl IntoIterator<Item = &'a EventKind>,
        now: u64,
    ) -> (Cursor, bool) {
        let terminal = flow.state.is_terminal();
        let mut clear = false;
        let id = flow.id.clone();
        let mut dropped = Vec::new();
        outbox.retain(|b| {
            let acked = key(b).and_then(|k| self.acked(&id, k));
            clear |= acked.is_some() && (terminal || now.saturating_sub(b.at_ms) >= CLEAR_AFTER_MS);
            if let Some(acked_ms) = acked.filter(|at| now.saturating_sub(*at) < SETTLE_MS) {
                dropped.push(Settling {
                    flow: id.clone(),
                    acked_ms,
                    batch: b.clone(),
                });
            }
            acked.is_none()
        });
        if let Ok(mut settling) = self.settling.lock() {
            settling.extend(dropped);
        }
        let first = flow.events;
        let mut room = MAX_EVENTS.saturating_sub(outbox.iter().map(|b| b.events.len()).sum());
        let mut kept = Vec::new();
        for kind in events {
            let n = flow.events;
            flow.events += 1;
            let task = matches!(kind, EventKind::TaskTransition { .. });
            if room > 0 || !task {
                room = room.saturating_sub(1);
                kept.push(Numbered {
                    n,
                    kind: kind.clone(),
                });
            }
        }
        let batch = key_of(&kept);
        let numbers = kept.iter().map(|e| e.n).collect();
        let new = flow.events > first;
        if !kept.is_empty() {
            outbox.push(Staged {
                at_ms: now,
                events: kept,
            });
        }
        let cursor = Cursor {
            flow: flow.id.clone(),
            next: first,
            at_ms: now,
            batch,
            kept: numbers,
            acks: Vec::new(),
        };
        (cursor, new || clear)
    }

    /// Publishes one event of a step, under its number.
    pub async fn publish(&self, js: &jetstream::Context, cursor: &mut Cursor, kind: EventKind) {
        let event = Event {
            event_id: event_id(&cursor.flow, cursor.next),
            at_ms: cursor.at_ms,
            source: SOURCE.to_owned(),
            kind,
        };
        let n = cursor.next;
        cursor.next += 1;
        if !cursor.kept.contains(&n) {
            // Not in the outbox: published once, on core NATS (the stream
            // still stores it, de-duplicated by its id), with no
            // acknowledgement to wait for: a step of 100,000 events (a large
            // flow's cancel) is not held to the stream's acknowledgement pace.
            send_once(&js.client(), &event).await;
            return;
        }
        if let Some(ack) = send(js, &event).await {
            cursor.acks.push(ack);
        }
    }

    /// After a step's events went out: its batch counts as sent now, and as
    /// acknowledged once the stream has confirmed every event of it.
    pub fn sent(self: &std::sync::Arc<Self>, cursor: Cursor, now: u64) {
        let Some(batch) = cursor.batch else {
            return;
        };
        self.with(&cursor.flow, |m| m.sent.insert(batch, now));
        self.confirm(cursor.flow, batch, cursor.acks);
    }

    fn confirm(self: &std::sync::Arc<Self>, flow: FlowId, batch: u64, acks: Vec<Ack>) {
        let ledger = self.clone();
        tokio::spawn(async move {
            for ack in acks {
                if !matches!(ack.await, Ok(true)) {
                    tracing::debug!(%flow, "event not acknowledged, published again later");
                    return;
                }
            }
            // Not for a flow forgotten meanwhile (its actor went away).
            if let Ok(mut flows) = ledger.flows.lock() {
                if let Some(m) = flows.get_mut(&flow) {
                    m.acked.insert(batch, common::now_ms());
                }
            }
        });
    }

    /// Publishes again the batches of `flow`'s `outbox` that are due (see
    /// [`REPUBLISH_AFTER_MS`]), and forgets batches the flow no longer holds.
    pub async fn republish(
        self: &std::sync::Arc<Self>,
        js: &jetstream::Context,
        flow: &FlowId,
        outbox: &[Staged],
        now: u64,
    ) {
        let held: HashSet<u64> = outbox.iter().filter_map(key).collect();
        let down = common::nats::last_disconnect_ms();
        let due: Vec<&Staged> = self
            .with(flow, |m| {
                m.sent.retain(|k, _| held.contains(k));
                m.acked.retain(|k, _| held.contains(k));
                outbox
                    .iter()
                    .filter(|b| {
                        let Some(k) = key(b) else { return false };
                        let since = m.sent.get(&k).copied().unwrap_or(b.at_ms);
                        // Not acknowledged, or only before an outage.
                        let acked = m.acked.get(&k).is_some_and(|at| down < *at);
                        !acked && now.saturating_sub(since) >= REPUBLISH_AFTER_MS
                    })
                    .collect()
            })
            .unwrap_or_default();
        for b in due {
            let Some(k) = key(b) else { continue };
            tracing::debug!(%flow, events = b.events.len(), "outbox published again");
            let mut acks = Vec::new();
            for e in &b.events {
                let event = Event {
                    event_id: event_id(flow, e.n),
                    at_ms: b.at_ms,
                    source: SOURCE.to_owned(),
                    kind: e.kind.clone(),
                };
                acks.extend(send(js, &event).await);
            }
            self.with(flow, |m| m.sent.insert(k, now));
            self.confirm(flow.clone(), k, acks);
        }
    }
}

impl Ledger {
    /// Publishes again the batches acknowledged before a connection of this
    /// process found its server gone (they may not have reached its disk),
    /// once connected again, and keeps them as acknowledged anew; forgets
    /// those that outlived [`SETTLE_MS`] without an outage. Run by the sweep:
    /// a finished flow has no actor left to do it.
    pub async fn recheck(&self, js: &jetstream::Context, now: u64) {
        if js.client().connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let down = common::nats::last_disconnect_ms();
        let doubtful: Vec<Settling> = match self.settling.lock() {
            Ok(mut settling) => {
                let (doubtful, rest) = std::mem::take(&mut *settling)
                    .into_iter()
                    // Past the duplicate window a repeat would be stored twice.
                    .filter(|s| now.saturating_sub(s.batch.at_ms) < REPEAT_UNTIL_MS)
                    .filter(|s| down >= s.acked_ms || now.saturating_sub(s.acked_ms) < SETTLE_MS)
                    .partition(|s| down >= s.acked_ms);
                *settling = rest;
                doubtful
            }
            Err(_) => return,
        };
        for mut s in doubtful {
            tracing::debug!(flow = %s.flow, events = s.batch.events.len(), "events acknowledged before an outage published again");
            let mut acks = Vec::new();
            for e in &s.batch.events {
                let event = Event {
                    event_id: event_id(&s.flow, e.n),
                    at_ms: s.batch.at_ms,
                    source: SOURCE.to_owned(),
                    kind: e.kind.clone(),
                };
                acks.extend(send(js, &event).await);
            }
            let mut stored = acks.len() == s.batch.events.len();
            for ack in acks {
                stored &= matches!(ack.await, Ok(true));
            }
            // Acknowledged anew: settling again. Not stored: tried again by
            // the next sweep (an acknowledgement of 0 is doubtful for good).
            s.acked_ms = if stored { common::now_ms() } else { 0 };
            if let Ok(mut settling) = self.settling.lock() {
                settling.push(s);
            }
        }
    }
}

fn key_of(events: &[Numbered]) -> Option<u64> {
    events.first().map(|e| e.n)
}

/// One JetStream publish under the event's id; the acknowledgement is
/// read on a task of its own (see [`Ack`]), so a step does not wait for the
/// stream.
async fn send(js: &jetstream::Context, event: &Event) -> Option<Ack> {
    let body = match serde_json::to_vec(event) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "event encode failed");
            return None;
        }
    };
    let subject = event.kind.subject();
    match js
        .publish_with_headers(
            subject,
            dedupe_headers(subject, &event.event_id),
            body.into(),
        )
        .await
    {
        Ok(ack) => Some(tokio::spawn(async move {
            ack.await
                .inspect_err(|e| tracing::debug!(error = %e, "event not acknowledged"))
                .is_ok()
        })),
        Err(e) => {
            tracing::warn!(error = %e, subject, "event publish failed");
            None
        }
    }
}

/// Publishes `event` once on core NATS, with its id for de-duplication.
async fn send_once(nats: &async_nats::Client, event: &Event) {
    let Ok(body) = serde_json::to_vec(event) else {
        return;
    };
    let subject = event.kind.subject();
    if let Err(e) = nats
        .publish_with_headers(
            subject,
            dedupe_headers(subject, &event.event_id),
            body.into(),
        )
        .await
    {
        tracing::warn!(error = %e, subject, "event publish failed");
    }
}
