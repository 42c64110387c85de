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
    /// Left on purpose (`coord.agents.{id}.leave`): anything it still held was
    /// released and handed back; heartbeats are ignored until it registers again.
    Left,
    /// A status this build does not know.
    #[serde(other)]
    Unknown,
}

impl AgentStatus {
    /// The wire name (`active`, `draining`, …), for messages people read.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Active => "active",
            AgentStatus::Draining => "draining",
            AgentStatus::Lost => "lost",
            AgentStatus::Left => "left",
            AgentStatus::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `coord.agents.{agent_id}.deregister` (operators: `coord.agents.deregister`):
/// the agent is leaving; it drains (no new placements).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeregisterAgent {
    pub agent_id: AgentId,
}

/// `coord.agents.{agent_id}.leave`: the agent is done. What it still holds is
/// released (its attempts are handed back and run again, as new attempts not
/// counted against their retry policy), and it is `left`, not `lost`. Drain
/// first (`deregister`) and finish running work, so nothing is handed back.
/// A new run of the agent leaves before it registers, so what a dead run held
/// is handed back at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaveAgent {
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
    /// Subject the agent receives its assignments on (a plain subscription).
    #[serde(default)]
    pub assign_subject: String,
    #[serde(default)]
    pub status: AgentStatus,
    /// When `status` last changed (ms since the epoch); lost and left agents
    /// are retired from the listing a retention period after it.
    #[serde(default)]
    pub status_since_ms: u64,
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
    /// The timeouts this attempt runs under and their deadlines.
    #[serde(default)]
    pub lease: AttemptLease,
}

/// The timing contract of one attempt. The orchestrator checks deadlines every
/// `tick_ms`, so a timeout fires between its due time and `tick_ms` later;
/// aim well inside them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AttemptLease {
    /// Send `started` within this long of `assigned_at_ms`.
    #[serde(default)]
    pub schedule_to_start_ms: u64,
    /// `assigned_at_ms + schedule_to_start_ms`: `started` must be in by then.
    #[serde(default)]
    pub start_by_ms: u64,
    /// Finish (final report stored) within this long of your `started` report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_to_close_ms: Option<u64>,
    /// Report (`started`, `progress`) at least this often while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
    /// The latest the attempt can still finish: `start_by_ms +
    /// start_to_close_ms` (absent without a start-to-close timeout). Starting
    /// earlier moves your own deadline earlier: `started` + `start_to_close_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// How often the orchestrator checks deadlines.
    #[serde(default)]
    pub tick_ms: u64,
}

/// What a report says happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ReportKind {
    /// The agent began work on the attempt. Optional for work that ends at
    /// once: a final report stored by `start_by_ms` implies it.
    Started,
    /// Still working: renews the lease; optional progress in 0..=1 and a
    /// short message (at most 1,024 bytes), shown with the task's status.
    Progress {
        #[serde(default)]
        progress: Option<f64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
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

impl ReportKind {
    /// The report's `type` on the wire.
    pub fn type_name(&self) -> &'static str {
        match self {
            ReportKind::Started => "started",
            ReportKind::Progress { .. } => "progress",
            ReportKind::Completed { .. } => "completed",
            ReportKind::Failed { .. } => "failed",
            ReportKind::Unknown => "unknown",
        }
    }
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

/// The most reports one message on `coord.agents.{id}.report` may carry as
/// an array: an agent whose reports come faster than the stream stores them
/// sends those waiting together, each applied as if sent alone, in order.
pub const MAX_REPORTS_PER_MESSAGE: usize = 256;

/// The reports in a message on `coord.agents.{id}.report`: one report
/// object, or an array of 1..=[`MAX_REPORTS_PER_MESSAGE`], to apply in
/// order. An array is read whole or not at all.
pub fn reports_in(payload: &[u8]) -> Result<Vec<AgentReport>, serde_json::Error> {
    use serde::de::Error as _;
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'[') {
        return serde_json::from_slice(payload).map(|r| vec![r]);
    }
    let reports: Vec<AgentReport> = serde_json::from_slice(payload)?;
    if reports.is_empty() || reports.len() > MAX_REPORTS_PER_MESSAGE {
        return Err(serde_json::Error::custom(format!(
            "an array of reports holds 1 to {MAX_REPORTS_PER_MESSAGE}, not {}",
            reports.len()
        )));
    }
    Ok(reports)
}

/// `coord.agents.{id}.cancel`: the attempt was taken away from the agent, for
/// any reason; stop working on it and send no final report (it would be
/// rejected as `fenced`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelNotice {
    pub flow_id: FlowId,
    pub task_id: TaskId,
    pub attempt: u32,
    /// Why, for programs.
    #[serde(default)]
    pub code: CancelCode,
    /// Why, for people.
    #[serde(default)]
    pub reason: String,
}

/// Why an attempt was taken away.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CancelCode {
    /// The flow was cancelled.
    FlowCancelled,
    /// A timeout of the attempt fired (`reason` names which).
    TimedOut,
    /// The allocator declared the agent lost (missed heartbeats).
    AgentLost,
    /// The agent left while holding it.
    AgentLeft,
    /// Its allocation was preempted (capacity reduced, quota lowered, reservation ended).
    Preempted,
    /// An upstream task is re-run, so this one starts over.
    Rerun,
    /// Another task failed in a `fail_fast` flow.
    FailFast,
    /// A code this build does not know.
    #[default]
    #[serde(other)]
    Other,
}

/// `coord.agents.{id}.rejected` (core publish, orchestrator or synchronizer →
/// agent): a report of this agent's, or an event it published without asking
/// for a reply, was refused and changed nothing. Fields the report or event
/// did not carry readably are absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReportRejected {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// The report's `type`, if readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_type: Option<String>,
    /// `bad_request` (the report is malformed), `not_found` (no such flow or
    /// task) or `fenced` (the attempt is not this agent's current one, or it
    /// has ended).
    pub code: crate::ErrorCode,
    /// The precise rule broken.
    pub reason: RejectReason,
    /// For people.
    #[serde(default)]
    pub message: String,
    /// The report's `Nats-Msg-Id` header, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<String>,
    #[serde(default)]
    pub at_ms: u64,
    /// For a refused agent event: its type (from the subject).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// For a refused agent event: its `event_id`, if readable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

/// The rule a rejected report (or agent event) broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Not JSON, or not an `AgentReport` (wrong or missing fields, bad ids).
    Malformed,
    /// A report `type` the orchestrator does not know.
    UnknownType,
    /// `progress` outside 0..=1 (or not a finite number), or a message over 1,024 bytes.
    ProgressOutOfRange,
    /// The body's `agent_id` is not the agent whose subject it came on.
    AgentMismatch,
    /// No such flow.
    UnknownFlow,
    /// No such task in the flow.
    UnknownTask,
    /// Not the task's current attempt (it timed out, was taken away or re-run).
    StaleAttempt,
    /// The current attempt is held by another agent.
    WrongAgent,
    /// The attempt is no longer running (it already ended).
    NotRunning,
    /// The flow has finished (or been cancelled).
    FlowFinished,
    /// An agent event's type (the last subject token) is not 1 to 64 of
    /// `a-z`, `0-9`, `_`, `-`, or its `event_id` breaks the id grammar.
    InvalidEventType,
    /// An agent event's `data` does not match its type's registered schema
    /// (`validation_failed`; the message lists the violations).
    SchemaViolation,
    /// An agent event could not be stored (`unavailable`): publish it again.
    NotStored,
    /// A reason this build does not know.
    #[serde(other)]
    Other,
}
