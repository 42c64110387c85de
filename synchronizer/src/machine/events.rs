//! Agent events: the checks an event and a query must pass, the filter a
//! stored event is listed by, and the verdict a refused plain publish gets.

use common::msg::{
    validate_event_id, validate_event_type, AgentEvent, AgentEventPublish, AgentEventQuery,
    RejectReason, Violation, DEFAULT_EVENT_LIST_LIMIT, MAX_EVENT_DATA_BYTES, MAX_EVENT_LIST_LIMIT,
};
use common::{AgentId, Error, ErrorCode};
use serde_json::Value;

use super::{pointer, rules, MAX_DEPTH};

/// Checks a published event's body: its id's grammar, its data's size and depth.
pub fn check_publish(body: &AgentEventPublish) -> Result<(), Error> {
    if let Some(id) = &body.event_id {
        validate_event_id(id)?;
    }
    let size = serde_json::to_vec(&body.data)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_EVENT_DATA_BYTES {
        return Err(Error::new(
            ErrorCode::PayloadTooLarge,
            format!("event data is {size} bytes, at most {MAX_EVENT_DATA_BYTES} allowed"),
        ));
    }
    if super::depth(&body.data) > MAX_DEPTH {
        return Err(Error::bad_request(format!(
            "event data nests deeper than {MAX_DEPTH}"
        )));
    }
    Ok(())
}

/// Refuses data its type's schema does not allow, listing every violation.
pub fn check_schema(
    schema: &rules::Schema,
    agent: &AgentId,
    event_type: &str,
    data: &Value,
) -> Result<(), Error> {
    let violations: Vec<Violation> = rules::schema_violations(schema, agent, data);
    let Some(first) = violations.first() else {
        return Ok(());
    };
    let more = match violations.len() {
        1 => String::new(),
        n => format!(" (and {} more)", n - 1),
    };
    Err(Error::new(
        ErrorCode::ValidationFailed,
        format!(
            "the event does not satisfy the schema of {event_type}: {}{more}",
            first.message
        ),
    )
    .with_details(serde_json::json!({ "event_type": event_type, "violations": violations })))
}

/// A query checked, with its limit resolved.
#[derive(Debug, Clone)]
pub struct Query {
    pub q: AgentEventQuery,
    pub limit: usize,
}

/// Checks a list query before any stream is read.
pub fn check_query(q: AgentEventQuery) -> Result<Query, Error> {
    if let Some(t) = &q.event_type {
        validate_event_type(t)?;
    }
    if let Some(m) = &q.field {
        if !pointer::is_valid(&m.path) {
            return Err(Error::bad_request(format!(
                "match.path {:?} is not a JSON Pointer (empty or starting with '/')",
                m.path
            )));
        }
    }
    if let (Some(since), Some(until)) = (q.since_ms, q.until_ms) {
        if until < since {
            return Err(Error::bad_request(format!(
                "until_ms {until} is before since_ms {since}"
            )));
        }
    }
    if q.from_seq == Some(0) {
        return Err(Error::bad_request("from_seq starts at 1"));
    }
    let limit = match q.limit {
        None => DEFAULT_EVENT_LIST_LIMIT,
        Some(0) => return Err(Error::bad_request("limit must be at least 1")),
        Some(n) if n > MAX_EVENT_LIST_LIMIT => {
            return Err(Error::bad_request(format!(
                "limit {n} is more than the {MAX_EVENT_LIST_LIMIT} allowed"
            )))
        }
        Some(n) => n,
    };
    Ok(Query { q, limit })
}

impl Query {
    /// Whether a stored event is listed. Type and agent are normally narrowed
    /// by the consumer's filter subject already; checked again for safety.
    pub fn matches(&self, e: &AgentEvent) -> bool {
        let q = &self.q;
        q.event_type.as_ref().is_none_or(|t| *t == e.event_type)
            && q.agent_id.as_ref().is_none_or(|a| *a == e.agent_id)
            && q.since_ms.is_none_or(|s| e.published_ms >= s)
            && q.until_ms.is_none_or(|u| e.published_ms < u)
            && q.field
                .as_ref()
                .is_none_or(|m| e.data.pointer(&m.path) == Some(&m.equals))
    }
}

/// The rule a refused event broke, for a verdict on the agent's `rejected`
/// subject (its code says as much; this names the rule).
pub fn reject_reason(code: ErrorCode) -> RejectReason {
    match code {
        ErrorCode::BadRequest | ErrorCode::PayloadTooLarge => RejectReason::Malformed,
        ErrorCode::InvalidId => RejectReason::InvalidEventType,
        ErrorCode::ValidationFailed => RejectReason::SchemaViolation,
        ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::Timeout => {
            RejectReason::NotStored
        }
        _ => RejectReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::msg::FieldMatch;
    use serde_json::json;

    fn event(t: &str, agent: &str, at: u64, data: Value) -> AgentEvent {
        AgentEvent {
            event_id: "e".into(),
            agent_id: AgentId::new(agent).unwrap(),
            event_type: t.into(),
            data,
            published_ms: at,
        }
    }

    #[test]
    fn every_filter_given_must_hold() {
        let q = check_query(AgentEventQuery {
            event_type: Some("approved".into()),
            agent_id: Some(AgentId::new("w1").unwrap()),
            since_ms: Some(10),
            until_ms: Some(20),
            field: Some(FieldMatch {
                path: "/ok".into(),
                equals: json!(true),
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(q.limit, DEFAULT_EVENT_LIST_LIMIT);
        assert!(q.matches(&event("approved", "w1", 10, json!({"ok": true}))));
        assert!(!q.matches(&event("approved", "w1", 20, json!({"ok": true}))));
        assert!(!q.matches(&event("approved", "w1", 9, json!({"ok": true}))));
        assert!(!q.matches(&event("approved", "w2", 15, json!({"ok": true}))));
        assert!(!q.matches(&event("docked", "w1", 15, json!({"ok": true}))));
        assert!(!q.matches(&event("approved", "w1", 15, json!({"ok": "true"}))));
        assert!(!q.matches(&event("approved", "w1", 15, json!(null))));
        let all = check_query(AgentEventQuery::default()).unwrap();
        assert!(all.matches(&event("x", "w9", 0, json!(null))));
    }

    #[test]
    fn bad_queries_are_refused_with_typed_codes() {
        let code = |q: AgentEventQuery| check_query(q).unwrap_err().code;
        assert_eq!(
            code(AgentEventQuery {
                event_type: Some("Bad".into()),
                ..Default::default()
            }),
            ErrorCode::InvalidId
        );
        for q in [
            AgentEventQuery {
                limit: Some(0),
                ..Default::default()
            },
            AgentEventQuery {
                limit: Some(MAX_EVENT_LIST_LIMIT + 1),
                ..Default::default()
            },
            AgentEventQuery {
                since_ms: Some(5),
                until_ms: Some(4),
                ..Default::default()
            },
            AgentEventQuery {
                from_seq: Some(0),
                ..Default::default()
            },
            AgentEventQuery {
                field: Some(FieldMatch {
                    path: "approved".into(),
                    equals: json!(true),
                }),
                ..Default::default()
            },
        ] {
            assert_eq!(code(q), ErrorCode::BadRequest);
        }
    }

    #[test]
    fn published_bodies_are_bounded() {
        let ok = AgentEventPublish {
            data: json!({"a": 1}),
            event_id: Some("job:1.done".into()),
        };
        assert!(check_publish(&ok).is_ok());
        let bad_id = AgentEventPublish {
            event_id: Some("a b".into()),
            ..ok.clone()
        };
        assert_eq!(
            check_publish(&bad_id).unwrap_err().code,
            ErrorCode::InvalidId
        );
        let big = AgentEventPublish {
            data: json!("x".repeat(MAX_EVENT_DATA_BYTES)),
            event_id: None,
        };
        assert_eq!(
            check_publish(&big).unwrap_err().code,
            ErrorCode::PayloadTooLarge
        );
        let mut deep = json!(1);
        for _ in 0..=MAX_DEPTH {
            deep = json!([deep]);
        }
        let deep = AgentEventPublish {
            data: deep,
            event_id: None,
        };
        assert_eq!(
            check_publish(&deep).unwrap_err().code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn a_schema_violation_lists_every_problem() {
        let schema = rules::compile_schema(&json!({
            "type": "object",
            "required": ["approved", "by"],
            "properties": {"approved": {"type": "boolean"}}
        }))
        .unwrap();
        let a = AgentId::new("w1").unwrap();
        assert!(check_schema(
            &schema,
            &a,
            "approved",
            &json!({"approved": true, "by": "x"})
        )
        .is_ok());
        let e = check_schema(&schema, &a, "approved", &json!({"approved": "yes"})).unwrap_err();
        assert_eq!(e.code, ErrorCode::ValidationFailed);
        assert_eq!(e.details["violations"].as_array().unwrap().len(), 2);
        assert_eq!(reject_reason(e.code), RejectReason::SchemaViolation);
    }
}
