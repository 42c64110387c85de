//! One attempt on the agent: claimed against a second delivery, its handler
//! run (with `started` reported once it runs past the start grace), its final
//! report stored, then its assignment acknowledged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{AgentReport, Assignment, ReportKind};
use common::nats as bus;
use common::{subject, AgentId, Error, FlowId, TaskId};
use serde_json::Value;
use tracing::Instrument;

use super::TaskFailure;

/// One attempt of one task.
pub(super) type AttemptKey = (FlowId, TaskId, u32);

/// Attempts being worked on, with their handler task once it runs (so a
/// cancel notice can abort it). An attempt is claimed here before anything
/// else happens, so a second delivery of it meanwhile is left alone.
pub(super) type InFlight = Arc<Mutex<HashMap<AttemptKey, Slot>>>;

/// Where a claimed attempt is.
pub(super) enum Slot {
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
pub(super) struct Finished {
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
    pub(super) grace: Duration,
}

pub(super) async fn work<H, Fut>(
    js: &jetstream::Context,
    me: &AgentId,
    msg: jetstream::Message,
    handler: H,
    Attempt {
        in_flight,
        finished,
        grace,
    }: Attempt<'_>,
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
    let grace = start_grace(grace, &assignment, common::now_ms());
    if grace.is_zero() && report(js, &assignment, ReportKind::Started).await.is_err() {
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
    let Some(mut task) = task else {
        let _ = msg.ack_with(jetstream::AckKind::Term).await;
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
                if let Err(e) = report(js, &assignment, ReportKind::Started).await {
                    // The final report is tried again as long; if it too is
                    // not stored, the assignment is redelivered.
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
