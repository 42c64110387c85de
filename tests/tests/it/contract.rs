//! The agent contract as an agent meets it: every assignment carries its lease,
//! refused reports come back as typed verdicts on the agent's own subject,
//! progress shows with the task, a runtime agent that shuts down leaves
//! (`left`, never `lost`) and hands back what it could not finish, lost and
//! left agents are retired, and sync points complete with runtime agents.

use std::time::{Duration, Instant};

use common::msg::{
    AgentStatus, Assignment, CancelCode, CancelNotice, CapacityRequest, FlowSpec, FlowState,
    RejectReason, ReportRejected, RetryPolicy, StatePut, SyncPointInitiate, SyncPointState,
    SyncPointWait, TaskState,
};
use common::{subject, AgentId, ErrorCode, ScopeId};
use coordkit::agent;
use futures::StreamExt;
use serde_json::json;
use testkit::{eventually, ServiceHandle, System};
use tokio::sync::{mpsc, oneshot};

use crate::orchestrator::{cpu_task, spawn_agent, tid};

fn aid(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

/// The flow's status once it has succeeded, waiting up to `secs`.
async fn succeeded(sys: &System, flow: &common::FlowId, secs: u64) -> common::msg::FlowStatus {
    eventually(Duration::from_secs(secs), "the flow to succeed", || async {
        let s = sys.client.flow_status(flow).await.ok()?;
        (s.state == FlowState::Succeeded).then_some(s)
    })
    .await
}

pub(crate) async fn status_of(sys: &System, agent: &AgentId) -> Option<AgentStatus> {
    let cap = sys
        .client
        .capacity(&CapacityRequest::default())
        .await
        .ok()?;
    cap.agent_status.get(agent).copied()
}

/// What a held handler returns.
type Outcome = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<serde_json::Value, agent::TaskFailure>> + Send>,
>;

/// Each assignment a held handler got, with the sender that lets it finish.
type Held = mpsc::UnboundedReceiver<(Assignment, oneshot::Sender<()>)>;

/// A handler that sends each assignment out and then waits until told to finish.
fn held() -> (
    Held,
    impl Fn(Assignment) -> Outcome + Clone + Send + Sync + 'static,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handler = move |a: Assignment| -> Outcome {
        let tx = tx.clone();
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            let _ = tx.send((a, done));
            let _ = wait.await;
            Ok(json!("done"))
        })
    };
    (rx, handler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_carry_their_lease_and_progress_shows_with_the_task() {
    let sys = System::start().await;
    let (mut got, handler) = held();
    let (stop, run) = spawn_agent(&sys.nats, "w1", 1.0, handler);
    let mut t = cpu_task("a", &[]);
    t.timeouts.start_to_close_ms = Some(60_000);
    t.timeouts.heartbeat_ms = Some(20_000);
    let flow = sys
        .client
        .create_flow(&FlowSpec::new("lease", vec![t]))
        .await
        .unwrap();
    let (a, done) = tokio::time::timeout(Duration::from_secs(20), got.recv())
        .await
        .unwrap()
        .unwrap();
    let lease = &a.lease;
    assert_eq!(lease.start_to_close_ms, Some(60_000));
    assert_eq!(lease.heartbeat_ms, Some(20_000));
    assert_eq!(lease.schedule_to_start_ms, 60_000, "the default");
    assert_eq!(lease.start_by_ms, a.assigned_at_ms + 60_000);
    assert_eq!(lease.deadline_ms, Some(lease.start_by_ms + 60_000));
    assert!(lease.tick_ms > 0);

    // Progress from inside the handler's attempt, as the runtime sends it.
    let (js, me) = (async_nats::jetstream::new(sys.nats.clone()), a.clone());
    agent::report(
        &js,
        &me,
        common::msg::ReportKind::Progress {
            progress: Some(0.4),
            message: Some("indexing".into()),
        },
    )
    .await
    .unwrap();
    let shown = eventually(
        Duration::from_secs(10),
        "progress in the status",
        || async {
            let s = sys.client.flow_status(&flow.flow_id).await.ok()?;
            let t = s.tasks.into_iter().find(|t| t.task_id == tid("a"))?;
            (t.progress == Some(0.4)).then_some(t)
        },
    )
    .await;
    assert_eq!(shown.progress_message.as_deref(), Some("indexing"));
    let _ = done.send(());
    succeeded(&sys, &flow.flow_id, 10).await;
    let _ = stop.send(());
    run.await.unwrap().unwrap();
}

/// The next verdict on a subscription to an agent's `rejected` subject.
async fn next(verdicts: &mut async_nats::Subscriber) -> ReportRejected {
    let msg = tokio::time::timeout(Duration::from_secs(10), verdicts.next())
        .await
        .expect("a verdict")
        .unwrap();
    serde_json::from_slice::<ReportRejected>(&msg.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_reports_come_back_as_typed_verdicts_on_the_agents_subject() {
    let sys = System::start().await;
    let (mut got, handler) = held();
    let (stop, run) = spawn_agent(&sys.nats, "w1", 1.0, handler);
    let mut verdicts = sys
        .nats
        .subscribe(subject::rejected(&aid("w1")))
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let flow = sys
        .client
        .create_flow(&FlowSpec::new("verdicts", vec![cpu_task("a", &[])]))
        .await
        .unwrap();
    let (a, done) = tokio::time::timeout(Duration::from_secs(20), got.recv())
        .await
        .unwrap()
        .unwrap();
    let js = async_nats::jetstream::new(sys.nats.clone());
    let publish = |body: serde_json::Value| {
        let js = js.clone();
        async move {
            js.publish(subject::report(&aid("w1")), body.to_string().into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    let ids = json!({"flow_id": flow.flow_id, "task_id": "a", "agent_id": "w1"});
    let with = |extra: serde_json::Value| {
        let mut body = ids.clone();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };

    publish(json!("not a report")).await;
    let v = next(&mut verdicts).await;
    assert_eq!(
        (v.code, v.reason),
        (ErrorCode::BadRequest, RejectReason::Malformed)
    );

    publish(with(json!({"attempt": "one", "type": "started"}))).await;
    let v = next(&mut verdicts).await;
    assert_eq!(v.reason, RejectReason::Malformed);
    assert_eq!(
        v.flow_id.as_deref(),
        Some(flow.flow_id.as_str()),
        "ids echoed"
    );

    publish(with(
        json!({"attempt": a.attempt, "type": "progress", "progress": 7.5}),
    ))
    .await;
    let v = next(&mut verdicts).await;
    assert_eq!(
        (v.code, v.reason),
        (ErrorCode::BadRequest, RejectReason::ProgressOutOfRange)
    );
    assert_eq!(v.attempt, Some(a.attempt));

    publish(with(json!({"attempt": a.attempt + 1, "type": "completed"}))).await;
    let v = next(&mut verdicts).await;
    assert_eq!(
        (v.code, v.reason),
        (ErrorCode::Fenced, RejectReason::StaleAttempt)
    );

    publish(with(
        json!({"attempt": a.attempt, "type": "started", "agent_id": "w2"}),
    ))
    .await;
    let v = next(&mut verdicts).await;
    assert_eq!(v.reason, RejectReason::AgentMismatch);

    publish(json!({"flow_id": "nope", "task_id": "a", "agent_id": "w1", "attempt": 1, "type": "started"}))
        .await;
    let v = next(&mut verdicts).await;
    assert_eq!(
        (v.code, v.reason),
        (ErrorCode::NotFound, RejectReason::UnknownFlow)
    );

    // None of it changed the attempt: it still finishes.
    let _ = done.send(());
    succeeded(&sys, &flow.flow_id, 10).await;
    let _ = stop.send(());
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_agent_that_shuts_down_leaves_and_is_never_lost() {
    let sys = System::start().await;
    let mut lost = sys
        .nats
        .subscribe(subject::event::AGENT_LOST)
        .await
        .unwrap();
    let mut left_events = sys
        .nats
        .subscribe(subject::event::AGENT_LEFT)
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let (stop, run) = spawn_agent(&sys.nats, "w1", 1.0, |_a| async { Ok(json!(1)) });
    let flow = sys
        .client
        .create_flow(&FlowSpec::new("then leave", vec![cpu_task("a", &[])]))
        .await
        .unwrap();
    succeeded(&sys, &flow.flow_id, 20).await;

    let asked = Instant::now();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("the agent stops within 5 s")
        .unwrap()
        .unwrap();
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert_eq!(status_of(&sys, &aid("w1")).await, Some(AgentStatus::Left));
    tokio::time::timeout(Duration::from_secs(5), left_events.next())
        .await
        .expect("an agent.left event")
        .unwrap();
    // Three heartbeat intervals (1.5 s) and more pass: still left, never lost.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(status_of(&sys, &aid("w1")).await, Some(AgentStatus::Left));
    assert!(
        tokio::time::timeout(Duration::from_millis(100), lost.next())
            .await
            .is_err(),
        "no agent.lost event"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_still_running_when_its_agent_leaves_is_handed_back_and_the_agent_told() {
    let sys = System::start().await;
    let (mut got, handler) = held();
    let (stop, run) = spawn_agent(&sys.nats, "w1", 1.0, handler);
    let mut cancels = sys
        .nats
        .subscribe(subject::cancel(&aid("w1")))
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    // One attempt allowed: handing back is not a failure.
    let mut t = cpu_task("a", &[]);
    t.retry = RetryPolicy {
        max_attempts: 1,
        ..Default::default()
    };
    let flow = sys
        .client
        .create_flow(&FlowSpec::new("hand back", vec![t]))
        .await
        .unwrap();
    let (first, _never) = tokio::time::timeout(Duration::from_secs(20), got.recv())
        .await
        .unwrap()
        .unwrap();
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .expect("the agent stops within 5 s")
        .unwrap()
        .unwrap();
    let notice = tokio::time::timeout(Duration::from_secs(10), cancels.next())
        .await
        .expect("a cancel notice")
        .unwrap();
    let notice: CancelNotice = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(
        (notice.code, notice.attempt),
        (CancelCode::AgentLeft, first.attempt)
    );
    // Another agent runs attempt 2.
    let (stop2, run2) = spawn_agent(&sys.nats, "w2", 1.0, |_a| async { Ok(json!(2)) });
    let done = succeeded(&sys, &flow.flow_id, 20).await;
    let a = done.tasks.iter().find(|t| t.task_id == tid("a")).unwrap();
    assert_eq!((a.state, a.attempt), (TaskState::Succeeded, 2));
    assert_eq!(a.agent_id, Some(aid("w2")));
    let _ = stop2.send(());
    run2.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_and_left_agents_are_retired_after_the_retention_period() {
    let sys = System::start().await;
    // A replica that retires after 1 s (the default replica keeps them an hour).
    let cfg = sys.server.config();
    let handle = ServiceHandle::spawn("allocator", move |rx| {
        let mut c = allocator::Config::new(cfg);
        c.agent_retention_ms = 1_000;
        allocator::run(c, async move {
            let _ = rx.await;
        })
    });
    let mut retired = sys
        .nats
        .subscribe(subject::event::AGENT_RETIRED)
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let (stop, run) = spawn_agent(&sys.nats, "w1", 1.0, |_a| async { Ok(json!(1)) });
    eventually(Duration::from_secs(10), "w1 active", || async {
        (status_of(&sys, &aid("w1")).await == Some(AgentStatus::Active)).then_some(())
    })
    .await;
    let _ = stop.send(());
    run.await.unwrap().unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), retired.next())
        .await
        .expect("an agent.retired event")
        .unwrap();
    let event: common::msg::Event = serde_json::from_slice(&event.payload).unwrap();
    assert!(matches!(
        event.kind,
        common::msg::EventKind::AgentRetired { ref agent_id, status: AgentStatus::Left } if agent_id == &aid("w1")
    ));
    eventually(
        Duration::from_secs(10),
        "w1 gone from the listing",
        || async { status_of(&sys, &aid("w1")).await.is_none().then_some(()) },
    )
    .await;
    handle.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_points_and_synchronize_complete_with_runtime_agents() {
    let sys = System::start().await;
    let mut agents = Vec::new();
    for id in ["w1", "w2"] {
        agents.push(spawn_agent(&sys.nats, id, 1.0, |_a| async { Ok(json!(1)) }));
        sys.client
            .state_put(&StatePut {
                agent_id: aid(id),
                expected_revision: 0,
                doc: json!({"step": 1}),
                scope: ScopeId::default(),
                clock: None,
            })
            .await
            .unwrap();
    }
    eventually(Duration::from_secs(10), "both agents active", || async {
        let a = status_of(&sys, &aid("w1")).await;
        let b = status_of(&sys, &aid("w2")).await;
        (a == Some(AgentStatus::Active) && b == Some(AgentStatus::Active)).then_some(())
    })
    .await;
    let point = sys
        .client
        .syncpoint_initiate(&SyncPointInitiate {
            scope: ScopeId::default(),
            agents: vec![aid("w1"), aid("w2")],
            label: "runtime".into(),
        })
        .await
        .unwrap();
    let done = sys
        .client
        .syncpoint_complete(&SyncPointWait {
            sync_point_id: point.id,
            timeout_ms: 5_000,
        })
        .await
        .unwrap();
    assert_eq!(done.state, SyncPointState::Completed, "{done:?}");
    // A synchronize round: the agents disagree at /step, the latest writer
    // wins, both are told and both acknowledge.
    sys.client
        .scope_set(&common::msg::ScopeConfig {
            scope: ScopeId::default(),
            policy: common::msg::ConflictPolicy::Lww,
            merge_fallback: Default::default(),
            schema: None,
            enforce_schema: false,
            invariants: vec![],
            shared: vec![],
        })
        .await
        .unwrap();
    let w2 = sys
        .client
        .state_get_at(&common::msg::StateGet {
            agent_id: aid("w2"),
            scope: ScopeId::default(),
            revision: None,
        })
        .await
        .unwrap();
    sys.client
        .state_put(&StatePut {
            agent_id: aid("w2"),
            expected_revision: w2.revision,
            doc: json!({"step": 2}),
            scope: ScopeId::default(),
            clock: None,
        })
        .await
        .unwrap();
    let round = sys
        .client
        .synchronize(&common::msg::SynchronizeRequest {
            scope: ScopeId::default(),
            agents: vec![aid("w1"), aid("w2")],
            shared: vec!["/step".into()],
            timeout_ms: 5_000,
        })
        .await
        .unwrap();
    assert!(round.complete, "{round:?}");
    assert!(
        !round.divergences.is_empty(),
        "there was something to agree on"
    );
    for (stop, run) in agents {
        let _ = stop.send(());
        run.await.unwrap().unwrap();
    }
}

/// Idle for `COORD_IDLE_S` seconds (20 by default; the documented run uses
/// 600), then a flow: the runtime rides out long stretches with no work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_agent_stays_up_through_a_long_idle_stretch() {
    let idle = std::env::var("COORD_IDLE_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let sys = System::start().await;
    let (stop, run) = spawn_agent(&sys.nats, "idler", 1.0, |_a| async { Ok(json!(1)) });
    eventually(Duration::from_secs(10), "idler active", || async {
        (status_of(&sys, &aid("idler")).await == Some(AgentStatus::Active)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(idle)).await;
    assert!(!run.is_finished(), "the agent stopped while idle");
    assert_eq!(
        status_of(&sys, &aid("idler")).await,
        Some(AgentStatus::Active)
    );
    let flow = sys
        .client
        .create_flow(&FlowSpec::new("after idle", vec![cpu_task("a", &[])]))
        .await
        .unwrap();
    succeeded(&sys, &flow.flow_id, 20).await;
    let _ = stop.send(());
    run.await.unwrap().unwrap();
}
