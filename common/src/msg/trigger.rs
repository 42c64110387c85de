//! Triggers: flows an operator registers to start when a matching agent event
//! is stored.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::id::AgentId;
use crate::msg::{FieldMatch, FlowSpec};

/// The input key under which every task of a flow a trigger started finds the
/// agent event that started it.
pub const TRIGGER_EVENT_KEY: &str = "trigger_event";

/// `coord.orchestrator.trigger.set`: start `flow` once for every stored agent
/// event of `event_type` (from `agent_id` when given, whose `data` matches
/// `match` when given). Setting a name that exists replaces its trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Letters, digits, `_` and `-`, at most 32 characters.
    pub name: String,
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub field: Option<FieldMatch>,
    /// The flow to start. It has no `id` (each flow's id is derived from the
    /// trigger and the event) and no `tasks_object`. Each task's `input`
    /// (an object, or absent) gets the event under `trigger_event`.
    pub flow: FlowSpec,
}

/// Longest trigger name: a triggered flow's id is `trg-{name}-{16 hex digits}`.
pub const MAX_TRIGGER_NAME: usize = 32;

impl Trigger {
    /// Whether an agent event matches.
    pub fn matches(&self, event_type: &str, agent: &AgentId, data: &serde_json::Value) -> bool {
        crate::msg::event_matches(
            &self.event_type,
            self.agent_id.as_ref(),
            self.field.as_ref(),
            event_type,
            agent,
            data,
        )
    }
}

/// `coord.orchestrator.trigger.get` / `trigger.delete`: names a trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerRef {
    pub name: String,
}

/// `coord.orchestrator.trigger.list`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerListRequest {}

/// Reply to `trigger.list`: every trigger, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TriggerList {
    pub triggers: Vec<Trigger>,
}

/// Reply to `trigger.delete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TriggerDeleted {
    pub name: String,
    /// Whether there was such a trigger.
    pub deleted: bool,
}
