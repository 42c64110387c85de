//! The agent runtime: everything an agent process does besides its actual work.
//!
//! It registers with the allocator (retrying until one answers), heartbeats in
//! the background, takes assignments from its durable JetStream subject, runs
//! the handler with bounded concurrency, and reports `completed` or `failed`
//! (after `started` if the handler runs past the start grace) with the attempt
//! number so the orchestrator can fence stale attempts. An assignment is acked only after its final report is stored, so a
//! crash mid-task means redelivery rather than a lost task. A cancel notice on
//! `coord.agents.{id}.cancel` aborts the handler of that attempt.
//!
//! On shutdown the agent leaves cleanly: it drains (no new placements, at
//! once in every allocator replica), takes and runs what was already stored
//! for it, waits for its running tasks up to `leave_grace`, then leaves
//! (`left`, never `lost`): whatever is still running is handed back. Report
//! verdicts (`coord.agents.{id}.rejected`) are logged, and sync notices are
//! acknowledged unless `follow_sync` is off, so sync points complete.
//!
//! A NATS outage is ridden out: the client reconnects on its own, the durable
//! consumer carries on where it was, reports and acks are retried until the
//! server has them, and the agent registers again after every reconnect (if
//! it was declared lost meanwhile, the event saying so may have been missed).

mod attempt;
mod events;
mod pull;
mod sync;
pub use attempt::{progress, report, DELIVERY_DEADLINE, START_GRACE};
use attempt::{work, Attempt, Finished, InFlight, Slot};
pub use events::publish_event;
pub use sync::SyncFollower;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use common::msg::{Assignment, CancelNotice, Heartbeat, RegisterAgent};
use common::nats::{self as bus, Stream};
use common::{subject, telemetry, AgentId, Client, Error, ErrorCode};
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// Who the agent is and what it offers.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub agent_id: AgentId,
    pub capabilities: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub capacity: BTreeMap<String, f64>,
    pub heartbeat_interval: Duration,
    /// Tasks run at once.
    pub concurrency: usize,
    /// On shutdown, how long running tasks may take to finish before they are
    /// handed back.
    pub leave_grace: Duration,
    /// Acknowledge the synchronizer's notices (sync points, rollbacks, agreed
    /// state). Turn off to handle them yourself with a [`SyncFollower`].
    pub follow_sync: bool,
    /// How long a handler may run before its `started` report is sent: one
    /// done sooner reports only its end, which saves a stored report and a
    /// flow write (default [`START_GRACE`]; zero sends `started` before the
    /// handler runs). Capped so `started` is in by `start_by_ms`.
    /// A handler that blocks its thread on a current-thread runtime holds the
    /// grace's timer up too: give such an agent zero.
    pub start_grace: Duration,
}

impl AgentOptions {
    pub fn new(agent_id: AgentId) -> Self {
        AgentOptions {
            agent_id,
            capabilities: Vec::new(),
            labels: BTreeMap::new(),
            capacity: BTreeMap::new(),
            heartbeat_interval: Duration::from_secs(5),
            concurrency: 8,
            leave_grace: Duration::from_secs(3),
            follow_sync: true,
            start_grace: START_GRACE,
        }
    }

    pub fn capacity(mut self, resource: &str, amount: f64) -> Self {
        self.capacity.insert(resource.to_owned(), amount);
        self
    }

    pub fn capability(mut self, capability: &str) -> Self {
        self.capabilities.push(capability.to_owned());
        self
    }
}

/// Why a task failed, as the handler reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskFailure {
    pub error: String,
    /// Whether another attempt might succeed.
    pub retryable: bool,
}

impl<E: std::fmt::Display> From<E> for TaskFailure {
    fn from(e: E) -> Self {
        TaskFailure {
            error: e.to_string(),
            retryable: true,
        }
    }
}

/// The durable consumer name of an agent's assignments.
pub fn consumer_name(agent: &AgentId) -> String {
    bus::agent_consumer(agent)
}

/// The reply-subject prefix of an agent's connection (`_INBOX_{id}`; see
/// `NatsConfig::nats_inbox_prefix`): where a server isolating agents lets this
/// agent, and only it, receive replies and pulled assignments.
pub fn inbox_prefix(agent: &AgentId) -> String {
    format!("_INBOX_{agent}")
}

/// Runs an agent until `shutdown` resolves: in-flight tasks finish and are
/// reported, then the function returns.
pub async fn run<H, Fut>(
    nats: async_nats::Client,
    opts: AgentOptions,
    handler: H,
    shutdown: impl Future,
) -> Result<(), Error>
where
    H: Fn(Assignment) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Value, TaskFailure>> + Send + 'static,
{
    let client = Client::new(nats.clone());
    let js = jetstream::new(nats.clone());
    tokio::pin!(shutdown);

    let registration = RegisterAgent {
        agent_id: opts.agent_id.clone(),
        capabilities: opts.capabilities.clone(),
        labels: opts.labels.clone(),
        capacity: opts.capacity.clone(),
        heartbeat_interval_ms: opts.heartbeat_interval.as_millis() as u64,
    };
    loop {
        match client.register_agent(&registration).await {
            Ok(_) => break,
            Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {
                tracing::info!(agent = %opts.agent_id, "waiting for the allocator");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
    tracing::info!(agent = %opts.agent_id, "registered");

    // Declared lost (a long pause, a partition)? Register again to get work
    // again. The event is a core message, missed if it comes while this
    // connection is down, so every reconnect registers again as well.
    let mut lost = nats
        .subscribe(subject::event::AGENT_LOST)
        .await
        .map_err(|e| Error::unavailable("subscribe to agent.lost", e))?;
    let outages = bus::Outages::watch(&nats);
    let (me, again) = (opts.agent_id.clone(), client.clone());
    let reregister = tokio::spawn(async move {
        let mut seen_down = outages.last_down_ms();
        let mut poll = tokio::time::interval(bus::Outages::POLL * 2);
        loop {
            let why = tokio::select! {
                msg = lost.next() => {
                    let Some(msg) = msg else { break };
                    let Ok(event) = serde_json::from_slice::<common::msg::Event>(&msg.payload) else {
                        continue;
                    };
                    match event.kind {
                        common::msg::EventKind::AgentLost { agent_id, .. } if agent_id == me => {
                            "declared lost by the allocator"
                        }
                        _ => continue,
                    }
                }
                _ = poll.tick() => {
                    let down = outages.last_down_ms();
                    if down == seen_down
                        || again.nats().connection_state() != async_nats::connection::State::Connected
                    {
                        continue;
                    }
                    seen_down = down;
                    "reconnected to nats"
                }
            };
            tracing::info!(agent = %me, why, "registering again");
            // Until it answers: while NATS or the allocator is still coming back.
            let mut pause = Duration::from_millis(100);
            loop {
                match again.register_agent(&registration).await {
                    Ok(_) => break,
                    Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {
                        tracing::debug!(agent = %me, error = %e, "registering again, allocator not answering yet");
                    }
                    Err(e) => {
                        tracing::warn!(agent = %me, error = %e, "registering again failed");
                        break;
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    });

    let running = Arc::new(AtomicU32::new(0));
    let in_flight: InFlight = Arc::default();
    let finished: Arc<Mutex<Finished>> = Arc::default();
    let mut cancels = nats
        .subscribe(subject::cancel(&opts.agent_id))
        .await
        .map_err(|e| Error::unavailable("subscribe to cancellations", e))?;
    let cancel_map = in_flight.clone();
    let canceller = tokio::spawn(async move {
        while let Some(msg) = cancels.next().await {
            let Ok(notice) = serde_json::from_slice::<CancelNotice>(&msg.payload) else {
                continue;
            };
            let key = (
                notice.flow_id.clone(),
                notice.task_id.clone(),
                notice.attempt,
            );
            // A running handler is taken out; a claim whose handler has not
            // started yet is marked, so it never starts (and keeps fending
            // off a second delivery).
            let handle = cancel_map
                .lock()
                .ok()
                .and_then(|mut m| match m.get_mut(&key) {
                    Some(Slot::Running(_)) => match m.remove(&key) {
                        Some(Slot::Running(h)) => Some(h),
                        _ => None,
                    },
                    Some(slot @ Slot::Claimed) => {
                        *slot = Slot::Cancelled;
                        None
                    }
                    _ => None,
                });
            tracing::info!(flow = %notice.flow_id, task = %notice.task_id, attempt = notice.attempt, code = ?notice.code, reason = %notice.reason, "attempt cancelled");
            if let Some(h) = handle {
                h.abort();
            }
        }
    });
    // Verdicts on this agent's reports: a refused report changed nothing.
    let mut verdicts = nats
        .subscribe(subject::rejected(&opts.agent_id))
        .await
        .map_err(|e| Error::unavailable("subscribe to report verdicts", e))?;
    let listener = tokio::spawn(async move {
        while let Some(msg) = verdicts.next().await {
            match serde_json::from_slice::<common::msg::ReportRejected>(&msg.payload) {
                Ok(v) => tracing::warn!(
                    flow = ?v.flow_id, task = ?v.task_id, attempt = ?v.attempt,
                    code = ?v.code, reason = ?v.reason, message = %v.message,
                    "report rejected"
                ),
                Err(e) => tracing::debug!(error = %e, "unreadable verdict"),
            }
        }
    });
    let (stop_sync, sync_stopped) = tokio::sync::oneshot::channel::<()>();
    let follower = if opts.follow_sync {
        let follower = SyncFollower::subscribe(nats.clone(), opts.agent_id.clone()).await?;
        Some(tokio::spawn(
            follower.run(|_notice| async { true }, sync_stopped),
        ))
    } else {
        None
    };
    let heartbeat = tokio::spawn(heartbeats(
        nats.clone(),
        opts.agent_id.clone(),
        opts.heartbeat_interval,
        running.clone(),
    ));

    let stream = bus::ensure_stream(&js, Stream::Assign, 1).await?;
    let name = consumer_name(&opts.agent_id);
    // Deliveries nobody acknowledged went to an earlier run of this agent that
    // died mid-task. Until their ack wait (minutes) ends they count against
    // `max_ack_pending` and hold back this run's assignments, so the consumer
    // is made afresh: the stream is a work queue, its messages stay, and the
    // new consumer delivers them at once (a stale attempt's reports are fenced).
    if let Ok(info) = stream.consumer_info(&name).await {
        if info.num_ack_pending > 0 {
            tracing::info!(agent = %opts.agent_id, pending = info.num_ack_pending, "assignments of an earlier run unacknowledged, delivering them again");
            stream
                .delete_consumer(&name)
                .await
                .map_err(|e| Error::unavailable(format_args!("delete consumer {name}"), e))?;
        }
    }
    let mut messages = pull::Assignments::open(
        stream.clone(),
        consumer::pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: subject::assign(&opts.agent_id),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(300),
            max_ack_pending: opts.concurrency.max(1) as i64,
            ..Default::default()
        },
    )
    .await?;
    let limit = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let permits = opts.concurrency.max(1) as u32;

    // Runs one delivered assignment on a worker of its own.
    let take = |msg: jetstream::Message, permit: tokio::sync::OwnedSemaphorePermit| {
        let span = telemetry::consumer_span(&msg.subject, msg.headers.as_ref());
        let (js, handler, running, me) = (
            js.clone(),
            handler.clone(),
            running.clone(),
            opts.agent_id.clone(),
        );
        let (in_flight, finished) = (in_flight.clone(), finished.clone());
        let grace = opts.start_grace;
        tokio::spawn(
            async move {
                running.fetch_add(1, Ordering::Relaxed);
                let at = Attempt {
                    in_flight: &in_flight,
                    finished: &finished,
                    grace,
                };
                work(&js, &me, msg, handler, at).await;
                running.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            }
            .instrument(span),
        );
    };

    let leaving = loop {
        let msg = tokio::select! {
            _ = &mut shutdown => break true,
            msg = messages.next() => msg,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "assignment stream error");
                continue;
            }
        };
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break false;
        };
        take(msg, permit);
    };
    let mut left = false;
    if leaving {
        // Drain: no new placements from here on, in every allocator replica.
        let grace = tokio::time::Instant::now() + opts.leave_grace;
        match client.deregister_agent(&opts.agent_id).await {
            Ok(_) => tracing::info!(agent = %opts.agent_id, "draining"),
            Err(e) => tracing::warn!(agent = %opts.agent_id, error = %e, "drain not confirmed"),
        }
        // What was placed before the drain is stored for this agent: take it
        // while the grace lasts.
        loop {
            let pending = stream
                .consumer_info(&name)
                .await
                .map(|i| i.num_pending)
                .unwrap_or(0);
            if pending == 0 || tokio::time::Instant::now() >= grace {
                break;
            }
            let next = tokio::select! {
                _ = tokio::time::sleep_until(grace) => break,
                msg = tokio::time::timeout(Duration::from_millis(200), messages.next()) => msg,
            };
            if let Ok(Ok(msg)) = next {
                let permit = tokio::select! {
                    _ = tokio::time::sleep_until(grace) => break,
                    p = limit.clone().acquire_owned() => p,
                };
                let Ok(permit) = permit else { break };
                take(msg, permit);
            }
        }
        // Running tasks get the rest of the grace; what is still running then
        // is handed back by the leave.
        let finished_in_time = tokio::select! {
            _ = limit.acquire_many(permits) => true,
            _ = tokio::time::sleep_until(grace) => false,
        };
        if !finished_in_time {
            let handles: Vec<_> = in_flight
                .lock()
                .map(|m| {
                    m.values()
                        .filter_map(|s| match s {
                            Slot::Running(h) => Some(h.clone()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            tracing::info!(agent = %opts.agent_id, running = handles.len(), "grace over, handing back running tasks");
            for h in handles {
                h.abort();
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), limit.acquire_many(permits)).await;
        }
        match client.leave_agent(&opts.agent_id).await {
            Ok(_) => {
                left = true;
                tracing::info!(agent = %opts.agent_id, "left");
            }
            Err(e) => tracing::warn!(agent = %opts.agent_id, error = %e, "leave not confirmed"),
        }
    } else {
        // Let in-flight tasks finish and report before going away.
        let _ = limit.acquire_many(permits).await;
    }
    heartbeat.abort();
    canceller.abort();
    listener.abort();
    reregister.abort();
    let _ = stop_sync.send(());
    if let Some(f) = follower {
        let _ = f.await;
    }
    // A durable consumer outlives its agent: the allocator removes it on
    // leave. Without a confirmed leave, one with nothing waiting in it is
    // removed here, so agents that come and go leave no consumers behind (the
    // server caps them); one with assignments waiting stays for a restart.
    drop(messages);
    if !left {
        if let Ok(info) = stream.consumer_info(&name).await {
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                if let Err(e) = stream.delete_consumer(&name).await {
                    tracing::debug!(agent = %opts.agent_id, error = %e, "assignment consumer left behind");
                }
            }
        }
    }
    Ok(())
}

async fn heartbeats(
    nats: async_nats::Client,
    agent: AgentId,
    every: Duration,
    running: Arc<AtomicU32>,
) {
    let subject = subject::heartbeat(&agent);
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(50)));
    loop {
        tick.tick().await;
        let beat = Heartbeat {
            agent_id: agent.clone(),
            at_ms: common::now_ms(),
            running: running.load(Ordering::Relaxed),
        };
        if let Ok(body) = serde_json::to_vec(&beat) {
            if let Err(e) = nats.publish(subject.clone(), body.into()).await {
                tracing::debug!(error = %e, "heartbeat not sent");
            }
        }
    }
}
