//! Allocation and capacity requests.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::id::{AgentId, AllocationId};

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
}

/// `coord.allocator.allocate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AllocateRequest {
    /// Who holds the allocation: a flow/task pair or any client id (free text).
    pub owner: String,
    #[serde(default)]
    pub requirements: Requirements,
    /// Higher is more important. Default 0.
    #[serde(default)]
    pub priority: i32,
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
}

/// `coord.allocator.release`. Releasing twice is not an error and frees nothing twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub allocation_id: AllocationId,
    pub agent_id: AgentId,
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
}

/// Capacity of one resource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ResourceCapacity {
    pub capacity: f64,
    pub allocated: f64,
    pub free: f64,
}

/// Reply to a capacity check.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CapacityStatus {
    /// Totals over every agent, per resource.
    #[serde(default)]
    pub pool: BTreeMap<String, ResourceCapacity>,
    /// Per agent, per resource.
    #[serde(default)]
    pub agents: BTreeMap<AgentId, BTreeMap<String, ResourceCapacity>>,
    /// Whether the requirements (if given) fit on some agent now.
    #[serde(default)]
    pub fits: Option<bool>,
    /// Agents the requirements fit on now, best first.
    #[serde(default)]
    pub candidates: Vec<AgentId>,
}
