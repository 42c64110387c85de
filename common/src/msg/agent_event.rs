//! Agent events: facts an external agent announces ("document indexed", "robot
//! docked", "human approved"), as opposed to the domain events coordkit's own
//! services write under `coord.events.…`.
//!
//! An agent publishes an [`AgentEventPublish`] on its own subject
//! `coord.agents.{id}.events.{type}`; the synchronizer checks it (the type's
//! JSON Schema, if an operator registered one) and stores it as an
//! [`AgentEvent`] in the `COORD_AGENT_EVENTS` stream under
//! `coord.agent_events.{type}.{agent}`. The agent and the type are taken from
//! the subject, which the server can confine to the agent, never from the body.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, ErrorCode};
use crate::id::AgentId;

/// Longest event type, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 64;
/// The event type grammar: one NATS token, lowercase so `Approved` and
/// `approved` can never be two types.
pub const EVENT_TYPE_PATTERN: &str = "^[a-z0-9_-]{1,64}$";
/// Longest event id, in bytes.
pub const MAX_EVENT_ID_LEN: usize = 128;
/// The event id grammar (it goes into the `Nats-Msg-Id` header as
/// `{agent}.{event id}`, never into a subject).
pub const EVENT_ID_PATTERN: &str = "^[A-Za-z0-9_.:-]{1,128}$";
/// Largest `data` accepted, in bytes of JSON.
pub const MAX_EVENT_DATA_BYTES: usize = 256 * 1024;
/// Events a list answers with when the query names no limit.
pub const DEFAULT_EVENT_LIST_LIMIT: usize = 100;
/// Most events one list answers with.
pub const MAX_EVENT_LIST_LIMIT: usize = 1_000;

/// Checks an event type (a subject token): `invalid_id` if it is not one.
pub fn validate_event_type(t: &str) -> Result<(), Error> {
    let ok = !t.is_empty()
        && t.len() <= MAX_EVENT_TYPE_LEN
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::InvalidId,
            format!(
                "invalid event type {:?}: 1 to {MAX_EVENT_TYPE_LEN} of a-z, 0-9, '_' or '-'",
                t.chars().take(MAX_EVENT_TYPE_LEN).collect::<String>()
            ),
        ))
    }
}

/// Checks an agent-chosen event id: `invalid_id` if it breaks the grammar.
pub fn validate_event_id(id: &str) -> Result<(), Error> {
    let ok = !id.is_empty()
        && id.len() <= MAX_EVENT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::InvalidId,
            format!(
                "invalid event id {:?}: 1 to {MAX_EVENT_ID_LEN} of A-Z, a-z, 0-9, '_', '.', ':' or '-'",
                id.chars().take(MAX_EVENT_ID_LEN).collect::<String>()
            ),
        ))
    }
}

/// The `Nats-Msg-Id` an event is stored under: scoped by the agent, so one
/// agent's ids can never collide with (or suppress) another's.
pub fn event_msg_id(agent: &AgentId, event_id: &str) -> String {
    format!("{agent}.{event_id}")
}

/// `coord.agents.{id}.events.{type}` (agent → synchronizer, a request or a
/// plain publish): one event of the agent's. Written by agents' authors, so
/// unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentEventPublish {
    /// Any JSON, `null` included (at most 256 KiB); checked against the
    /// type's schema when an operator registered one. Required, so an empty
    /// body is refused rather than stored as an event.
    pub data: Value,
    /// The agent's own id for this event (1..=128 of `A-Za-z0-9_.:-`): a
    /// re-sent event with the same id within two minutes is stored once.
    /// Absent = a fresh id is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

/// An accepted agent event as stored in `COORD_AGENT_EVENTS` on
/// `coord.agent_events.{type}.{agent}`, and the reply to a publish made as a
/// request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentEvent {
    /// The agent's `event_id`, or the one made for it.
    pub event_id: String,
    /// From the subject it was published on.
    pub agent_id: AgentId,
    /// From the subject it was published on.
    pub event_type: String,
    #[serde(default)]
    pub data: Value,
    /// When the synchronizer accepted it (ms since the epoch).
    pub published_ms: u64,
}

/// One stored event with its stream sequence, as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentEventRecord {
    /// Its sequence in `COORD_AGENT_EVENTS`: increasing, for paging.
    pub seq: u64,
    #[serde(flatten)]
    pub event: AgentEvent,
}

/// Matches events whose `data` holds `equals` at JSON Pointer `path`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldMatch {
    /// A JSON Pointer into `data` (`""` or starting with `/`), e.g. `/approved`.
    pub path: String,
    pub equals: Value,
}

/// `coord.sync.events.list`: stored agent events, oldest first. Every filter
/// given must hold.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentEventQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<AgentId>,
    /// Published at or after (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_ms: Option<u64>,
    /// Published before (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[serde(rename = "match")]
    pub field: Option<FieldMatch>,
    /// At most this many (default 100, at most 1,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Start at this stream sequence (a previous page's `next_seq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<u64>,
}

/// The answer to `coord.sync.events.list`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct AgentEventList {
    pub events: Vec<AgentEventRecord>,
    /// Set when more may match: pass it as `from_seq` for the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_seq: Option<u64>,
}

/// `coord.sync.events.schema.set`: registers (or, with `schema: null`,
/// removes) the JSON Schema events of one type must match. Types without one
/// are accepted as they come.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventSchemaSet {
    pub event_type: String,
    #[serde(default)]
    pub schema: Option<Value>,
}

/// `coord.sync.events.schema.get`: one type's registered schema.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventSchemaGet {
    pub event_type: String,
}

/// A registered event schema, as stored and answered (`schema: null` after a
/// removal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventSchema {
    pub event_type: String,
    #[serde(default)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub updated_ms: u64,
}

/// `coord.sync.events.schema.list`: every registered schema.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EventSchemaListRequest {}

/// The answer to `coord.sync.events.schema.list`, by type.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct EventSchemaList {
    pub schemas: Vec<EventSchema>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_lowercase_tokens() {
        for ok in [
            "approved",
            "doc_indexed",
            "robot-docked",
            "a1",
            &"x".repeat(64),
        ] {
            assert!(validate_event_type(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Approved",
            "a.b",
            "a*",
            ">",
            "a b",
            "é",
            &"x".repeat(65),
        ] {
            assert_eq!(
                validate_event_type(bad).unwrap_err().code,
                ErrorCode::InvalidId,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn ids_allow_dots_and_colons_but_nothing_unsafe() {
        for ok in ["t-1", "job:42.done", &"x".repeat(128)] {
            assert!(validate_event_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a\r\nb", "a/b", "a*", &"x".repeat(129)] {
            assert!(validate_event_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_publish_refuses_unknown_fields_and_needs_data() {
        let p: AgentEventPublish = serde_json::from_str(r#"{"data":null}"#).unwrap();
        assert_eq!(p.data, Value::Null);
        assert!(serde_json::from_str::<AgentEventPublish>("{}").is_err());
        assert!(serde_json::from_str::<AgentEventPublish>(r#"{"data":1,"agent_id":"x"}"#).is_err());
    }

    #[test]
    fn a_record_lists_flat() {
        let r = AgentEventRecord {
            seq: 7,
            event: AgentEvent {
                event_id: "e".into(),
                agent_id: AgentId::new("w1").unwrap(),
                event_type: "approved".into(),
                data: serde_json::json!({"ok": true}),
                published_ms: 1,
            },
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["event_type"], "approved");
        assert_eq!(serde_json::from_value::<AgentEventRecord>(v).unwrap(), r);
    }
}
