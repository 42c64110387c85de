//! The agent runtime: everything an agent process does besides its actual work.
//!
//! It registers with the allocator (retrying until one answers), heartbeats in
//! the background, takes assignments from its durable JetStream subject, runs
//! the handler with bounded concurrency, and reports `started` then `completed`
//! or `failed` with the attempt number so the orchestrator can fence stale
//! attempts. An assignment is acked only after its final report is stored, so a
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

mod events;
mod pull;
mod sync;
pub use events::publish_event;
pub use sync::SyncFollower;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use common::msg::{AgentReport, Assignment, CancelNotice, Heartbeat, RegisterAgent, ReportKind};
use common::nats::{self as bus, Stream};
use common::{subject, telemetry, AgentId, Client, Error, ErrorCode, FlowId, TaskId};
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
        tokio::spawn(
            async move {
                running.fetch_add(1, Ordering::Relaxed);
                work(&js, &me, msg, handler, &in_flight, &finished).await;
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

/// One attempt of one task.
type AttemptKey = (FlowId, TaskId, u32);

/// Attempts being worked on, with their handler task once it runs (so a
/// cancel notice can abort it). An attempt is claimed here before anything
/// else happens, so a second delivery of it meanwhile is left alone.
type InFlight = Arc<Mutex<HashMap<AttemptKey, Slot>>>;

/// Where a claimed attempt is.
enum Slot {
    /// Delivered and being started.
    Claimed,
    /// A cancel notice came before its handler started: it never will.
    Cancelled,
    /// Its handler runs.
    Running(tokio::task::AbortHandle),
}

/// An attempt's place in [`InFlight`], given up on drop.
struct Claim<'a>(&'a InFlight, AttemptKey);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(&self.1);
        }
    }
}

/// How many finished attempts the runtime remembers.
const REMEMBER_FINISHED: usize = 4096;

/// Attempts this runtime has run and reported, oldest first. The server may
/// deliver an assignment again after its ack (a consumer's acks reach disk
/// after the fact, so a server killed just after one forgets it); the attempt
/// is then acknowledged again instead of run twice.
#[derive(Default)]
struct Finished {
    keys: HashSet<AttemptKey>,
    order: VecDeque<AttemptKey>,
}

impl Finished {
    fn insert(&mut self, key: AttemptKey) {
        if self.keys.insert(key.clone()) {
            self.order.push_back(key);
        }
        while self.order.len() > REMEMBER_FINISHED {
            if let Some(old) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
    }
}

async fn work<H, Fut>(
    js: &jetstream::Context,
    me: &AgentId,
    msg: jetstream::Message,
    handler: H,
    in_flight: &InFlight,
    finished: &Mutex<Finished>,
) where
    H: Fn(Assignment) -> Fut,
    Fut: Future<Output = Result<Value, TaskFailure>> + Send + 'static,
{
    let assignment: Assignment = match serde_json::from_slice(&msg.payload) {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "unreadable assignment dropped");
            let _ = msg.ack_with(jetstream::AckKind::Term).await;
            return;
        }
    };
    if &assignment.agent_id != me {
        tracing::warn!(to = %assignment.agent_id, "assignment for another agent dropped");
        let _ = msg.ack_with(jetstream::AckKind::Term).await;
        return;
    }
    let key = (
        assignment.flow_id.clone(),
        assignment.task_id.clone(),
        assignment.attempt,
    );
    if finished.lock().is_ok_and(|f| f.keys.contains(&key)) {
        tracing::debug!(flow = %key.0, task = %key.1, attempt = key.2, "finished attempt delivered again, acknowledged");
        ack(&msg).await;
        return;
    }
    let claimed = in_flight.lock().is_ok_and(|mut m| {
        if m.contains_key(&key) {
            return false;
        }
        m.insert(key.clone(), Slot::Claimed);
        true
    });
    if !claimed {
        // Being worked on already: that delivery is acknowledged when it ends.
        return;
    }
    // Released when this function returns, after the attempt is in `finished`.
    let _claim = Claim(in_flight, key.clone());
    if report(js, &assignment, ReportKind::Started).await.is_err() {
        let _ = msg
            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
            .await;
        return;
    }
    let current = Arc::new((js.clone(), assignment.clone()));
    // Started under the lock, so a cancel notice either finds the claim (and
    // the handler never starts) or finds it running (and aborts it).
    let task = in_flight.lock().ok().and_then(|mut m| {
        if matches!(m.get(&key), Some(Slot::Cancelled)) {
            return None;
        }
        let task = tokio::spawn(
            ATTEMPT
                .scope(current, handler(assignment.clone()))
                .in_current_span(),
        );
        m.insert(key.clone(), Slot::Running(task.abort_handle()));
        Some(task)
    });
    let Some(task) = task else {
        let _ = msg.ack_with(jetstream::AckKind::Term).await;
        return;
    };
    let result = task.await;
    let outcome = match result {
        Ok(Ok(output)) => ReportKind::Completed { output },
        Ok(Err(f)) => ReportKind::Failed {
            error: f.error,
            retryable: f.retryable,
        },
        Err(e) if e.is_cancelled() => {
            // The orchestrator no longer wants this attempt; a report would be rejected.
            let _ = msg.ack_with(jetstream::AckKind::Term).await;
            return;
        }
        Err(e) => ReportKind::Failed {
            error: format!("handler panicked: {e}"),
            retryable: true,
        },
    };
    match report(js, &assignment, outcome).await {
        Ok(()) => {
            if let Ok(mut f) = finished.lock() {
                f.insert(key);
            }
            ack(&msg).await
        }
        Err(e) => {
            tracing::warn!(error = %e, "final report not stored; the assignment will be redelivered");
            let _ = msg
                .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                .await;
        }
    }
}

tokio::task_local! {
    /// The attempt the running handler works on, for [`progress`].
    static ATTEMPT: Arc<(jetstream::Context, Assignment)>;
}

/// Reports progress on the attempt the calling handler works on: renews its
/// lease (send one at least every `lease.heartbeat_ms`) and shows `fraction`
/// (0..=1) and `message` with the task's status. Outside a handler it is
/// `bad_request`.
pub async fn progress(fraction: Option<f64>, message: Option<String>) -> Result<(), Error> {
    let current = ATTEMPT
        .try_with(Arc::clone)
        .map_err(|_| Error::bad_request("progress is reported from inside a task handler"))?;
    let (js, assignment) = &*current;
    report(
        js,
        assignment,
        ReportKind::Progress {
            progress: fraction,
            message,
        },
    )
    .await
}

/// How long a report or an ack is retried before the runtime gives up on it:
/// longer than a server restart, shorter than the stream's duplicate window
/// (two minutes), so a retried report is still recognised as a duplicate.
pub const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);

/// Acknowledges an assignment and waits for the server to confirm it, retrying
/// through an outage: a lost ack would bring the assignment back after the ack
/// wait (minutes) and run the task a second time.
async fn ack(msg: &jetstream::Message) {
    let deadline = tokio::time::Instant::now() + DELIVERY_DEADLINE;
    let mut pause = Duration::from_millis(100);
    loop {
        match msg.double_ack().await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() + pause < deadline => {
                tracing::debug!(error = %e, "ack not confirmed, retrying");
            }
            Err(e) => {
                tracing::warn!(error = %e, "ack not confirmed; the assignment will come back");
                return;
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// Publishes a report and waits for JetStream to store it, retrying for up to
/// [`DELIVERY_DEADLINE`] (a NATS restart must not cost a finished task). The
/// message id makes a retried publish land once.
pub async fn report(
    js: &jetstream::Context,
    a: &Assignment,
    kind: ReportKind,
) -> Result<(), Error> {
    let tag = kind.type_name();
    let body = AgentReport {
        flow_id: a.flow_id.clone(),
        task_id: a.task_id.clone(),
        attempt: a.attempt,
        agent_id: a.agent_id.clone(),
        kind,
        at_ms: common::now_ms(),
    };
    let body = serde_json::to_vec(&body).map_err(|e| Error::internal_from("encode report", e))?;
    // Each progress report is new; every other kind is sent once per attempt.
    let msg_id = if tag == "progress" {
        format!(
            "{}.{}.{}.{tag}.{}",
            a.flow_id,
            a.task_id,
            a.attempt,
            uuid::Uuid::now_v7().simple()
        )
    } else {
        format!("{}.{}.{}.{tag}", a.flow_id, a.task_id, a.attempt)
    };
    let deadline = tokio::time::Instant::now() + DELIVERY_DEADLINE;
    let mut pause = Duration::from_millis(100);
    let to = subject::report(&a.agent_id);
    let headers = bus::dedupe_headers(&to, &msg_id);
    loop {
        let sent = js
            .publish_with_headers(to.clone(), headers.clone(), body.clone().into())
            .await;
        let failure: common::error::BoxError = match sent {
            Ok(ack) => match ack.await {
                Ok(_) => return Ok(()),
                Err(e) => e.into(),
            },
            Err(e) => e.into(),
        };
        if tokio::time::Instant::now() + pause >= deadline {
            return Err(Error::unavailable("report not stored", failure));
        }
        tracing::debug!(error = %failure, "report not stored yet, retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
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
