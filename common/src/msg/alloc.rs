//! Allocation, capacity, reservation, adjustment and rebalancing messages.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::id::{AgentId, AllocationId, FlowId, ReservationId, TaskId};
use crate::msg::AgentStatus;

/// What a task (or any client) needs from the agent that runs it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Amount per named resource, e.g. `{"cpu": 1, "gpu": 1}`.
    #[serde(default)]
    pub resources: BTreeMap<String, f64>,
    /// Capabilities the agent must have, all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Labels the agent must carry, with these exact values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// How to choose among the agents that fit. Default `best_fit`.
    #[serde(default, skip_serializing_if = "Policy::is_default")]
    pub policy: Policy,
    /// Anti-affinity group: never on an agent that already holds an allocation
    /// of the same group (so gang members of one group land on distinct agents).
    /// Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
    /// Whether `optimize` with `apply` may move the allocation to another agent.
    /// Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub movable: bool,
}

/// How to choose among the agents requirements fit on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Least leftover on the scarcest requested resource: keeps big holes free
    /// for big requests. The default.
    #[default]
    BestFit,
    /// Most leftover: spreads load (and the blast radius of losing an agent).
    Spread,
}

impl Policy {
    fn is_default(&self) -> bool {
        *self == Policy::BestFit
    }
}

/// `coord.allocator.allocate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocateRequest {
    /// Who holds the allocation: a flow/task pair or any client id (free text).
    /// Reservations of owner `x` also serve owners `x/…`.
    pub owner: String,
    #[serde(default)]
    pub requirements: Requirements,
    /// Higher is more important; preemption releases the lowest first. Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Id for the allocation, chosen by the caller so that a retried or timed-out
    /// request is harmless: an allocation with this id that exists already is
    /// returned as it is, and the id can be released without knowing the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_id: Option<AllocationId>,
    /// When the caller stops waiting, in ms since the epoch. A request the
    /// allocator reaches later (its replica was frozen or stalled, and read it
    /// late) is refused with `timeout` instead of booked, so it cannot book
    /// behind the back of a caller who has since retried, been refused or
    /// released the id. Checked again in the booking's compare-and-set. The
    /// typed client sets it to its request timeout. Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    /// The flow task the allocation is for. The allocator's reconciliation
    /// asks the orchestrator whether that task still holds it, and takes it
    /// back if not (the orchestrator died between booking and recording it,
    /// or its release was lost). The orchestrator sets it. Default none.
    ///
    /// With the `allocation_id` of a live allocation of the same `owner` that
    /// was booked for another task, the allocation is handed on: it is bound
    /// to this task from now on (`bound_at_ms`) and returned, with nothing
    /// booked anew. The orchestrator hands a finished task's allocation to
    /// the next task of the same owner and requirements this way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskRef>,
    /// A lease for a client's own allocation: taken back (`allocation.preempted`,
    /// reason `expired`) unless renewed (`coord.allocator.renew`) within this
    /// many ms. Default none: held until released — an operator's booking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// How long a flow task that succeeded vouches for the allocation it held,
/// in ms after it ended: its orchestrator replica may have handed the
/// allocation on to another task (see [`AllocateRequest::task`]), which the
/// allocator learns late or, for a short task, never. Far longer than that
/// takes; short enough that one a dead replica kept is soon taken back.
pub const HAND_ON_VOUCH_MS: u64 = 10_000;

/// A task of a flow, as the holder of an allocation.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(deny_unknown_fields)]
pub struct TaskRef {
    pub flow_id: FlowId,
    pub task_id: TaskId,
}

/// `coord.allocator.renew`: extends an allocation's lease.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    pub allocation_id: AllocationId,
    /// The new lease from now, in ms; default the allocation's own `ttl_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// `coord.orchestrator.allocations.held`: the allocator's reconciliation asks
/// which of these allocations their flow tasks still hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeldRequest {
    pub allocations: Vec<HeldQuery>,
}

/// One allocation and the task it was booked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeldQuery {
    pub allocation_id: AllocationId,
    pub task: TaskRef,
}

/// Reply: the allocations no task holds, each with why. An allocation whose
/// flow could not be read is held (nothing is taken back on doubt).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HeldReply {
    #[serde(default)]
    pub unheld: Vec<Unheld>,
}

/// An allocation its task does not hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Unheld {
    pub allocation_id: AllocationId,
    /// E.g. "flow f1 is gone", "task t1 is succeeded", "task t1 holds another allocation".
    pub reason: String,
}

/// A live allocation: `resources` held on `agent_id` for `owner`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Allocation {
    pub allocation_id: AllocationId,
    pub agent_id: AgentId,
    pub owner: String,
    #[serde(default)]
    pub resources: BTreeMap<String, f64>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub created_at_ms: u64,
    /// The reservation this allocation draws from; it ends with the reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation_id: Option<ReservationId>,
    /// Anti-affinity group, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
    /// Whether a rebalancing may move it.
    #[serde(default)]
    pub movable: bool,
    /// Capabilities it needs (so a rebalancing only moves it where they are).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Labels it needs, likewise.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The gang it belongs to, if it was placed as part of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang_id: Option<String>,
    /// Booked but not yet confirmed (a gang member, or an allocation waiting to
    /// be counted against its owner's quota): it holds capacity, and is rolled
    /// back if not confirmed in time (the booking replica died).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
    /// The flow task it was booked for (see [`AllocateRequest::task`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskRef>,
    /// Its lease (see [`AllocateRequest::ttl_ms`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// When its lease ends unless renewed, in ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// When it was last handed on to another task (see
    /// [`AllocateRequest::task`]), in ms since the epoch; none if never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound_at_ms: Option<u64>,
}

/// `coord.allocator.allocate.gang`: several requirements placed all-or-nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GangRequest {
    pub owner: String,
    /// One entry per member; at least one. Members sharing an anti-affinity
    /// group land on distinct agents.
    pub members: Vec<Requirements>,
    #[serde(default)]
    pub priority: i32,
}

/// Reply to a gang allocation: one allocation per member, in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GangReply {
    pub gang_id: String,
    pub allocations: Vec<Allocation>,
}

/// `coord.allocator.release`. Releasing twice is not an error and frees nothing twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub allocation_id: AllocationId,
    /// Where it was placed, if known. If it has been moved since, or is not
    /// given, it is found where it is now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
}

/// Reply to a release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReleaseReply {
    /// False when the allocation was already gone.
    pub released: bool,
}

/// `coord.allocator.capacity.check`: the pool's capacity, and optionally whether
/// given requirements fit now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CapacityRequest {
    #[serde(default)]
    pub requirements: Option<Requirements>,
    /// Check the fit as this owner (who may draw from its reservations). Default: nobody's.
    #[serde(default)]
    pub owner: Option<String>,
}

/// Capacity of one resource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ResourceCapacity {
    pub capacity: f64,
    /// Held by allocations outside reservations.
    pub allocated: f64,
    /// Held by reservations now or later (the peak still ahead), whether drawn from or not.
    #[serde(default)]
    pub reserved: f64,
    /// `capacity - allocated - reserved`: what an owner without a reservation can take.
    pub free: f64,
}

/// Why requirements do not fit on one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Unfit {
    /// The agent is draining or lost: no new placements.
    NotAccepting {
        status: AgentStatus,
    },
    MissingCapability {
        capability: String,
    },
    LabelMismatch {
        label: String,
        want: String,
        #[serde(default)]
        have: Option<String>,
    },
    /// An allocation of the same anti-affinity group is already there.
    AntiAffinity {
        group: String,
    },
    /// `resource` is short by `needed - free`.
    Short {
        resource: String,
        needed: f64,
        free: f64,
    },
    /// A reason this build does not know.
    #[serde(other)]
    Unknown,
}

/// No agent can take the requirements now (the `details` of a `no_capacity` error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct NoFit {
    pub message: String,
    /// The agent closest to fitting (short on the least), if any agent has the
    /// right capabilities and labels.
    #[serde(default)]
    pub best_candidate: Option<AgentId>,
    /// What that candidate lacks.
    #[serde(default)]
    pub short: Option<Unfit>,
    #[serde(default)]
    pub agents_considered: usize,
    /// For a gang: which member (0-based) could not be placed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<usize>,
}

/// Reply to a capacity check.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CapacityStatus {
    /// Totals over the agents that take placements (not draining, not lost), per resource.
    #[serde(default)]
    pub pool: BTreeMap<String, ResourceCapacity>,
    /// Per agent (every agent), per resource.
    #[serde(default)]
    pub agents: BTreeMap<AgentId, BTreeMap<String, ResourceCapacity>>,
    /// Per label (`key=value`), totals over the agents that take placements.
    #[serde(default)]
    pub labels: BTreeMap<String, BTreeMap<String, ResourceCapacity>>,
    /// Every agent's life-cycle status.
    #[serde(default)]
    pub agent_status: BTreeMap<AgentId, AgentStatus>,
    /// When the answering allocator last heard each agent's heartbeat (ms
    /// since the epoch); an agent not heard from since it started is absent.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub last_heartbeat_ms: BTreeMap<AgentId, u64>,
    /// Whether the requirements (if given) fit on some agent now.
    #[serde(default)]
    pub fits: Option<bool>,
    /// Agents the requirements fit on now, best first.
    #[serde(default)]
    pub candidates: Vec<AgentId>,
    /// Agents the requirements could go to once those agents are idle: they take
    /// placements, have the capabilities and labels, and enough capacity in all.
    #[serde(default)]
    pub eligible: Vec<AgentId>,
    /// When they do not fit: what is short, and on which best candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_fit: Option<NoFit>,
    /// Quotas by the owner they are set for: those covering the request's
    /// `owner` when it names one, else every quota.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub quotas: BTreeMap<String, QuotaStatus>,
}

/// `coord.allocator.capacity.reserve`: hold capacity on one agent for `owner`
/// over `[start_ms, end_ms)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// Who may draw from it: this owner and owners `owner/…`.
    pub owner: String,
    pub requirements: Requirements,
    /// Window start, ms since the epoch (may be now or in the past: starts at once).
    pub start_ms: u64,
    /// Window end (exclusive), after `start_ms` and in the future.
    pub end_ms: u64,
    /// Reserve on this agent; default: placed by best fit over the window.
    #[serde(default)]
    pub agent_id: Option<AgentId>,
}

/// A reservation as stored and answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Reservation {
    pub reservation_id: ReservationId,
    pub agent_id: AgentId,
    pub owner: String,
    #[serde(default)]
    pub resources: BTreeMap<String, f64>,
    pub start_ms: u64,
    pub end_ms: u64,
    #[serde(default)]
    pub created_at_ms: u64,
}

/// `coord.allocator.reservation.cancel`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelReservation {
    pub reservation_id: ReservationId,
    /// Where it is held; looked up when absent.
    #[serde(default)]
    pub agent_id: Option<AgentId>,
}

/// Reply to a cancellation (idempotent, like release).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelReply {
    /// False when the reservation was already gone.
    pub cancelled: bool,
    /// Allocations that drew from it, released with it.
    #[serde(default)]
    pub released: Vec<Allocation>,
}

/// `coord.allocator.capacity.adjust`: change one agent's capacity at run time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdjustRequest {
    pub agent_id: AgentId,
    /// New amounts for the named resources; resources not named keep theirs.
    pub capacity: BTreeMap<String, f64>,
    /// When allocations no longer fit: release the lowest-priority ones first
    /// (newest first among equals). Without it, such an adjustment is not applied
    /// and the reply names what would have to go. Default false.
    #[serde(default)]
    pub preempt: bool,
}

/// Reply to an adjustment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AdjustReply {
    /// Whether the new capacity is in force.
    pub applied: bool,
    /// The agent's capacity now.
    #[serde(default)]
    pub capacity: BTreeMap<String, f64>,
    /// Allocations that do not fit the new capacity, in preemption order.
    #[serde(default)]
    pub no_longer_fit: Vec<Allocation>,
    /// Reservations that do not fit it either (cancelled when preempting).
    #[serde(default)]
    pub reservations_no_longer_fit: Vec<Reservation>,
    /// What was released (empty unless `preempt`).
    #[serde(default)]
    pub preempted: Vec<Allocation>,
}

/// `coord.allocator.quota.set`: cap what `owner` may hold across the pool.
/// The quota covers the owner and every owner below it (`team` covers
/// `team/flow-1`), like reservations; gang members count one by one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaRequest {
    pub owner: String,
    /// Most the owner may hold per resource, summed over its allocations on
    /// every agent; resources not named are not capped. Empty clears the quota.
    #[serde(default)]
    pub limits: BTreeMap<String, f64>,
    /// When the owner already holds more than the new limits: release the
    /// lowest-priority allocations first (newest first among equals). Without
    /// it, such a change is not applied and the reply names what would have to
    /// go. Default false.
    #[serde(default)]
    pub preempt: bool,
}

/// A quota and what is counted against it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QuotaStatus {
    /// Most the owner may hold, per resource.
    #[serde(default)]
    pub limits: BTreeMap<String, f64>,
    /// Held now by the owner and the owners below it, per resource (every
    /// resource they hold, limited or not).
    #[serde(default)]
    pub used: BTreeMap<String, f64>,
    /// How many allocations are counted.
    #[serde(default)]
    pub allocations: usize,
}

/// Reply to a quota change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QuotaReply {
    pub owner: String,
    /// Whether the requested limits are in force.
    pub applied: bool,
    /// The quota in force now; absent when the owner has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaStatus>,
    /// Allocations beyond the new limits, in preemption order.
    #[serde(default)]
    pub no_longer_fit: Vec<Allocation>,
    /// What was released (empty unless `preempt`).
    #[serde(default)]
    pub preempted: Vec<Allocation>,
}

/// Why an allocation was refused by a quota (the `details` of a
/// `quota_exceeded` error).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct QuotaExceeded {
    /// Who the allocation was for.
    pub owner: String,
    /// Who the quota is set for: `owner` or an owner above it.
    pub quota_owner: String,
    pub resource: String,
    pub limit: f64,
    /// Already held against the quota.
    pub in_use: f64,
    /// What the refused request (all of a gang's members) asked for.
    pub requested: f64,
}

/// `coord.allocator.optimize`: a rebalancing plan, applied only on request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OptimizeRequest {
    /// Carry out the moves (only allocations marked movable are ever moved). Default false.
    #[serde(default)]
    pub apply: bool,
    /// Most moves to plan. Default 100.
    #[serde(default)]
    pub max_moves: Option<usize>,
}

/// One planned move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Move {
    pub allocation_id: AllocationId,
    pub owner: String,
    pub from: AgentId,
    pub to: AgentId,
    #[serde(default)]
    pub resources: BTreeMap<String, f64>,
}

/// Utilisation figures over the agents that take placements. An agent's
/// utilisation is its busiest resource's share of capacity (0..=1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Utilisation {
    /// The hottest agent's utilisation.
    pub max: f64,
    pub mean: f64,
    /// Standard deviation across agents: how uneven the load is.
    pub stddev: f64,
    /// Per resource, the share of free capacity outside the largest free block:
    /// averaged over resources (0 = all free capacity in one place).
    pub fragmentation: f64,
    #[serde(default)]
    pub per_agent: BTreeMap<AgentId, f64>,
}

/// Reply to `optimize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct OptimizePlan {
    pub moves: Vec<Move>,
    pub before: Utilisation,
    /// As it would be (or is, when applied) after the moves.
    pub after: Utilisation,
    /// Moves carried out (empty unless `apply`); a move whose allocation changed
    /// meanwhile is skipped.
    #[serde(default)]
    pub applied: Vec<AllocationId>,
}
