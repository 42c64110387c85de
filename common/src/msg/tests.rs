//! Round trips of every wire message, and the exact JSON of the ones agents in
//! other languages read and write (so a rename shows up as a failing test).

use serde::{de::DeserializeOwned, Serialize};
use serde_json::json;

use super::*;
use crate::id::*;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: &T) {
    let json = serde_json::to_string(v).unwrap();
    let back: T = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, v, "{json}");
}

fn a(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}
fn t(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

#[test]
fn every_message_round_trips() {
    let flow = FlowId::new("f1").unwrap();
    let alloc = AllocationId::new("al1").unwrap();
    round_trip(&RegisterAgent {
        agent_id: a("w1"),
        capabilities: vec!["py".into()],
        labels: [("zone".to_string(), "eu".to_string())].into(),
        capacity: [("cpu".to_string(), 2.0)].into(),
        heartbeat_interval_ms: 1000,
    });
    round_trip(&Heartbeat {
        agent_id: a("w1"),
        at_ms: 5,
        running: 1,
    });
    round_trip(&Assignment {
        flow_id: flow.clone(),
        task_id: t("a"),
        attempt: 1,
        agent_id: a("w1"),
        kind: "k".into(),
        input: json!({"x": 1}),
        allocation_id: alloc.clone(),
        resources: Default::default(),
        assigned_at_ms: 9,
    });
    for kind in [
        ReportKind::Started,
        ReportKind::Progress {
            progress: Some(0.5),
        },
        ReportKind::Completed {
            output: json!([1, 2]),
        },
        ReportKind::Failed {
            error: "boom".into(),
            retryable: true,
        },
    ] {
        round_trip(&AgentReport {
            flow_id: flow.clone(),
            task_id: t("a"),
            attempt: 2,
            agent_id: a("w1"),
            kind,
            at_ms: 1,
        });
    }
    let mut task = TaskSpec::new(t("a"));
    task.kind = "k".into();
    task.depends_on = vec![t("b")];
    task.priority = 3;
    task.retry = RetryPolicy {
        max_attempts: 3,
        ..Default::default()
    };
    task.timeouts.heartbeat_ms = Some(500);
    round_trip(&FlowSpec {
        max_parallelism: Some(2),
        failure_mode: FailureMode::FailFast,
        ..FlowSpec::new("n", vec![task])
    });
    round_trip(&Event {
        event_id: "e".into(),
        at_ms: 1,
        source: "orchestrator".into(),
        kind: EventKind::TaskTransition {
            flow_id: flow,
            task_id: t("a"),
            from: TaskState::Ready,
            to: TaskState::Assigned,
            attempt: 1,
            agent_id: Some(a("w1")),
            reason: None,
            timeout_ms: None,
        },
    });
    round_trip(&StatePut {
        agent_id: a("w1"),
        expected_revision: 0,
        doc: json!({"k": "v"}),
        scope: ScopeId::default(),
        clock: Some(Hlc {
            physical_ms: 5,
            logical: 1,
            node: "w1".into(),
        }),
    });
    round_trip(&ScopeConfig {
        scope: ScopeId::new("plans").unwrap(),
        policy: ConflictPolicy::Merge,
        merge_fallback: MergeFallback::Theirs,
        schema: Some(json!({"type": "object"})),
        invariants: vec![
            Invariant::Agree {
                pointer: "/plan/id".into(),
                agents: vec![a("w1")],
            },
            Invariant::SumAtMost {
                pointer: "/budget".into(),
                max: 10.0,
            },
        ],
        shared: vec!["/plan".into()],
    });
    round_trip(&SyncNotice {
        notice_id: SyncPointId::new("sp1").unwrap(),
        kind: NoticeKind::Rollback,
        scope: ScopeId::default(),
        agent_id: a("w1"),
        revision: 4,
        doc: json!({"a": 1}),
        at_ms: 3,
    });
    round_trip(&ReleaseRequest {
        allocation_id: alloc.clone(),
        agent_id: Some(a("w1")),
    });
    round_trip(&ReleaseRequest {
        allocation_id: alloc,
        agent_id: None,
    });
}

#[test]
fn report_json_is_flat_and_tagged() {
    let r: AgentReport = serde_json::from_value(json!({
        "flow_id": "f1", "task_id": "a", "attempt": 1, "agent_id": "w1",
        "type": "completed", "output": {"ok": true}, "extra": "ignored"
    }))
    .unwrap();
    assert_eq!(
        r.kind,
        ReportKind::Completed {
            output: json!({"ok": true})
        }
    );
    let unknown: AgentReport = serde_json::from_value(json!({
        "flow_id": "f1", "task_id": "a", "attempt": 1, "agent_id": "w1", "type": "teleported"
    }))
    .unwrap();
    assert_eq!(unknown.kind, ReportKind::Unknown);
}

#[test]
fn specs_people_write_reject_typos() {
    let err = serde_json::from_value::<FlowSpec>(json!({
        "tasks": [{"id": "a", "dependson": ["b"]}]
    }))
    .unwrap_err();
    assert!(err.to_string().contains("dependson"), "{err}");
}

#[test]
fn unknown_events_are_tolerated() {
    let e: Event = serde_json::from_value(json!({
        "event_id": "x", "at_ms": 1, "type": "quantum_leap", "where": "?"
    }))
    .unwrap();
    assert_eq!(e.kind, EventKind::Unknown);
}

#[test]
fn event_subjects_follow_the_transition() {
    let k = EventKind::TaskTransition {
        flow_id: FlowId::new("f").unwrap(),
        task_id: t("a"),
        from: TaskState::Running,
        to: TaskState::Succeeded,
        attempt: 1,
        agent_id: None,
        reason: Some("why".into()),
        timeout_ms: None,
    };
    assert_eq!(k.subject(), "coord.events.task.succeeded");
}

#[test]
fn backoff_grows_and_is_capped() {
    let p = RetryPolicy {
        max_attempts: 5,
        backoff_base_ms: 100,
        backoff_factor: 2.0,
        backoff_max_ms: 500,
        ..Default::default()
    };
    assert_eq!(
        [
            p.backoff_ms(1),
            p.backoff_ms(2),
            p.backoff_ms(3),
            p.backoff_ms(4)
        ],
        [100, 200, 400, 500]
    );
    assert_eq!(p.backoff_ms(1000), 500);
}

#[test]
fn task_defaults_are_left_out_of_the_json() {
    let json = serde_json::to_value(TaskSpec::new(t("a"))).unwrap();
    assert!(
        json.get("retry").is_none() && json.get("timeouts").is_none(),
        "{json}"
    );
}

#[test]
fn state_requests_default_the_scope_and_reject_typos() {
    let get: StateGet = serde_json::from_value(json!({"agent_id": "w1"})).unwrap();
    assert_eq!(get.scope.as_str(), crate::id::DEFAULT_SCOPE);
    assert_eq!(get.revision, None);
    let err =
        serde_json::from_value::<ScopeConfig>(json!({"scope": "s", "polcy": "merge"})).unwrap_err();
    assert!(err.to_string().contains("polcy"), "{err}");
    let err = serde_json::from_value::<ScopeConfig>(json!({
        "invariants": [{"type": "agree", "pointer": "/a", "agent": ["x"]}]
    }))
    .unwrap_err();
    assert!(err.to_string().contains("agent"), "{err}");
    let inv: Invariant =
        serde_json::from_value(json!({"type": "sum_at_most", "pointer": "/b", "max": 3})).unwrap();
    assert_eq!(
        inv,
        Invariant::SumAtMost {
            pointer: "/b".into(),
            max: 3.0
        }
    );
}

#[test]
fn anomaly_events_go_to_their_kind_and_unknown_kinds_still_read() {
    let a: Anomaly = serde_json::from_value(json!({
        "anomaly_id": "m-1", "kind": "throughput_drop", "severity": "warning",
        "subject": "tasks_succeeded", "at_ms": 5, "value": 0.0, "expected": 20.0,
        "message": "fell", "new_field": true
    }))
    .unwrap();
    let k = EventKind::AnomalyDetected { anomaly: a };
    assert_eq!(k.subject(), "coord.events.anomaly.throughput_drop");
    let v = serde_json::to_value(&k).unwrap();
    assert_eq!(v["type"], "anomaly_detected");
    let newer: Anomaly = serde_json::from_value(json!({
        "anomaly_id": "m-2", "kind": "from_the_future", "at_ms": 1
    }))
    .unwrap();
    assert_eq!(newer.kind, AnomalyKind::Unknown);
    assert!(serde_json::from_value::<AnomaliesRequest>(json!({"limt": 1})).is_err());
}
