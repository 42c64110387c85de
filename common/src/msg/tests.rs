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
        lease: AttemptLease {
            schedule_to_start_ms: 60_000,
            start_by_ms: 60_009,
            start_to_close_ms: Some(1_000),
            heartbeat_ms: None,
            deadline_ms: Some(61_009),
            tick_ms: 1_000,
        },
    });
    for kind in [
        ReportKind::Started,
        ReportKind::Progress {
            progress: Some(0.5),
            message: Some("half".into()),
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
        owner: Some("team-a".into()),
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
            task_kind: Some("summarise".into()),
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
        enforce_schema: false,
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
        task_kind: None,
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

fn cpu(n: f64) -> std::collections::BTreeMap<String, f64> {
    [("cpu".to_string(), n)].into()
}

fn allocation() -> Allocation {
    Allocation {
        allocation_id: AllocationId::new("al1").unwrap(),
        agent_id: a("w1"),
        owner: "team/f1".into(),
        resources: cpu(2.0),
        priority: 3,
        created_at_ms: 7,
        reservation_id: Some(ReservationId::new("rs1").unwrap()),
        anti_affinity: Some("g".into()),
        movable: true,
        capabilities: vec!["py".into()],
        labels: [("zone".to_string(), "eu".to_string())].into(),
        gang_id: Some("gang1".into()),
        pending: true,
        task: Some(TaskRef {
            flow_id: FlowId::new("f1").unwrap(),
            task_id: TaskId::new("t1").unwrap(),
        }),
        ttl_ms: Some(5_000),
        expires_at_ms: Some(5_007),
        bound_at_ms: None,
    }
}

#[test]
fn allocator_messages_round_trip() {
    let req = Requirements {
        resources: cpu(1.0),
        capabilities: vec!["py".into()],
        labels: [("zone".to_string(), "eu".to_string())].into(),
        policy: Policy::Spread,
        anti_affinity: Some("g".into()),
        movable: true,
    };
    round_trip(&GangRequest {
        owner: "team".into(),
        members: vec![req.clone(), Requirements::default()],
        priority: -1,
    });
    round_trip(&GangReply {
        gang_id: "gang1".into(),
        allocations: vec![allocation()],
    });
    round_trip(&ReserveRequest {
        owner: "team".into(),
        requirements: req.clone(),
        start_ms: 1,
        end_ms: 2,
        agent_id: Some(a("w1")),
    });
    let reservation = Reservation {
        reservation_id: ReservationId::new("rs1").unwrap(),
        agent_id: a("w1"),
        owner: "team".into(),
        resources: cpu(1.0),
        start_ms: 1,
        end_ms: 2,
        created_at_ms: 1,
    };
    round_trip(&reservation);
    round_trip(&CancelReservation {
        reservation_id: ReservationId::new("rs1").unwrap(),
        agent_id: None,
    });
    round_trip(&CancelReply {
        cancelled: true,
        released: vec![allocation()],
    });
    round_trip(&AdjustRequest {
        agent_id: a("w1"),
        capacity: cpu(0.5),
        preempt: true,
    });
    round_trip(&AdjustReply {
        applied: true,
        capacity: cpu(0.5),
        no_longer_fit: vec![allocation()],
        reservations_no_longer_fit: vec![reservation],
        preempted: vec![allocation()],
    });
    round_trip(&OptimizeRequest {
        apply: true,
        max_moves: Some(3),
    });
    let util = Utilisation {
        max: 1.0,
        mean: 0.5,
        stddev: 0.5,
        fragmentation: 0.25,
        per_agent: [(a("w1"), 1.0), (a("w2"), 0.0)].into(),
    };
    round_trip(&OptimizePlan {
        moves: vec![Move {
            allocation_id: AllocationId::new("al1").unwrap(),
            owner: "o".into(),
            from: a("w1"),
            to: a("w2"),
            resources: cpu(1.0),
        }],
        before: util.clone(),
        after: util,
        applied: vec![AllocationId::new("al1").unwrap()],
    });
    let quota = QuotaStatus {
        limits: cpu(4.0),
        used: cpu(2.5),
        allocations: 2,
    };
    round_trip(&QuotaRequest {
        owner: "team".into(),
        limits: cpu(4.0),
        preempt: true,
    });
    round_trip(&QuotaReply {
        owner: "team".into(),
        applied: false,
        quota: Some(quota.clone()),
        no_longer_fit: vec![allocation()],
        preempted: vec![],
    });
    round_trip(&CapacityStatus {
        fits: Some(false),
        no_fit: Some(NoFit {
            message: "cpu is short".into(),
            best_candidate: Some(a("w1")),
            short: Some(Unfit::Short {
                resource: "cpu".into(),
                needed: 2.0,
                free: 1.0,
            }),
            agents_considered: 1,
            member: Some(0),
        }),
        quotas: [("team".to_string(), quota)].into(),
        last_heartbeat_ms: [(a("w1"), 1_700_000_000_000)].into(),
        ..Default::default()
    });
    round_trip(&QuotaExceeded {
        owner: "team/f1".into(),
        quota_owner: "team".into(),
        resource: "cpu".into(),
        limit: 4.0,
        in_use: 3.0,
        requested: 2.0,
    });
}

#[test]
fn allocator_json_is_pinned() {
    let mut gang_member = allocation();
    gang_member.reservation_id = None;
    gang_member.anti_affinity = None;
    gang_member.capabilities = vec![];
    gang_member.labels = Default::default();
    assert_eq!(
        serde_json::to_value(&gang_member).unwrap(),
        json!({
            "allocation_id": "al1", "agent_id": "w1", "owner": "team/f1",
            "resources": {"cpu": 2.0}, "priority": 3, "created_at_ms": 7,
            "movable": true, "gang_id": "gang1", "pending": true,
            "task": {"flow_id": "f1", "task_id": "t1"}, "ttl_ms": 5000, "expires_at_ms": 5007
        })
    );
    // Defaults may be left out of requests.
    let gang: GangRequest =
        serde_json::from_value(json!({"owner": "o", "members": [{"resources": {"gpu": 1}}]}))
            .unwrap();
    assert_eq!(
        (gang.priority, gang.members[0].policy),
        (0, Policy::BestFit)
    );
    let adjust: AdjustRequest =
        serde_json::from_value(json!({"agent_id": "w1", "capacity": {"cpu": 1}})).unwrap();
    assert!(!adjust.preempt);
    let quota: QuotaRequest = serde_json::from_value(json!({"owner": "team"})).unwrap();
    assert!(
        quota.limits.is_empty() && !quota.preempt,
        "empty limits clear"
    );
    assert_eq!(
        serde_json::to_value(QuotaReply {
            owner: "team".into(),
            applied: true,
            quota: None,
            no_longer_fit: vec![],
            preempted: vec![],
        })
        .unwrap(),
        json!({"owner": "team", "applied": true, "no_longer_fit": [], "preempted": []})
    );
    assert_eq!(
        serde_json::to_value(QuotaStatus {
            limits: cpu(4.0),
            used: cpu(1.0),
            allocations: 1,
        })
        .unwrap(),
        json!({"limits": {"cpu": 4.0}, "used": {"cpu": 1.0}, "allocations": 1})
    );
    assert_eq!(
        serde_json::to_value(Unfit::Short {
            resource: "cpu".into(),
            needed: 2.0,
            free: 0.5,
        })
        .unwrap(),
        json!({"reason": "short", "resource": "cpu", "needed": 2.0, "free": 0.5})
    );
    assert_eq!(
        serde_json::to_value(EventKind::AllocationPreempted {
            allocation_id: AllocationId::new("al1").unwrap(),
            agent_id: a("w1"),
            owner: "team".into(),
            priority: 0,
            reason: "quota_reduced".into(),
        })
        .unwrap(),
        json!({
            "type": "allocation_preempted", "allocation_id": "al1", "agent_id": "w1",
            "owner": "team", "priority": 0, "reason": "quota_reduced"
        })
    );
    let changed = EventKind::QuotaChanged {
        owner: "team".into(),
        limits: cpu(4.0),
    };
    assert_eq!(changed.subject(), "coord.events.quota.changed");
    assert_eq!(
        serde_json::to_value(&changed).unwrap(),
        json!({"type": "quota_changed", "owner": "team", "limits": {"cpu": 4.0}})
    );
    // A capacity report without quotas reads as it did before quotas existed.
    let v = serde_json::to_value(CapacityStatus::default()).unwrap();
    assert!(v.get("quotas").is_none(), "{v}");
    // Requests people and programs write reject typos.
    let err =
        serde_json::from_value::<GangRequest>(json!({"owner": "o", "member": []})).unwrap_err();
    assert!(err.to_string().contains("member"), "{err}");
    let err = serde_json::from_value::<QuotaRequest>(json!({"owner": "o", "limit": {"cpu": 1}}))
        .unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
    let err = serde_json::from_value::<OptimizeRequest>(json!({"aply": true})).unwrap_err();
    assert!(err.to_string().contains("aply"), "{err}");
}

#[test]
fn states_read_back_from_their_wire_names() {
    for s in [TaskState::Blocked, TaskState::TimedOut, TaskState::Waiting] {
        assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
        assert_eq!(serde_json::to_value(s).unwrap(), json!(s.as_str()));
    }
    for s in [FlowState::Running, FlowState::Cancelled] {
        assert_eq!(s.as_str().parse::<FlowState>().unwrap(), s);
    }
    assert!("timedout".parse::<TaskState>().is_err());
    assert!("".parse::<FlowState>().is_err());
}

#[test]
fn a_report_message_holds_one_report_or_an_array_read_whole() {
    let one =
        json!({"flow_id": "f", "task_id": "t", "attempt": 1, "agent_id": "w1", "type": "started"});
    let done = json!({"flow_id": "f", "task_id": "t", "attempt": 1, "agent_id": "w1", "type": "completed", "output": 3});
    let read = |v: serde_json::Value| reports_in(v.to_string().as_bytes());
    assert_eq!(read(one.clone()).unwrap().len(), 1);
    let both = read(json!([one, done])).unwrap();
    assert_eq!(
        both.iter().map(|r| r.kind.type_name()).collect::<Vec<_>>(),
        ["started", "completed"]
    );
    assert!(reports_in(b"  \n[]").is_err(), "an empty array");
    assert!(
        read(json!([one, "junk"])).is_err(),
        "read whole or not at all"
    );
    let many: Vec<_> = (0..=MAX_REPORTS_PER_MESSAGE).map(|_| one.clone()).collect();
    let err = read(json!(many)).unwrap_err().to_string();
    assert!(err.contains("1 to 256"), "{err}");
    assert!(read(json!("not a report")).is_err());
}
