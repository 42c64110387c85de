//! Flows that react to agent events: what a wait task waits for, and
//! triggers, flows an operator registers to start when a matching agent event
//! is stored.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// What a wait task waits for: the first agent event of `event_type` (from
/// `agent_id` when given, whose `data` matches `match` when given) stored at
/// or after the moment the task began waiting. Events stored earlier, even
/// since the flow started, do not count: a wait is for something that
/// happens after the work before it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitFor {
    /// The event's type (`a-z`, `0-9`, `_` and `-`, at most 64).
    pub event_type: String,
    /// Only events this agent published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    /// Only events whose `data` holds this value at this place.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub field: Option<FieldMatch>,
    /// How long to wait, from the moment the task began waiting; the task
    /// then ends `timed_out` with the error `wait_timed_out: …`. Default:
    /// no limit (until the flow is cancelled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Whether an agent event of `event_type` from `agent` with `data` matches a
/// filter of the same three parts (as a wait task and a trigger hold them).
pub fn event_matches(
    want_type: &str,
    want_agent: Option<&AgentId>,
    field: Option<&FieldMatch>,
    event_type: &str,
    agent: &AgentId,
    data: &Value,
) -> bool {
    want_type == event_type
        && want_agent.is_none_or(|a| a == agent)
        && field.is_none_or(|f| data.pointer(&f.path) == Some(&f.equals))
}

/// What is wrong with an event filter, for a validation message; `None` when
/// it is fine.
pub fn event_filter_problem(event_type: &str, field: Option<&FieldMatch>) -> Option<String> {
    if let Err(e) = crate::msg::validate_event_type(event_type) {
        return Some(e.message);
    }
    if let Some(f) = field {
        if !(f.path.is_empty() || f.path.starts_with('/')) {
            return Some(format!(
                "match.path {:?} is not a JSON Pointer (it must be empty or start with '/')",
                f.path
            ));
        }
        if f.path.len() > MAX_POINTER_LEN {
            return Some(format!(
                "match.path is {} bytes, at most {MAX_POINTER_LEN} allowed",
                f.path.len()
            ));
        }
    }
    None
}

/// Longest JSON Pointer a filter may hold.
pub const MAX_POINTER_LEN: usize = 256;

impl WaitFor {
    /// Whether an agent event matches.
    pub fn matches(&self, event_type: &str, agent: &AgentId, data: &Value) -> bool {
        event_matches(
            &self.event_type,
            self.agent_id.as_ref(),
            self.field.as_ref(),
            event_type,
            agent,
            data,
        )
    }
}

/// Which trigger started a flow, on which agent event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FlowOrigin {
    pub trigger: String,
    pub event_type: String,
    pub agent_id: AgentId,
    pub event_id: String,
    /// The event's sequence in the agent events stream.
    #[serde(default)]
    pub stream_seq: u64,
}
