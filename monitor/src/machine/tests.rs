//! The monitor core driven by hand-made events: windows, detectors,
//! health, validation and the report, each checked on what it derives.

use super::*;
use common::msg::ResourceCapacity;
use common::{AgentId, FlowId, TaskId};

/// An event with an id of its own (a repeated id is counted once).
pub(super) fn ev(at_ms: u64, kind: EventKind) -> Vec<u8> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    serde_json::to_vec(&Event {
        event_id: format!("e{n}"),
        at_ms,
        source: "test".into(),
        kind,
    })
    .unwrap()
}

fn tr(flow: &str, task: &str, to: TaskState, at_ms: u64) -> (String, Vec<u8>) {
    tr_timeout(flow, task, to, at_ms, None)
}

fn tr_timeout(
    flow: &str,
    task: &str,
    to: TaskState,
    at_ms: u64,
    timeout_ms: Option<u64>,
) -> (String, Vec<u8>) {
    tr_full(flow, task, to, at_ms, timeout_ms, None)
}

fn tr_full(
    flow: &str,
    task: &str,
    to: TaskState,
    at_ms: u64,
    timeout_ms: Option<u64>,
    task_kind: Option<&str>,
) -> (String, Vec<u8>) {
    let kind = EventKind::TaskTransition {
        flow_id: FlowId::new(flow).unwrap(),
        task_id: TaskId::new(task).unwrap(),
        from: TaskState::Blocked,
        to,
        attempt: 1,
        agent_id: Some(AgentId::new("w1").unwrap()),
        reason: None,
        timeout_ms,
        task_kind: task_kind.map(str::to_owned),
    };
    (kind.subject().to_owned(), ev(at_ms, kind))
}

/// Runs one task through ready → assigned → running → `end`, at `t0`.
fn run_task(m: &mut Monitor, flow: &str, task: &str, t0: u64, wait: u64, run: u64, end: TaskState) {
    let steps = [
        (TaskState::Ready, t0),
        (TaskState::Assigned, t0 + 1),
        (TaskState::Running, t0 + 1 + wait),
        (end, t0 + 1 + wait + run),
    ];
    for (to, at) in steps {
        let (s, p) = tr(flow, task, to, at);
        m.observe(&s, &p, at);
    }
}

#[test]
fn task_latencies_and_rates_come_from_transitions() {
    let mut m = Monitor::new(0, "m", Settings::default());
    for i in 0..10u64 {
        run_task(
            &mut m,
            "f",
            &format!("t{i}"),
            1_000 * i,
            20,
            100,
            TaskState::Succeeded,
        );
    }
    run_task(&mut m, "f", "bad", 11_000, 20, 50, TaskState::Failed);
    let x = m.metrics(12_000);
    assert_eq!(x.tasks_completed, 10);
    assert_eq!(x.tasks_failed, 1);
    let run = &x.latency["run_time"];
    assert_eq!(run.count, 11);
    assert!((99..=101).contains(&run.p90_ms), "{run:?}");
    assert!((19..=21).contains(&x.latency["queue_wait"].p50_ms));
    assert!((120..=122).contains(&x.latency["end_to_end"].p90_ms));
    assert!((x.task_rates["succeeded"].last_1m - 10.0 / 60.0).abs() < 1e-9);
    assert_eq!(x.tasks_tracked, 0, "finished tasks are evicted");
    assert_eq!(m.slowest_agents()[0].name, "w1");
    assert_eq!(m.slowest_flows()[0].runs, 11);
}

#[test]
fn memory_stays_bounded_under_endless_traffic() {
    let mut m = Monitor::new(0, "m", Settings::default());
    // Tasks that start and never finish, many more than the cap.
    for i in 0..(MAX_TRACKED_TASKS + 5_000) {
        let (s, p) = tr("f", &format!("t{i}"), TaskState::Running, i as u64);
        m.observe(&s, &p, i as u64);
    }
    assert!(m.metrics(0).tasks_tracked <= MAX_TRACKED_TASKS);
    for i in 0..(MAX_FAMILIES + 10) {
        m.observe(&format!("coord.x{i}"), b"", 0);
    }
    assert_eq!(m.metrics(0).message_rates.len(), MAX_FAMILIES + 1);
    for i in 0..(MAX_RANKED + 10) {
        run_task(&mut m, &format!("f{i}"), "a", 0, 1, 1, TaskState::Succeeded);
    }
    assert!(m.by_flow.len() <= MAX_RANKED);
}

#[test]
fn requests_counted_by_the_services_are_traffic_on_their_families() {
    let stats = |create: u64, get: u64| {
        [
            serde_json::json!({"name": "orchestrator", "id": "o1", "endpoints": [
                {"subject": common::subject::FLOW_CREATE, "num_requests": create},
                {"subject": common::subject::AGENT_STATE_GET_ALL, "num_requests": get},
            ]}),
        ]
    };
    let mut m = Monitor::new(0, "m", Settings::default());
    m.observe_requests(1_000, &stats(5, 0));
    m.observe("coord.agents.w1.heartbeat", b"{}", 1_500);
    m.observe_requests(2_000, &stats(8, 2));
    let got = m.metrics(2_000);
    assert_eq!(got.messages_by_subject[common::subject::FLOW_CREATE], 3);
    assert_eq!(got.messages_by_subject["coord.agents.*.state.get"], 2);
    assert_eq!(got.messages_by_subject["coord.agents.*.heartbeat"], 1);
    assert_eq!(got.messages_total, 6);
    assert_eq!(
        got.bytes_total, 2,
        "requests add no bytes: their bodies are unseen"
    );
    assert!((got.message_rates[common::subject::FLOW_CREATE].last_1m - 3.0 / 60.0).abs() < 1e-9);
}

#[test]
fn agent_loss_is_an_anomaly_and_counted() {
    let mut m = Monitor::new(0, "m", Settings::default());
    let a = AgentId::new("w1").unwrap();
    let reg = EventKind::AgentRegistered {
        agent_id: a.clone(),
        capacity: Default::default(),
    };
    m.observe(reg.subject(), &ev(0, reg.clone()), 0);
    assert_eq!(m.metrics(0).agents_online, 1);
    let lost = EventKind::AgentLost {
        agent_id: a.clone(),
        last_seen_ms: 1_000,
        released: vec![serde_json::from_value(serde_json::json!({
            "allocation_id": "al", "agent_id": "w1", "owner": "f/t"
        }))
        .unwrap()],
    };
    m.observe(lost.subject(), &ev(4_000, lost), 4_000);
    let x = m.metrics(4_000);
    assert_eq!((x.agents_online, x.agents_lost), (0, 1));
    let new = m.take_new_anomalies();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].kind, AnomalyKind::AgentLost);
    assert_eq!(new[0].subject, "w1");
    assert_eq!(
        (new[0].agent_id.as_deref(), &new[0].flow_id),
        (Some("w1"), &None)
    );
    assert!(m.take_new_anomalies().is_empty());
    assert_eq!(m.anomalies().count(), 1);
}

#[test]
fn throughput_drop_and_latency_spike_are_each_reported_once() {
    let mut m = Monitor::new(0, "m", Settings::default());
    let mut t = 0u64;
    let mut n = 0;
    let mut interval = |m: &mut Monitor, t: &mut u64, tasks: usize, run: u64| {
        for _ in 0..tasks {
            n += 1;
            run_task(m, "f", &format!("t{n}"), *t, 5, run, TaskState::Succeeded);
        }
        *t += 1_000;
        m.tick(*t);
    };
    for i in 0..30 {
        interval(&mut m, &mut t, 20 + i % 3, 20 + (i % 4) as u64);
    }
    assert_eq!(m.take_new_anomalies(), vec![], "steady run");
    for _ in 0..5 {
        interval(&mut m, &mut t, 20, 400);
    }
    for _ in 0..5 {
        interval(&mut m, &mut t, 20, 20);
    }
    for _ in 0..5 {
        interval(&mut m, &mut t, 0, 20);
    }
    let kinds: Vec<(AnomalyKind, String)> = m
        .take_new_anomalies()
        .into_iter()
        .map(|a| (a.kind, a.subject))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (AnomalyKind::LatencySpike, "run_time".to_owned()),
            (AnomalyKind::ThroughputDrop, "tasks_succeeded".to_owned()),
        ]
    );
}

#[test]
fn a_task_running_far_past_the_usual_time_is_stuck_once() {
    let mut m = Monitor::new(0, "m", Settings::default());
    for i in 0..30 {
        run_task(
            &mut m,
            "f",
            &format!("t{i}"),
            0,
            1,
            100,
            TaskState::Succeeded,
        );
    }
    let (s, p) = tr("f", "slow", TaskState::Running, 1_000);
    m.observe(&s, &p, 1_000);
    m.tick(10_000);
    assert!(m.take_new_anomalies().is_empty());
    m.tick(1_000 + STUCK_MIN_MS + 1);
    m.tick(1_000 + STUCK_MIN_MS + 2);
    let a = m.take_new_anomalies();
    assert_eq!(a.len(), 1);
    assert_eq!(
        (a[0].kind, a[0].subject.as_str()),
        (AnomalyKind::StuckTask, "f/slow")
    );
    let about = (a[0].flow_id.as_deref(), a[0].task_id.as_deref());
    assert_eq!(
        about,
        (Some("f"), Some("slow")),
        "what it is about, for links"
    );
}

#[test]
fn a_task_past_its_own_timeout_is_stuck_without_any_history() {
    let mut m = Monitor::new(0, "m", Settings::default());
    // No run has finished yet, so there is no usual time; the timeouts decide.
    let (s, p) = tr_timeout("f", "short", TaskState::Running, 1_000, Some(2_000));
    m.observe(&s, &p, 1_000);
    let (s, p) = tr_timeout("f", "long", TaskState::Running, 1_000, Some(600_000));
    m.observe(&s, &p, 1_000);
    let (s, p) = tr("f", "unbounded", TaskState::Running, 1_000);
    m.observe(&s, &p, 1_000);
    m.tick(1_000 + 2_000 + STUCK_PAST_TIMEOUT_MS);
    assert!(
        m.take_new_anomalies().is_empty(),
        "not past timeout + grace yet"
    );
    m.tick(1_000 + 2_000 + STUCK_PAST_TIMEOUT_MS + 1);
    m.tick(1_000 + 2_000 + STUCK_PAST_TIMEOUT_MS + 2);
    let a = m.take_new_anomalies();
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(
        (a[0].kind, a[0].subject.as_str(), a[0].expected),
        (AnomalyKind::StuckTask, "f/short", 2_000.0)
    );
    assert!(
        a[0].message.contains("timeout of 2000 ms"),
        "{}",
        a[0].message
    );
}

#[test]
fn a_long_timeout_overrides_the_usual_time() {
    let mut m = Monitor::new(0, "m", Settings::default());
    for i in 0..30 {
        run_task(
            &mut m,
            "f",
            &format!("t{i}"),
            0,
            1,
            100,
            TaskState::Succeeded,
        );
    }
    // Far past the usual time, but well within the 10-minute timeout it was given.
    let (s, p) = tr_timeout("f", "batch", TaskState::Running, 1_000, Some(600_000));
    m.observe(&s, &p, 1_000);
    m.tick(1_000 + STUCK_MIN_MS * 4);
    assert!(m.take_new_anomalies().is_empty());
    m.tick(1_000 + 600_000 + STUCK_PAST_TIMEOUT_MS + 1);
    let a = m.take_new_anomalies();
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].subject, "f/batch");
}

#[test]
fn each_subject_family_has_its_own_traffic_detector() {
    let mut m = Monitor::new(0, "m", Settings::default());
    let mut now = 0;
    let mut interval = |m: &mut Monitor, a: usize, b: usize| {
        for _ in 0..a {
            m.observe("coord.custom.a", b"{}", now);
        }
        for _ in 0..b {
            m.observe("coord.custom.b", b"{}", now);
        }
        now += 10_000;
        m.tick(now);
        m.take_new_anomalies()
    };
    for i in 0..20 {
        let found = interval(&mut m, 50 + i % 3, 3_000 + 10 * (i % 4));
        assert!(found.is_empty(), "steady traffic: {found:?}");
    }
    // Family a jumps twentyfold; the total moves by a third (not an outlier).
    let found = interval(&mut m, 1_000, 3_000);
    let subjects: Vec<&str> = found.iter().map(|a| a.subject.as_str()).collect();
    assert_eq!(subjects, ["messages:coord.custom.a"], "{found:?}");
    assert_eq!(found[0].kind, AnomalyKind::Outlier);
    // It stays one anomaly while it lasts.
    assert!(interval(&mut m, 1_000, 3_000).is_empty());
}

#[test]
fn family_detectors_are_capped() {
    let mut m = Monitor::new(0, "m", Settings::default());
    for i in 0..(MAX_FAMILY_DETECTORS + 10) {
        m.observe(&format!("coord.custom.f{i}"), b"{}", 0);
    }
    m.tick(10_000);
    assert_eq!(m.detectors.families.len(), MAX_FAMILY_DETECTORS);
}

#[test]
fn queue_depth_is_the_assignments_waiting_per_agent() {
    let mut m = Monitor::new(0, "m", Settings::default());
    let to = |m: &mut Monitor, task: &str, agent: &str, state: TaskState, at: u64| {
        m.transition("f", task, state, (1, None, None), Some(agent), at, at);
    };
    for (i, agent) in ["w1", "w1", "w1", "w3", "w3", "w2"].iter().enumerate() {
        to(&mut m, &format!("t{i}"), agent, TaskState::Assigned, 1_000);
    }
    to(&mut m, "t5", "w2", TaskState::Running, 1_001);
    let reports = StreamHealth {
        name: common::nats::STREAM_REPORTS.into(),
        consumer_pending: [("orchestrator".to_string(), 40)].into(),
        ..Default::default()
    };
    m.observe_streams(1_000, &[reports]);
    let x = m.metrics(1_000);
    assert_eq!(
        x.queue_depth, 5,
        "assigned and not started; no stream counts"
    );
    assert_eq!(
        x.queue_depth_by_agent,
        [("w1".to_string(), 3), ("w3".to_string(), 2)].into()
    );
    for i in 0..5 {
        to(&mut m, &format!("t{i}"), "w1", TaskState::Running, 2_000);
    }
    m.observe_streams(2_000, &[]);
    assert_eq!(m.metrics(2_000).queue_depth, 0);
    assert!(m.metrics(2_000).queue_depth_by_agent.is_empty());
    assert_eq!(m.metrics(2_000).queue_depth_peak.last_1m, 5.0);
}

#[test]
fn saturation_and_growing_lag_fire_once_until_they_clear() {
    let mut m = Monitor::new(0, "m", Settings::default());
    let cap = |allocated: f64| {
        let mut c = CapacityStatus::default();
        c.pool.insert(
            "cpu".into(),
            ResourceCapacity {
                capacity: 4.0,
                allocated,
                reserved: 0.0,
                free: 4.0 - allocated,
            },
        );
        c
    };
    for used in [1.0, 4.0, 4.0, 3.9, 1.0, 4.0] {
        m.observe_capacity(0, &cap(used));
    }
    let sat: Vec<_> = m.take_new_anomalies();
    assert_eq!(sat.len(), 2);
    assert!(sat
        .iter()
        .all(|a| a.kind == AnomalyKind::ResourceSaturation));

    let stream = |pending: u64| {
        let mut s = StreamHealth {
            name: "S".into(),
            ..Default::default()
        };
        s.consumer_pending.insert("c".into(), pending);
        vec![s]
    };
    for p in [10, 2_000, 3_000, 4_000, 5_000, 6_000, 6_000, 7_000] {
        m.observe_streams(0, &stream(p));
    }
    let lag = m.take_new_anomalies();
    assert_eq!(lag.len(), 1);
    assert_eq!(
        (lag[0].kind, lag[0].subject.as_str()),
        (AnomalyKind::ConsumerLag, "S/c")
    );
}

#[test]
fn a_task_is_judged_by_the_usual_time_of_its_own_kind() {
    let mut m = Monitor::new(0, "m", Settings::default());
    // Quick tasks usually take 1 s, slow ones 100 s: the overall p99 (100 s)
    // would let a quick task hang for 500 s before anyone said so.
    for (kind, run) in [("quick", 1_000u64), ("slow", 100_000)] {
        for i in 0..25 {
            let task = format!("{kind}{i}");
            let (s, p) = tr_full("f", &task, TaskState::Running, 0, None, Some(kind));
            m.observe(&s, &p, 0);
            let (s, p) = tr("f", &task, TaskState::Succeeded, run);
            m.observe(&s, &p, run);
        }
    }
    let (s, p) = tr_full(
        "f",
        "hung",
        TaskState::Running,
        200_000,
        None,
        Some("quick"),
    );
    m.observe(&s, &p, 200_000);
    let (s, p) = tr_full("f", "long", TaskState::Running, 200_000, None, Some("slow"));
    m.observe(&s, &p, 200_000);
    m.tick(200_000 + STUCK_MIN_MS - 1);
    assert!(m.take_new_anomalies().is_empty());
    m.tick(200_000 + STUCK_MIN_MS + 1);
    m.tick(200_000 + STUCK_MIN_MS + 2);
    let a = m.take_new_anomalies();
    assert_eq!(a.len(), 1, "{a:?}");
    assert_eq!(a[0].subject, "f/hung");
    assert!(
        a[0].message.contains("tasks of kind quick"),
        "{}",
        a[0].message
    );
}

#[test]
fn an_event_published_again_under_its_id_is_counted_once() {
    let mut m = Monitor::new(0, "t", Settings::default());
    let (subject, body) = tr("f", "a", TaskState::Succeeded, 10);
    let created = ev(
        10,
        EventKind::FlowCreated {
            flow_id: FlowId::new("f").unwrap(),
            name: "f".into(),
            tasks: 1,
        },
    );
    for at in [10, 2_000, 60_000] {
        m.observe(&subject, &body, at);
        m.observe("coord.events.flow.created", &created, at);
    }
    let metrics = m.metrics(60_000);
    assert_eq!((metrics.tasks_completed, metrics.flows_created), (1, 1));
    assert_eq!(metrics.messages_total, 6, "each repeat is still traffic");
}
