//! A new flow's first assignments sent ahead of its creation's write: the
//! agent works while the flow is stored, and a creation that is not stored
//! takes its attempt back and gives its allocation back.

use std::time::Duration;

use async_nats::jetstream;
use common::msg::{
    Assignment, CancelNotice, FlowSpec, FlowState, RejectReason, ReportRejected, TaskState,
};
use common::{subject, AgentId, ErrorCode};
use futures::StreamExt;
use serde_json::json;
use testkit::{eventually, System};

use crate::orchestrator::{bare_agent, cpu_task, next_assignment};

/// `w1`'s completion of `a`, stored in the reports stream.
async fn complete(js: &jetstream::Context, a: &Assignment) {
    let report = json!({"flow_id": a.flow_id, "task_id": a.task_id, "attempt": a.attempt,
        "agent_id": "w1", "type": "completed", "output": 3});
    js.publish(subject::report(&a.agent_id), report.to_string().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// A one-task flow whose id the orchestrator chooses.
fn unnamed() -> FlowSpec {
    FlowSpec::new("ahead", vec![cpu_task("a", &[])])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_flows_first_task_is_assigned_and_done_before_its_creation_is_stored() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    let flows = js.get_key_value(common::nats::KV_FLOWS).await.unwrap();
    let mut assignments = bare_agent(&sys, 1.0).await;
    orchestrator::failpoints::hold_create_writes();
    let creating = tokio::spawn({
        let client = sys.client.clone();
        async move { client.create_flow(&unnamed()).await }
    });
    // The write is held: the assignment left before it.
    let a = next_assignment(&mut assignments).await;
    assert!(
        flows.get(a.flow_id.as_str()).await.unwrap().is_none(),
        "the flow is not stored yet"
    );
    // And the agent's completion came before it too.
    complete(&js, &a).await;
    assert!(!creating.is_finished(), "no reply before the write");
    orchestrator::failpoints::release_create_writes();
    let created = creating.await.unwrap().expect("the flow created");
    assert_eq!(created.flow_id, a.flow_id);
    let status = eventually(Duration::from_secs(20), "the flow to succeed", || async {
        let s = sys.client.flow_status(&a.flow_id).await.ok()?;
        (s.state == FlowState::Succeeded).then_some(s)
    })
    .await;
    assert_eq!(status.tasks[0].output, json!(3));
    assert_eq!(status.tasks[0].attempt, 1, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_not_stored_takes_back_the_attempt_it_sent_ahead() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    let w1 = AgentId::new("w1").unwrap();
    let mut cancels = sys.nats.subscribe(subject::cancel(&w1)).await.unwrap();
    let mut verdicts = sys.nats.subscribe(subject::rejected(&w1)).await.unwrap();
    let mut assignments = bare_agent(&sys, 1.0).await;
    orchestrator::failpoints::fail_next_create_write();
    let err = sys
        .client
        .create_flow(&unnamed())
        .await
        .expect_err("the creation's write failed");
    assert_eq!(err.code, ErrorCode::Unavailable, "{err}");
    // The assignment had left; it is taken back.
    let a = next_assignment(&mut assignments).await;
    let msg = tokio::time::timeout(Duration::from_secs(30), cancels.next())
        .await
        .expect("a cancel notice")
        .unwrap();
    let notice: CancelNotice = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(
        (&notice.flow_id, &notice.task_id, notice.attempt),
        (&a.flow_id, &a.task_id, a.attempt)
    );
    // Its allocation is given back: the agent is free again.
    eventually(
        Duration::from_secs(20),
        "the allocation given back",
        || async {
            let cap = sys.client.capacity(&Default::default()).await.ok()?;
            let cpu = cap.agents.get(&w1)?.get("cpu")?.allocated;
            (cpu == 0.0).then_some(())
        },
    )
    .await;
    // A completion sent anyway belongs to no flow: refused, once it is
    // clear no creation is still being written.
    complete(&js, &a).await;
    let msg = tokio::time::timeout(Duration::from_secs(20), verdicts.next())
        .await
        .expect("a verdict")
        .unwrap();
    let v: ReportRejected = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(
        (v.code, v.reason),
        (ErrorCode::NotFound, RejectReason::UnknownFlow)
    );
    // The next flow runs as usual.
    let next = sys.client.create_flow(&unnamed()).await.unwrap();
    let b = next_assignment(&mut assignments).await;
    assert_eq!(b.flow_id, next.flow_id);
    complete(&js, &b).await;
    eventually(
        Duration::from_secs(20),
        "the next flow to succeed",
        || async {
            let s = sys.client.flow_status(&next.flow_id).await.ok()?;
            (s.state == FlowState::Succeeded).then_some(())
        },
    )
    .await;
}

/// Every write of the flows bucket, as published to it.
async fn flow_writes(sys: &System) -> async_nats::Subscriber {
    let writes = sys
        .nats
        .subscribe(format!("$KV.{}.>", common::nats::KV_FLOWS))
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    writes
}

/// The next write of the flows bucket: the flow's state, its task's and
/// the task's attempt.
async fn next_write(writes: &mut async_nats::Subscriber) -> (FlowState, TaskState, u32) {
    let write = tokio::time::timeout(Duration::from_secs(30), writes.next())
        .await
        .expect("a write within 30 s")
        .unwrap();
    let flow: orchestrator::machine::Flow = serde_json::from_slice(&write.payload).unwrap();
    let only = flow.tasks.values().next().expect("its task");
    (flow.state, only.state, only.attempt)
}

/// A one-task flow whose id the orchestrator chose is stored by one write
/// with its agent's completion: the creation is not written before it. The
/// orchestrator holds the write for the report as long as the test needs
/// (`first_write_ms`), so the count does not depend on how soon it comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_flow_and_its_first_report_are_stored_by_one_write() {
    let sys = System::start_tuned(|c| c.first_write_ms = 120_000).await;
    let js = jetstream::new(sys.nats.clone());
    let mut assignments = bare_agent(&sys, 1.0).await;
    let mut writes = flow_writes(&sys).await;
    let creating = tokio::spawn({
        let client = sys.client.clone();
        async move { client.create_flow(&unnamed()).await }
    });
    let a = next_assignment(&mut assignments).await;
    assert!(!creating.is_finished(), "no reply before the write");
    complete(&js, &a).await;
    let created = creating.await.unwrap().expect("the flow created");
    assert_eq!(created.flow_id, a.flow_id);
    assert_eq!(
        (created.state, created.tasks[0].state),
        (FlowState::Succeeded, TaskState::Succeeded),
        "the reply has the flow as written: {created:?}"
    );
    assert_eq!(
        next_write(&mut writes).await,
        (FlowState::Succeeded, TaskState::Succeeded, 1),
        "the flow's first write holds its end"
    );
}

/// A creation whose agent does not report is written once the hold is
/// over, its assignment recorded, and the reply waits for that write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_flow_whose_agent_is_silent_is_stored_with_its_assignment() {
    let sys = System::start().await;
    let mut assignments = bare_agent(&sys, 1.0).await;
    let mut writes = flow_writes(&sys).await;
    let created = sys.client.create_flow(&unnamed()).await.unwrap();
    let a = next_assignment(&mut assignments).await;
    assert_eq!(created.flow_id, a.flow_id);
    assert_eq!(
        (created.tasks[0].state, created.tasks[0].attempt),
        (TaskState::Assigned, a.attempt),
        "the reply has the assignment as written: {created:?}"
    );
    assert_eq!(
        next_write(&mut writes).await,
        (FlowState::Running, TaskState::Assigned, 1),
        "created and assigned in one write"
    );
}

/// With another orchestrator replica heard, a creation is written at once,
/// as it is for a flow named by its client: an agent's early report goes to
/// one replica only, and the stored copy to either, so the creating one
/// might wait for a report that another holds. Both replicas would hold a
/// deferred creation for as long as the test runs (`first_write_ms`), and
/// the agent never reports: a creation deferred is a reply that does not
/// come within the client's timeout. The replicas hear each other within a
/// ping round or two of starting; until then a creation may be deferred.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_a_new_flow_is_written_at_its_creation() {
    let hold = |c: &mut orchestrator::Config| c.first_write_ms = 600_000;
    let sys = System::start_tuned(hold).await;
    let _second = testkit::start_orchestrator(sys.server.config(), hold);
    eventually(Duration::from_secs(60), "two orchestrators", || async {
        (testkit::replicas(&sys.nats, "orchestrator").await == 2).then_some(())
    })
    .await;
    let _assignments = bare_agent(&sys, 1_000.0).await;
    let client = sys.client.clone().with_timeout(Duration::from_secs(3));
    eventually(
        Duration::from_secs(60),
        "a creation written at once",
        || async {
            let created = client.create_flow(&unnamed()).await.ok()?;
            (created.tasks[0].state == TaskState::Ready).then_some(())
        },
    )
    .await;
}
