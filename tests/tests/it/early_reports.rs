//! Completions taken as they are published, before the reports stream has
//! stored them: applied once, acknowledged once stored, refused never.

use std::time::Duration;

use async_nats::jetstream;
use common::msg::{FlowSpec, FlowState};
use common::{subject, AgentId, FlowId};
use futures::StreamExt;
use serde_json::json;
use testkit::{eventually, System};

use crate::orchestrator::{bare_agent, cpu_task, next_assignment};

/// Registers `w1` (no runtime: the test is the agent), creates a one-task
/// flow and returns the attempt it was assigned.
async fn assigned(sys: &System, flow: &FlowId) -> u32 {
    let mut assignments = bare_agent(sys, 2.0).await;
    let mut spec = FlowSpec::new(flow.as_str(), vec![cpu_task("a", &[])]);
    spec.id = Some(flow.clone());
    sys.client.create_flow(&spec).await.unwrap();
    next_assignment(&mut assignments).await.attempt
}

async fn stored_reports(js: &jetstream::Context) -> u64 {
    let mut stream = js.get_stream(common::nats::STREAM_REPORTS).await.unwrap();
    stream.info().await.unwrap().state.last_sequence
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_is_applied_as_it_is_published_even_before_it_is_stored() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    let flow = FlowId::new("early").unwrap();
    let attempt = assigned(&sys, &flow).await;
    let before = stored_reports(&js).await;

    // The stream refuses this publish (it expects another stream), so only
    // the early path can see it.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Stream", "NOT_THE_REPORTS_STREAM");
    let report = json!({"flow_id": flow, "task_id": "a", "attempt": attempt,
        "agent_id": "w1", "type": "completed", "output": 7});
    sys.nats
        .publish_with_headers(
            subject::report(&AgentId::new("w1").unwrap()),
            headers,
            report.to_string().into(),
        )
        .await
        .unwrap();
    let status = eventually(Duration::from_secs(10), "the flow to succeed", || async {
        let s = sys.client.flow_status(&flow).await.ok()?;
        (s.state == FlowState::Succeeded).then_some(s)
    })
    .await;
    assert_eq!(status.tasks[0].output, json!(7));
    assert_eq!(
        stored_reports(&js).await,
        before,
        "the report was not stored: it was applied from its publish"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_applied_early_is_acknowledged_when_stored_and_refused_never() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    let w1 = AgentId::new("w1").unwrap();
    let mut verdicts = sys.nats.subscribe(subject::rejected(&w1)).await.unwrap();
    let mut refusals = sys
        .nats
        .subscribe(subject::event::REPORT_REJECTED)
        .await
        .unwrap();
    let flow = FlowId::new("early-stored").unwrap();
    let attempt = assigned(&sys, &flow).await;

    let report = json!({"flow_id": flow, "task_id": "a", "attempt": attempt,
        "agent_id": "w1", "type": "completed", "output": 8});
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Nats-Msg-Id",
        format!("early-stored.a.{attempt}.completed").as_str(),
    );
    js.publish_with_headers(subject::report(&w1), headers, report.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "the flow to succeed", || async {
        let s = sys.client.flow_status(&flow).await.ok()?;
        (s.state == FlowState::Succeeded).then_some(())
    })
    .await;
    // The stored copy is acknowledged: nothing left pending on the shared
    // consumer (a work queue: acknowledged reports leave the stream).
    eventually(
        Duration::from_secs(10),
        "the stored copy acknowledged",
        || async {
            let mut stream = js.get_stream(common::nats::STREAM_REPORTS).await.ok()?;
            let info = stream.info().await.ok()?;
            (info.state.messages == 0).then_some(())
        },
    )
    .await;
    let mut consumer: jetstream::consumer::PullConsumer = js
        .get_stream(common::nats::STREAM_REPORTS)
        .await
        .unwrap()
        .get_consumer(common::nats::CONSUMER_ORCHESTRATOR)
        .await
        .unwrap();
    let info = consumer.info().await.unwrap();
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "{info:?}");
    // And neither copy was refused.
    let quiet = Duration::from_millis(500);
    assert!(
        tokio::time::timeout(quiet, verdicts.next()).await.is_err(),
        "the agent was told its report was refused"
    );
    assert!(
        tokio::time::timeout(quiet, refusals.next()).await.is_err(),
        "a report_rejected event was published"
    );
}
