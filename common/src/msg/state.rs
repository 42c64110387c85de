//! Versioned agent state documents, scopes, consistency checks and sync points.
//!
//! A state document is keyed by scope and agent. Every request that names a
//! document takes an optional `scope` (default `"default"`), so clients written
//! before scopes existed keep working unchanged.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::Error;
use crate::id::{AgentId, ScopeId, SyncPointId};

/// A hybrid logical clock reading: wall-clock milliseconds, a counter for events
/// within the same millisecond (or while the wall clock lags a peer), and the
/// node that made it. Readings order by `(physical_ms, logical, node)`, so two
/// writers can never tie.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, JsonSchema)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch.
    pub physical_ms: u64,
    #[serde(default)]
    pub logical: u32,
    /// Who made the reading (an agent or a synchronizer instance); breaks ties.
    #[serde(default)]
    pub node: String,
}

/// Only the object form: serde's derive would also take `[1, 2]` as a clock
/// (its fields in order), so a malformed put would be stored as if it had one.
impl<'de> Deserialize<'de> for Hlc {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            physical_ms: u64,
            #[serde(default)]
            logical: u32,
            #[serde(default)]
            node: String,
        }
        let map = serde_json::Map::<String, Value>::deserialize(d)?;
        let f = Fields::deserialize(Value::Object(map)).map_err(serde::de::Error::custom)?;
        Ok(Hlc {
            physical_ms: f.physical_ms,
            logical: f.logical,
            node: f.node,
        })
    }
}

/// How a put made from a stale revision is resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// Refuse: a `conflict` error carrying the current document and revision.
    #[default]
    Reject,
    /// Last writer wins by hybrid logical clock.
    Lww,
    /// Three-way JSON merge of base, stored ("theirs") and incoming ("ours").
    Merge,
}

/// What a three-way merge does with a leaf changed differently on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MergeFallback {
    /// The side with the later hybrid logical clock wins the leaf.
    #[default]
    Lww,
    /// The incoming put wins the leaf.
    Ours,
    /// The stored document wins the leaf.
    Theirs,
    /// Any such leaf makes the put a `conflict` that lists them.
    Reject,
}

/// A rule over the documents of several agents in one scope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Invariant {
    /// Every named agent (all checked agents when empty) has the same value at `pointer`.
    Agree {
        pointer: String,
        #[serde(default)]
        agents: Vec<AgentId>,
    },
    /// The value at `pointer`, where present, is the id of an agent registered with the allocator.
    RegisteredAgent { pointer: String },
    /// The numbers at `pointer` over all checked agents add up to at most `max`.
    SumAtMost { pointer: String, max: f64 },
}

/// `coord.sync.scope.set`: the configuration of a scope (replaces the previous one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScopeConfig {
    /// The scope to configure. Required, so that a body of defaults alone
    /// cannot replace the `default` scope's configuration.
    pub scope: ScopeId,
    /// Default `reject`.
    #[serde(default)]
    pub policy: ConflictPolicy,
    /// Default `lww`.
    #[serde(default)]
    pub merge_fallback: MergeFallback,
    /// A JSON Schema every document of the scope must satisfy (no remote `$ref`s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// Refuse a put whose document fails `schema` (`validation_failed`, with
    /// every violation). Off by default: documents are stored as written and
    /// `validate` reports them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enforce_schema: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub invariants: Vec<Invariant>,
    /// JSON Pointers that `synchronize` makes equal across agents (besides `agree` invariants).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared: Vec<String>,
}

/// `coord.sync.scope.get`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScopeGet {
    #[serde(default)]
    pub scope: ScopeId,
}

/// `coord.agents.{agent_id}.state.get` (any agent's: `coord.sync.state.get`):
/// the latest document, or the one at `revision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateGet {
    pub agent_id: AgentId,
    #[serde(default)]
    pub scope: ScopeId,
    /// A past revision of this document (from its history); latest when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

/// `coord.agents.{agent_id}.state.put` (operators: `coord.sync.state.put`): a
/// compare-and-set of an agent's state document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatePut {
    pub agent_id: AgentId,
    /// The revision this document was made from; 0 to create the first one.
    /// A stale revision is resolved by the scope's policy.
    pub expected_revision: u64,
    pub doc: Value,
    #[serde(default)]
    pub scope: ScopeId,
    /// The writer's hybrid logical clock; the synchronizer stamps one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<Hlc>,
}

/// How a stale put was resolved (absent when the base was current).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Resolution {
    pub policy: ConflictPolicy,
    pub outcome: ConflictOutcome,
    pub expected_revision: u64,
    /// The revision the put found instead of `expected_revision`.
    pub current_revision: u64,
    /// Whether the base revision was still in the key's history (merge only);
    /// without it, only leaves equal on both sides merge cleanly.
    #[serde(default)]
    pub base_available: bool,
    /// JSON Pointers of leaves both sides changed differently (merge only).
    #[serde(default)]
    pub conflicts: Vec<String>,
}

/// The result of resolving a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConflictOutcome {
    /// The put was refused.
    Rejected,
    /// The put's clock was later: it replaced the stored document.
    Overwritten,
    /// The stored document's clock was later: it stays, the put is dropped.
    KeptCurrent,
    /// Both sides were merged into a new revision.
    Merged,
}

/// An agent's state document at a revision (reply to get and put).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StateDoc {
    pub agent_id: AgentId,
    /// KV revision (a global, increasing sequence, not a per-key counter).
    pub revision: u64,
    pub doc: Value,
    #[serde(default)]
    pub updated_at_ms: u64,
    #[serde(default)]
    pub scope: ScopeId,
    /// The clock of the write that produced this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hlc: Option<Hlc>,
    /// Set on a put reply when the base was stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
}

/// `coord.agents.{agent_id}.state.delete` (operators: `coord.sync.state.delete`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateDelete {
    pub agent_id: AgentId,
    #[serde(default)]
    pub scope: ScopeId,
    /// Delete only if the document is still at this revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_revision: Option<u64>,
}

/// Reply to a state delete.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StateDeleted {
    pub agent_id: AgentId,
    #[serde(default)]
    pub scope: ScopeId,
    /// False when there was no document to delete.
    pub deleted: bool,
}

/// `coord.agents.{agent_id}.state.history` (any agent's: `coord.sync.state.history`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateHistoryRequest {
    pub agent_id: AgentId,
    #[serde(default)]
    pub scope: ScopeId,
}

/// One revision in a document's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HistoryEntry {
    pub revision: u64,
    /// True for a deletion (then `doc` is null).
    #[serde(default)]
    pub deleted: bool,
    #[serde(default)]
    pub doc: Value,
    #[serde(default)]
    pub updated_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hlc: Option<Hlc>,
}

/// Reply to a state history request: oldest first, at most the bucket's history (64).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StateHistory {
    pub agent_id: AgentId,
    #[serde(default)]
    pub scope: ScopeId,
    #[serde(default)]
    pub entries: Vec<HistoryEntry>,
}

/// A change pushed on `coord.sync.watch.{scope}.{agent}`: the KV write itself,
/// republished by the server. The revision is in the `Nats-Sequence` header and
/// a deletion has the header `KV-Operation: DEL` and an empty body.
pub type StateChange = StateDoc;

/// `coord.sync.validate`: check documents against the scope's schema and invariants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateRequest {
    #[serde(default)]
    pub scope: ScopeId,
    /// The agents to check; every agent with a document in the scope when empty.
    #[serde(default)]
    pub agents: Vec<AgentId>,
}

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Violation {
    /// The agent whose document breaks the rule; absent for a rule over all
    /// agents at once (a sum), whose contributors are listed in `agents`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentId>,
    /// JSON Pointer into the document.
    pub pointer: String,
    /// `schema:{keyword location}`, `agree`, `registered_agent`, `sum_at_most` or `missing`.
    pub rule: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<AgentId>,
}

/// Reply to `coord.sync.validate` (also part of a synchronize report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ValidationReport {
    #[serde(default)]
    pub scope: ScopeId,
    pub valid: bool,
    /// The revision of each document checked.
    #[serde(default)]
    pub checked: BTreeMap<AgentId, u64>,
    #[serde(default)]
    pub violations: Vec<Violation>,
}

/// `coord.sync.synchronize`: agree the shared keys of a set of agents, push the
/// agreed state to each agent and wait for each to acknowledge it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SynchronizeRequest {
    #[serde(default)]
    pub scope: ScopeId,
    pub agents: Vec<AgentId>,
    /// Pointers to agree on, besides the scope's `shared` and `agree` pointers.
    #[serde(default)]
    pub shared: Vec<String>,
    /// How long each agent has to acknowledge, in milliseconds (default 5000).
    #[serde(default = "default_ack_timeout_ms")]
    pub timeout_ms: u64,
}

/// The acknowledgement deadline when a request names none, in milliseconds.
pub fn default_ack_timeout_ms() -> u64 {
    5000
}

/// Values that differed at one shared pointer, and the one agreed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Divergence {
    pub pointer: String,
    /// Each agent's value before (null when absent).
    pub values: BTreeMap<AgentId, Value>,
    pub agreed: Value,
    /// The agent whose value was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AgentId>,
}

/// One agent's part in a synchronize round or a rollback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentSyncResult {
    pub agent_id: AgentId,
    /// The revision the agent was asked to acknowledge.
    pub revision: u64,
    pub acked: bool,
    /// Why not: `timeout` when no acknowledgement came in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Error>,
}

/// Reply to `coord.sync.synchronize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SyncReport {
    /// The id agents echo in their acknowledgements.
    pub round_id: SyncPointId,
    #[serde(default)]
    pub scope: ScopeId,
    pub policy: ConflictPolicy,
    #[serde(default)]
    pub divergences: Vec<Divergence>,
    /// Validation of the agreed documents.
    pub validation: ValidationReport,
    #[serde(default)]
    pub agents: Vec<AgentSyncResult>,
    /// True when every agent acknowledged.
    pub complete: bool,
}

/// What a notice pushed to an agent is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// A sync point was taken: `doc` is the agent's state in the cut.
    SyncPoint,
    /// The agent's state was restored to a sync point's cut.
    Rollback,
    /// The agreed state after a synchronize round.
    AgreedState,
    #[serde(other)]
    Unknown,
}

/// Pushed to an agent on `coord.agents.{id}.sync`. The agent answers with a
/// [`SyncAck`] on `coord.agents.{id}.sync.ack` echoing `notice_id` and `revision`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SyncNotice {
    /// The sync point id, or the synchronize round id.
    pub notice_id: SyncPointId,
    pub kind: NoticeKind,
    #[serde(default)]
    pub scope: ScopeId,
    pub agent_id: AgentId,
    /// The revision of the agent's document this notice is about.
    pub revision: u64,
    #[serde(default)]
    pub doc: Value,
    #[serde(default)]
    pub at_ms: u64,
}

/// An agent's acknowledgement, published on `coord.agents.{its id}.sync.ack`
/// (the agent is the one named in the subject, not in the body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SyncAck {
    pub notice_id: SyncPointId,
    #[serde(default)]
    pub revision: u64,
}

/// `coord.sync.syncpoint.initiate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncPointInitiate {
    #[serde(default)]
    pub scope: ScopeId,
    /// Participants; each must have a document in the scope.
    pub agents: Vec<AgentId>,
    /// A free-form label for people.
    #[serde(default)]
    pub label: String,
}

/// Where a sync point is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncPointState {
    /// Recorded and announced; waiting for acknowledgements.
    Initiated,
    /// Every participant acknowledged.
    Completed,
    /// Completion was attempted and some participants did not acknowledge in time.
    Incomplete,
    #[serde(other)]
    Unknown,
}

/// One rollback of a sync point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RollbackRecord {
    pub notice_id: SyncPointId,
    pub at_ms: u64,
    /// The new revision written for each participant.
    #[serde(default)]
    pub revisions: BTreeMap<AgentId, u64>,
    pub verified: bool,
}

/// A sync point: a consistent cut of its participants' states.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SyncPoint {
    pub id: SyncPointId,
    #[serde(default)]
    pub scope: ScopeId,
    #[serde(default)]
    pub label: String,
    pub state: SyncPointState,
    /// The state bucket's stream sequence the cut was taken at: every
    /// participant's document is its latest revision at or below it.
    pub sequence: u64,
    /// Each participant's revision in the cut.
    pub cut: BTreeMap<AgentId, u64>,
    /// Participants that acknowledged, with when (ms).
    #[serde(default)]
    pub acked: BTreeMap<AgentId, u64>,
    /// Participants that had not acknowledged when completion was attempted.
    #[serde(default)]
    pub missing: Vec<AgentId>,
    pub created_at_ms: u64,
    #[serde(default)]
    pub completed_at_ms: Option<u64>,
    #[serde(default)]
    pub rollbacks: Vec<RollbackRecord>,
}

/// `coord.sync.syncpoint.{get,diff}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncPointRef {
    pub sync_point_id: SyncPointId,
}

/// `coord.sync.syncpoint.{complete,rollback}`: wait up to `timeout_ms` for acknowledgements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncPointWait {
    pub sync_point_id: SyncPointId,
    /// Milliseconds (default 5000); 0 does not wait.
    #[serde(default = "default_ack_timeout_ms")]
    pub timeout_ms: u64,
}

/// `coord.sync.syncpoint.list`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncPointListRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<ScopeId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SyncPointState>,
}

/// A sync point in a list (without per-agent detail).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SyncPointSummary {
    pub id: SyncPointId,
    #[serde(default)]
    pub scope: ScopeId,
    #[serde(default)]
    pub label: String,
    pub state: SyncPointState,
    pub sequence: u64,
    pub participants: usize,
    pub created_at_ms: u64,
    #[serde(default)]
    pub rollbacks: usize,
}

/// Reply to `coord.sync.syncpoint.list`, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SyncPointList {
    #[serde(default)]
    pub sync_points: Vec<SyncPointSummary>,
}

/// Reply to `coord.sync.syncpoint.rollback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RollbackReport {
    pub sync_point_id: SyncPointId,
    /// The id agents echo in their acknowledgements of the rollback notice.
    pub notice_id: SyncPointId,
    /// True when every participant's document, read back, equals its cut.
    pub verified: bool,
    /// Participants whose document, read back, differs from the cut.
    #[serde(default)]
    pub mismatches: Vec<AgentId>,
    #[serde(default)]
    pub agents: Vec<AgentSyncResult>,
}

/// One change between two versions of a document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DiffEntry {
    pub pointer: String,
    pub op: DiffOp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

/// What happened at a pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiffOp {
    Added,
    Removed,
    Changed,
    #[serde(other)]
    Unknown,
}

/// One participant's changes since the cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentDiff {
    pub agent_id: AgentId,
    pub cut_revision: u64,
    /// 0 when the document is gone.
    pub current_revision: u64,
    #[serde(default)]
    pub changes: Vec<DiffEntry>,
}

/// Reply to `coord.sync.syncpoint.diff`: the cut against the documents now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SyncPointDiff {
    pub sync_point_id: SyncPointId,
    #[serde(default)]
    pub agents: Vec<AgentDiff>,
    /// True when no participant changed since the cut.
    pub unchanged: bool,
}
