//! Handing on over the wire: a succeeded task's allocation kept by its
//! replica and taken by the next task alike (nothing booked for it), kept
//! again for its own time, bound
//! to a holder still running, given back when nobody takes it or a task
//! of another kind finds no capacity, and taken
//! back by the reconciliation when the replica keeping it is killed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{
    AllocateRequest, FlowSpec, FlowState, QuotaRequest, RegisterAgent, Requirements, TaskRef,
};
use common::{subject, AgentId, AllocationId, Client, ErrorCode, FlowId, TaskId};
use futures::StreamExt;
use serde_json::Value;
use testkit::{eventually, wait_for_service, NatsServer, Process, Replica, System};

use crate::orchestrator::{cpu_task, spawn_agent, wait_finished, wait_registered, AgentHandle};

/// Long enough that nothing kept is given back while a test looks.
const KEEP_LONG_MS: u64 = 600_000;

/// A one-task flow `id` whose task needs the agent's whole capacity.
fn one_task(id: &str) -> FlowSpec {
    let mut spec = FlowSpec::new("hand-on", vec![cpu_task("only", &[])]);
    spec.id = Some(FlowId::new(id).unwrap());
    spec
}

/// The CPU allocated on agent `w`.
async fn allocated(client: &Client, w: &str) -> Option<f64> {
    let cap = client.capacity(&Default::default()).await.ok()?;
    Some(
        cap.agents
            .get(&AgentId::new(w).unwrap())?
            .get("cpu")?
            .allocated,
    )
}

/// The allocations in agent `w`'s stored record.
async fn record_allocations(nats: &async_nats::Client, w: &str) -> serde_json::Map<String, Value> {
    let js = jetstream::new(nats.clone());
    let agents = js.get_key_value(common::nats::KV_AGENTS).await.unwrap();
    let entry = agents.get(w).await.unwrap().expect("the agent's record");
    let rec: Value = serde_json::from_slice(&entry).unwrap();
    rec["allocations"].as_object().cloned().unwrap_or_default()
}

/// Agent `w` with 1 cpu, recording the allocation of every task it runs.
fn recording_agent(nats: &async_nats::Client) -> (AgentHandle, Arc<Mutex<Vec<AllocationId>>>) {
    let seen: Arc<Mutex<Vec<AllocationId>>> = Arc::default();
    let record = seen.clone();
    let agent = spawn_agent(nats, "w", 1.0, move |a| {
        record.lock().unwrap().push(a.allocation_id.clone());
        async { Ok(Value::Null) }
    });
    (agent, seen)
}

/// [`recording_agent`], registered, once the test's subscriptions are in.
async fn recording_agent_registered(sys: &System) -> (AgentHandle, Arc<Mutex<Vec<AllocationId>>>) {
    sys.nats.flush().await.unwrap();
    let recorded = recording_agent(&sys.nats);
    wait_registered(&sys.client, "w").await;
    recorded
}

/// Two one-task flows one after the other on an agent that fits one task:
/// the second runs on the allocation the first succeeded with, and nothing
/// is booked or released in between (one `allocation.made`, no
/// `allocation.released`).
#[tokio::test]
async fn a_task_runs_on_the_allocation_the_one_before_it_succeeded_with() {
    let sys = System::start_tuned(|c| c.keep_allocation_ms = KEEP_LONG_MS).await;
    let mut made = sys
        .nats
        .subscribe(subject::event::ALLOCATION_MADE)
        .await
        .unwrap();
    let mut released = sys
        .nats
        .subscribe(subject::event::ALLOCATION_RELEASED)
        .await
        .unwrap();
    let (agent, seen) = recording_agent_registered(&sys).await;

    for id in ["first", "second"] {
        sys.client.create_flow(&one_task(id)).await.unwrap();
        let done = wait_finished(
            &sys.client,
            &FlowId::new(id).unwrap(),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(done.state, FlowState::Succeeded, "{done:?}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[0], seen[1],
        "the second task ran on the first's allocation"
    );
    // Kept again after the second: still held.
    assert_eq!(allocated(&sys.client, "w").await, Some(1.0));
    let held = record_allocations(&sys.nats, "w").await;
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held.contains_key(seen[0].as_str()), "{held:?}");

    assert!(made.next().await.is_some(), "the first task's booking");
    let quiet = Duration::from_millis(300);
    assert!(
        tokio::time::timeout(quiet, made.next()).await.is_err(),
        "booked once"
    );
    assert!(
        tokio::time::timeout(quiet, released.next()).await.is_err(),
        "never released"
    );
    let _ = agent.0.send(());
}

/// A task sent on a kept allocation that the allocator then refuses to hand
/// on (here: other quotas cover the two flows) is placed again at once and
/// the refused attempt does not count: with one attempt allowed, it still
/// succeeds, on its second.
#[tokio::test]
async fn a_task_whose_allocation_is_not_handed_on_runs_again_uncounted() {
    let sys = System::start_tuned(|c| c.keep_allocation_ms = KEEP_LONG_MS).await;
    sys.nats.flush().await.unwrap();
    let seen: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let record = seen.clone();
    let _agent = spawn_agent(&sys.nats, "w", 1.0, move |a| {
        record
            .lock()
            .unwrap()
            .push((a.flow_id.to_string(), a.attempt));
        // Still running when the hand-on is asked for (20 ms on), and
        // cancelled then.
        let slow = a.flow_id.as_str() == "second" && a.attempt == 1;
        async move {
            if slow {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok(Value::Null)
        }
    });
    wait_registered(&sys.client, "w").await;
    let flow = |id: &str| {
        let mut spec = one_task(id);
        spec.owner = Some("team-a".into());
        spec.tasks[0].retry.max_attempts = 1;
        spec
    };
    sys.client.create_flow(&flow("first")).await.unwrap();
    let first = FlowId::new("first").unwrap();
    let done = wait_finished(&sys.client, &first, Duration::from_secs(30)).await;
    assert_eq!(done.state, FlowState::Succeeded, "{done:?}");
    // The kept allocation is owned `team-a/first/only`: a quota of its own
    // covers it and not the next flow's task.
    sys.client
        .set_quota(&QuotaRequest {
            owner: "team-a/first".into(),
            limits: [("cpu".to_string(), 10.0)].into(),
            preempt: false,
        })
        .await
        .unwrap();
    sys.client.create_flow(&flow("second")).await.unwrap();
    let second = FlowId::new("second").unwrap();
    let done = wait_finished(&sys.client, &second, Duration::from_secs(30)).await;
    assert_eq!(done.state, FlowState::Succeeded, "{done:?}");
    assert_eq!(done.tasks[0].attempt, 2, "{done:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            ("first".into(), 1),
            ("second".into(), 1),
            ("second".into(), 2)
        ],
        "the second ran first on the kept allocation"
    );
}

/// An allocation handed on and kept again is kept for its own time: the
/// timer of the keep before it, firing meanwhile, gives nothing back. The
/// margins are a second and a half on either side of that timer.
#[tokio::test]
async fn an_allocation_kept_again_outlives_the_timer_of_its_first_keep() {
    let sys = System::start_tuned(|c| c.keep_allocation_ms = 3_000).await;
    let mut released = sys
        .nats
        .subscribe(subject::event::ALLOCATION_RELEASED)
        .await
        .unwrap();
    let (agent, seen) = recording_agent_registered(&sys).await;
    let run = |id: &'static str| {
        let client = sys.client.clone();
        async move {
            client.create_flow(&one_task(id)).await.unwrap();
            let id = FlowId::new(id).unwrap();
            let done = wait_finished(&client, &id, Duration::from_secs(30)).await;
            assert_eq!(done.state, FlowState::Succeeded, "{done:?}");
        }
    };
    // Kept at t, until t + 3 s; taken and kept again at t + 1.5 s.
    run("first").await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    run("second").await;
    // Past the first keep's timer (t + 3 s), before the second's (t + 4.5 s).
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    assert!(
        tokio::time::timeout(Duration::ZERO, released.next())
            .await
            .is_err(),
        "given back by the first keep's timer"
    );
    run("third").await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter().all(|a| a == &seen[0]),
        "every task ran on the first's allocation: {seen:?}"
    );
    let _ = agent.0.send(());
}

/// A task still running on an allocation it was handed is bound to it at
/// the allocator (its owner and task, `bound_at_ms`), and the task before
/// no longer vouches for it. The agent's work waits for the test, so the
/// running state it asserts is held.
#[tokio::test]
async fn a_task_still_running_on_an_allocation_handed_on_is_bound_to_it() {
    let sys = System::start_tuned(|c| c.keep_allocation_ms = KEEP_LONG_MS).await;
    let gate = Arc::new(tokio::sync::Notify::new());
    let agent = {
        let gate = gate.clone();
        spawn_agent(&sys.nats, "w", 1.0, move |a| {
            let gate = gate.clone();
            async move {
                if a.flow_id.as_str() == "second" {
                    gate.notified().await;
                }
                Ok(Value::Null)
            }
        })
    };
    wait_registered(&sys.client, "w").await;
    sys.client.create_flow(&one_task("first")).await.unwrap();
    wait_finished(
        &sys.client,
        &FlowId::new("first").unwrap(),
        Duration::from_secs(30),
    )
    .await;
    sys.client.create_flow(&one_task("second")).await.unwrap();

    let bound = eventually(
        Duration::from_secs(30),
        "bound to the second task",
        || async {
            let held = record_allocations(&sys.nats, "w").await;
            let (_, a) = held.iter().next()?;
            (a["owner"] == "second/only").then(|| a.clone())
        },
    )
    .await;
    assert_eq!(bound["task"]["flow_id"], "second");
    assert!(bound["bound_at_ms"].as_u64().is_some(), "{bound}");
    gate.notify_waiters();
    let done = wait_finished(
        &sys.client,
        &FlowId::new("second").unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.state, FlowState::Succeeded, "{done:?}");
    let _ = agent.0.send(());
}

/// A task of another kind (other requirements) that finds no capacity
/// while an allocation is kept does not wait out the keeping: what is kept
/// for other kinds is given back at once, and the task runs on capacity
/// booked for it. Kept for ten minutes here, so only that can run it.
#[tokio::test]
async fn a_task_of_another_kind_is_not_held_back_by_an_allocation_kept() {
    let sys = System::start_tuned(|c| c.keep_allocation_ms = KEEP_LONG_MS).await;
    let (agent, seen) = recording_agent(&sys.nats);
    wait_registered(&sys.client, "w").await;
    sys.client.create_flow(&one_task("first")).await.unwrap();
    wait_finished(
        &sys.client,
        &FlowId::new("first").unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(allocated(&sys.client, "w").await, Some(1.0), "kept");

    let mut other = one_task("other");
    other.tasks[0].requirements.resources = [("cpu".to_string(), 0.5)].into();
    sys.client.create_flow(&other).await.unwrap();
    let done = wait_finished(
        &sys.client,
        &FlowId::new("other").unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(done.state, FlowState::Succeeded, "{done:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_ne!(seen[0], seen[1], "booked anew, not handed on");
    let _ = agent.0.send(());
}

/// An allocation nobody takes in its time is given back.
#[tokio::test]
async fn an_allocation_kept_that_nobody_takes_is_given_back() {
    let sys = System::start_tuned(|c| c.keep_allocation_ms = 200).await;
    let agent = spawn_agent(&sys.nats, "w", 1.0, |_| async { Ok(Value::Null) });
    wait_registered(&sys.client, "w").await;
    sys.client.create_flow(&one_task("alone")).await.unwrap();
    wait_finished(
        &sys.client,
        &FlowId::new("alone").unwrap(),
        Duration::from_secs(30),
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "the allocation given back",
        || async { (allocated(&sys.client, "w").await? == 0.0).then_some(()) },
    )
    .await;
    let _ = agent.0.send(());
}

/// The allocator binds an allocation to the task an `allocate` with its id
/// names, with that task's owner, and books nothing; it refuses when other
/// quotas cover the new owner than the old.
#[tokio::test]
async fn an_allocate_with_a_live_id_for_another_task_binds_it_there() {
    let sys = System::start().await;
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: AgentId::new("w").unwrap(),
            capabilities: vec![],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 1.0)].into(),
            heartbeat_interval_ms: 60_000,
        })
        .await
        .unwrap();
    // A task's allocation goes only to an agent that listens for work.
    let w = AgentId::new("w").unwrap();
    let _listening = sys.nats.subscribe(subject::assign(&w)).await.unwrap();
    sys.nats.flush().await.unwrap();
    let ask = |owner: &str, flow: &str, id: Option<&AllocationId>| AllocateRequest {
        owner: owner.into(),
        requirements: Requirements {
            resources: [("cpu".to_string(), 1.0)].into(),
            ..Default::default()
        },
        priority: 0,
        allocation_id: id.cloned(),
        deadline_ms: None,
        task: Some(TaskRef {
            flow_id: FlowId::new(flow).unwrap(),
            task_id: TaskId::new("t").unwrap(),
        }),
        ttl_ms: None,
    };
    let first = sys
        .client
        .allocate(&ask("team/f1/t", "f1", None))
        .await
        .unwrap();
    let id = first.allocation_id.clone();
    let bound = sys
        .client
        .allocate(&ask("team/f2/t", "f2", Some(&id)))
        .await
        .unwrap();
    assert_eq!(bound.allocation_id, id);
    assert_eq!(bound.owner, "team/f2/t");
    assert_eq!(bound.task.as_ref().map(|t| t.flow_id.as_str()), Some("f2"));
    assert!(bound.bound_at_ms.is_some());
    assert_eq!(
        allocated(&sys.client, "w").await,
        Some(1.0),
        "nothing booked anew"
    );

    // A quota on f2's flow but not on f3's: the two owners are not counted
    // alike, so the allocation is not handed over.
    sys.client
        .set_quota(&common::msg::QuotaRequest {
            owner: "team/f2".into(),
            limits: [("cpu".to_string(), 4.0)].into(),
            preempt: false,
        })
        .await
        .unwrap();
    let refused = sys
        .client
        .allocate(&ask("team/f3/t", "f3", Some(&id)))
        .await;
    assert_eq!(refused.map_err(|e| e.code).err(), Some(ErrorCode::Conflict));
}

/// An orchestrator replica killed while it keeps an allocation leaves it
/// bound to a task that ended: the reconciliation takes it back once that
/// task no longer vouches for it, with no person involved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocation_kept_by_a_killed_replica_is_taken_back() {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let client = Client::new(nats.clone());
    let _allocator = Process::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_coord-proc")),
        [
            "--nats-url",
            server.url(),
            "allocator",
            "--sweep-ms",
            "200",
            "--reconcile-grace-ms",
            "1000",
        ],
    );
    let replica = Replica::start_orchestrator(server.config(), |c| {
        c.keep_allocation_ms = KEEP_LONG_MS;
    });
    wait_for_service(&nats, "allocator").await;
    wait_for_service(&nats, "orchestrator").await;
    let agent = spawn_agent(&nats, "w", 1.0, |_| async { Ok(Value::Null) });
    wait_registered(&client, "w").await;
    client.create_flow(&one_task("kept")).await.unwrap();
    wait_finished(
        &client,
        &FlowId::new("kept").unwrap(),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(allocated(&client, "w").await, Some(1.0), "kept");

    replica.kill();
    // Another replica answers the reconciliation (nothing is taken back
    // while no orchestrator answers).
    let _second = Replica::start("orchestrator", server.config());
    let within = Duration::from_millis(common::msg::HAND_ON_VOUCH_MS + 30_000);
    eventually(within, "the kept allocation taken back", || async {
        (allocated(&client, "w").await? == 0.0).then_some(())
    })
    .await;
    let _ = agent.0.send(());
}
