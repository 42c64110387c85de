//! Versioned agent state documents.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::id::AgentId;

/// `coord.sync.state.get`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StateGet {
    pub agent_id: AgentId,
}

/// `coord.sync.state.put`: a compare-and-set of an agent's state document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatePut {
    pub agent_id: AgentId,
    /// The revision this document was made from; 0 to create the first one.
    /// A stale revision is a `conflict` whose details carry the current document.
    pub expected_revision: u64,
    pub doc: Value,
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
}
