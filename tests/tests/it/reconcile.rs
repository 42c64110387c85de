//! Reconciliation against real processes: what a crash leaves booked is
//! taken back by the system itself, and nothing still held is.

use std::sync::Arc;
use std::time::Duration;

use common::msg::{AllocateRequest, EventKind, FlowSpec, FlowState, ReleaseRequest, TaskState};
use common::{subject, AgentId, AllocationId, FlowId};
use futures::StreamExt;
use serde_json::json;
use testkit::{eventually, wait_for_service, NatsServer, Process, Replica};
use tokio::sync::Notify;

use crate::orchestrator::{cpu_task, spawn_agent};

/// The reconciliation's grace in this test: short, so the test is too.
const GRACE_MS: u64 = 2_000;

/// The reproduction: flow `t0 → t1` on one agent of capacity 2. The allocator
/// is frozen (`SIGSTOP`) when t0 completes, so the orchestrator's release of
/// t0 and its allocate for t1 both wait in it; the orchestrator is killed;
/// the allocator thawed books t1 for a caller that is gone; a new
/// orchestrator places t1 again (another allocation) and the flow succeeds.
/// The first t1 allocation must be taken back by reconciliation, and the
/// agent's capacity be whole again, with no person involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_booked_for_a_killed_orchestrator_is_taken_back() {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let client = common::Client::new(nats.clone());
    let grace = GRACE_MS.to_string();
    let allocator = Process::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_coord-proc")),
        [
            "--nats-url",
            server.url(),
            "allocator",
            "--sweep-ms",
            "200",
            "--reconcile-grace-ms",
            &grace,
        ],
    );
    // t1 is to be booked, not handed t0's allocation (see `spare`).
    let first = Replica::start_orchestrator(server.config(), |c| c.keep_allocation_ms = 0);
    wait_for_service(&nats, "allocator").await;
    wait_for_service(&nats, "orchestrator").await;

    // Copies of the orchestrator's allocator requests, to see them sent.
    let mut allocates = nats.subscribe(subject::ALLOCATE).await.unwrap();
    let mut releases = nats.subscribe(subject::RELEASE).await.unwrap();
    let mut preempted = nats
        .subscribe(subject::event::ALLOCATION_PREEMPTED)
        .await
        .unwrap();
    nats.flush().await.unwrap();

    let t0_done = Arc::new(Notify::new());
    let agent = {
        let t0_done = t0_done.clone();
        spawn_agent(&nats, "w", 2.0, move |a| {
            let t0_done = t0_done.clone();
            async move {
                if a.task_id.as_str() == "t0" {
                    t0_done.notified().await;
                }
                Ok(json!({"task": a.task_id}))
            }
        })
    };
    let w = AgentId::new("w").unwrap();
    eventually(Duration::from_secs(20), "agent w registered", || async {
        let cap = client.capacity(&Default::default()).await.ok()?;
        cap.agents.contains_key(&w).then_some(())
    })
    .await;

    let flow_id = FlowId::new("leak").unwrap();
    let mut spec = FlowSpec::new("leak", vec![cpu_task("t0", &[]), cpu_task("t1", &["t0"])]);
    spec.id = Some(flow_id.clone());
    client.create_flow(&spec).await.unwrap();
    let running = eventually(Duration::from_secs(20), "t0 running", || async {
        let s = client.flow_status(&flow_id).await.ok()?;
        let t0 = s.tasks.iter().find(|t| t.task_id.as_str() == "t0")?;
        (t0.state == TaskState::Running)
            .then(|| t0.allocation_id.clone())
            .flatten()
    })
    .await;
    // The allocate for t0 went by: forget it.
    while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, allocates.next()).await {}

    // t0 runs past the grace: reconciliation asks about its allocation and
    // must leave it alone, since t0 holds it.
    tokio::time::sleep(Duration::from_millis(GRACE_MS * 2)).await;

    allocator.stop();
    t0_done.notify_one();
    let released: ReleaseRequest = next_json(&mut releases, "the release of t0").await;
    assert_eq!(released.allocation_id, running);
    let asked: AllocateRequest = next_json(&mut allocates, "the allocate for t1").await;
    assert_eq!(asked.owner, "leak/t1");
    let leaked = asked.allocation_id.clone().expect("a caller-chosen id");
    first.kill();
    allocator.resume();

    // Thawed, the allocator books t1 for the dead replica.
    eventually(
        Duration::from_secs(20),
        "the dead replica's booking",
        || async {
            let cap = client.capacity(&Default::default()).await.ok()?;
            (cap.agents.get(&w)?.get("cpu")?.allocated > 0.5).then_some(())
        },
    )
    .await;

    let _second = Replica::start("orchestrator", server.config());
    let done = eventually(Duration::from_secs(30), "the flow finished", || async {
        let s = client.flow_status(&flow_id).await.ok()?;
        s.state.is_terminal().then_some(s)
    })
    .await;
    assert_eq!(done.state, FlowState::Succeeded);
    let t1 = done
        .tasks
        .iter()
        .find(|t| t.task_id.as_str() == "t1")
        .unwrap();
    assert_ne!(
        t1.allocation_id.as_ref(),
        Some(&leaked),
        "t1 ran on a new allocation"
    );

    // Capacity is whole again, by itself.
    eventually(
        Duration::from_millis(GRACE_MS * 10),
        "agent w's capacity whole again",
        || async {
            let cap = client.capacity(&Default::default()).await.ok()?;
            let cpu = cap.agents.get(&w)?.get("cpu")?;
            (cpu.allocated == 0.0).then_some(())
        },
    )
    .await;
    let event: common::msg::Event = next_json(&mut preempted, "the reclaim event").await;
    let event = event.kind;
    match event {
        EventKind::AllocationPreempted {
            allocation_id,
            reason,
            owner,
            ..
        } => {
            assert_eq!(allocation_id, leaked, "only the leaked allocation is taken");
            assert_eq!(reason, "reclaimed");
            assert_eq!(owner, "leak/t1");
        }
        other => panic!("unexpected event {other:?}"),
    }
    let t0 = done
        .tasks
        .iter()
        .find(|t| t.task_id.as_str() == "t0")
        .unwrap();
    assert_eq!(t0.attempt, 1, "t0 was never taken away while it ran");
    let _ = agent.0.send(());
    drop(allocator);
}

/// A leased allocation not renewed is taken back; renewed, it stays.
#[tokio::test]
async fn an_unrenewed_lease_ends_and_a_renewed_one_stays() {
    let sys = testkit::System::start().await;
    sys.client
        .register_agent(&common::msg::RegisterAgent {
            agent_id: AgentId::new("l").unwrap(),
            capabilities: vec![],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 2.0)].into(),
            heartbeat_interval_ms: 60_000,
        })
        .await
        .unwrap();
    let lease = |id: &str| AllocateRequest {
        owner: "batch-job".into(),
        requirements: common::msg::Requirements {
            resources: [("cpu".to_string(), 1.0)].into(),
            ..Default::default()
        },
        priority: 0,
        allocation_id: Some(AllocationId::new(id).unwrap()),
        deadline_ms: None,
        task: None,
        ttl_ms: Some(1_500),
    };
    let kept = sys.client.allocate(&lease("kept")).await.unwrap();
    let dropped = sys.client.allocate(&lease("dropped")).await.unwrap();
    assert!(kept.expires_at_ms.is_some());
    let mut events = sys
        .nats
        .subscribe(subject::event::ALLOCATION_PREEMPTED)
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    // Renew one until the other is gone.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let gone = loop {
        assert!(
            std::time::Instant::now() < until,
            "the unrenewed lease never ended"
        );
        sys.client
            .renew(&common::msg::RenewRequest {
                allocation_id: kept.allocation_id.clone(),
                ttl_ms: None,
            })
            .await
            .unwrap();
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), events.next()).await {
            let e: common::msg::Event = serde_json::from_slice(&m.payload).unwrap();
            break e.kind;
        }
    };
    match gone {
        EventKind::AllocationPreempted {
            allocation_id,
            reason,
            ..
        } => {
            assert_eq!(allocation_id, dropped.allocation_id);
            assert_eq!(reason, "expired");
        }
        other => panic!("unexpected event {other:?}"),
    }
    let cap = sys.client.capacity(&Default::default()).await.unwrap();
    assert_eq!(
        cap.agents[&AgentId::new("l").unwrap()]["cpu"].allocated,
        1.0
    );
    let renewed = sys
        .client
        .renew(&common::msg::RenewRequest {
            allocation_id: kept.allocation_id.clone(),
            ttl_ms: None,
        })
        .await
        .unwrap();
    assert!(renewed.expires_at_ms > kept.expires_at_ms);
    // Renewing what is gone, or what has no lease, is a typed error.
    let e = sys
        .client
        .renew(&common::msg::RenewRequest {
            allocation_id: dropped.allocation_id,
            ttl_ms: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code, common::ErrorCode::NotFound);
}

async fn next_json<T: serde::de::DeserializeOwned>(
    sub: &mut async_nats::Subscriber,
    what: &str,
) -> T {
    let m = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .unwrap_or_else(|_| panic!("{what} not seen"))
        .unwrap();
    serde_json::from_slice(&m.payload).unwrap_or_else(|e| panic!("{what}: {e}"))
}
