//! Task flows: the spec a person writes and the status the orchestrator reports.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::{AgentId, AllocationId, FlowId, TaskId};
use crate::msg::Requirements;

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
    #[serde(default)]
    pub input: Value,
    #[serde(default)]
    pub requirements: Requirements,
    /// Tasks that must succeed before this one is ready.
    #[serde(default)]
    pub depends_on: Vec<TaskId>,
    /// Higher runs first among ready tasks. Default 0.
    #[serde(default)]
    pub priority: i32,
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
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled | TaskState::Skipped
        )
    }
}

/// Where a flow is in its life cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlowState {
    Running,
    /// Every task succeeded.
    Succeeded,
    /// Every task is final and at least one failed.
    Failed,
}

impl FlowState {
    pub fn is_terminal(self) -> bool {
        !matches!(self, FlowState::Running)
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
    #[serde(default)]
    pub tasks: Vec<TaskStatus>,
    #[serde(default)]
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
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
    /// `self_dependency`, `cycle`, `invalid_requirement`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// For `cycle`: the tasks on the cycle, first one repeated at the end.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<TaskId>,
}
