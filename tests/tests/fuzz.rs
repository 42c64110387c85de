//! Property-based fuzzing of the code that meets untrusted input first: no
//! panic, whatever comes in.
//!
//! - Decoding every request type (the channel table's list, so a new request
//!   type cannot go unfuzzed) from arbitrary bytes, arbitrary JSON built from
//!   the protocol's own field names, and corrupted JSON; whatever decodes
//!   re-encodes and decodes again.
//! - Flow validation on arbitrary specs (NaN, infinite and huge numbers
//!   included), and the flow machine driven through every valid one.
//! - The synchronizer's three-way merge on arbitrary documents.
//! - The allocator's placement core on arbitrary agents and requirements.
//!
//! The normal test run tries a few dozen cases each; `PROPTEST_CASES=100000
//! cargo nextest run -p tests --test fuzz` runs a long one (docs/RELIABILITY.md).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use allocator::machine::{self as placement, AgentRecord};
use common::msg::*;
use common::{AgentId, AllocationId, FlowId, TaskId};
use orchestrator::machine::{validate, Flow};
use proptest::prelude::*;
use serde_json::{json, Value};
use synchronizer::machine::merge::{merge3, Side};

/// Cases per property: a quick run unless `PROPTEST_CASES` asks for more.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(48);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Decodes `bytes` as `T` the way an endpoint does; whatever is accepted must
/// survive a round trip.
fn decode_one<T: serde::de::DeserializeOwned + serde::Serialize>(bytes: &[u8]) {
    if let Ok(v) = common::service::decode::<T>(bytes) {
        let again = serde_json::to_vec(&v).expect("an accepted request encodes");
        if let Err(e) = common::service::decode::<T>(&again) {
            panic!(
                "{} accepted {} but not its own encoding {}: {e}",
                std::any::type_name::<T>(),
                String::from_utf8_lossy(bytes),
                String::from_utf8_lossy(&again)
            );
        }
    }
}

/// Every request type, by the name the channel table gives it.
macro_rules! request_types {
    ($($t:ident),* $(,)?) => {
        const REQUEST_TYPES: &[&str] = &[$(stringify!($t)),*];
        fn decode_every_request(bytes: &[u8]) {
            $(decode_one::<$t>(bytes);)*
        }
    };
}

request_types!(
    FlowSpec,
    FlowRef,
    FlowListRequest,
    FlowChanges,
    RerunRequest,
    ExplainRequest,
    FlowOptimizeRequest,
    Trigger,
    TriggerRef,
    TriggerListRequest,
    HeldRequest,
    RegisterAgent,
    DeregisterAgent,
    LeaveAgent,
    AllocateRequest,
    GangRequest,
    ReleaseRequest,
    RenewRequest,
    CapacityRequest,
    ReserveRequest,
    CancelReservation,
    AdjustRequest,
    QuotaRequest,
    OptimizeRequest,
    StateGet,
    StatePut,
    StateDelete,
    StateHistoryRequest,
    ScopeConfig,
    ScopeGet,
    ValidateRequest,
    SynchronizeRequest,
    SyncPointInitiate,
    SyncPointWait,
    SyncPointListRequest,
    SyncPointRef,
    MetricsRequest,
    AnalysisRequest,
    AnomaliesRequest,
    HealthRequest,
    SystemValidateRequest,
    ReportRequest,
    AgentEventQuery,
    EventSchemaSet,
    EventSchemaGet,
    EventSchemaListRequest,
    // Agents' messages the services read.
    AgentReport,
    Heartbeat,
    SyncAck,
    AgentEventPublish,
);

/// Every property name in the request schemas, so arbitrary JSON reaches past
/// the first unknown-field check.
fn field_names() -> Vec<String> {
    let mut names = BTreeSet::new();
    fn walk(v: &Value, names: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::Object(props)) = m.get("properties") {
                    names.extend(props.keys().cloned());
                }
                m.values().for_each(|v| walk(v, names));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, names)),
            _ => {}
        }
    }
    for c in xtask::channels().unwrap() {
        if let xtask::Pattern::Request { request, .. } = c.pattern {
            walk(&serde_json::to_value(request.schema()).unwrap(), &mut names);
        }
    }
    names.into_iter().collect()
}

/// Strings that mean something somewhere: ids good and bad, enum values, pointers.
const WORDS: &[&str] = &[
    "a",
    "b",
    "t1",
    "w-1",
    "a.b",
    "*",
    ">",
    "a b",
    "ü",
    "",
    "cpu",
    "mem",
    "gpu",
    "running",
    "paused",
    "reject",
    "merge",
    "lww",
    "best_fit",
    "spread",
    "/x",
    "/a/0",
    "~",
    "completed",
    "failed",
    "started",
    "progress",
    "fail_fast",
    "continue",
];

fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        prop::sample::select(vec![
            0.0,
            -1.0,
            1e308,
            -1e308,
            f64::MIN_POSITIVE,
            4294967296.0
        ])
        .prop_map(|f| json!(f)),
    ]
}

fn json_value(keys: Vec<String>) -> impl Strategy<Value = Value> + Clone {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        number(),
        prop::sample::select(WORDS).prop_map(Value::from),
        any::<String>().prop_map(Value::from),
    ];
    let key = prop_oneof![
        4 => prop::sample::select(keys),
        1 => any::<String>(),
    ];
    leaf.prop_recursive(5, 96, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Raw bodies: arbitrary bytes, JSON, and JSON with a few bytes overwritten.
fn bodies() -> impl Strategy<Value = Vec<u8>> {
    let json = json_value(field_names()).prop_map(|v| serde_json::to_vec(&v).unwrap());
    prop_oneof![
        any::<Vec<u8>>(),
        json.clone(),
        (
            json,
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)
        )
            .prop_map(|(mut body, edits)| {
                for (at, byte) in edits {
                    if !body.is_empty() {
                        let i = at.index(body.len());
                        body[i] = byte;
                    }
                }
                body
            }),
    ]
}

/// Amounts a resource map may hold once past JSON (which has no NaN).
fn amount() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 0.0..8.0f64,
        1 => prop::sample::select(vec![
            f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0, 0.0, f64::MAX, f64::MIN_POSITIVE, 1e-300
        ]),
        1 => any::<f64>(),
    ]
}

fn resources() -> impl Strategy<Value = BTreeMap<String, f64>> {
    prop::collection::btree_map(
        prop::sample::select(vec!["cpu".to_owned(), "mem".to_owned(), "".to_owned()]),
        amount(),
        0..3,
    )
}

fn requirements() -> impl Strategy<Value = Requirements> {
    (
        resources(),
        prop::collection::vec(
            prop::sample::select(vec!["gpu".to_owned(), "x".to_owned()]),
            0..2,
        ),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec!["g".to_owned()])),
    )
        .prop_map(
            |(resources, capabilities, spread, anti_affinity)| Requirements {
                resources,
                capabilities,
                policy: if spread {
                    Policy::Spread
                } else {
                    Policy::BestFit
                },
                anti_affinity,
                ..Default::default()
            },
        )
}

fn task_id(i: usize) -> TaskId {
    TaskId::new(format!("t{i}")).unwrap()
}

/// Flow specs of up to 8 tasks with arbitrary dependencies and settings.
fn flow_specs() -> impl Strategy<Value = FlowSpec> {
    let task = (
        0usize..8,
        prop::collection::vec(0usize..8, 0..3),
        requirements(),
        any::<i32>(),
        prop_oneof![
            3 => (1u32..6, 0u64..2_000, 1.0..4.0f64, 0u64..60_000),
            1 => (any::<u32>(), any::<u64>(), amount(), any::<u64>()),
        ],
        (
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u64>()),
        ),
        prop::option::of(any::<u64>()),
    )
        .prop_map(
            |(id, deps, requirements, priority, retry, timeouts, estimate)| {
                let mut t = TaskSpec::new(task_id(id));
                t.depends_on = deps.into_iter().map(task_id).collect();
                t.requirements = requirements;
                t.priority = priority;
                t.retry.max_attempts = retry.0;
                t.retry.backoff_base_ms = retry.1;
                t.retry.backoff_factor = retry.2;
                t.retry.backoff_max_ms = retry.3;
                t.timeouts.schedule_to_start_ms = timeouts.0;
                t.timeouts.start_to_close_ms = timeouts.1;
                t.estimated_duration_ms = estimate;
                t
            },
        );
    (
        prop::collection::vec((task, prop::bool::weighted(0.1)), 0..9),
        prop::option::of(any::<u32>()),
        any::<bool>(),
    )
        .prop_map(|(tasks, max_parallelism, fail_fast)| {
            // Mostly well-formed graphs (unique ids, dependencies on earlier
            // tasks), so the machine gets to run them; one task in ten keeps
            // its random id and dependencies (duplicates, cycles, unknowns).
            let tasks = tasks
                .into_iter()
                .enumerate()
                .map(|(i, (mut t, wild))| {
                    if !wild {
                        t.id = task_id(i);
                        t.depends_on
                            .retain(|d| d.as_str()[1..].parse::<usize>().is_ok_and(|n| n < i));
                    }
                    t
                })
                .collect();
            let mut spec = FlowSpec::new("fuzz", tasks);
            spec.max_parallelism = max_parallelism;
            if fail_fast {
                spec.failure_mode = FailureMode::FailFast;
            }
            spec
        })
}

/// Runs a valid flow to the end (or 64 rounds): every dispatchable task is
/// assigned, started and then completed or failed, and time jumps around.
fn drive(spec: FlowSpec, outcomes: &[bool], jumps: &[u64]) {
    let agent = AgentId::new("w").unwrap();
    let id = FlowId::new("f").unwrap();
    let mut now = 1_000u64;
    let (mut flow, _) = Flow::new(id.clone(), spec, now);
    for round in 0..64 {
        let _ = flow.status(round, now);
        let _ = flow.next_wakeup();
        let _ = flow.next_wakeup_after(now);
        for task in flow.dispatchable(now) {
            let allocation = AllocationId::new(format!("x{round}-{task}")).unwrap();
            if flow.assign(&task, &agent, &allocation, now).is_err() {
                continue;
            }
            let attempt = flow.tasks[&task].attempt;
            let mut report = AgentReport {
                flow_id: id.clone(),
                task_id: task.clone(),
                attempt,
                agent_id: agent.clone(),
                kind: ReportKind::Started,
                at_ms: now,
            };
            let _ = flow.report(&report, now);
            report.kind = if outcomes[round as usize % outcomes.len()] {
                ReportKind::Completed {
                    output: json!(round),
                }
            } else {
                ReportKind::Failed {
                    error: "boom".into(),
                    retryable: true,
                }
            };
            let _ = flow.report(&report, now);
        }
        now = now.saturating_add(jumps[round as usize % jumps.len()]);
        let _ = flow.tick(now);
        if flow.state.is_terminal() {
            break;
        }
    }
}

/// Agents as the allocator stores them, with arbitrary capacities.
fn agents() -> impl Strategy<Value = Vec<AgentRecord>> {
    prop::collection::vec(
        (
            resources(),
            prop::collection::vec(
                prop::sample::select(vec!["gpu".to_owned(), "x".to_owned()]),
                0..2,
            ),
            any::<u64>(),
            any::<bool>(),
        ),
        0..5,
    )
    .prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(
                |(i, (capacity, capabilities, heartbeat_interval_ms, lost))| {
                    let mut rec = AgentRecord::register(
                        &RegisterAgent {
                            agent_id: AgentId::new(format!("a{i}")).unwrap(),
                            capabilities,
                            labels: BTreeMap::new(),
                            capacity,
                            heartbeat_interval_ms,
                        },
                        None,
                        0,
                    );
                    if lost {
                        rec.mark_lost();
                    }
                    rec
                },
            )
            .collect()
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn decoding_any_body_as_any_request_never_panics(body in bodies()) {
        decode_every_request(&body);
    }

    #[test]
    fn validating_and_running_any_flow_spec_never_panics(
        spec in flow_specs(),
        outcomes in prop::collection::vec(any::<bool>(), 1..4),
        jumps in prop::collection::vec(prop_oneof![0u64..10_000, any::<u64>()], 1..4),
    ) {
        // Through the wire too: what validates must also survive encoding.
        if let Ok(body) = serde_json::to_vec(&spec) {
            decode_one::<FlowSpec>(&body);
        }
        if validate(&spec).is_ok() {
            drive(spec, &outcomes, &jumps);
        }
    }

    #[test]
    fn merging_any_documents_never_panics(
        base in prop::option::of(json_value(WORDS.iter().map(|w| w.to_string()).collect())),
        theirs in json_value(WORDS.iter().map(|w| w.to_string()).collect()),
        ours in json_value(WORDS.iter().map(|w| w.to_string()).collect()),
        prefer_ours in any::<bool>(),
    ) {
        let side = if prefer_ours { Side::Ours } else { Side::Theirs };
        let _ = merge3(base.as_ref(), &theirs, &ours, side);
        // One side unchanged from the base: the other side's document wins whole.
        let merged = merge3(Some(&theirs), &theirs, &ours, side);
        prop_assert_eq!(&merged.value, &ours);
        prop_assert!(merged.conflicts.is_empty());
        let merged = merge3(Some(&ours), &theirs, &ours, side);
        prop_assert_eq!(&merged.value, &theirs);
    }

    #[test]
    fn placing_anything_on_any_agents_never_panics(
        agents in agents(),
        req in requirements(),
        members in prop::collection::vec(requirements(), 0..4),
        now in prop_oneof![0u64..10_000, any::<u64>()],
        window in (any::<u64>(), any::<u64>()),
    ) {
        if let Ok(chosen) = placement::place(&agents, &req, None, now) {
            prop_assert!(chosen.agent.fit(&req, None, now).is_ok(), "placed where it does not fit");
        }
        let _ = placement::candidates(&agents, &req, Some("o"), now);
        let _ = placement::capacity_status(&agents, Some(&req), None, now);
        let _ = placement::place_reservation(&agents, &req, window.0, window.1, now);
        let ids: Vec<AllocationId> = (0..members.len())
            .map(|i| AllocationId::new(format!("g{i}")).unwrap())
            .collect();
        let _ = placement::place_gang(&agents, &members, "o", 0, &ids, "gang", now);
        for a in &agents {
            let _ = a.overcommitted(now);
            let _ = a.usage(now);
            let _ = a.lost_at(now, now.saturating_add(1));
        }
    }
}

#[test]
fn every_request_type_of_the_channel_table_is_fuzzed() {
    let fuzzed: BTreeSet<&str> = REQUEST_TYPES.iter().copied().collect();
    for c in xtask::channels().unwrap() {
        if let xtask::Pattern::Request { request, .. } = c.pattern {
            // The NATS service API's own requests are not ours to decode.
            if c.address.starts_with("$SRV") {
                continue;
            }
            assert!(
                fuzzed.contains(request.name),
                "{} ({}) is not in request_types!",
                request.name,
                c.address
            );
        }
    }
}
