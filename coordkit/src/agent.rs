//! The agent runtime: everything an agent process does besides its actual work.
//!
//! It listens on its assignment subject, hands back what an earlier run of
//! it held (a leave before it registers: that run died mid-task), registers
//! with the allocator (retrying until one answers), heartbeats in the
//! background, runs the handler with bounded concurrency, and reports
//! `completed` or `failed` (after `started` if the handler runs past the
//! start grace) with the attempt number so the orchestrator can fence stale
//! attempts. An assignment comes again until its `started` is stored, so a
//! repeat of an attempt held or ended is ignored. A cancel notice on
//! `coord.agents.{id}.cancel` aborts the handler of that attempt.
//!
//! On shutdown the agent leaves cleanly: it drains (no new placements, at
//! once in every allocator replica), still takes what was placed before the
//! drain, waits for its tasks up to `leave_grace`, then leaves (`left`,
//! never `lost`): whatever is still running is handed back. Report verdicts
//! (`coord.agents.{id}.rejected`) are logged, and sync notices are
//! acknowledged unless `follow_sync` is off, so sync points complete.
//!
//! A NATS outage is ridden out: the client reconnects and subscribes again
//! on its own, reports are retried until the server has them, assignments
//! missed meanwhile come again, and the agent registers again after every
//! reconnect (if it was declared lost meanwhile, the event saying so may
//! have been missed), and when a heartbeat is answered `lost` (the event
//! missed with no reconnect: a partition between a cluster's servers).

mod attempt;
mod events;
mod sync;
use attempt::{claim, work, Attempt, Finished, InFlight, Reporter, Slot};
pub use attempt::{progress, report, DELIVERY_DEADLINE, START_GRACE};
pub use events::publish_event;
pub use sync::SyncFollower;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{AgentInfo, AgentStatus, Assignment, CancelNotice, Heartbeat, RegisterAgent};
use common::nats as bus;
use common::{subject, telemetry, AgentId, Client, Error, ErrorCode};
use futures::{FutureExt, StreamExt};
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

/// The reply-subject prefix of an agent's connection (`_INBOX_{id}`; see
/// `NatsConfig::nats_inbox_prefix`): where a server isolating agents lets this
/// agent, and only it, receive replies.
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
    let reporter = Reporter::start(jetstream::new(nats.clone()), &opts.agent_id);
    tokio::pin!(shutdown);

    // Listening before registering: the allocator places work only on an
    // agent it finds listening.
    let mut assignments = nats
        .subscribe(subject::assign(&opts.agent_id))
        .await
        .map_err(|e| Error::unavailable("subscribe to assignments", e))?;
    // What an earlier run of this agent held died with it: handed back now
    // (run again at once, not counted as failures) rather than when its
    // leases run out.
    loop {
        match client.leave_agent(&opts.agent_id).await {
            Ok(_) => {
                tracing::info!(agent = %opts.agent_id, "an earlier run's work handed back");
                break;
            }
            Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {
                tracing::info!(agent = %opts.agent_id, "waiting for the allocator");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            // Never registered (or retired): nothing to hand back.
            Err(_) => break,
        }
    }
    // Whatever came before the leave was answered is the earlier run's,
    // handed back with it.
    while let Some(Some(_)) = assignments.next().now_or_never() {}
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
    // Or told so in answer to a heartbeat: an event missed with no reconnect
    // (a partition that left this connection up).
    let told_lost = Arc::new(tokio::sync::Notify::new());
    let told = told_lost.clone();
    // The connection's own disconnect events as well as the poll: a
    // reconnect faster than the poll (a few ms, to another node of a
    // cluster) is seen by the events alone.
    let last_down = move || outages.last_down_ms().max(bus::last_disconnect_ms());
    let reregister = tokio::spawn(async move {
        let mut seen_down = last_down();
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
                _ = told.notified() => "told on a heartbeat that it is lost",
                _ = poll.tick() => {
                    let down = last_down();
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
        told_lost,
    ));

    let workers = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    // Claims one assignment and runs it on a task of its own (waiting there
    // for a worker); a repeat, or anything that is not an assignment for this
    // agent, is dropped.
    let take = |msg: async_nats::Message| {
        if msg
            .headers
            .as_ref()
            .is_some_and(|h| h.get(subject::PROBE_HEADER).is_some())
        {
            return;
        }
        let assignment: Assignment = match serde_json::from_slice(&msg.payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "unreadable assignment dropped");
                return;
            }
        };
        if assignment.agent_id != opts.agent_id {
            tracing::warn!(to = %assignment.agent_id, "assignment for another agent dropped");
            return;
        }
        let key = (
            assignment.flow_id.clone(),
            assignment.task_id.clone(),
            assignment.attempt,
        );
        if !claim(&in_flight, &finished, &key) {
            tracing::debug!(flow = %key.0, task = %key.1, attempt = key.2, "repeat of an attempt held or ended");
            return;
        }
        let span = telemetry::consumer_span(&msg.subject, msg.headers.as_ref());
        let (reporter, handler, running) = (reporter.clone(), handler.clone(), running.clone());
        let (in_flight, finished, workers) = (in_flight.clone(), finished.clone(), workers.clone());
        let grace = opts.start_grace;
        tokio::spawn(
            async move {
                running.fetch_add(1, Ordering::Relaxed);
                let at = Attempt {
                    in_flight: &in_flight,
                    finished: &finished,
                    workers: &workers,
                    grace,
                };
                work(&reporter, assignment, handler, at).await;
                running.fetch_sub(1, Ordering::Relaxed);
            }
            .instrument(span),
        );
    };

    let leaving = loop {
        tokio::select! {
            _ = &mut shutdown => break true,
            msg = assignments.next() => match msg {
                Some(msg) => take(msg),
                None => break false,
            },
        }
    };
    let held = || in_flight.lock().map(|m| m.len()).unwrap_or(0);
    if leaving {
        // Drain: no new placements from here on, in every allocator replica.
        let grace = tokio::time::Instant::now() + opts.leave_grace;
        match client.deregister_agent(&opts.agent_id).await {
            Ok(_) => tracing::info!(agent = %opts.agent_id, "draining"),
            Err(e) => tracing::warn!(agent = %opts.agent_id, error = %e, "drain not confirmed"),
        }
        // What was placed before the drain may still arrive: taken, and
        // everything held gets the grace to finish.
        let mut check = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(grace) => break,
                msg = assignments.next() => match msg {
                    Some(msg) => take(msg),
                    None => break,
                },
                _ = check.tick() => if held() == 0 { break },
            }
        }
        if held() > 0 {
            // Handed back by the leave: those waiting never start, those
            // running are stopped.
            let handles: Vec<_> = in_flight
                .lock()
                .map(|mut m| {
                    m.values_mut()
                        .filter_map(|s| match s {
                            Slot::Running(h) => Some(h.clone()),
                            slot => {
                                *slot = Slot::Cancelled;
                                None
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            tracing::info!(agent = %opts.agent_id, running = handles.len(), "grace over, handing back running tasks");
            for h in handles {
                h.abort();
            }
            workers.close();
            let stopped = async {
                while held() > 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), stopped).await;
        }
        match client.leave_agent(&opts.agent_id).await {
            Ok(_) => tracing::info!(agent = %opts.agent_id, "left"),
            Err(e) => tracing::warn!(agent = %opts.agent_id, error = %e, "leave not confirmed"),
        }
    } else {
        // Let held tasks finish and report before going away.
        while held() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    heartbeat.abort();
    canceller.abort();
    listener.abort();
    reregister.abort();
    let _ = stop_sync.send(());
    if let Some(f) = follower {
        let _ = f.await;
    }
    Ok(())
}

/// Heartbeats every `every`, each with a reply subject: an allocator that
/// has this agent `lost` answers there with its record, and `told_lost`
/// is notified.
async fn heartbeats(
    nats: async_nats::Client,
    agent: AgentId,
    every: Duration,
    running: Arc<AtomicU32>,
    told_lost: Arc<tokio::sync::Notify>,
) {
    let subject = subject::heartbeat(&agent);
    let inbox = nats.new_inbox();
    let mut answers = match nats.subscribe(inbox.clone()).await {
        Ok(sub) => Some(sub),
        Err(e) => {
            tracing::warn!(error = %e, "heartbeat answers not heard");
            None
        }
    };
    let mut tick = tokio::time::interval(every.max(Duration::from_millis(50)));
    loop {
        let answer = async {
            match answers.as_mut() {
                Some(sub) => sub.next().await,
                None => std::future::pending().await,
            }
        };
        let answered = tokio::select! {
            _ = tick.tick() => None,
            msg = answer => Some(msg),
        };
        match answered {
            None => {}
            // The subscription ended: beats go on unanswered.
            Some(None) => {
                answers = None;
                continue;
            }
            Some(Some(msg)) => {
                let info = serde_json::from_slice::<AgentInfo>(&msg.payload);
                if info.is_ok_and(|i| i.status == AgentStatus::Lost) {
                    told_lost.notify_one();
                }
                continue;
            }
        }
        let beat = Heartbeat {
            agent_id: agent.clone(),
            at_ms: common::now_ms(),
            running: running.load(Ordering::Relaxed),
        };
        if let Ok(body) = serde_json::to_vec(&beat) {
            let sent = nats
                .publish_with_reply(subject.clone(), inbox.clone(), body.into())
                .await;
            if let Err(e) = sent {
                tracing::debug!(error = %e, "heartbeat not sent");
            }
        }
    }
}
