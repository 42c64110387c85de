//! The flow state machine: readiness, assignment, leases, retries, reports,
//! pause / resume / cancel.
//!
//! Pure and deterministic: no IO, no clock, no random ids. Time and ids come in as
//! arguments and every decision comes out as [`Effect`]s for the adapter to carry
//! out *after* the new state has been stored with a compare-and-set. Because the
//! adapter re-runs a step from fresh state whenever it loses a CAS race, every
//! method here must be safe to call on any stored revision.
//!
//! Task transitions (each one is an event):
//!
//! ```text
//! blocked ─deps succeeded─▶ ready ─assign─▶ assigned ─started─▶ running ─completed─▶ succeeded
//!                            ▲ ▲                │                  │
//!                            │ └─publish failed─┘                  │
//!                            └──── retry after back-off ◀── failed, timed out or agent lost
//!                                   (attempts left)                │ (no attempts left)
//!                                                                  ▼
//!                                                        failed | timed_out
//! blocked/ready ─a dependency failed (continue mode) or fail-fast─▶ skipped
//! any unfinished ─cancel─▶ cancelled
//! ```

mod agents;
mod alarm;
mod change;
mod driver;
mod explain;
mod flow;
mod place;
mod placing;
mod plan;
mod report;
mod status;
mod step;
mod tasks;
mod transition;
mod validate;
mod wait;

use common::msg::{
    CancelNotice, EventKind, FailureMode, FlowState, RejectReason, TaskSpec, TaskState,
};
use common::{AgentId, AllocationId, FlowId, TaskId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use alarm::Alarm;
pub use change::Problems;
pub use driver::{assignment_ahead, Driver, Executor, Wake, REDELIVER_AFTER_MS};
pub use place::{Placement, MAX_PLACING_PER_FLOW};
pub use placing::{Gone, Owners, Placing, FREED_ALL};
pub use plan::PlanInput;
pub use status::HAND_ON_VOUCH_MS;
pub use status::STATUS_TASKS;
pub use step::{Command, GRANT_MAX_AGE_MS};
pub use tasks::{due_of, Tasks, Touched};
pub use validate::{validate, MAX_TASKS};
pub use wait::{AgentEventRef, WAIT_TIMED_OUT};

/// How long an assigned task may wait for its agent's `started` report when the
/// spec sets no `schedule_to_start_ms`.
pub const DEFAULT_SCHEDULE_TO_START_MS: u64 = 60_000;
/// Duration assumed for a task with no estimate and no observed run.
pub const DEFAULT_ESTIMATE_MS: u64 = 1_000;
/// Attempts kept in a task's history.
pub const HISTORY_KEEP: usize = 16;

/// A flow and the state of each of its tasks, as stored in KV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    pub id: FlowId,
    pub name: String,
    pub state: FlowState,
    pub created_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    #[serde(default)]
    pub max_parallelism: Option<u32>,
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Who the flow runs for (see [`FlowSpec::owner`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Problems found at creation that did not stop the flow.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<common::msg::ValidationProblem>,
    /// The trigger and agent event that started the flow, if a trigger did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<common::msg::FlowOrigin>,
    /// The W3C `traceparent` of the request that created the flow. Work with no
    /// cause of its own (a sweep's tick ending a back-off) continues this
    /// trace, so every attempt of a task stays in the flow's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
    /// Events numbered so far: the next event's number (its id is
    /// `{flow}.{n}`, see `crate::outbox`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub events: u64,
    /// Wait tasks waiting now: the adapter looks for their events only when
    /// there are some, without a pass over every task.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub waiting: u32,
    pub tasks: Tasks,
    /// Where the last look for an unfinished task stopped.
    #[serde(skip)]
    unfinished: Hint,
}

/// A task that was unfinished when last looked at: finishing a flow is asked
/// after every completion, and starting from here (tasks finish roughly in
/// dispatch order) saves a scan of every task each time. Only a hint: it
/// never takes part in comparisons.
#[derive(Debug, Clone, Default)]
struct Hint(Option<TaskId>);

impl PartialEq for Hint {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// One task's spec and run state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub spec: TaskSpec,
    pub state: TaskState,
    /// Attempts made; the current attempt when assigned or running.
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<AllocationId>,
    /// Tasks that depend on this one (derived from the specs at creation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependents: Vec<TaskId>,
    /// Upward rank in estimated milliseconds (critical-path ordering).
    #[serde(default)]
    pub rank: u64,
    /// When the task last changed state.
    #[serde(default)]
    pub since_ms: u64,
    /// In back-off: not to be dispatched before this time.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub not_before_ms: u64,
    /// When the current attempt times out unless the agent reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub output: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Failed or timed-out attempts, retried or not.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failures: u32,
    /// The last attempts, oldest first (at most [`HISTORY_KEEP`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<AttemptRecord>,
    /// Attempts that do not count against `max_attempts`: those handed back
    /// by an agent that left (not failures), and all made before a re-run
    /// (which renews the budget).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uncounted: u32,
    /// The current attempt's latest progress, 0..=1, and its message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_message: Option<String>,
    /// The replica whose step made the task ready, which is the one to
    /// place it (see [`Placing`]); none in a flow stored before replicas
    /// were told apart, or by a step that did not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readied_by: Option<u32>,
    /// The allocation id a ready task was asked for with before its grant
    /// was recorded (a new flow's first tasks, booked beside its first
    /// write): whoever places it asks with this id again, and so gets back
    /// the booking already made rather than a second one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asked: Option<AllocationId>,
    /// The allocation a succeeded task's last attempt held: its replica may
    /// hand it on to another task, and the task vouches for it until the
    /// allocator has the new holder (see [`Flow::holds`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_allocation: Option<AllocationId>,
}

/// A succeeded task's allocation, as its replica may hand it on: to a task
/// of another flow of the same owner with the same requirements and
/// priority, which then runs on it with nothing booked anew.
#[derive(Debug, Clone, PartialEq)]
pub struct HandOn {
    /// The task that held it.
    pub from: common::msg::TaskRef,
    /// Its allocation owner (see [`Flow::allocation_owner`]).
    pub owner: String,
    pub requirements: common::msg::Requirements,
    pub priority: i32,
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u32,
    #[serde(default)]
    pub agent: Option<AgentId>,
    pub outcome: String,
    #[serde(default)]
    pub assigned_ms: Option<u64>,
    #[serde(default)]
    pub started_ms: Option<u64>,
    pub ended_ms: u64,
}

/// Something the adapter must do once the new state is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Event(EventKind),
    /// Send the attempt to the agent it was placed on.
    Assign {
        task: TaskId,
        attempt: u32,
        agent: AgentId,
        allocation: AllocationId,
    },
    /// Give an allocation back to the allocator.
    Release {
        agent: AgentId,
        allocation: AllocationId,
        /// The task that succeeded with it, when it may be handed on to
        /// another task rather than given back (see [`HandOn`]).
        after: Option<TaskId>,
    },
    /// Give back the concurrency slot an attempt held.
    FreeSlot {
        key: String,
        holder: String,
    },
    /// Tell an agent to stop working on an attempt.
    Cancel {
        agent: AgentId,
        notice: CancelNotice,
    },
}

/// Why a request, report or assignment was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("flow has finished")]
    FlowFinished,
    #[error("flow is paused")]
    FlowPaused,
    #[error("no task {0} in this flow")]
    UnknownTask(TaskId),
    #[error("attempt {got} is stale, the current attempt is {current}")]
    StaleAttempt { got: u32, current: u32 },
    #[error("agent {got} does not hold the task")]
    WrongAgent { got: AgentId },
    #[error("task is {0}, not running")]
    NotActive(TaskState),
    #[error("task is {0}, not ready")]
    NotReady(TaskState),
    #[error("task is backing off until {0}")]
    NotDue(u64),
    #[error("the flow already runs its maximum of {0} tasks at once")]
    ParallelismLimit(u32),
    #[error("unknown report type")]
    UnknownReport,
    #[error("{0}")]
    ProgressOutOfRange(String),
    #[error("flow is {0}, cannot {1}")]
    WrongFlowState(FlowState, &'static str),
    /// The report was applied already: a delivery of it again (its first
    /// replica stalled past the acknowledgement wait and another took it).
    /// Acknowledged without a verdict: the agent's work counted.
    #[error("the report was applied already")]
    AlreadyApplied,
    #[error("task is {0}, not waiting for an event")]
    NotWaiting(TaskState),
    #[error("the event does not match what the task waits for")]
    NoMatch,
    /// A change that would leave the flow invalid: every problem found.
    #[error("{}", problems_text(.0))]
    Invalid(Problems),
    /// A modification made from an older revision of the flow.
    #[error("the flow is at revision {current}, not {expected}: read it again")]
    Stale { expected: u64, current: u64 },
    /// A placement granted too long ago to be used: the allocator's
    /// reconciliation may have taken it back meanwhile.
    #[error("the placement was granted {age_ms} ms ago; placing again")]
    LateGrant { age_ms: u64 },
}

fn problems_text(problems: &Problems) -> String {
    let all: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
    all.join("; ")
}

impl Rejection {
    /// The typed verdict an agent hears for a report refused with this.
    pub fn verdict(&self) -> (common::ErrorCode, RejectReason) {
        use common::ErrorCode as C;
        match self {
            Rejection::FlowFinished | Rejection::WrongFlowState(..) => {
                (C::Fenced, RejectReason::FlowFinished)
            }
            Rejection::UnknownTask(_) => (C::NotFound, RejectReason::UnknownTask),
            Rejection::StaleAttempt { .. } => (C::Fenced, RejectReason::StaleAttempt),
            Rejection::WrongAgent { .. } => (C::Fenced, RejectReason::WrongAgent),
            Rejection::NotActive(_) => (C::Fenced, RejectReason::NotRunning),
            Rejection::UnknownReport => (C::BadRequest, RejectReason::UnknownType),
            Rejection::ProgressOutOfRange(_) => (C::BadRequest, RejectReason::ProgressOutOfRange),
            Rejection::FlowPaused
            | Rejection::AlreadyApplied
            | Rejection::NotReady(_)
            | Rejection::NotWaiting(_)
            | Rejection::NoMatch
            | Rejection::NotDue(_)
            | Rejection::ParallelismLimit(_)
            | Rejection::Invalid(_)
            | Rejection::Stale { .. }
            | Rejection::LateGrant { .. } => (C::Fenced, RejectReason::Other),
        }
    }

    /// The error an operator's request refused with this is answered with.
    pub fn error(&self) -> common::Error {
        use common::ErrorCode as C;
        let message = self.to_string();
        match self {
            Rejection::UnknownTask(_) => common::Error::new(C::NotFound, message),
            Rejection::StaleAttempt { .. } | Rejection::WrongAgent { .. } => {
                common::Error::new(C::Fenced, message)
            }
            Rejection::Invalid(problems) => common::Error::new(C::ValidationFailed, message)
                .with_details(serde_json::json!({ "problems": problems })),
            Rejection::Stale { current, .. } => common::Error::new(C::Conflict, message)
                .with_details(serde_json::json!({ "current_revision": current })),
            _ => common::Error::new(C::Conflict, message),
        }
    }
}

/// The longest progress message kept with a task.
pub const MAX_PROGRESS_MESSAGE: usize = 1_024;

/// Who holds a concurrency slot: one attempt of one task (ids hold no `.`).
pub fn slot_holder(flow: &FlowId, task: &TaskId, attempt: u32) -> String {
    format!("{flow}.{task}.{attempt}")
}

/// The attempt a slot holder names, if it is one.
pub fn parse_slot_holder(holder: &str) -> Option<(FlowId, TaskId, u32)> {
    let mut parts = holder.split('.');
    let (flow, task, attempt) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    Some((
        FlowId::new(flow).ok()?,
        TaskId::new(task).ok()?,
        attempt.parse().ok()?,
    ))
}

#[cfg(test)]
mod tests;
