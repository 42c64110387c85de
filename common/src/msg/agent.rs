//! Agent life cycle: registration, heartbeats, assignments and reports.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::{AgentId, AllocationId, FlowId, TaskId};

/// `coord.agents.{agent_id}.register` (operators: `coord.agents.register`): an
/// agent announces itself and its capacity.
/// Registering again replaces capabilities, labels and capacity and keeps the
/// agent's current allocations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterAgent {
    pub agent_id: AgentId,
    /// What the agent can do (matched against task requirements), e.g. `["python", "gpu"]`.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Free-form labels (matched exactly), e.g. `{"zone": "eu-1"}`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Capacity per named resource, e.g. `{"cpu": 4, "mem_mb": 8192}`.
    #[serde(default)]
    pub capacity: BTreeMap<String, f64>,
    /// How often the agent promises to heartbeat, in ms. Default 5000.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
}

fn default_heartbeat_ms() -> u64 {
    5_000
}

/// Where an agent is in its life cycle, as the allocator sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStatus {
    /// Takes new placements.
    #[default]
    Active,
    /// Deregistered: keeps its allocations until they are released, takes no new ones.
    Draining,
    /// Missed its heartbeats: its allocations were released. Registering again revives it.
    Lost,
    /// A status this build does not know.
    #[serde(other)]
    Unknown,
}

/// `coord.agents.{agent_id}.deregister` (operators: `coord.agents.deregister`):
/// the agent is leaving; it drains (no new placements).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeregisterAgent {
    pub agent_id: AgentId,
}

/// Reply to a registration, and the allocator's view of one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentInfo {
    pub agent_id: AgentId,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub capacity: BTreeMap<String, f64>,
    /// Sum of live allocations per resource.
    #[serde(default)]
    pub allocated: BTreeMap<String, f64>,
    /// Number of live allocations.
    #[serde(default)]
    pub allocations: usize,
    #[serde(default)]
    pub registered_at_ms: u64,
    /// Last heartbeat seen, 0 if none yet.
    #[serde(default)]
    pub last_heartbeat_ms: u64,
    /// Subject the agent receives its assignments on (a durable JetStream subject).
    #[serde(default)]
    pub assign_subject: String,
    #[serde(default)]
    pub status: AgentStatus,
}

/// `coord.agents.{id}.heartbeat`: published by an agent every `heartbeat_interval_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Heartbeat {
    pub agent_id: AgentId,
    /// Sender's clock.
    #[serde(default)]
    pub at_ms: u64,
    /// Tasks the agent is running now.
    #[serde(default)]
    pub running: u32,
}

/// `coord.agents.{id}.assign` (JetStream): a task attempt for the agent to run.
///
/// Exactly-once *effect* relies on the agent echoing `flow_id`, `task_id` and
/// `attempt` in every report: a report for an older attempt is fenced off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Assignment {
    pub flow_id: FlowId,
    pub task_id: TaskId,
    /// Attempt number, starting at 1.
    pub attempt: u32,
    pub agent_id: AgentId,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub input: Value,
    pub allocation_id: AllocationId,
    /// Resources held for this attempt.
    #[serde(default)]
    pub resources: BTreeMap<String, f64>,
    /// When the orchestrator assigned it.
    #[serde(default)]
    pub assigned_at_ms: u64,
}

/// What a report says happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReportKind {
    /// The agent began work on the attempt.
    Started,
    /// Still working; optional progress in 0..=1.
    Progress {
        #[serde(default)]
        progress: Option<f64>,
    },
    /// Finished with an output.
    Completed {
        #[serde(default)]
        output: Value,
    },
    /// Gave up.
    Failed {
        #[serde(default)]
        error: String,
        #[serde(default)]
        retryable: bool,
    },
    /// A kind this build does not know (sent by a newer agent); rejected.
    #[serde(other)]
    Unknown,
}

/// `coord.agents.{id}.report` (JetStream): an agent's report on an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentReport {
    pub flow_id: FlowId,
    pub task_id: TaskId,
    pub attempt: u32,
    pub agent_id: AgentId,
    #[serde(flatten)]
    pub kind: ReportKind,
    /// Sender's clock.
    #[serde(default)]
    pub at_ms: u64,
}

/// `coord.agents.{id}.cancel`: stop working on this attempt; its result would be
/// rejected anyway (the flow was cancelled, or the attempt timed out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelNotice {
    pub flow_id: FlowId,
    pub task_id: TaskId,
    pub attempt: u32,
    #[serde(default)]
    pub reason: String,
}
