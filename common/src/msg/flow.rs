//! Task flows: the spec a person writes and the status the orchestrator reports.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::{AgentId, AllocationId, FlowId, TaskId};
use crate::msg::{FlowOrigin, Requirements, WaitFor};

/// `coord.orchestrator.flow.create`: a DAG of tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    /// Id to use; a fresh one is generated when absent. Creating an id that exists is a conflict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<FlowId>,
    /// Human name (free text).
    #[serde(default)]
    pub name: String,
    pub tasks: Vec<TaskSpec>,
    /// Most tasks of this flow placed or running at once. Default: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallelism: Option<u32>,
    /// What a task failure does to the rest of the flow. Default `continue`.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Refuse the flow (instead of warning) when some task's requirements no
    /// registered agent could ever satisfy; `unavailable` while the
    /// allocator cannot say. Default false: agents may join later.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_feasible: bool,
    /// A spec too large for one message sends its tasks ahead: the name of an
    /// object in the `coord_uploads` object store holding them as a JSON
    /// array, read (and deleted) by `flow.create`; `tasks` is then empty.
    /// [`crate::Client::create_flow`] does this by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks_object: Option<String>,
    /// Who the flow runs for, e.g. a team (`team-a`, or `org/team-a`). Its
    /// tasks' allocations are owned `{owner}/{flow}/{task}`, so the owner's
    /// quotas count them and its reservations serve them from the first
    /// placement. Default none: owned `{flow}/{task}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// What happens to a flow when a task fails for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Skip the failed task's dependants; independent branches run on.
    #[default]
    Continue,
    /// Stop the flow: cancel running tasks, skip everything not started.
    FailFast,
}

/// Deadlines of a task, as Temporal users know them. All optional, in ms.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// From assignment to the agent's `started` report. Default 60000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_to_start_ms: Option<u64>,
    /// From `started` to `completed`/`failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_to_close_ms: Option<u64>,
    /// Longest silence between reports while running (`progress` reports extend the lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
}

/// Which failures a retry policy retries.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The agent reported `failed` with `retryable: true`.
    Error,
    /// A deadline of the attempt passed.
    Timeout,
    /// The agent holding the attempt was declared lost.
    AgentLost,
}

/// How a failed attempt is retried: attempt `n` (1-based) waits
/// `min(backoff_base_ms * backoff_factor^(n-1), backoff_max_ms)` before it is ready again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. Default 1 (no retry).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Default 1000.
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    /// Default 2.
    #[serde(default = "default_backoff_factor")]
    pub backoff_factor: f64,
    /// Default 60000.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Default: all kinds. A `failed` report with `retryable: false` is never retried.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<FailureKind>,
}

fn default_max_attempts() -> u32 {
    1
}
fn default_backoff_base_ms() -> u64 {
    1_000
}
fn default_backoff_factor() -> f64 {
    2.0
}
fn default_backoff_max_ms() -> u64 {
    60_000
}
fn default_retry_on() -> Vec<FailureKind> {
    vec![
        FailureKind::Error,
        FailureKind::Timeout,
        FailureKind::AgentLost,
    ]
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: default_max_attempts(),
            backoff_base_ms: default_backoff_base_ms(),
            backoff_factor: default_backoff_factor(),
            backoff_max_ms: default_backoff_max_ms(),
            retry_on: default_retry_on(),
        }
    }
}

impl RetryPolicy {
    /// Wait before the attempt after `failed_attempt` (1-based).
    pub fn backoff_ms(&self, failed_attempt: u32) -> u64 {
        let exp = self
            .backoff_factor
            .max(1.0)
            .powi(failed_attempt.saturating_sub(1).min(64) as i32);
        let wait = self.backoff_base_ms as f64 * exp;
        if wait.is_finite() {
            (wait as u64).min(self.backoff_max_ms)
        } else {
            self.backoff_max_ms
        }
    }
}

/// One task of a flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub id: TaskId,
    /// What to run; agents dispatch on it (free text, e.g. `"summarise"`).
    #[serde(default)]
    pub kind: String,
    /// Passed to the agent as is.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub input: Value,
    #[serde(default, skip_serializing_if = "is_default")]
    pub requirements: Requirements,
    /// Tasks that must succeed before this one is ready.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<TaskId>,
    /// Higher runs first among ready tasks. Default 0.
    #[serde(default, skip_serializing_if = "is_default")]
    pub priority: i32,
    #[serde(default, skip_serializing_if = "is_default")]
    pub timeouts: Timeouts,
    #[serde(default, skip_serializing_if = "is_default")]
    pub retry: RetryPolicy,
    /// Expected run time, for critical-path ordering and ETAs before any run is observed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_duration_ms: Option<u64>,
    /// At most `limit` tasks holding `key` run at once, across every flow: for
    /// rate-limited tools and APIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<ConcurrencyLimit>,
    /// Makes this a *wait* task: instead of running on an agent it waits for
    /// an agent event that matches, and succeeds with that event as its
    /// output. It takes no allocation and is never retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for: Option<WaitFor>,
}

/// A named limit shared by every flow: a task takes one of the key's `limit`
/// slots when it is dispatched and gives it back when its attempt ends. Each
/// task's own `limit` applies when it is dispatched, so tasks sharing a key
/// should declare the same limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyLimit {
    /// Letters, digits, `_` and `-`, at most 64 characters.
    pub key: String,
    /// At least 1.
    pub limit: u32,
}

impl TaskSpec {
    /// A task with every optional part left at its default.
    pub fn new(id: TaskId) -> Self {
        TaskSpec {
            id,
            kind: String::new(),
            input: Value::Null,
            requirements: Requirements::default(),
            depends_on: Vec::new(),
            priority: 0,
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
            estimated_duration_ms: None,
            concurrency: None,
            wait_for: None,
        }
    }
}

impl FlowSpec {
    /// A flow of `tasks` with every optional part left at its default.
    pub fn new(name: impl Into<String>, tasks: Vec<TaskSpec>) -> Self {
        FlowSpec {
            id: None,
            name: name.into(),
            tasks,
            max_parallelism: None,
            failure_mode: FailureMode::default(),
            require_feasible: false,
            tasks_object: None,
            owner: None,
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// Where a task is in its life cycle.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting on dependencies.
    Blocked,
    /// Dependencies done; waiting for an agent.
    Ready,
    /// Sent to an agent, not yet started.
    Assigned,
    /// The agent reported it started.
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Never ran because a dependency failed.
    Skipped,
    /// The last attempt missed a deadline and no retry was left, or a wait
    /// task's event did not come in time.
    TimedOut,
    /// A wait task (`wait_for`) whose dependencies are done, waiting for its event.
    Waiting,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded
                | TaskState::Failed
                | TaskState::Cancelled
                | TaskState::Skipped
                | TaskState::TimedOut
        )
    }

    /// Holding (or about to hold) an agent's resources.
    pub fn is_active(self) -> bool {
        matches!(self, TaskState::Assigned | TaskState::Running)
    }

    /// The wire name (`running`, `timed_out`, …), for messages people read.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Blocked => "blocked",
            TaskState::Ready => "ready",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Skipped => "skipped",
            TaskState::TimedOut => "timed_out",
            TaskState::Waiting => "waiting",
        }
    }
}

impl std::fmt::Display for TaskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state a wire name stands for, for readers of records as plain JSON.
impl std::str::FromStr for TaskState {
    type Err = serde::de::value::Error;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::deserialize(serde::de::IntoDeserializer::into_deserializer(name))
    }
}

/// Where a flow is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    Running,
    /// No new dispatch; running tasks finish and are recorded.
    Paused,
    /// Every task succeeded.
    Succeeded,
    /// Every task is final and at least one failed.
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl FlowState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            FlowState::Succeeded | FlowState::Failed | FlowState::Cancelled
        )
    }

    /// The wire name (`running`, `succeeded`, …), for messages people read.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowState::Running => "running",
            FlowState::Paused => "paused",
            FlowState::Succeeded => "succeeded",
            FlowState::Failed => "failed",
            FlowState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for FlowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state a wire name stands for, for readers of records as plain JSON.
impl std::str::FromStr for FlowState {
    type Err = serde::de::value::Error;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::deserialize(serde::de::IntoDeserializer::into_deserializer(name))
    }
}

/// `coord.orchestrator.flow.get` / `flow.status`: names a flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowRef {
    pub flow_id: FlowId,
}

/// One task in a status reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskStatus {
    pub task_id: TaskId,
    pub state: TaskState,
    /// Attempts made so far (0 before the first assignment).
    #[serde(default)]
    pub attempt: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_id: Option<AllocationId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub output: Value,
    /// While in back-off: not dispatched before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
    /// When the current attempt times out unless the agent reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// The current attempt's latest reported progress, 0..=1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f64>,
    /// The message that came with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_message: Option<String>,
}

/// Reply to `flow.create`, `flow.get` and `flow.status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowStatus {
    pub flow_id: FlowId,
    #[serde(default)]
    pub name: String,
    pub state: FlowState,
    /// KV revision the status was read at.
    #[serde(default)]
    pub revision: u64,
    /// Number of tasks per state (states with none are left out).
    #[serde(default)]
    pub counts: BTreeMap<TaskState, usize>,
    /// Share of tasks in a final state, 0..=1.
    #[serde(default)]
    pub progress: f64,
    /// Tasks, unfinished ones first; a large flow lists at most 1,000.
    #[serde(default)]
    pub tasks: Vec<TaskStatus>,
    /// Tasks left out of `tasks` (only a large flow's list is cut).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tasks_omitted: usize,
    #[serde(default)]
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Tasks assigned or running, per agent.
    #[serde(default)]
    pub running_by_agent: BTreeMap<AgentId, Vec<TaskId>>,
    /// Attempts made over all tasks.
    #[serde(default)]
    pub attempts: u32,
    /// Attempts that failed or timed out (retried or not).
    #[serde(default)]
    pub failures: u32,
    /// Length of the longest chain of unfinished tasks, by estimated or observed durations.
    #[serde(default)]
    pub critical_path_remaining_ms: u64,
    /// Expected finish time, when the flow is not finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
    /// Problems found at creation that do not stop the flow, e.g. requirements
    /// no registered agent could satisfy (`infeasible_requirements`). Advice
    /// only: "some agent could" is taken from the last second's answers
    /// unless an agent left or its capacity changed since
    /// (`require_feasible` asks afresh).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<ValidationProblem>,
    /// The trigger and the agent event that started the flow, for a flow a
    /// trigger started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<FlowOrigin>,
}

/// `coord.orchestrator.flow.list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowListRequest {
    /// Only flows in this state.
    #[serde(default)]
    pub state: Option<FlowState>,
}

/// One line of `flow.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowSummary {
    pub flow_id: FlowId,
    #[serde(default)]
    pub name: String,
    pub state: FlowState,
    #[serde(default)]
    pub tasks: usize,
    #[serde(default)]
    pub progress: f64,
}

/// Reply to `flow.list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowList {
    pub flows: Vec<FlowSummary>,
}

/// One problem found when validating a flow spec; `flow.create` reports all of
/// them at once in the error's `details.problems`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ValidationProblem {
    /// Stable: `empty_flow`, `too_many_tasks`, `duplicate_task`, `unknown_dependency`,
    /// `self_dependency`, `cycle`, `invalid_requirement`, `invalid_retry`, `invalid_timeout`,
    /// `infeasible_requirements` (a warning unless the spec sets `require_feasible`),
    /// `invalid_parallelism`, `invalid_concurrency`, `invalid_wait_for`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// For `cycle`: the tasks on the cycle, first one repeated at the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<TaskId>,
}

/// `coord.orchestrator.flow.modify`: changes to a flow that is not finished,
/// applied all at once or not at all, against the revision the client read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowChanges {
    pub flow_id: FlowId,
    /// The flow revision the changes were made from (`revision` of a status
    /// reply); a flow changed since is a `conflict`.
    pub expected_revision: u64,
    /// New tasks; they may depend on existing tasks (finished ones included).
    #[serde(default)]
    pub add: Vec<TaskSpec>,
    /// New dependencies of tasks that have not started.
    #[serde(default)]
    pub add_dependencies: Vec<Dependency>,
    /// Tasks that have not started (blocked or ready), with nothing left depending on them.
    #[serde(default)]
    pub remove: Vec<TaskId>,
    /// New priorities of tasks that have not started.
    #[serde(default)]
    pub priorities: BTreeMap<TaskId, i32>,
    /// New inputs of tasks not yet assigned.
    #[serde(default)]
    pub inputs: BTreeMap<TaskId, Value>,
}

/// `task_id` depends on `depends_on`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dependency {
    pub task_id: TaskId,
    pub depends_on: TaskId,
}

/// `coord.orchestrator.flow.rerun`: reset a finished task and everything
/// downstream of it to run again (history is kept; attempts keep counting).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RerunRequest {
    pub flow_id: FlowId,
    pub task_id: TaskId,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}
