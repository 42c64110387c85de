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
mod change;
mod explain;
mod place;
mod placing;
mod plan;
mod status;
mod step;
mod tasks;
mod validate;
mod wait;

use std::collections::{BTreeSet, HashMap};

use common::msg::{
    AgentReport, CancelCode, CancelNotice, EventKind, FailureKind, FailureMode, FlowSpec,
    FlowState, RejectReason, ReportKind, TaskSpec, TaskState,
};
use common::{AgentId, AllocationId, FlowId, TaskId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use change::Problems;
pub use place::{Placement, MAX_PLACING_PER_FLOW};
pub use placing::Placing;
pub use plan::PlanInput;
pub use status::STATUS_TASKS;
pub use step::{Command, GRANT_MAX_AGE_MS};
pub use tasks::{Tasks, Touched};
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
    /// Events numbered so far: the next event's number (see [`Staged`]).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub events: u64,
    /// Wait tasks waiting now: the adapter looks for their events only when
    /// there are some, without a pass over every task.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub waiting: u32,
    pub tasks: Tasks,
    /// How the tasks are spread over KV entries; `None` while they fit in the
    /// flow's own entry. Kept by the store, never read by the state machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<Pages>,
    /// Events committed with a step and not yet known to be in the events
    /// stream, kept and read by the adapter alone (`crate::outbox`). Always
    /// the last field, even when empty: the store tells a step that changed
    /// only the outbox by the encoding before it.
    #[serde(default)]
    pub outbox: Vec<Staged>,
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

/// A large flow's tasks live in `count` page entries beside the flow's entry
/// (its header). Every write stamps the pages it changes with a new `step`
/// and records it here, so a reader can tell a page written after the header
/// it read (a torn read) and read again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pages {
    pub count: u32,
    /// The step of the header's last write.
    pub step: u64,
    /// The step each page was last written at.
    pub steps: Vec<u64>,
    /// Page `i + 1` holds the ids from `bounds[i]` up to the next bound.
    #[serde(default)]
    pub bounds: Vec<TaskId>,
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

impl Flow {
    /// A flow `f` of `n` independent tasks `t0`…, for tests.
    #[cfg(test)]
    pub(crate) fn independent(n: usize) -> Flow {
        let tasks = (0..n)
            .map(|i| TaskSpec::new(TaskId::new(format!("t{i}")).expect("valid id")))
            .collect();
        Flow::new(
            FlowId::new("f").expect("valid id"),
            FlowSpec::new("f", tasks),
            1,
        )
        .0
    }

    /// [`Flow::assign`] with the new attempt's number taken out of its
    /// [`Effect::Assign`], for tests.
    #[cfg(test)]
    pub(crate) fn assign_attempt(
        &mut self,
        task: &TaskId,
        agent: &AgentId,
        allocation: &AllocationId,
        now_ms: u64,
    ) -> Result<(u32, Vec<Effect>), Rejection> {
        let effects = self.assign(task, agent, allocation, now_ms)?;
        let attempt = effects
            .iter()
            .find_map(|e| match e {
                Effect::Assign { attempt, .. } => Some(*attempt),
                _ => None,
            })
            .expect("an assignment is sent");
        Ok((attempt, effects))
    }

    /// A new flow from a validated spec. Tasks without dependencies become ready
    /// at once.
    pub fn new(id: FlowId, spec: FlowSpec, now_ms: u64) -> (Flow, Vec<Effect>) {
        let ranks = validate::upward_ranks(&spec, |t: &TaskSpec| {
            t.estimated_duration_ms.unwrap_or(DEFAULT_ESTIMATE_MS)
        });
        let mut dependents: HashMap<TaskId, Vec<TaskId>> = HashMap::new();
        for t in &spec.tasks {
            for d in &t.depends_on {
                dependents.entry(d.clone()).or_default().push(t.id.clone());
            }
        }
        let tasks = spec
            .tasks
            .into_iter()
            .map(|spec| {
                let task = Task {
                    state: TaskState::Blocked,
                    attempt: 0,
                    agent: None,
                    allocation: None,
                    dependents: dependents.remove(&spec.id).unwrap_or_default(),
                    rank: ranks.get(&spec.id).copied().unwrap_or(DEFAULT_ESTIMATE_MS),
                    since_ms: now_ms,
                    not_before_ms: 0,
                    deadline_ms: None,
                    assigned_ms: None,
                    started_ms: None,
                    output: Value::Null,
                    error: None,
                    failures: 0,
                    history: Vec::new(),
                    uncounted: 0,
                    progress: None,
                    progress_message: None,
                    spec,
                };
                (task.spec.id.clone(), task)
            })
            .collect::<Tasks>();
        let mut flow = Flow {
            id: id.clone(),
            name: spec.name,
            state: FlowState::Running,
            created_at_ms: now_ms,
            finished_at_ms: None,
            max_parallelism: spec.max_parallelism,
            failure_mode: spec.failure_mode,
            owner: spec.owner,
            warnings: Vec::new(),
            started_by: None,
            trace: None,
            events: 0,
            waiting: 0,
            tasks,
            pages: None,
            outbox: Vec::new(),
            unfinished: Hint::default(),
        };
        let mut effects = vec![Effect::Event(EventKind::FlowCreated {
            flow_id: id,
            name: flow.name.clone(),
            tasks: flow.tasks.len(),
        })];
        let roots: Vec<TaskId> = flow
            .tasks
            .values()
            .filter(|t| t.spec.depends_on.is_empty())
            .map(|t| t.spec.id.clone())
            .collect();
        for t in roots {
            flow.transition(&t, TaskState::Ready, now_ms, None, &mut effects);
        }
        (flow, effects)
    }

    /// Tasks assigned or running now.
    pub fn active(&self) -> usize {
        self.tasks.values().filter(|t| t.state.is_active()).count()
    }

    /// How many more tasks may be started, `in_flight` being placed already:
    /// the flow's parallelism budget, the one place it is computed.
    pub fn room(&self, in_flight: usize) -> usize {
        match self.max_parallelism {
            // Counting active tasks is a scan of the flow: only when it matters.
            Some(max) => (max as usize).saturating_sub(self.active() + in_flight),
            None => usize::MAX,
        }
    }

    /// Ready tasks in dispatch order: priority, then critical path (upward rank), then id.
    pub fn ready_in_order(&self) -> Vec<TaskId> {
        let ready = self.tasks.ready_in_order();
        ready.iter().map(|(_, id)| id.clone()).collect()
    }

    /// The ready tasks to place now, in order, within the parallelism budget:
    /// none while the flow is paused or finished, none still backing off.
    pub fn dispatchable(&self, now_ms: u64) -> Vec<TaskId> {
        self.dispatchable_up_to(now_ms, usize::MAX)
    }

    /// The first `limit` of [`Flow::dispatchable`], read off the ready tasks
    /// kept in order: a wide flow has far more ready tasks than can be
    /// placed at once, and finding them must not be a pass over every task.
    pub fn dispatchable_up_to(&self, now_ms: u64, limit: usize) -> Vec<TaskId> {
        if self.state != FlowState::Running {
            return Vec::new();
        }
        let budget = self.room(0).min(limit);
        if budget == 0 {
            return Vec::new();
        }
        let mut due = Vec::new();
        self.visit_dispatchable(now_ms, |t| {
            due.push(t.spec.id.clone());
            due.len() < budget
        });
        due
    }

    /// Hands the ready tasks due at `now_ms` to `visit`, in dispatch order,
    /// until it returns `false`; the parallelism budget is the caller's. The
    /// order stays locked meanwhile: `visit` must not ask for it again.
    pub fn visit_dispatchable<'a>(&'a self, now_ms: u64, mut visit: impl FnMut(&'a Task) -> bool) {
        if self.state != FlowState::Running {
            return;
        }
        let ready = self.tasks.ready_in_order();
        for (_, id) in ready.iter() {
            let Some(t) = self.tasks.get(id).filter(|t| t.not_before_ms <= now_ms) else {
                continue;
            };
            if !visit(t) {
                return;
            }
        }
    }

    /// The earliest time something is due: a back-off ending or a deadline passing.
    pub fn next_wakeup(&self) -> Option<u64> {
        if self.state.is_terminal() {
            return None;
        }
        self.tasks
            .values()
            .filter_map(|t| match t.state {
                TaskState::Ready if t.not_before_ms > 0 => Some(t.not_before_ms),
                TaskState::Assigned | TaskState::Running | TaskState::Waiting => t.deadline_ms,
                _ => None,
            })
            .min()
    }

    /// Records that `task` was placed on `agent`; the new attempt goes out
    /// as an [`Effect::Assign`].
    pub fn assign(
        &mut self,
        task: &TaskId,
        agent: &AgentId,
        allocation: &AllocationId,
        now_ms: u64,
    ) -> Result<Vec<Effect>, Rejection> {
        match self.state {
            FlowState::Running => {}
            FlowState::Paused => return Err(Rejection::FlowPaused),
            _ => return Err(Rejection::FlowFinished),
        }
        let full = self.room(0) == 0;
        let t = self
            .tasks
            .get_mut(task)
            .ok_or_else(|| Rejection::UnknownTask(task.clone()))?;
        if t.state != TaskState::Ready {
            return Err(Rejection::NotReady(t.state));
        }
        if t.not_before_ms > now_ms {
            return Err(Rejection::NotDue(t.not_before_ms));
        }
        if let (Some(max), true) = (self.max_parallelism, full) {
            return Err(Rejection::ParallelismLimit(max));
        }
        t.attempt += 1;
        t.agent = Some(agent.clone());
        t.allocation = Some(allocation.clone());
        t.assigned_ms = Some(now_ms);
        t.started_ms = None;
        t.progress = None;
        t.progress_message = None;
        t.deadline_ms = Some(
            now_ms.saturating_add(
                t.spec
                    .timeouts
                    .schedule_to_start_ms
                    .unwrap_or(DEFAULT_SCHEDULE_TO_START_MS),
            ),
        );
        let attempt = t.attempt;
        let mut effects = Vec::new();
        self.transition(task, TaskState::Assigned, now_ms, None, &mut effects);
        effects.push(Effect::Assign {
            task: task.clone(),
            attempt,
            agent: agent.clone(),
            allocation: allocation.clone(),
        });
        Ok(effects)
    }

    /// Undoes an assignment whose message could not be sent: the task is ready
    /// again and its allocation goes back. The attempt number stays used, so a
    /// message that did get through after all is fenced off.
    pub fn unassign(
        &mut self,
        task: &TaskId,
        attempt: u32,
        now_ms: u64,
    ) -> Result<Vec<Effect>, Rejection> {
        let t = self
            .tasks
            .get_mut(task)
            .ok_or_else(|| Rejection::UnknownTask(task.clone()))?;
        if t.attempt != attempt {
            return Err(Rejection::StaleAttempt {
                got: attempt,
                current: t.attempt,
            });
        }
        if t.state != TaskState::Assigned {
            return Err(Rejection::NotActive(t.state));
        }
        let mut effects = Vec::new();
        if let (Some(agent), Some(allocation)) = (t.agent.take(), t.allocation.take()) {
            effects.push(Effect::Release { agent, allocation });
        }
        if let Some(c) = &t.spec.concurrency {
            effects.push(Effect::FreeSlot {
                key: c.key.clone(),
                holder: slot_holder(&self.id, task, attempt),
            });
        }
        t.deadline_ms = None;
        self.transition(
            task,
            TaskState::Ready,
            now_ms,
            Some("assignment not delivered".into()),
            &mut effects,
        );
        Ok(effects)
    }

    /// Applies an agent's report. Fencing: only the current attempt, from the
    /// agent that holds it, while it is assigned or running, is accepted.
    pub fn report(&mut self, report: &AgentReport, now_ms: u64) -> Result<Vec<Effect>, Rejection> {
        let t = self
            .tasks
            .get(&report.task_id)
            .ok_or_else(|| Rejection::UnknownTask(report.task_id.clone()))?;
        if report.attempt != t.attempt {
            return Err(Rejection::StaleAttempt {
                got: report.attempt,
                current: t.attempt,
            });
        }
        if t.agent.as_ref() != Some(&report.agent_id) {
            return Err(Rejection::WrongAgent {
                got: report.agent_id.clone(),
            });
        }
        // Only a completion of this attempt by this agent reaches `succeeded`,
        // so anything but a failure arriving then is a report seen again.
        if t.state == TaskState::Succeeded && !matches!(report.kind, ReportKind::Failed { .. }) {
            return Err(Rejection::AlreadyApplied);
        }
        if self.state.is_terminal() {
            return Err(Rejection::FlowFinished);
        }
        let state = t.state;
        if !state.is_active() {
            return Err(Rejection::NotActive(state));
        }
        if let ReportKind::Progress { progress, message } = &report.kind {
            if let Some(p) = progress {
                if !p.is_finite() || !(0.0..=1.0).contains(p) {
                    return Err(Rejection::ProgressOutOfRange(format!(
                        "progress {p} is outside 0..=1"
                    )));
                }
            }
            if message
                .as_ref()
                .is_some_and(|m| m.len() > MAX_PROGRESS_MESSAGE)
            {
                return Err(Rejection::ProgressOutOfRange(format!(
                    "progress message is over {MAX_PROGRESS_MESSAGE} bytes"
                )));
            }
        }
        let id = report.task_id.clone();
        let mut effects = Vec::new();
        match &report.kind {
            ReportKind::Started | ReportKind::Progress { .. } => {
                if let (ReportKind::Progress { progress, message }, Some(t)) =
                    (&report.kind, self.tasks.get_mut(&id))
                {
                    if progress.is_some() {
                        t.progress = *progress;
                    }
                    if message.is_some() {
                        t.progress_message = message.clone();
                    }
                }
                if state == TaskState::Assigned {
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.started_ms = Some(now_ms);
                    }
                    self.transition(&id, TaskState::Running, now_ms, None, &mut effects);
                }
                // Every report from the holder renews its lease.
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.deadline_ms = running_deadline(t, now_ms);
                }
            }
            ReportKind::Completed { output } => {
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.output = output.clone();
                    t.error = None;
                }
                self.succeed(&id, now_ms, &mut effects);
            }
            ReportKind::Failed { error, retryable } => {
                self.fail_attempt(
                    &id,
                    FailureKind::Error,
                    *retryable,
                    error,
                    None,
                    now_ms,
                    &mut effects,
                );
            }
            ReportKind::Unknown => return Err(Rejection::UnknownReport),
        }
        Ok(effects)
    }

    /// Expires attempts whose deadline has passed and makes blocked tasks whose
    /// dependencies all succeeded ready (a repair for steps lost to a crash).
    /// Derived from stored deadlines only, so a restarted orchestrator picks up
    /// every timer where it was.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.state.is_terminal() {
            return effects;
        }
        // One pass: on a flow of a million tasks each costs tens of ms.
        let mut expired: Vec<(TaskId, TaskState)> = Vec::new();
        let mut unblocked: Vec<TaskId> = Vec::new();
        let mut waited_out: Vec<TaskId> = Vec::new();
        for t in self.tasks.values() {
            if t.state == TaskState::Waiting && t.deadline_ms.is_some_and(|d| d < now_ms) {
                waited_out.push(t.spec.id.clone());
            } else if t.state.is_active() && t.deadline_ms.is_some_and(|d| d <= now_ms) {
                expired.push((t.spec.id.clone(), t.state));
            } else if t.state == TaskState::Blocked && self.deps_succeeded(t) {
                unblocked.push(t.spec.id.clone());
            }
        }
        for (id, state) in expired {
            let what = match self.tasks.get(&id) {
                _ if state == TaskState::Assigned => {
                    "schedule_to_start: no `started` report in time"
                }
                Some(t)
                    if t.spec.timeouts.start_to_close_ms.is_some_and(|d| {
                        t.started_ms.unwrap_or(now_ms).saturating_add(d) <= now_ms
                    }) =>
                {
                    "start_to_close: not finished in time"
                }
                _ => "heartbeat: no `progress` report in time",
            };
            self.fail_attempt(
                &id,
                FailureKind::Timeout,
                true,
                what,
                Some(CancelCode::TimedOut),
                now_ms,
                &mut effects,
            );
        }
        for id in waited_out {
            self.wait_timed_out(&id, now_ms, &mut effects);
        }
        for id in unblocked {
            // Unless an expiry above ended the flow meanwhile.
            if self.state.is_terminal()
                || self
                    .tasks
                    .get(&id)
                    .is_none_or(|t| t.state != TaskState::Blocked)
            {
                continue;
            }
            self.transition(&id, TaskState::Ready, now_ms, None, &mut effects);
        }
        self.maybe_finish(now_ms, &mut effects);
        effects
    }

    /// Stops new dispatch; running tasks finish and are recorded.
    pub fn pause(&mut self) -> Result<Vec<Effect>, Rejection> {
        match self.state {
            FlowState::Paused => Ok(Vec::new()),
            FlowState::Running => {
                self.state = FlowState::Paused;
                Ok(vec![Effect::Event(EventKind::FlowPaused {
                    flow_id: self.id.clone(),
                })])
            }
            s => Err(Rejection::WrongFlowState(s, "pause")),
        }
    }

    /// Dispatch continues.
    pub fn resume(&mut self, now_ms: u64) -> Result<Vec<Effect>, Rejection> {
        match self.state {
            FlowState::Running => Ok(Vec::new()),
            FlowState::Paused => {
                self.state = FlowState::Running;
                let mut effects = vec![Effect::Event(EventKind::FlowResumed {
                    flow_id: self.id.clone(),
                })];
                // Tasks that finished while paused may have completed the flow.
                self.maybe_finish(now_ms, &mut effects);
                Ok(effects)
            }
            s => Err(Rejection::WrongFlowState(s, "resume")),
        }
    }

    /// Ends the flow: running attempts are told to stop, every allocation goes
    /// back, every unfinished task is cancelled.
    pub fn cancel(&mut self, now_ms: u64) -> Result<Vec<Effect>, Rejection> {
        if self.state.is_terminal() {
            return Err(Rejection::WrongFlowState(self.state, "cancel"));
        }
        let mut effects = Vec::new();
        let open: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| !t.state.is_terminal())
            .map(|t| t.spec.id.clone())
            .collect();
        for id in open {
            self.stop_task(
                &id,
                TaskState::Cancelled,
                "flow cancelled",
                CancelCode::FlowCancelled,
                now_ms,
                &mut effects,
            );
        }
        self.state = FlowState::Cancelled;
        self.finished_at_ms = Some(now_ms);
        effects.push(Effect::Event(EventKind::FlowCompleted {
            flow_id: self.id.clone(),
            state: self.state,
        }));
        Ok(effects)
    }

    fn deps_succeeded(&self, t: &Task) -> bool {
        t.spec.depends_on.iter().all(|p| {
            self.tasks
                .get(p)
                .is_some_and(|pt| pt.state == TaskState::Succeeded)
        })
    }

    fn succeed(&mut self, id: &TaskId, now_ms: u64, effects: &mut Vec<Effect>) {
        self.close_attempt(id, "succeeded", now_ms, effects);
        let dependents = self
            .tasks
            .get(id)
            .map(|t| t.dependents.clone())
            .unwrap_or_default();
        self.transition(id, TaskState::Succeeded, now_ms, None, effects);
        for d in dependents {
            let ready = self
                .tasks
                .get(&d)
                .is_some_and(|dt| dt.state == TaskState::Blocked && self.deps_succeeded(dt));
            if ready {
                self.transition(&d, TaskState::Ready, now_ms, None, effects);
            }
        }
        self.maybe_finish(now_ms, effects);
    }

    /// Ends the current attempt's hold on its agent: history, release.
    fn close_attempt(
        &mut self,
        id: &TaskId,
        outcome: &str,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        if let (Some(agent), Some(allocation)) = (t.agent.clone(), t.allocation.take()) {
            effects.push(Effect::Release { agent, allocation });
        }
        if let Some(c) = &t.spec.concurrency {
            effects.push(Effect::FreeSlot {
                key: c.key.clone(),
                holder: slot_holder(&self.id, id, t.attempt),
            });
        }
        t.history.push(AttemptRecord {
            attempt: t.attempt,
            agent: t.agent.clone(),
            outcome: outcome.to_owned(),
            assigned_ms: t.assigned_ms,
            started_ms: t.started_ms,
            ended_ms: now_ms,
        });
        if t.history.len() > HISTORY_KEEP {
            let extra = t.history.len() - HISTORY_KEEP;
            t.history.drain(..extra);
        }
        t.deadline_ms = None;
    }

    /// An attempt its agent handed back on leaving: ready again at once, its
    /// agent told to stop, and not a failure.
    fn hand_back(&mut self, id: &TaskId, agent: &AgentId, now_ms: u64, effects: &mut Vec<Effect>) {
        let Some(t) = self.tasks.get(id) else { return };
        if !t.state.is_active() {
            return;
        }
        effects.push(Effect::Cancel {
            agent: agent.clone(),
            notice: CancelNotice {
                flow_id: self.id.clone(),
                task_id: id.clone(),
                attempt: t.attempt,
                code: CancelCode::AgentLeft,
                reason: "agent left: the attempt is handed back".into(),
            },
        });
        self.close_attempt(id, "handed back: agent left", now_ms, effects);
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        t.uncounted += 1;
        t.not_before_ms = 0;
        t.allocation = None;
        let reason = format!(
            "handed back by agent {agent} on leaving; attempt {} next",
            t.attempt + 1
        );
        self.transition(id, TaskState::Ready, now_ms, Some(reason), effects);
        if let Some(t) = self.tasks.get_mut(id) {
            t.agent = None;
        }
    }

    /// A failed attempt: retried after back-off while the policy allows, else
    /// the task fails for good and the failure mode decides about the rest.
    /// `cancel`: the attempt is taken from an agent that may still work on it,
    /// which is told so.
    #[allow(clippy::too_many_arguments)]
    fn fail_attempt(
        &mut self,
        id: &TaskId,
        kind: FailureKind,
        retryable: bool,
        error: &str,
        cancel: Option<CancelCode>,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get(id) else { return };
        // A step that ends several attempts (a tick, a lost agent) may already have
        // ended this one through fail-fast.
        if !t.state.is_active() {
            return;
        }
        let (attempt, agent) = (t.attempt, t.agent.clone());
        if let (Some(code), Some(agent)) = (cancel, agent) {
            // The agent may still be working on it: tell it to stop.
            let reason = match code {
                CancelCode::TimedOut => format!("attempt timed out: {error}"),
                _ => error.to_owned(),
            };
            effects.push(Effect::Cancel {
                agent,
                notice: CancelNotice {
                    flow_id: self.id.clone(),
                    task_id: id.clone(),
                    attempt,
                    code,
                    reason,
                },
            });
        }
        let outcome = match kind {
            FailureKind::Error => format!("failed: {error}"),
            FailureKind::Timeout => format!("timed out: {error}"),
            FailureKind::AgentLost => error.to_owned(),
        };
        self.close_attempt(id, &outcome, now_ms, effects);
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        t.failures += 1;
        t.error = Some(outcome.clone());
        let policy = &t.spec.retry;
        let retry = t.attempt.saturating_sub(t.uncounted) < policy.max_attempts
            && policy.retry_on.contains(&kind)
            && (kind != FailureKind::Error || retryable);
        if retry {
            let wait = policy.backoff_ms(t.attempt);
            t.not_before_ms = now_ms.saturating_add(wait);
            t.allocation = None;
            let reason = format!("{outcome}; attempt {} in {wait} ms", t.attempt + 1);
            self.transition(id, TaskState::Ready, now_ms, Some(reason), effects);
            if let Some(t) = self.tasks.get_mut(id) {
                t.agent = None;
            }
            return;
        }
        let end = if kind == FailureKind::Timeout {
            TaskState::TimedOut
        } else {
            TaskState::Failed
        };
        self.transition(id, end, now_ms, Some(outcome), effects);
        self.after_failure(id, now_ms, effects);
    }

    /// A task failed for good: its dependants are skipped, or (fail-fast)
    /// everything unfinished is stopped.
    fn after_failure(&mut self, id: &TaskId, now_ms: u64, effects: &mut Vec<Effect>) {
        match self.failure_mode {
            FailureMode::Continue => self.skip_downstream(id, now_ms, effects),
            FailureMode::FailFast => {
                let open: Vec<TaskId> = self
                    .tasks
                    .values()
                    .filter(|t| !t.state.is_terminal())
                    .map(|t| t.spec.id.clone())
                    .collect();
                for other in open {
                    let to = if self.tasks.get(&other).is_some_and(|t| t.state.is_active()) {
                        TaskState::Cancelled
                    } else {
                        TaskState::Skipped
                    };
                    self.stop_task(
                        &other,
                        to,
                        &format!("fail-fast: task {id} failed"),
                        CancelCode::FailFast,
                        now_ms,
                        effects,
                    );
                }
            }
        }
        self.maybe_finish(now_ms, effects);
    }

    /// Ends an unfinished task without running it (further).
    pub(crate) fn stop_task(
        &mut self,
        id: &TaskId,
        to: TaskState,
        reason: &str,
        code: CancelCode,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get(id) else { return };
        if t.state.is_active() {
            if let Some(agent) = t.agent.clone() {
                effects.push(Effect::Cancel {
                    agent,
                    notice: CancelNotice {
                        flow_id: self.id.clone(),
                        task_id: id.clone(),
                        attempt: t.attempt,
                        code,
                        reason: reason.to_owned(),
                    },
                });
            }
            self.close_attempt(id, reason, now_ms, effects);
        }
        self.transition(id, to, now_ms, Some(reason.to_owned()), effects);
    }

    /// Everything downstream of a failed task can never run.
    fn skip_downstream(&mut self, from: &TaskId, now_ms: u64, effects: &mut Vec<Effect>) {
        let mut stack = self
            .tasks
            .get(from)
            .map(|t| t.dependents.clone())
            .unwrap_or_default();
        let mut seen = BTreeSet::new();
        let reason = format!("dependency {from} did not succeed");
        while let Some(d) = stack.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            let Some(t) = self.tasks.get(&d) else {
                continue;
            };
            if matches!(t.state, TaskState::Blocked | TaskState::Ready) {
                stack.extend(t.dependents.iter().cloned());
                self.transition(
                    &d,
                    TaskState::Skipped,
                    now_ms,
                    Some(reason.clone()),
                    effects,
                );
            }
        }
    }

    fn maybe_finish(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        if self.state != FlowState::Running || self.has_unfinished() {
            return;
        }
        let ok = self.tasks.values().all(|t| t.state == TaskState::Succeeded);
        self.state = if ok {
            FlowState::Succeeded
        } else {
            FlowState::Failed
        };
        self.finished_at_ms = Some(now_ms);
        effects.push(Effect::Event(EventKind::FlowCompleted {
            flow_id: self.id.clone(),
            state: self.state,
        }));
    }

    /// Whether some task is not final, looking from the hint onwards first.
    fn has_unfinished(&mut self) -> bool {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let (after, before) = match self.unfinished.0.as_ref() {
            Some(h) => (
                self.tasks.range::<TaskId, _>((Included(h), Unbounded)),
                Some(self.tasks.range::<TaskId, _>((Unbounded, Excluded(h)))),
            ),
            None => (self.tasks.range::<TaskId, _>(..), None),
        };
        let found = after
            .chain(before.into_iter().flatten())
            .find(|(_, t)| !t.state.is_terminal())
            .map(|(id, _)| id.clone());
        let unfinished = found.is_some();
        self.unfinished.0 = found;
        unfinished
    }

    fn transition(
        &mut self,
        id: &TaskId,
        to: TaskState,
        now_ms: u64,
        reason: Option<String>,
        effects: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        let from = t.state;
        // A wait task never queues for an agent: it begins waiting instead.
        let to = match (&t.spec.wait_for, to) {
            (Some(_), TaskState::Ready) => TaskState::Waiting,
            _ => to,
        };
        t.state = to;
        t.since_ms = now_ms;
        if from == TaskState::Waiting {
            self.waiting = self.waiting.saturating_sub(1);
        }
        if to == TaskState::Waiting {
            self.waiting += 1;
        }
        if !to.is_active() {
            t.deadline_ms = None;
        }
        if to == TaskState::Waiting {
            t.started_ms = Some(now_ms);
            t.deadline_ms = t
                .spec
                .wait_for
                .as_ref()
                .and_then(|w| w.timeout_ms)
                .map(|ms| now_ms.saturating_add(ms));
        }
        effects.push(Effect::Event(EventKind::TaskTransition {
            flow_id: self.id.clone(),
            task_id: id.clone(),
            from,
            to,
            attempt: t.attempt,
            agent_id: t.agent.clone(),
            reason,
            timeout_ms: if to == TaskState::Running {
                t.spec.timeouts.start_to_close_ms
            } else {
                None
            },
            task_kind: (to == TaskState::Running && !t.spec.kind.is_empty())
                .then(|| t.spec.kind.clone()),
        }));
    }

    /// The spec the flow was created from, with its id.
    pub fn spec(&self) -> FlowSpec {
        FlowSpec {
            id: Some(self.id.clone()),
            name: self.name.clone(),
            tasks: self.tasks.values().map(|t| t.spec.clone()).collect(),
            max_parallelism: self.max_parallelism,
            failure_mode: self.failure_mode,
            require_feasible: false,
            tasks_object: None,
            owner: self.owner.clone(),
        }
    }

    /// The owner of `task`'s allocations: `{owner}/{flow}/{task}`, or
    /// `{flow}/{task}` for a flow without an owner.
    pub fn allocation_owner(&self, task: &TaskId) -> String {
        match &self.owner {
            Some(owner) => format!("{owner}/{}/{task}", self.id),
            None => format!("{}/{task}", self.id),
        }
    }
}

impl Task {
    /// The timing contract of the attempt assigned at `assigned_at_ms`, as the
    /// assignment tells the agent; `tick_ms` is how often deadlines are checked.
    pub fn lease(&self, assigned_at_ms: u64, tick_ms: u64) -> common::msg::AttemptLease {
        let t = &self.spec.timeouts;
        let schedule_to_start_ms = t
            .schedule_to_start_ms
            .unwrap_or(DEFAULT_SCHEDULE_TO_START_MS);
        let start_by_ms = assigned_at_ms.saturating_add(schedule_to_start_ms);
        common::msg::AttemptLease {
            schedule_to_start_ms,
            start_by_ms,
            start_to_close_ms: t.start_to_close_ms,
            heartbeat_ms: t.heartbeat_ms,
            deadline_ms: t.start_to_close_ms.map(|d| start_by_ms.saturating_add(d)),
            tick_ms,
        }
    }
}

/// The lease of a running attempt: the earlier of the start-to-close deadline
/// and the next heartbeat due; `None` when the spec sets neither (the agent's
/// own heartbeats to the allocator still cover a crash). Timeouts are whatever
/// the spec says, up to `u64::MAX`, so the sums saturate.
fn running_deadline(t: &Task, now_ms: u64) -> Option<u64> {
    let close = t
        .spec
        .timeouts
        .start_to_close_ms
        .map(|d| t.started_ms.unwrap_or(now_ms).saturating_add(d));
    let beat = t
        .spec
        .timeouts
        .heartbeat_ms
        .map(|d| now_ms.saturating_add(d));
    match (close, beat) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
