//! Several reports in one stored message, as an agent written from the
//! protocol page sends them: applied in order as if sent alone, each element
//! judged on its own once the array is read, and an array that is not all
//! reports refused whole, with nothing applied.

use std::time::Duration;

use async_nats::jetstream;
use common::msg::{
    Assignment, FlowSpec, FlowState, RegisterAgent, RejectReason, ReportRejected, TaskState,
};
use common::{subject, AgentId, FlowId};
use futures::StreamExt;
use serde_json::{json, Value};
use testkit::{eventually, System};

use crate::orchestrator::cpu_task;

/// Publishes `body` on `agent`'s report subject and waits until it is stored.
async fn publish(js: &jetstream::Context, agent: &AgentId, id: &str, body: Value) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    js.publish_with_headers(subject::report(agent), headers, body.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn verdict(verdicts: &mut async_nats::Subscriber) -> ReportRejected {
    let msg = tokio::time::timeout(Duration::from_secs(10), verdicts.next())
        .await
        .expect("a verdict")
        .unwrap();
    serde_json::from_slice(&msg.payload).unwrap()
}

async fn task_state(sys: &System, flow: &FlowId, task: &str) -> Option<TaskState> {
    let s = sys.client.flow_status(flow).await.ok()?;
    s.tasks
        .iter()
        .find(|t| t.task_id.as_str() == task)
        .map(|t| t.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_array_of_reports_is_applied_in_order_and_refused_whole_when_one_is_not_a_report() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    let w1 = AgentId::new("w1").unwrap();
    let mut assignments = sys.nats.subscribe(subject::assign(&w1)).await.unwrap();
    let mut verdicts = sys.nats.subscribe(subject::rejected(&w1)).await.unwrap();
    sys.nats.flush().await.unwrap();
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: w1.clone(),
            capabilities: Vec::new(),
            labels: Default::default(),
            capacity: [("cpu".to_string(), 2.0)].into(),
            heartbeat_interval_ms: 600_000,
        })
        .await
        .unwrap();
    let flow = FlowId::new("arrays").unwrap();
    let mut spec = FlowSpec::new("arrays", vec![cpu_task("a", &[]), cpu_task("b", &[])]);
    spec.id = Some(flow.clone());
    sys.client.create_flow(&spec).await.unwrap();
    let mut attempt = std::collections::BTreeMap::new();
    while attempt.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(30), assignments.next())
            .await
            .expect("both tasks assigned")
            .unwrap();
        if let Ok(a) = serde_json::from_slice::<Assignment>(&msg.payload) {
            attempt.insert(a.task_id.to_string(), a.attempt);
        }
    }
    let report = |task: &str, kind: Value| {
        let mut r =
            json!({"flow_id": flow, "task_id": task, "attempt": attempt[task], "agent_id": "w1"});
        for (k, v) in kind.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };

    // One element is not a report: the array is refused whole, a not completed.
    let bad = json!([
        report("a", json!({"type": "completed", "output": 1})),
        "junk"
    ]);
    publish(&js, &w1, "arr-1", bad).await;
    let v = verdict(&mut verdicts).await;
    assert_eq!(v.reason, RejectReason::Malformed, "{v:?}");
    assert!(v.message.contains("not a report"), "{v:?}");
    publish(&js, &w1, "arr-2", json!([])).await;
    let v = verdict(&mut verdicts).await;
    assert_eq!(v.reason, RejectReason::Malformed, "{v:?}");
    assert!(v.message.contains("1 to 256"), "{v:?}");
    // Not completed (ready while the record of its assignment, sent ahead
    // of it, waits for a report).
    let a = task_state(&sys, &flow, "a").await;
    assert!(
        matches!(
            a,
            Some(TaskState::Ready | TaskState::Assigned | TaskState::Running)
        ),
        "{a:?}"
    );

    // Read whole: a runs and completes in one message; b's element, naming
    // another agent, is refused alone.
    let good = json!([
        report("a", json!({"type": "started"})),
        report("a", json!({"type": "completed", "output": {"n": 1}})),
        report(
            "b",
            json!({"type": "completed", "output": 2, "agent_id": "w2"})
        ),
    ]);
    publish(&js, &w1, "arr-3", good).await;
    let v = verdict(&mut verdicts).await;
    assert_eq!(v.reason, RejectReason::AgentMismatch, "{v:?}");
    assert_eq!(v.task_id.as_deref(), Some("b"));
    assert_eq!(v.msg_id.as_deref(), Some("arr-3"));
    eventually(Duration::from_secs(10), "a to succeed", || async {
        (task_state(&sys, &flow, "a").await == Some(TaskState::Succeeded)).then_some(())
    })
    .await;
    let b = task_state(&sys, &flow, "b").await;
    assert!(
        matches!(b, Some(TaskState::Assigned | TaskState::Running)),
        "{b:?}"
    );

    // An array of one is a report like any other.
    publish(
        &js,
        &w1,
        "arr-4",
        json!([report("b", json!({"type": "completed", "output": 2}))]),
    )
    .await;
    let status = eventually(Duration::from_secs(10), "the flow to succeed", || async {
        let s = sys.client.flow_status(&flow).await.ok()?;
        (s.state == FlowState::Succeeded).then_some(s)
    })
    .await;
    let output = |t: &str| {
        status
            .tasks
            .iter()
            .find(|s| s.task_id.as_str() == t)
            .map(|s| s.output.clone())
    };
    assert_eq!(output("a"), Some(json!({"n": 1})));
    assert_eq!(output("b"), Some(json!(2)));
}
