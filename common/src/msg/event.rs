//! Domain events: one per fact, published on `coord.events.…` and kept by the
//! events stream as an audit log, a replay source and the monitor's input.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::id::{AgentId, AllocationId, FlowId, ReservationId, ScopeId, SyncPointId, TaskId};
use crate::msg::{
    Allocation, Anomaly, ConflictOutcome, ConflictPolicy, FlowState, SyncPointState, TaskState,
};
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
        /// On `running`: the attempt's start-to-close timeout in ms, when the
        /// task's spec sets one, so a watcher can tell a long run from a stuck one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        /// On `running`: the task's kind, so a watcher can compare a run with
        /// the usual time of its kind.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task_kind: Option<String>,
    },
    FlowPaused {
        flow_id: FlowId,
    },
    /// Tasks of a flow were reset to run again (`flow.rerun`); a finished
    /// flow is running again and will complete (and be counted) again.
    FlowRerun {
        flow_id: FlowId,
        /// The task re-run; everything downstream of it was reset too.
        task_id: crate::TaskId,
        /// How many tasks were reset.
        #[serde(default)]
        reset: usize,
        /// Whether the flow had finished before.
        #[serde(default)]
        was_finished: bool,
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
        #[serde(default)]
        scope: ScopeId,
    },
    /// An agent missed its heartbeats: every allocation it held is released
    /// (listed, with owners, so their tasks can be re-queued).
    AgentLost {
        agent_id: AgentId,
        /// Last heartbeat (or registration) seen, ms since the epoch.
        #[serde(default)]
        last_seen_ms: u64,
        #[serde(default)]
        released: Vec<Allocation>,
    },
    /// An agent left on purpose: whatever it still held is released (listed,
    /// with owners, so their tasks are handed back).
    AgentLeft {
        agent_id: AgentId,
        #[serde(default)]
        released: Vec<Allocation>,
    },
    /// A lost or left agent was removed from the listing after the retention
    /// period.
    AgentRetired {
        agent_id: AgentId,
        /// `lost` or `left`: what it was when retired.
        status: crate::msg::AgentStatus,
    },
    /// An agent deregistered and drains: no new placements.
    AgentDeregistered {
        agent_id: AgentId,
        /// Allocations it still holds.
        #[serde(default)]
        allocations: usize,
    },
    /// An agent's capacity changed at run time.
    CapacityAdjusted {
        agent_id: AgentId,
        #[serde(default)]
        capacity: BTreeMap<String, f64>,
    },
    /// An owner's quota was set, changed or (with empty `limits`) cleared.
    QuotaChanged {
        owner: String,
        #[serde(default)]
        limits: BTreeMap<String, f64>,
    },
    /// An allocation was taken back before its owner released it.
    AllocationPreempted {
        allocation_id: AllocationId,
        agent_id: AgentId,
        owner: String,
        #[serde(default)]
        priority: i32,
        /// `capacity_reduced`, `quota_reduced`, `reservation_ended`,
        /// `gang_rolled_back`, `reclaimed` (no task holds it: reconciliation)
        /// or `expired` (its lease was not renewed).
        #[serde(default)]
        reason: String,
    },
    /// A movable allocation was moved by a rebalancing.
    AllocationMoved {
        allocation_id: AllocationId,
        owner: String,
        from: AgentId,
        to: AgentId,
    },
    ReservationMade {
        reservation_id: ReservationId,
        agent_id: AgentId,
        owner: String,
        start_ms: u64,
        end_ms: u64,
        #[serde(default)]
        resources: BTreeMap<String, f64>,
    },
    /// A reservation ended: `cancelled`, `expired` or `capacity_reduced`.
    ReservationEnded {
        reservation_id: ReservationId,
        agent_id: AgentId,
        owner: String,
        #[serde(default)]
        reason: String,
    },
    /// A put was made from a stale revision; `outcome` says how the scope's
    /// policy resolved it.
    StateConflict {
        agent_id: AgentId,
        expected_revision: u64,
        current_revision: u64,
        #[serde(default)]
        scope: ScopeId,
        #[serde(default)]
        policy: ConflictPolicy,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        outcome: Option<ConflictOutcome>,
        /// The revision written by the resolution, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resolved_revision: Option<u64>,
        /// Leaves both sides changed (merge).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        conflicts: Vec<String>,
    },
    StateDeleted {
        agent_id: AgentId,
        #[serde(default)]
        scope: ScopeId,
    },
    ScopeConfigured {
        scope: ScopeId,
        policy: ConflictPolicy,
    },
    /// A synchronize round agreed the shared keys of a set of agents.
    StateSynchronized {
        round_id: SyncPointId,
        scope: ScopeId,
        agents: usize,
        divergences: usize,
        #[serde(default)]
        unacked: Vec<AgentId>,
    },
    SyncPointInitiated {
        sync_point_id: SyncPointId,
        scope: ScopeId,
        participants: usize,
        sequence: u64,
    },
    /// Completion was attempted: `state` is `completed` or `incomplete`.
    SyncPointCompleted {
        sync_point_id: SyncPointId,
        state: SyncPointState,
        #[serde(default)]
        missing: Vec<AgentId>,
    },
    SyncPointRolledBack {
        sync_point_id: SyncPointId,
        participants: usize,
        verified: bool,
        #[serde(default)]
        unacked: Vec<AgentId>,
    },
    /// The monitor detected an anomaly (published on `coord.events.anomaly.{kind}`).
    AnomalyDetected {
        anomaly: Anomaly,
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
                TaskState::Waiting => s::TASK_WAITING,
                TaskState::Skipped => s::TASK_SKIPPED,
                TaskState::Blocked => s::TASK_RESET,
            },
            EventKind::FlowPaused { .. } => s::FLOW_PAUSED,
            EventKind::FlowResumed { .. } => s::FLOW_RESUMED,
            EventKind::FlowRerun { .. } => s::FLOW_RERUN,
            EventKind::ReportRejected { .. } => s::REPORT_REJECTED,
            EventKind::AgentRegistered { .. } => s::AGENT_REGISTERED,
            EventKind::AllocationMade { .. } => s::ALLOCATION_MADE,
            EventKind::AllocationReleased { .. } => s::ALLOCATION_RELEASED,
            EventKind::StateUpdated { .. } => s::STATE_UPDATED,
            EventKind::AgentLost { .. } => s::AGENT_LOST,
            EventKind::AgentDeregistered { .. } => s::AGENT_DEREGISTERED,
            EventKind::AgentLeft { .. } => s::AGENT_LEFT,
            EventKind::AgentRetired { .. } => s::AGENT_RETIRED,
            EventKind::CapacityAdjusted { .. } => s::CAPACITY_ADJUSTED,
            EventKind::QuotaChanged { .. } => s::QUOTA_CHANGED,
            EventKind::AllocationPreempted { .. } => s::ALLOCATION_PREEMPTED,
            EventKind::AllocationMoved { .. } => s::ALLOCATION_MOVED,
            EventKind::ReservationMade { .. } => s::RESERVATION_MADE,
            EventKind::ReservationEnded { .. } => s::RESERVATION_ENDED,
            EventKind::StateConflict { .. } => s::STATE_CONFLICT,
            EventKind::StateDeleted { .. } => s::STATE_DELETED,
            EventKind::ScopeConfigured { .. } => s::SCOPE_CONFIGURED,
            EventKind::StateSynchronized { .. } => s::STATE_SYNCHRONIZED,
            EventKind::SyncPointInitiated { .. } => s::SYNCPOINT_INITIATED,
            EventKind::SyncPointCompleted { .. } => s::SYNCPOINT_COMPLETED,
            EventKind::SyncPointRolledBack { .. } => s::SYNCPOINT_ROLLED_BACK,
            EventKind::AnomalyDetected { anomaly } => s::anomaly(anomaly.kind),
            EventKind::Unknown => s::UNKNOWN,
        }
    }
}
