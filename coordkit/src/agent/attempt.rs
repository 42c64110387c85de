//! One attempt on the agent: claimed against a repeat of its assignment,
//! queued for a worker, its handler run (with `started` reported once it
//! runs past the start grace) and its final report stored.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use async_nats::jetstream;
use common::msg::{AgentReport, Assignment, ReportKind};
use common::nats as bus;
use common::{subject, Error, FlowId, TaskId};
use serde_json::Value;
use tracing::Instrument;

use super::TaskFailure;

/// One attempt of one task.
pub(super) type AttemptKey = (FlowId, TaskId, u32);

/// Attempts held, with their handler task once it runs (so a cancel notice
/// can abort it). An attempt is claimed here before anything else happens,
/// so a repeat of its assignment meanwhile is left alone.
pub(super) type InFlight = Arc<Mutex<HashMap<AttemptKey, Slot>>>;

/// Where a claimed attempt is.
pub(super) enum Slot {
    /// Delivered, waiting for a worker or being started.
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

/// How long a finished attempt is remembered: a repeat of its assignment
/// sent before its report was stored may still be on its way.
const REMEMBER_FINISHED: Duration = Duration::from_secs(600);
/// Most finished attempts remembered.
const REMEMBER_MOST: usize = 65_536;

/// Attempts this runtime has ended (reported, or taken away), oldest first.
/// The orchestrator sends an assignment again until its `started` is
/// stored, so a repeat can arrive after the attempt ended: it is not run
/// twice.
#[derive(Default)]
pub(super) struct Finished {
    keys: HashSet<AttemptKey>,
    order: VecDeque<(tokio::time::Instant, AttemptKey)>,
}

impl Finished {
    fn insert(&mut self, key: AttemptKey) {
        let now = tokio::time::Instant::now();
        if self.keys.insert(key.clone()) {
            self.order.push_back((now, key));
        }
        while let Some((at, _)) = self.order.front() {
            if self.order.len() <= REMEMBER_MOST && now.duration_since(*at) < REMEMBER_FINISHED {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
    }
}

/// How long a handler may run before its `started` report is sent, by
/// default. A task done sooner reports only its end (the protocol allows it).
pub const START_GRACE: Duration = Duration::from_millis(20);

/// `grace`, or less when the attempt's `start_by_ms` is near: a `started`
/// report must be stored by then (a second's margin).
fn start_grace(grace: Duration, a: &Assignment, now: u64) -> Duration {
    let left = a.lease.start_by_ms.saturating_sub(now).saturating_sub(1000);
    grace.min(Duration::from_millis(left))
}

/// What a worker shares with the others, and the agent's start grace.
pub(super) struct Attempt<'a> {
    pub(super) in_flight: &'a InFlight,
    pub(super) finished: &'a Mutex<Finished>,
    pub(super) workers: &'a Arc<tokio::sync::Semaphore>,
    pub(super) grace: Duration,
}

/// Claims `key` unless it is held or ended already (a repeat).
pub(super) fn claim(in_flight: &InFlight, finished: &Mutex<Finished>, key: &AttemptKey) -> bool {
    if finished.lock().is_ok_and(|f| f.keys.contains(key)) {
        return false;
    }
    in_flight.lock().is_ok_and(|mut m| {
        if m.contains_key(key) {
            return false;
        }
        m.insert(key.clone(), Slot::Claimed);
        true
    })
}

/// Runs a claimed attempt once a worker is free.
pub(super) async fn work<H, Fut>(
    reporter: &Reporter,
    assignment: Assignment,
    handler: H,
    Attempt {
        in_flight,
        finished,
        workers,
        grace,
    }: Attempt<'_>,
) where
    H: Fn(Assignment) -> Fut,
    Fut: Future<Output = Result<Value, TaskFailure>> + Send + 'static,
{
    let key = (
        assignment.flow_id.clone(),
        assignment.task_id.clone(),
        assignment.attempt,
    );
    // Released when this function returns, after the attempt is in `finished`.
    let _claim = Claim(in_flight, key.clone());
    let Ok(_worker) = workers.clone().acquire_owned().await else {
        return;
    };
    let grace = start_grace(grace, &assignment, common::now_ms());
    // Not stored: the orchestrator sends the assignment again, and it runs then.
    if grace.is_zero()
        && reporter
            .send(&assignment, ReportKind::Started)
            .await
            .is_err()
    {
        return;
    }
    let current = Arc::new((reporter.clone(), assignment.clone()));
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
    let Some(mut task) = task else {
        if let Ok(mut f) = finished.lock() {
            f.insert(key);
        }
        return;
    };
    // A handler done within the grace sends no `started`: its final report
    // implies it, which saves a stored report and a flow write per short task.
    let result = if grace.is_zero() {
        task.await
    } else {
        match tokio::time::timeout(grace, &mut task).await {
            Ok(result) => result,
            Err(_) => {
                if let Err(e) = reporter.send(&assignment, ReportKind::Started).await {
                    // The final report is tried again as long; if it too is
                    // not stored, the assignment is sent again.
                    tracing::warn!(error = %e, "started report not stored, working on");
                }
                task.await
            }
        }
    };
    let outcome = match result {
        Ok(Ok(output)) => ReportKind::Completed { output },
        Ok(Err(f)) => ReportKind::Failed {
            error: f.error,
            retryable: f.retryable,
        },
        Err(e) if e.is_cancelled() => {
            // The orchestrator no longer wants this attempt; a report would be rejected.
            if let Ok(mut f) = finished.lock() {
                f.insert(key);
            }
            return;
        }
        Err(e) => ReportKind::Failed {
            error: format!("handler panicked: {e}"),
            retryable: true,
        },
    };
    match reporter.send(&assignment, outcome).await {
        Ok(()) => {
            if let Ok(mut f) = finished.lock() {
                f.insert(key);
            }
        }
        // The attempt times out under its lease and runs again.
        Err(e) => tracing::warn!(error = %e, "final report not stored"),
    }
}

tokio::task_local! {
    /// The attempt the running handler works on, for [`progress`].
    static ATTEMPT: Arc<(Reporter, Assignment)>;
}

/// Reports progress on the attempt the calling handler works on: renews its
/// lease (send one at least every `lease.heartbeat_ms`) and shows `fraction`
/// (0..=1) and `message` with the task's status. Outside a handler it is
/// `bad_request`.
pub async fn progress(fraction: Option<f64>, message: Option<String>) -> Result<(), Error> {
    let current = ATTEMPT
        .try_with(Arc::clone)
        .map_err(|_| Error::bad_request("progress is reported from inside a task handler"))?;
    let (reporter, assignment) = &*current;
    reporter
        .send(
            assignment,
            ReportKind::Progress {
                progress: fraction,
                message,
            },
        )
        .await
}

/// How long a report is retried before the runtime gives up on it: longer
/// than a server restart, shorter than the stream's duplicate window (two
/// minutes), so a retried report is still recognised as a duplicate.
pub const DELIVERY_DEADLINE: Duration = Duration::from_secs(60);

/// Publishes a report and waits for JetStream to store it, retrying for up to
/// [`DELIVERY_DEADLINE`] (a NATS restart must not cost a finished task). The
/// message id makes a retried publish land once. (The runtime's own reports
/// go through a [`Reporter`], which sends several in one message under load.)
pub async fn report(
    js: &jetstream::Context,
    a: &Assignment,
    kind: ReportKind,
) -> Result<(), Error> {
    let (body, msg_id) = encode(a, kind)?;
    let to = subject::report(&a.agent_id);
    let headers = bus::dedupe_headers(&to, &msg_id);
    store(js, &to, headers, body).await
}

/// A report's body and its `Nats-Msg-Id`: each progress report is new;
/// every other kind is sent once per attempt.
fn encode(a: &Assignment, kind: ReportKind) -> Result<(Vec<u8>, String), Error> {
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
    Ok((body, msg_id))
}

/// Publishes `body` to `to` and waits for JetStream to store it, retrying
/// with the same headers (so the same message id) until [`DELIVERY_DEADLINE`].
async fn store(
    js: &jetstream::Context,
    to: &str,
    headers: async_nats::HeaderMap,
    body: Vec<u8>,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + DELIVERY_DEADLINE;
    let mut pause = Duration::from_millis(100);
    let body = bytes::Bytes::from(body);
    loop {
        let sent = js
            .publish_with_headers(to.to_owned(), headers.clone(), body.clone())
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

/// The agent's reports on their way to the reports stream. One message is
/// being stored at a time; the reports that come meanwhile go together in
/// the next one, as an array. An agent ending many short tasks thus costs the
/// stream a stored message per store rather than per report, and one ending
/// a task at a time waits for nothing more than its own.
#[derive(Clone)]
pub(super) struct Reporter {
    queue: mpsc::UnboundedSender<Queued>,
    to: Arc<str>,
}

/// A report waiting to be sent, with the headers made in its attempt's span
/// (its message id and trace), and who waits for it to be stored.
struct Queued {
    body: Vec<u8>,
    headers: async_nats::HeaderMap,
    stored: oneshot::Sender<Result<(), Error>>,
}

/// Bytes of reports put in one message at most: well under the server's
/// default largest message (1 MiB). A larger report goes alone.
const ARRAY_BYTES: usize = 256 * 1024;

impl Reporter {
    /// Starts sending `agent`'s reports; it stops once every handle is gone.
    pub(super) fn start(js: jetstream::Context, agent: &common::AgentId) -> Reporter {
        let (queue, waiting) = mpsc::unbounded_channel();
        let to: Arc<str> = subject::report(agent).into();
        tokio::spawn(send_all(js, to.clone(), agent.to_string(), waiting));
        Reporter { queue, to }
    }

    /// Reports `kind` on attempt `a` once it is stored (see [`report`]).
    pub(super) async fn send(&self, a: &Assignment, kind: ReportKind) -> Result<(), Error> {
        let (body, msg_id) = encode(a, kind)?;
        let headers = bus::dedupe_headers(&self.to, &msg_id);
        let (stored, done) = oneshot::channel();
        let gone = || Error::unavailable("report not stored", "the agent's reporter stopped");
        self.queue
            .send(Queued {
                body,
                headers,
                stored,
            })
            .map_err(|_| gone())?;
        done.await.unwrap_or_else(|_| Err(gone()))
    }
}

/// Sends what is queued, one message at a time: alone as it was made, or
/// several as an array under an id of their own, in the first one's trace.
async fn send_all(
    js: jetstream::Context,
    to: Arc<str>,
    agent: String,
    mut waiting: mpsc::UnboundedReceiver<Queued>,
) {
    let mut next = None;
    loop {
        let first = match next.take() {
            Some(q) => q,
            None => match waiting.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut bytes = first.body.len();
        let mut batch = vec![first];
        while batch.len() < common::msg::MAX_REPORTS_PER_MESSAGE {
            match waiting.try_recv() {
                Ok(q) if bytes + q.body.len() < ARRAY_BYTES => {
                    bytes += q.body.len() + 1;
                    batch.push(q);
                }
                Ok(q) => {
                    next = Some(q);
                    break;
                }
                Err(_) => break,
            }
        }
        let stored = match batch.as_mut_slice() {
            [one] => {
                let headers = std::mem::take(&mut one.headers);
                store(&js, &to, headers, std::mem::take(&mut one.body)).await
            }
            many => {
                let mut body = Vec::with_capacity(bytes + 2);
                body.push(b'[');
                for (i, q) in many.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(&q.body);
                }
                body.push(b']');
                let msg_id = format!("{agent}.reports.{}", uuid::Uuid::now_v7().simple());
                let mut headers = std::mem::take(&mut many[0].headers);
                headers.insert("Nats-Msg-Id", msg_id.as_str());
                store(&js, &to, headers, body).await
            }
        };
        for q in batch {
            let _ = q.stored.send(stored.clone());
        }
    }
}
