//! How the monitor sees traffic: it subscribes to no request subject, so with
//! the monitor running a request to a service that is down still fails at
//! once with `unavailable` (NATS "no responders") instead of waiting out its
//! timeout; and it still counts every subject family, requests included (from
//! the services' `$SRV.STATS`), after a real flow, a cancel, state writes and
//! a sync point.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::msg::{
    FlowSpec, FlowState, StateGet, StatePut, SyncPointInitiate, SyncPointState, SyncPointWait,
    TaskState,
};
use common::{subject, AgentId, Client, ErrorCode};
use coordkit::agent::SyncFollower;
use serde_json::{json, Value};
use testkit::{eventually, start_service, wait_for_service, NatsServer, System};
use tokio::sync::Semaphore;

use crate::orchestrator::{cpu_task, spawn_agent, wait_finished, wait_registered};

/// A failure at once; a request meeting interest but no service would take
/// the client's whole timeout (5 s).
const AT_ONCE: Duration = Duration::from_millis(100);

#[tokio::test]
async fn a_request_to_a_stopped_service_fails_at_once_while_the_monitor_runs() {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    // The monitor and the orchestrator; no allocator, no synchronizer.
    let services = ["monitor", "orchestrator"].map(|n| start_service(n, server.config()));
    let nats = server.connect().await;
    for n in ["monitor", "orchestrator"] {
        wait_for_service(&nats, n).await;
    }
    // The default deadline: a request that is not refused at once waits 5 s.
    let client = Client::new(nats.clone());
    // The bodies are well formed; no service is there to read them.
    let agent = AgentId::new("ff-1").unwrap();
    let get = json!({"agent_id": "ff-1"});
    let requests = [
        ("synchronizer", subject::STATE_GET.to_owned(), get.clone()),
        ("synchronizer", subject::agent_state_get(&agent), get),
        (
            "synchronizer",
            subject::SYNCPOINT_LIST.to_owned(),
            json!({}),
        ),
        (
            "allocator",
            subject::agent_register(&agent),
            json!({"agent_id": "ff-1", "capacity": {"cpu": 1.0}}),
        ),
        (
            "allocator",
            subject::ALLOCATE.to_owned(),
            json!({"owner": "ff", "requirements": {"resources": {"cpu": 1.0}}}),
        ),
    ];
    for (service, on, body) in &requests {
        let started = Instant::now();
        let err = client.request::<_, Value>(on, body).await.unwrap_err();
        let took = started.elapsed();
        assert_eq!(err.code, ErrorCode::Unavailable, "{service} on {on}: {err}");
        assert!(took < AT_ONCE, "{service} on {on} failed after {took:?}");
    }

    // The monitor was up all along and still answers.
    client.metrics().await.unwrap();
    for s in services {
        s.stop().await.unwrap();
    }
}

#[tokio::test]
async fn the_monitor_counts_every_subject_family_after_a_flow_runs() {
    let sys = System::start().await;
    // Task `hold` runs until the test lets it go (or its flow is cancelled).
    let hold = Arc::new(Semaphore::new(0));
    let (stop, agent) = spawn_agent(&sys.nats, "fam-w1", 2.0, {
        let hold = hold.clone();
        move |a| {
            let hold = hold.clone();
            async move {
                if a.task_id.as_str() == "hold" {
                    let _ = hold.acquire().await;
                }
                Ok(json!({"ok": true}))
            }
        }
    });
    let me = AgentId::new("fam-w1").unwrap();
    let follower = SyncFollower::subscribe(sys.nats.clone(), me.clone())
        .await
        .unwrap();
    let (stop_follower, follower_stopped) = tokio::sync::oneshot::channel::<()>();
    let following = tokio::spawn(follower.run(|_| async { true }, async {
        let _ = follower_stopped.await;
    }));
    wait_registered(&sys.client, "fam-w1").await;

    // A flow that runs to the end…
    let done = sys
        .client
        .create_flow(&FlowSpec::new(
            "fam-f1",
            vec![cpu_task("a", &[]), cpu_task("b", &["a"])],
        ))
        .await
        .unwrap();
    let done = wait_finished(&sys.client, &done.flow_id, Duration::from_secs(30)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    // …and one cancelled while its task runs, so the agent is told to stop.
    let held = sys
        .client
        .create_flow(&FlowSpec::new("fam-f2", vec![cpu_task("hold", &[])]))
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "task hold running", || async {
        let s = sys.client.flow_status(&held.flow_id).await.ok()?;
        (s.tasks.first()?.state == TaskState::Running).then_some(())
    })
    .await;
    sys.client.cancel_flow(&held.flow_id).await.unwrap();
    hold.add_permits(1);

    // State on the agent's own subject and the shared one, and a sync point.
    sys.client
        .state_put(&StatePut {
            agent_id: me.clone(),
            expected_revision: 0,
            doc: json!({"step": 1}),
            scope: Default::default(),
            clock: None,
        })
        .await
        .unwrap();
    sys.client
        .request::<_, Value>(
            subject::STATE_GET,
            &StateGet {
                agent_id: me.clone(),
                scope: Default::default(),
                revision: None,
            },
        )
        .await
        .unwrap();
    let point = sys
        .client
        .syncpoint_initiate(&SyncPointInitiate {
            scope: Default::default(),
            agents: vec![me.clone()],
            label: "fam".into(),
        })
        .await
        .unwrap();
    let point = sys
        .client
        .syncpoint_complete(&SyncPointWait {
            sync_point_id: point.id,
            timeout_ms: 5_000,
        })
        .await
        .unwrap();
    assert_eq!(point.state, SyncPointState::Completed);

    // Counted under their families: the flow, scope and agent ids collapse.
    assert_eq!(
        subject::family(&subject::flow_watch(&done.flow_id)),
        subject::FLOW_WATCH_ALL
    );
    let watch_flow = subject::family(&subject::flow_watch(&done.flow_id));
    let watch_state = subject::family(&subject::state_watch(&Default::default(), &me));
    assert_eq!(watch_state, "coord.sync.watch.*.*");
    let families: Vec<&str> = vec![
        // Requests, counted by the services that took them.
        subject::FLOW_CREATE,
        subject::FLOW_STATUS,
        subject::FLOW_CANCEL,
        subject::ALLOCATE,
        subject::RELEASE,
        subject::AGENT_REGISTER_ALL,
        subject::AGENT_STATE_PUT_ALL,
        subject::STATE_GET,
        subject::SYNCPOINT_INITIATE,
        subject::SYNCPOINT_COMPLETE,
        subject::MONITOR_METRICS,
        // Everything else, seen on the monitor's subscriptions.
        subject::HEARTBEAT_ALL,
        subject::REPORT_ALL,
        "coord.agents.*.cancel",
        "coord.agents.*.sync",
        subject::SYNC_ACK_ALL,
        &watch_flow,
        &watch_state,
        subject::event::FLOW_CREATED,
        subject::event::TASK_SUCCEEDED,
        subject::event::TASK_CANCELLED,
        subject::event::AGENT_REGISTERED,
        subject::event::ALLOCATION_MADE,
        subject::event::STATE_UPDATED,
        subject::event::SYNCPOINT_INITIATED,
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    let m = loop {
        let m = sys.client.metrics().await.unwrap();
        let missing: Vec<&&str> = families
            .iter()
            .filter(|f| !m.messages_by_subject.contains_key(**f))
            .collect();
        if missing.is_empty() {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "never counted: {missing:?}; counted: {:?}",
            m.messages_by_subject.keys()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for f in &families {
        assert!(m.message_rates[*f].last_15m > 0.0, "{f}: {m:?}");
    }
    // Counted once each, whichever of the monitor's polls saw them: a health
    // query gathers the services' counts afresh before this read.
    sys.client.health().await.unwrap();
    let m = sys.client.metrics().await.unwrap();
    for (f, n) in [
        (subject::FLOW_CREATE, 2),
        (subject::FLOW_CANCEL, 1),
        (subject::STATE_GET, 1),
        (subject::SYNCPOINT_INITIATE, 1),
    ] {
        assert_eq!(
            m.messages_by_subject[f], n,
            "{f}: {:?}",
            m.messages_by_subject
        );
    }
    let counted: u64 = m.messages_by_subject.values().sum();
    assert_eq!(counted, m.messages_total);

    stop_follower.send(()).unwrap();
    following.await.unwrap();
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}
