//! Domain events: one per fact, published on `coord.events.…` and kept by the
//! events stream as an audit log, a replay source and the monitor's input.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::id::{AgentId, AllocationId, FlowId, TaskId};
use crate::msg::{FlowState, TaskState};
use crate::subject::event as s;

/// An event: who said what, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Event {
    /// Unique per event (also the JetStream `Nats-Msg-Id`, so a retried publish is stored once).
    pub event_id: String,
    pub at_ms: u64,
    /// Service that published it.
    #[serde(default)]
    pub source: String,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    FlowCreated {
        flow_id: FlowId,
        #[serde(default)]
        name: String,
        #[serde(default)]
        tasks: usize,
    },
    FlowCompleted {
        flow_id: FlowId,
        state: FlowState,
    },
    /// A task moved from one state to another (every transition is one event).
    TaskTransition {
        flow_id: FlowId,
        task_id: TaskId,
        from: TaskState,
        to: TaskState,
        #[serde(default)]
        attempt: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_id: Option<AgentId>,
        /// Why, when it is not the obvious next step (a retry, a timeout, a cancel).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    FlowPaused {
        flow_id: FlowId,
    },
    FlowResumed {
        flow_id: FlowId,
    },
    /// A report was fenced off (stale attempt, wrong agent, finished task).
    ReportRejected {
        flow_id: FlowId,
        task_id: TaskId,
        attempt: u32,
        agent_id: AgentId,
        reason: String,
    },
    AgentRegistered {
        agent_id: AgentId,
        #[serde(default)]
        capacity: BTreeMap<String, f64>,
    },
    AllocationMade {
        allocation_id: AllocationId,
        agent_id: AgentId,
        owner: String,
        #[serde(default)]
        resources: BTreeMap<String, f64>,
    },
    AllocationReleased {
        allocation_id: AllocationId,
        agent_id: AgentId,
    },
    StateUpdated {
        agent_id: AgentId,
        revision: u64,
    },
    /// A put was made from a stale revision and refused.
    StateConflict {
        agent_id: AgentId,
        expected_revision: u64,
        current_revision: u64,
    },
    /// An event type this build does not know (published by a newer service).
    #[serde(other)]
    Unknown,
}

impl EventKind {
    /// The subject this event is published on.
    pub fn subject(&self) -> &'static str {
        match self {
            EventKind::FlowCreated { .. } => s::FLOW_CREATED,
            EventKind::FlowCompleted { .. } => s::FLOW_COMPLETED,
            EventKind::TaskTransition { to, .. } => match to {
                TaskState::Ready => s::TASK_READY,
                TaskState::Assigned => s::TASK_ASSIGNED,
                TaskState::Running => s::TASK_STARTED,
                TaskState::Succeeded => s::TASK_SUCCEEDED,
                TaskState::Failed => s::TASK_FAILED,
                TaskState::Cancelled => s::TASK_CANCELLED,
                TaskState::TimedOut => s::TASK_TIMED_OUT,
                TaskState::Skipped | TaskState::Blocked => s::TASK_SKIPPED,
            },
            EventKind::FlowPaused { .. } => s::FLOW_PAUSED,
            EventKind::FlowResumed { .. } => s::FLOW_RESUMED,
            EventKind::ReportRejected { .. } => s::REPORT_REJECTED,
            EventKind::AgentRegistered { .. } => s::AGENT_REGISTERED,
            EventKind::AllocationMade { .. } => s::ALLOCATION_MADE,
            EventKind::AllocationReleased { .. } => s::ALLOCATION_RELEASED,
            EventKind::StateUpdated { .. } => s::STATE_UPDATED,
            EventKind::StateConflict { .. } => s::STATE_CONFLICT,
            EventKind::Unknown => s::UNKNOWN,
        }
    }
}
