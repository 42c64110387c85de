//! Why a flow's tasks wait (`flow.explain`) and how the flow could run sooner
//! (`flow.optimize`).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::id::{AgentId, FlowId, TaskId};
use crate::msg::{FlowState, FlowStatus, TaskState};

/// `coord.orchestrator.flow.explain`: why tasks are where they are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExplainRequest {
    pub flow_id: FlowId,
    /// Only this task; default every task that is not finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
}

/// Reply to `flow.explain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Explanation {
    pub flow_id: FlowId,
    pub state: FlowState,
    pub tasks: Vec<TaskExplanation>,
}

/// Every reason one task is in its state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskExplanation {
    pub task_id: TaskId,
    pub state: TaskState,
    pub reasons: Vec<String>,
}

/// `coord.orchestrator.flow.optimize`: a plan for the flow's remaining tasks,
/// applied (as new priorities of the tasks not started) only on request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowOptimizeRequest {
    pub flow_id: FlowId,
    /// Re-prioritise the tasks that have not started as the plan proposes.
    #[serde(default)]
    pub apply: bool,
}

/// Reply to `flow.optimize`: how the remaining work is expected to run on the
/// agents registered now, and the order that would finish it soonest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowPlan {
    pub flow_id: FlowId,
    /// The flow revision the plan was made from.
    pub revision: u64,
    /// The longest chain of remaining work, first task first.
    pub critical_path: Vec<TaskId>,
    /// Its length in estimated milliseconds (observed means where known).
    pub critical_path_ms: u64,
    /// Expected time to finish with the current priorities, simulated over the
    /// capacity the agents have for this flow now.
    pub makespan_ms: u64,
    /// Expected time to finish with the proposed priorities.
    pub optimized_makespan_ms: u64,
    /// No order can finish sooner: the longer of the critical path, the busiest
    /// resource's work over its capacity and the work over `max_parallelism`.
    pub lower_bound_ms: u64,
    /// What limits the makespan most.
    pub bottleneck: FlowBottleneck,
    /// Demand and capacity per resource the remaining tasks need.
    #[serde(default)]
    pub resources: BTreeMap<String, ResourceLoad>,
    /// Where and when each remaining task would run under the proposed order
    /// (times relative to the plan), by the allocator's default policy (best fit).
    pub placements: Vec<PlannedTask>,
    /// Tasks no registered agent could run, and tasks waiting on them.
    #[serde(default)]
    pub unplaceable: Vec<TaskExplanation>,
    /// Priority changes the plan proposes; empty when the current order is as good.
    pub priority_changes: Vec<PriorityChange>,
    /// Whether the changes were applied.
    pub applied: bool,
    /// The flow after applying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<FlowStatus>,
}

/// What limits a flow's makespan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowBottleneck {
    /// `critical_path`, `resource`, `parallelism`, `unplaceable` (no remaining
    /// task can start anywhere; `bound_ms` is 0) or `none` (nothing left to run).
    pub kind: String,
    /// For `resource`: which one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// The makespan this limit alone imposes, in ms.
    pub bound_ms: u64,
    pub message: String,
}

/// One resource's load from the remaining tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ResourceLoad {
    /// Sum over the remaining tasks of amount × estimated ms.
    pub demand: f64,
    /// What the agents have for this flow now, summed.
    pub capacity: f64,
    /// `demand / capacity`: the makespan this resource alone imposes, in ms.
    pub bound_ms: u64,
}

/// Where and when the plan runs one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlannedTask {
    pub task_id: TaskId,
    pub agent_id: AgentId,
    /// Start and end, in ms after the plan was made.
    pub start_ms: u64,
    pub end_ms: u64,
}

/// A new priority for a task that has not started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PriorityChange {
    pub task_id: TaskId,
    pub from: i32,
    pub to: i32,
}
