//! The bad-input corpus: every request endpoint of every service (the channel
//! table in `xtask`, checked against what the services announce in
//! `$SRV.INFO`) gets malformed requests: not JSON, wrong shapes, missing and
//! unknown fields, wrong types, unknown enum values, NaN and overflowing
//! numbers, deep nesting, oversized payloads, ids that are not subject-safe,
//! negative resources, self-dependencies, duplicate tasks, and requests that
//! expect no reply. Each answered one gets a typed error with a documented
//! code; afterwards every service still answers `$SRV.PING` and no stream or
//! KV bucket has a new revision.
//!
//! Most cases are derived from the request's JSON Schema (required fields,
//! property types, id patterns, enums) applied to a well-formed base request
//! per endpoint, which is never sent itself. An endpoint without a base fails
//! the test, so a new endpoint cannot go without coverage. A per-agent
//! endpoint (`coord.agents.*.…`) is sent to agent `a1`'s subject, and a body
//! naming another agent there is `forbidden`.
//!
//! Every endpoint also gets an empty object and an empty body (which the
//! endpoints read as `{}`): a read may answer them, but no endpoint may write
//! anything for them (a scope set from `{}` used to reset the `default` scope).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_nats::jetstream;
use common::{subject, ErrorCode};
use futures::StreamExt;
use serde_json::{json, Map, Value};
use testkit::{NatsServer, System, SERVICES};
use xtask::Pattern;

/// A request body and the codes an answer may carry.
struct Case {
    what: String,
    body: Vec<u8>,
    expect: Vec<ErrorCode>,
}

fn case(what: impl Into<String>, body: impl Into<Vec<u8>>, expect: &[ErrorCode]) -> Case {
    Case {
        what: what.into(),
        body: body.into(),
        expect: expect.to_vec(),
    }
}

use ErrorCode::{
    BadRequest, Forbidden, InvalidId, NoCapacity, NotFound, PayloadTooLarge, ValidationFailed,
};

/// The agent whose own subjects the per-agent endpoints are sent to (the base
/// requests name it).
const AGENT: &str = "a1";

/// A well-formed request per endpoint: the starting point of the derived
/// cases. Never sent as is (some would change state).
fn base(subject: &str) -> Option<Value> {
    let flow_ref = json!({"flow_id": "f1"});
    let point = json!({"sync_point_id": "sp1"});
    let needs = json!({"resources": {"cpu": 1.0}});
    Some(match subject {
        subject::FLOW_CREATE => json!({"name": "n", "tasks": [{"id": "a", "kind": "k"}]}),
        subject::FLOW_GET
        | subject::FLOW_STATUS
        | subject::FLOW_PAUSE
        | subject::FLOW_RESUME
        | subject::FLOW_CANCEL => flow_ref,
        subject::FLOW_LIST => json!({"state": "running"}),
        subject::FLOW_MODIFY => json!({"flow_id": "f1", "expected_revision": 1, "remove": ["a"]}),
        subject::FLOW_RERUN => json!({"flow_id": "f1", "task_id": "a"}),
        subject::FLOW_EXPLAIN => json!({"flow_id": "f1", "task_id": "a"}),
        subject::FLOW_OPTIMIZE => json!({"flow_id": "f1", "apply": true}),
        subject::TRIGGER_SET => json!({
            "name": "t1", "event_type": "approval", "agent_id": "a1",
            "match": {"path": "/ok", "equals": true},
            "flow": {"name": "n", "tasks": [{"id": "a", "kind": "k", "input": {"x": 1}}]}
        }),
        subject::TRIGGER_GET | subject::TRIGGER_DELETE => json!({"name": "t1"}),
        subject::TRIGGER_LIST => json!({}),
        subject::AGENT_REGISTER | subject::AGENT_REGISTER_ALL => json!({
            "agent_id": "a1", "capabilities": ["c"], "labels": {"k": "v"},
            "capacity": {"cpu": 2.0}, "heartbeat_interval_ms": 1000
        }),
        subject::AGENT_DEREGISTER | subject::AGENT_DEREGISTER_ALL | subject::AGENT_LEAVE_ALL => {
            json!({"agent_id": "a1"})
        }
        subject::ALLOCATE => {
            json!({"owner": "o", "requirements": needs, "priority": 1, "allocation_id": "x1"})
        }
        subject::ALLOCATE_GANG => json!({"owner": "o", "members": [needs], "priority": 1}),
        subject::RELEASE => json!({"allocation_id": "x1", "agent_id": "a1"}),
        subject::RENEW => json!({"allocation_id": "x1", "ttl_ms": 5000}),
        subject::ALLOCATIONS_HELD => json!({"allocations": [
            {"allocation_id": "x1", "task": {"flow_id": "f1", "task_id": "a"}}
        ]}),
        subject::CAPACITY_CHECK => json!({"owner": "o", "requirements": needs}),
        subject::CAPACITY_RESERVE => json!({
            "owner": "o", "requirements": needs, "start_ms": 1, "end_ms": 2, "agent_id": "a1"
        }),
        subject::RESERVATION_CANCEL => json!({"reservation_id": "r1", "agent_id": "a1"}),
        subject::CAPACITY_ADJUST => {
            json!({"agent_id": "a1", "capacity": {"cpu": 1.0}, "preempt": true})
        }
        subject::OPTIMIZE => json!({"apply": false, "max_moves": 3}),
        subject::QUOTA_SET => json!({"owner": "team", "limits": {"cpu": 4.0}, "preempt": true}),
        subject::STATE_GET | subject::AGENT_STATE_GET_ALL => {
            json!({"agent_id": "a1", "revision": 1, "scope": "s"})
        }
        subject::STATE_PUT | subject::AGENT_STATE_PUT_ALL => {
            json!({"agent_id": "a1", "expected_revision": 0, "doc": {}, "scope": "s"})
        }
        subject::STATE_DELETE | subject::AGENT_STATE_DELETE_ALL => {
            json!({"agent_id": "a1", "expected_revision": 1, "scope": "s"})
        }
        subject::STATE_HISTORY | subject::AGENT_STATE_HISTORY_ALL => {
            json!({"agent_id": "a1", "scope": "s"})
        }
        subject::SCOPE_SET => json!({"scope": "s", "policy": "reject", "shared": ["/x"]}),
        subject::SCOPE_GET => json!({"scope": "s"}),
        subject::VALIDATE => json!({"scope": "s", "agents": ["a1"]}),
        subject::SYNCHRONIZE => {
            json!({"agents": ["a1"], "scope": "s", "shared": ["/x"], "timeout_ms": 10})
        }
        subject::SYNCPOINT_INITIATE => json!({"agents": ["a1"], "label": "l", "scope": "s"}),
        subject::SYNCPOINT_COMPLETE | subject::SYNCPOINT_ROLLBACK => {
            json!({"sync_point_id": "sp1", "timeout_ms": 10})
        }
        subject::SYNCPOINT_LIST => json!({"scope": "s", "state": "open"}),
        subject::SYNCPOINT_GET | subject::SYNCPOINT_DIFF => point,
        subject::AGENT_EVENTS_PUBLISH_ALL => json!({"data": {"k": 1}, "event_id": "e1"}),
        subject::AGENT_EVENTS_LIST => json!({
            "event_type": "t", "agent_id": "a1", "since_ms": 1, "until_ms": 2,
            "match": {"path": "/k", "equals": 1}, "limit": 5, "from_seq": 1
        }),
        subject::EVENT_SCHEMA_SET => json!({"event_type": "t", "schema": {"type": "object"}}),
        subject::EVENT_SCHEMA_GET => json!({"event_type": "t"}),
        subject::EVENT_SCHEMA_LIST => json!({}),
        subject::MONITOR_ANOMALIES => json!({"kind": "k", "limit": 1, "since_ms": 0}),
        subject::MONITOR_METRICS
        | subject::MONITOR_ANALYSIS
        | subject::MONITOR_HEALTH
        | subject::MONITOR_VALIDATE
        | subject::MONITOR_REPORT => json!({}),
        _ => return None,
    })
}

/// Cases a schema cannot suggest: what the request means, not its shape.
fn semantic(subject: &str) -> Vec<Case> {
    let body = |v: Value| v.to_string().into_bytes();
    let task = |id: &str, deps: &[&str]| json!({"id": id, "depends_on": deps});
    let negative = json!({"resources": {"cpu": -1.0}});
    if subject == subject::AGENT_EVENTS_PUBLISH_ALL {
        // The agent comes from the subject only: naming one is an unknown field.
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        return vec![
            case(
                "a body naming an agent",
                body(json!({"data": 1, "agent_id": "a2"})),
                &[BadRequest],
            ),
            case(
                "event id with a space",
                body(json!({"data": 1, "event_id": "a b"})),
                &[InvalidId],
            ),
            case(
                "event id too long",
                body(json!({"data": 1, "event_id": "x".repeat(129)})),
                &[InvalidId],
            ),
            case(
                "data nested 100 deep",
                format!(r#"{{"data":{deep}}}"#),
                &[BadRequest],
            ),
            case(
                "data over 256 KiB",
                body(json!({"data": "x".repeat(300 * 1024)})),
                &[PayloadTooLarge],
            ),
        ];
    }
    if subject.starts_with("coord.agents.*.") {
        // Valid in every other respect, so only the agent can be wrong.
        let mut other = base(subject).unwrap_or_default();
        other["agent_id"] = json!("a2");
        let mut out = vec![case(
            "a body naming another agent",
            body(other),
            &[Forbidden],
        )];
        let shared = match subject {
            subject::AGENT_REGISTER_ALL => subject::AGENT_REGISTER,
            subject::AGENT_STATE_PUT_ALL => subject::STATE_PUT,
            _ => return out,
        };
        out.extend(semantic(shared));
        return out;
    }
    match subject {
        subject::FLOW_CREATE => vec![
            case(
                "self-dependency",
                body(json!({"tasks": [task("a", &["a"])]})),
                &[ValidationFailed],
            ),
            case(
                "duplicate tasks",
                body(json!({"tasks": [task("a", &[]), task("a", &[])]})),
                &[ValidationFailed],
            ),
            case(
                "unknown dependency",
                body(json!({"tasks": [task("a", &["ghost"])]})),
                &[ValidationFailed],
            ),
            case(
                "cycle",
                body(json!({"tasks": [task("a", &["b"]), task("b", &["a"])]})),
                &[ValidationFailed],
            ),
            case("no tasks", body(json!({"tasks": []})), &[ValidationFailed]),
            case(
                "negative resources",
                body(json!({"tasks": [{"id": "a", "requirements": negative}]})),
                &[ValidationFailed],
            ),
            case(
                "task id with a dot",
                body(json!({"tasks": [task("a.b", &[])]})),
                &[InvalidId],
            ),
            case(
                "dependency id with >",
                body(json!({"tasks": [task("a", &[">"])]})),
                &[InvalidId],
            ),
            case(
                "NaN resource",
                r#"{"tasks":[{"id":"a","requirements":{"resources":{"cpu":NaN}}}]}"#,
                &[BadRequest],
            ),
            case(
                "overflowing resource",
                r#"{"tasks":[{"id":"a","requirements":{"resources":{"cpu":1e999}}}]}"#,
                &[BadRequest],
            ),
            case(
                "unknown task field",
                body(json!({"tasks": [{"id": "a", "dependson": ["b"]}]})),
                &[BadRequest],
            ),
            case(
                "wait for an event type that is not one",
                body(json!({"tasks": [{"id": "a", "wait_for": {"event_type": "A.B"}}]})),
                &[ValidationFailed],
            ),
            case(
                "wait with a match that is not a JSON Pointer",
                body(json!({"tasks": [{"id": "a", "wait_for": {
                    "event_type": "ok", "match": {"path": "x", "equals": 1}, "timeout_ms": 0
                }}]})),
                &[ValidationFailed],
            ),
            case(
                "wait with an unknown field",
                body(
                    json!({"tasks": [{"id": "a", "wait_for": {"event_type": "ok", "timout_ms": 5}}]}),
                ),
                &[BadRequest],
            ),
        ],
        subject::TRIGGER_SET => {
            let trigger = |name: &str, event_type: &str, flow: Value| json!({"name": name, "event_type": event_type, "flow": flow});
            let flow = json!({"tasks": [{"id": "a"}]});
            vec![
                case(
                    "trigger name with a dot",
                    body(trigger("a.b", "ok", flow.clone())),
                    &[InvalidId],
                ),
                case(
                    "trigger name too long",
                    body(trigger(&"n".repeat(33), "ok", flow.clone())),
                    &[InvalidId],
                ),
                case(
                    "event type with upper case",
                    body(trigger("t1", "Ok", flow.clone())),
                    &[ValidationFailed],
                ),
                case(
                    "flow with an id",
                    body(trigger(
                        "t1",
                        "ok",
                        json!({"id": "f", "tasks": [{"id": "a"}]}),
                    )),
                    &[ValidationFailed],
                ),
                case(
                    "task input that is not an object",
                    body(trigger(
                        "t1",
                        "ok",
                        json!({"tasks": [{"id": "a", "input": 3}]}),
                    )),
                    &[ValidationFailed],
                ),
                case(
                    "flow with a cycle",
                    body(trigger(
                        "t1",
                        "ok",
                        json!({"tasks": [task("a", &["b"]), task("b", &["a"])]}),
                    )),
                    &[ValidationFailed],
                ),
            ]
        }
        subject::FLOW_MODIFY => vec![
            case(
                "self-dependency on a missing flow",
                body(
                    json!({"flow_id": "f1", "expected_revision": 1, "add_dependencies": [["a", "a"]]}),
                ),
                &[ValidationFailed, NotFound, BadRequest],
            ),
            case(
                "duplicate added tasks",
                body(
                    json!({"flow_id": "f1", "expected_revision": 1, "add": [task("n", &[]), task("n", &[])]}),
                ),
                &[ValidationFailed, NotFound],
            ),
        ],
        subject::AGENT_REGISTER => vec![
            case(
                "negative capacity",
                body(json!({"agent_id": "a1", "capacity": {"cpu": -4.0}})),
                &[ValidationFailed],
            ),
            case(
                "NaN capacity",
                r#"{"agent_id":"a1","capacity":{"cpu":NaN}}"#,
                &[BadRequest],
            ),
            case(
                "overflowing capacity",
                r#"{"agent_id":"a1","capacity":{"cpu":-1e999}}"#,
                &[BadRequest],
            ),
        ],
        subject::ALLOCATE => vec![
            case(
                "negative resources",
                body(json!({"owner": "o", "requirements": negative})),
                &[ValidationFailed],
            ),
            case(
                "nothing registered",
                body(json!({"owner": "o", "requirements": {"resources": {"cpu": 1.0}}})),
                &[NoCapacity],
            ),
        ],
        subject::ALLOCATE_GANG => vec![
            case(
                "negative member",
                body(json!({"owner": "o", "members": [negative]})),
                &[ValidationFailed],
            ),
            case(
                "no members",
                body(json!({"owner": "o", "members": []})),
                &[ValidationFailed],
            ),
        ],
        subject::CAPACITY_CHECK => vec![case(
            "negative resources",
            body(json!({"requirements": negative})),
            &[ValidationFailed],
        )],
        subject::CAPACITY_RESERVE => vec![
            case(
                "negative resources",
                body(
                    json!({"owner": "o", "requirements": negative, "start_ms": 1, "end_ms": u64::MAX}),
                ),
                &[ValidationFailed],
            ),
            case(
                "window ends before it starts",
                body(
                    json!({"owner": "o", "requirements": {"resources": {"cpu": 1.0}}, "start_ms": 9, "end_ms": 1}),
                ),
                &[ValidationFailed],
            ),
        ],
        subject::CAPACITY_ADJUST => vec![case(
            "negative capacity",
            body(json!({"agent_id": "a1", "capacity": {"cpu": -1.0}})),
            &[ValidationFailed, NotFound],
        )],
        subject::QUOTA_SET => vec![case(
            "negative limit",
            body(json!({"owner": "team", "limits": {"cpu": -1.0}})),
            &[ValidationFailed],
        )],
        subject::STATE_PUT => vec![case(
            "document over 512 KiB",
            body(
                json!({"agent_id": "a1", "expected_revision": 0, "doc": {"pad": "x".repeat(600 * 1024)}}),
            ),
            &[PayloadTooLarge],
        )],
        subject::SYNCHRONIZE => vec![case(
            "no agents",
            body(json!({"agents": []})),
            &[ValidationFailed, BadRequest],
        )],
        subject::SYNCPOINT_INITIATE => vec![
            case(
                "no agents",
                body(json!({"agents": []})),
                &[ValidationFailed, BadRequest],
            ),
            case(
                "agent id with a space",
                body(json!({"agents": ["a b"]})),
                &[InvalidId],
            ),
        ],
        subject::EVENT_SCHEMA_SET => vec![
            case(
                "a schema that is not one",
                body(json!({"event_type": "t", "schema": {"type": 12}})),
                &[ValidationFailed],
            ),
            case(
                "an uppercase type",
                body(json!({"event_type": "Approved", "schema": {}})),
                &[InvalidId],
            ),
            case(
                "a type with a dot",
                body(json!({"event_type": "a.b", "schema": null})),
                &[InvalidId],
            ),
        ],
        subject::EVENT_SCHEMA_GET => vec![case(
            "a type with a wildcard",
            body(json!({"event_type": "*"})),
            &[InvalidId],
        )],
        subject::AGENT_EVENTS_LIST => vec![
            case("limit 0", body(json!({"limit": 0})), &[BadRequest]),
            case(
                "limit past the maximum",
                body(json!({"limit": 1_000_000})),
                &[BadRequest],
            ),
            case("from_seq 0", body(json!({"from_seq": 0})), &[BadRequest]),
            case(
                "until before since",
                body(json!({"since_ms": 5, "until_ms": 1})),
                &[BadRequest],
            ),
            case(
                "a match path that is no pointer",
                body(json!({"match": {"path": "k", "equals": 1}})),
                &[BadRequest],
            ),
            case(
                "a type with a wildcard",
                body(json!({"event_type": ">"})),
                &[InvalidId],
            ),
        ],
        subject::SCOPE_SET => vec![case(
            "a schema that is not one",
            body(json!({"scope": "s", "schema": {"type": 12}})),
            &[ValidationFailed, BadRequest],
        )],
        _ => Vec::new(),
    }
}

/// Ids that must never reach a subject.
const BAD_IDS: [&str; 8] = [
    "a.b",
    "a*",
    ">",
    "a b",
    "a\r\nPUB x 1",
    "ünïcödé",
    "",
    "0123456789012345678901234567890123456789012345678901234567890123456789",
];

/// The schema a property resolves to: `$ref`s followed, `anyOf` branches
/// (other than `null`) flattened.
fn resolve<'a>(root: &'a Value, schema: &'a Value) -> Vec<&'a Value> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/$defs/");
        return root["$defs"]
            .get(name)
            .map(|s| resolve(root, s))
            .unwrap_or_default();
    }
    if let Some(branches) = schema
        .get("anyOf")
        .or(schema.get("oneOf"))
        .and_then(Value::as_array)
    {
        return branches
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) != Some("null"))
            .flat_map(|b| resolve(root, b))
            .collect();
    }
    vec![schema]
}

/// JSON types a resolved schema accepts; empty when it accepts anything.
fn types(schemas: &[&Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for s in schemas {
        match s.get("type") {
            Some(Value::String(t)) => {
                out.insert(t.clone());
            }
            Some(Value::Array(ts)) => {
                out.extend(ts.iter().filter_map(Value::as_str).map(str::to_owned))
            }
            _ if s.get("enum").is_some() || s.get("const").is_some() => {
                out.insert("string".into());
            }
            // `true`, or a schema without a type: anything goes.
            _ => return BTreeSet::new(),
        }
    }
    if out.contains("integer") {
        out.insert("number".into());
    }
    out
}

fn is_id(schemas: &[&Value]) -> bool {
    schemas
        .iter()
        .any(|s| s.get("pattern").and_then(Value::as_str) == Some("^[A-Za-z0-9_-]{1,64}$"))
}

fn is_enum(schemas: &[&Value]) -> bool {
    !schemas.is_empty()
        && schemas
            .iter()
            .all(|s| s.get("enum").is_some() || s.get("const").is_some())
}

/// Cases derived from the request's schema and the endpoint's base request.
fn derived(schema: &Value, base: &Map<String, Value>) -> Vec<Case> {
    let mut out = Vec::new();
    let with = |field: &str, v: Value| {
        let mut m = base.clone();
        m.insert(field.to_owned(), v);
        Value::Object(m).to_string().into_bytes()
    };
    let required: BTreeSet<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for field in &required {
        let mut m = base.clone();
        m.remove(*field);
        out.push(case(
            format!("missing {field}"),
            Value::Object(m).to_string(),
            &[BadRequest],
        ));
    }
    let mut unknown = base.clone();
    unknown.insert("zz_unknown".into(), json!(1));
    out.push(case(
        "unknown field",
        Value::Object(unknown).to_string(),
        &[BadRequest],
    ));
    let props = schema["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    for (field, prop) in &props {
        let resolved = resolve(schema, prop);
        let accepted = types(&resolved);
        if !accepted.is_empty() {
            for (kind, wrong) in [
                ("string", json!("text")),
                ("number", json!(12.5)),
                ("boolean", json!(true)),
                ("array", json!([1, 2])),
                ("object", json!({"k": "v"})),
            ] {
                if !accepted.contains(kind) {
                    out.push(case(
                        format!("{field} as {kind}"),
                        with(field, wrong),
                        &[BadRequest],
                    ));
                }
            }
            if accepted.contains("integer") {
                out.push(case(
                    format!("{field} fractional"),
                    with(field, json!(1.5)),
                    &[BadRequest],
                ));
                let unsigned = resolved.iter().any(|s| {
                    s.get("minimum")
                        .and_then(Value::as_f64)
                        .is_some_and(|m| m >= 0.0)
                });
                if unsigned {
                    out.push(case(
                        format!("{field} negative"),
                        with(field, json!(-1)),
                        &[BadRequest],
                    ));
                }
                let mut raw = base.clone();
                raw.insert(field.clone(), json!("@@"));
                let text = Value::Object(raw)
                    .to_string()
                    .replace("\"@@\"", "18446744073709551616");
                out.push(case(format!("{field} beyond u64"), text, &[BadRequest]));
            }
            if accepted.contains("number") {
                for token in ["NaN", "Infinity", "1e999"] {
                    let mut raw = base.clone();
                    raw.insert(field.clone(), json!("@@"));
                    let text = Value::Object(raw).to_string().replace("\"@@\"", token);
                    out.push(case(format!("{field} = {token}"), text, &[BadRequest]));
                }
            }
        }
        if is_id(&resolved) {
            for bad in BAD_IDS {
                out.push(case(
                    format!("{field} = {bad:?}"),
                    with(field, json!(bad)),
                    &[InvalidId],
                ));
            }
        }
        if is_enum(&resolved) {
            out.push(case(
                format!("{field} unknown variant"),
                with(field, json!("no_such_variant")),
                &[BadRequest],
            ));
        }
        // Ids inside arrays (agents, task ids to remove, shared pointers are not ids).
        if let Some(items) = prop.get("items") {
            if is_id(&resolve(schema, items)) {
                for bad in BAD_IDS {
                    out.push(case(
                        format!("{field}[] = {bad:?}"),
                        with(field, json!([bad])),
                        &[InvalidId],
                    ));
                }
            }
        }
    }
    out
}

/// Cases every endpoint gets, whatever it takes.
fn generic() -> Vec<Case> {
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    vec![
        case("not JSON", "this is not json", &[BadRequest]),
        case("invalid UTF-8", vec![0xff, 0xfe, b'{', 0x80], &[BadRequest]),
        case("truncated", r#"{"a":"#, &[BadRequest]),
        case("an array", "[1,2,3]", &[BadRequest]),
        case("a string", r#""flow""#, &[BadRequest]),
        case("a number", "42", &[BadRequest]),
        case("null", "null", &[BadRequest]),
        case("NaN", r#"{"n":NaN}"#, &[BadRequest]),
        case("a number past f64", r#"{"n":1e999}"#, &[BadRequest]),
        case("nested 100 000 deep", deep(100_000), &[BadRequest]),
        case(
            "nested deep in a field",
            format!(r#"{{"zz":{}}}"#, deep(10_000)),
            &[BadRequest],
        ),
        case("two documents", "{} {}", &[BadRequest]),
        case(
            "over the request limit",
            format!(
                r#"{{"pad":"{}"}}"#,
                "x".repeat(common::service::MAX_REQUEST_BYTES + 1)
            ),
            &[PayloadTooLarge],
        ),
    ]
}

/// The last sequence of every stream (KV buckets are streams): any write moves one.
async fn revisions(js: &jetstream::Context) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut names = js.stream_names();
    while let Some(name) = names.next().await {
        let name = name.unwrap();
        let mut stream = js.get_stream(&name).await.unwrap();
        out.insert(name, stream.info().await.unwrap().state.last_sequence);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_a_corpus_of_bad_input_with_typed_errors_and_changes_nothing() {
    // The server takes messages bigger than the services do, so the services'
    // own size limit is what answers an oversized request.
    let sys = System::start_on(NatsServer::start_with_config("max_payload: 4MB\n")).await;
    let js = jetstream::new(sys.nats.clone());

    // The endpoints: the channel table, and what the services say they serve.
    let mut endpoints: BTreeMap<String, (String, Value)> = BTreeMap::new();
    for c in xtask::channels().unwrap() {
        // `$SRV.*` is the NATS service API, answered by the client library.
        if c.address.starts_with("$SRV") {
            continue;
        }
        if let Pattern::Request {
            server, request, ..
        } = c.pattern
        {
            let schema = serde_json::to_value(request.schema()).unwrap();
            // Served as the wildcard over every agent's subject.
            endpoints.insert(
                c.address
                    .replace("{agent_id}", "*")
                    .replace("{event_type}", "*"),
                (server.to_owned(), schema),
            );
        }
    }
    let mut served = BTreeSet::new();
    for name in SERVICES {
        let info = sys
            .nats
            .request(format!("{}.{name}", subject::SRV_INFO), "".into())
            .await
            .unwrap();
        let info: Value = serde_json::from_slice(&info.payload).unwrap();
        for e in info["endpoints"].as_array().unwrap() {
            served.insert(e["subject"].as_str().unwrap().to_owned());
        }
    }
    let listed: BTreeSet<String> = endpoints.keys().cloned().collect();
    assert_eq!(
        served, listed,
        "the services serve exactly the request subjects the channel table lists"
    );

    let documented: BTreeSet<&str> = {
        let protocol =
            std::fs::read_to_string(testkit::workspace_root().join("docs/protocol.md")).unwrap();
        ErrorCode::ALL
            .iter()
            .map(|c| c.as_str())
            .filter(|c| protocol.contains(&format!("| `{c}` |")))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    };
    let before = revisions(&js).await;

    let mut failures = Vec::new();
    let mut sent = 0;
    for (endpoint, (server, schema)) in &endpoints {
        let subject = &endpoint.replace('*', AGENT);
        let Some(Value::Object(base)) = base(endpoint) else {
            failures.push(format!(
                "{subject} ({server}): no base request in the corpus"
            ));
            continue;
        };
        let cases = generic()
            .into_iter()
            .chain(derived(schema, &base))
            .chain(semantic(endpoint));
        for c in cases {
            sent += 1;
            let reply = match tokio::time::timeout(
                Duration::from_secs(10),
                sys.nats.request(subject.clone(), c.body.clone().into()),
            )
            .await
            {
                Ok(Ok(r)) => r,
                other => {
                    failures.push(format!("{subject}: {}: no reply ({other:?})", c.what));
                    continue;
                }
            };
            let header = reply
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
                .map(|v| v.as_str().to_owned());
            let body: Value = serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
            let code = body["error"]["code"]
                .as_str()
                .unwrap_or("<none>")
                .to_owned();
            let parsed: Option<ErrorCode> = serde_json::from_value(json!(code)).ok();
            let ok = parsed.is_some_and(|p| {
                c.expect.contains(&p)
                    && documented.contains(p.as_str())
                    && header.as_deref() == Some(p.status().to_string().as_str())
            });
            if !ok {
                let shown: String = body.to_string().chars().take(200).collect();
                failures.push(format!(
                    "{subject}: {}: expected {:?}, got {code} (header {header:?}): {shown}",
                    c.what, c.expect
                ));
            }
        }
        // Nothing but defaults: answered or refused, never written.
        for (what, body) in [("an empty object", "{}"), ("an empty body", "")] {
            sent += 1;
            let before = revisions(&js).await;
            let reply = tokio::time::timeout(
                Duration::from_secs(10),
                sys.nats.request(subject.clone(), body.into()),
            )
            .await;
            if !matches!(reply, Ok(Ok(_))) {
                failures.push(format!("{subject}: {what}: no reply ({reply:?})"));
            }
            let after = revisions(&js).await;
            if after != before {
                let shown: String = reply
                    .ok()
                    .and_then(Result::ok)
                    .map(|r| {
                        String::from_utf8_lossy(&r.payload)
                            .chars()
                            .take(200)
                            .collect()
                    })
                    .unwrap_or_default();
                failures.push(format!(
                    "{subject}: {what} changed stored state ({before:?} -> {after:?}): {shown}"
                ));
            }
        }
        // Replies to nothing: the same garbage published with no reply subject.
        sys.nats
            .publish(subject.clone(), "this is not json".into())
            .await
            .unwrap();
    }
    assert!(sent > 1_000, "only {sent} cases");
    assert!(
        failures.is_empty(),
        "{} of {sent} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Everyone is still up, and nothing was written anywhere.
    sys.nats.flush().await.unwrap();
    for name in SERVICES {
        tokio::time::timeout(
            Duration::from_secs(5),
            sys.nats
                .request(format!("{}.{name}", subject::SRV_PING), "".into()),
        )
        .await
        .unwrap_or_else(|_| panic!("{name} no longer answers $SRV.PING"))
        .unwrap();
    }
    assert_eq!(
        revisions(&js).await,
        before,
        "a bad request changed stored state"
    );
}
