//! The Prometheus exposition over many flows: its series stay the same set
//! (no label takes an id) however many flows the monitor has seen.

use super::tests::ev;
use super::*;
use common::{AgentId, FlowId, TaskId};

/// Drives one flow of one task on an agent of its own through the monitor,
/// with the traffic a real one makes (heartbeat, assignment, report, flow and
/// state watches) and the services' request counts.
fn one_flow(m: &mut Monitor, i: u64) {
    let t0 = 1_000 + i * 10;
    let (flow, agent) = (format!("fl0w{i}"), format!("ag3nt{i}"));
    let (fid, aid) = (FlowId::new(&flow).unwrap(), AgentId::new(&agent).unwrap());
    let send = |m: &mut Monitor, kind: EventKind, at: u64| {
        m.observe(kind.subject(), &ev(at, kind), at);
    };
    send(
        m,
        EventKind::AgentRegistered {
            agent_id: aid.clone(),
            capacity: [("cpu".to_owned(), 1.0)].into(),
        },
        t0,
    );
    send(
        m,
        EventKind::FlowCreated {
            flow_id: fid.clone(),
            name: flow.clone(),
            tasks: 1,
        },
        t0,
    );
    for (to, at) in [
        (TaskState::Ready, t0),
        (TaskState::Assigned, t0 + 1),
        (TaskState::Running, t0 + 2),
        (TaskState::Succeeded, t0 + 5),
    ] {
        send(
            m,
            EventKind::TaskTransition {
                flow_id: fid.clone(),
                task_id: TaskId::new(format!("t4sk{i}")).unwrap(),
                from: TaskState::Blocked,
                to,
                attempt: 1,
                agent_id: Some(aid.clone()),
                reason: None,
                timeout_ms: None,
                task_kind: Some("work".into()),
            },
            at,
        );
    }
    send(
        m,
        EventKind::FlowCompleted {
            flow_id: fid.clone(),
            state: common::msg::FlowState::Succeeded,
        },
        t0 + 6,
    );
    for s in [
        common::subject::heartbeat(&aid),
        common::subject::assign(&aid),
        common::subject::report(&aid),
        common::subject::flow_watch(&fid),
        format!("coord.sync.watch.sc0pe{i}.{agent}"),
    ] {
        m.observe(&s, b"{}", t0 + 6);
    }
    let endpoint = |subject: &str, n: u64| {
        serde_json::json!({"name": subject.replace('.', "-"), "subject": subject,
            "num_requests": n, "num_errors": 0,
            "data": {"errors_by_code": {"no_capacity": n / 2}}})
    };
    m.observe_requests(
        t0 + 6,
        &[
            serde_json::json!({"name": "orchestrator", "id": "o1", "endpoints": [
                endpoint(common::subject::FLOW_CREATE, i + 1),
                endpoint(common::subject::AGENT_REGISTER_ALL, i + 1),
            ]}),
        ],
    );
}

fn series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s))
        .collect()
}

#[test]
fn series_stay_flat_over_a_thousand_flows_and_no_label_is_an_id() {
    let mut m = Monitor::new(0, "m", Settings::default());
    let render = |m: &Monitor| {
        prom::render(
            m.exposition(20_000),
            prom::Status {
                version: "0".into(),
                ..Default::default()
            },
        )
        .unwrap()
    };
    for i in 0..10 {
        one_flow(&mut m, i);
    }
    let early = render(&m);
    for i in 10..1_000 {
        one_flow(&mut m, i);
    }
    let late = render(&m);
    assert_eq!(series(&early), series(&late), "{late}");
    assert!(
        prom_value(&late, r#"coord_flows_completed_total{state="succeeded"}"#) == Some(1_000.0),
        "{late}"
    );
    for id in ["fl0w", "ag3nt", "t4sk", "sc0pe"] {
        assert!(!late.contains(id), "{id} in a label:\n{late}");
    }
    // The same holds for the message families of the JSON API.
    let families = m.metrics(20_000).messages_by_subject;
    assert!(families
        .keys()
        .all(|f| !f.contains("fl0w") && !f.contains("ag3nt")));
}

fn prom_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
