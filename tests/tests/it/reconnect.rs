//! NATS outages: the server is killed mid-run and brought back on the same port
//! and store (JetStream on disk). Afterwards the agent runtime still takes work,
//! heartbeats and is not declared lost; a flow running across the outage
//! finishes with every task run and accepted exactly once; and every watch,
//! durable consumer and subscription the services hold is back: the
//! allocator's agent and heartbeat watches, the orchestrator's report and
//! allocator-event consumers, the synchronizer's acknowledgements and the
//! agent's sync notices, the monitor's counters.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use common::msg::{
    AgentStatus, Event, EventKind, FlowSpec, FlowState, RegisterAgent, RetryPolicy, StatePut,
    SyncPointInitiate, SyncPointState, SyncPointWait, TaskState,
};
use common::{subject, AgentId, FlowId};
use coordkit::agent::{self, AgentOptions, SyncFollower};
use futures::StreamExt;
use serde_json::json;
use testkit::{eventually, System};
use tokio::sync::oneshot;

use crate::orchestrator::{
    assignment_consumer, count_successes, cpu_task, random_dag, spawn_agent, take_assignment, tid,
    wait_finished, wait_registered,
};

/// How long the server stays down: several heartbeat intervals of the agent
/// (500 ms), so heartbeats are missed for real while it is away.
const OUTAGE: Duration = Duration::from_secs(2);

/// Every event the events stream holds, read back through an ephemeral consumer.
async fn stored_events(nats: &async_nats::Client) -> Vec<Event> {
    read_events(nats)
        .await
        .expect("the events stream reads back")
}

/// [`stored_events`], or why JetStream could not answer (a cluster may still
/// be electing leaders).
pub(crate) async fn read_events(nats: &async_nats::Client) -> Result<Vec<Event>, String> {
    let js = jetstream::new(nats.clone());
    let why = |e: &dyn std::fmt::Display| e.to_string();
    let stream = js
        .get_stream(common::nats::STREAM_EVENTS)
        .await
        .map_err(|e| why(&e))?;
    let total = stream.get_info().await.map_err(|e| why(&e))?.state.messages as usize;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .map_err(|e| why(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| why(&e))?;
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|e| why(&e))?
            .ok_or("the events stream ended")?
            .map_err(|e| why(&e))?;
        out.push(serde_json::from_slice(&msg.payload).map_err(|e| why(&e))?);
    }
    Ok(out)
}

/// Kills the server, keeps it down for [`OUTAGE`], and starts it again.
/// Returns when it is back (the caller's clients reconnect on their own).
async fn outage(sys: &mut System) -> Instant {
    sys.server.kill();
    tokio::time::sleep(OUTAGE).await;
    tokio::task::block_in_place(|| sys.server.resume());
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_nats_restart_agents_flows_watches_and_consumers_carry_on() {
    let mut sys = System::start().await;
    // The agent has its own connection, as an agent process would.
    let agent_nats = common::nats::connect(&sys.server.config(), "agent-steady")
        .await
        .unwrap();
    let runs: Arc<Mutex<BTreeMap<(String, String), u32>>> = Arc::default();
    let r = runs.clone();
    let (stop_steady, steady) = spawn_agent(&agent_nats, "steady", 4.0, move |a| {
        let r = r.clone();
        async move {
            *r.lock()
                .unwrap()
                .entry((a.flow_id.to_string(), a.task_id.to_string()))
                .or_default() += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(json!(a.task_id))
        }
    });
    wait_registered(&sys.client, "steady").await;
    // It keeps state and follows sync points, on its own connection.
    let follower = SyncFollower::subscribe(agent_nats.clone(), AgentId::new("steady").unwrap())
        .await
        .unwrap();
    let (stop_follower, follower_stopped) = oneshot::channel::<()>();
    let following = tokio::spawn(follower.run(|_| async { true }, async {
        let _ = follower_stopped.await;
    }));
    let put = |expected_revision: u64, n: u64| StatePut {
        agent_id: AgentId::new("steady").unwrap(),
        expected_revision,
        doc: json!({"n": n}),
        scope: Default::default(),
        clock: None,
    };
    let first = sys.client.state_put(&put(0, 1)).await.unwrap();

    // A flow long enough to be running when the server goes away.
    let across = sys.client.create_flow(&random_dag(60, 3)).await.unwrap();
    eventually(Duration::from_secs(30), "the flow under way", || async {
        let s = sys.client.flow_status(&across.flow_id).await.ok()?;
        (s.progress > 0.15).then_some(())
    })
    .await;

    let down_at_ms = common::now_ms();
    let back = outage(&mut sys).await;
    let back_at_ms = common::now_ms();
    let metrics_before = eventually(Duration::from_secs(20), "the monitor back", || async {
        sys.client.metrics().await.ok()
    })
    .await;

    // The flow that ran across the outage finishes, every task run and accepted once.
    let done = match tokio::time::timeout(
        Duration::from_secs(40),
        wait_finished(&sys.client, &across.flow_id, Duration::from_secs(60)),
    )
    .await
    {
        Ok(done) => done,
        Err(_) => {
            let s = sys.client.flow_status(&across.flow_id).await.unwrap();
            let stuck: Vec<_> = s
                .tasks
                .iter()
                .filter(|t| !t.state.is_terminal())
                .map(|t| {
                    (
                        t.task_id.to_string(),
                        t.state,
                        t.attempt,
                        t.agent_id.clone(),
                    )
                })
                .collect();
            panic!("flow stuck: {:?} {stuck:?}", s.counts);
        }
    };
    assert_eq!(done.state, FlowState::Succeeded, "{:?}", done.counts);
    let twice: Vec<_> = runs
        .lock()
        .unwrap()
        .iter()
        .filter(|((f, _), n)| *f == across.flow_id.as_str() && **n != 1)
        .map(|((_, t), n)| (t.clone(), *n))
        .collect();
    assert!(twice.is_empty(), "tasks run more than once: {twice:?}");
    assert!(
        done.tasks.iter().all(|t| t.attempt == 1),
        "no task needed a second attempt: {:?}",
        done.tasks
            .iter()
            .filter(|t| t.attempt != 1)
            .map(|t| (&t.task_id, t.attempt))
            .collect::<Vec<_>>()
    );

    // A flow submitted after the outage runs on the same agent.
    let after = sys
        .client
        .create_flow(&FlowSpec::new(
            "after",
            vec![cpu_task("a", &[]), cpu_task("b", &["a"])],
        ))
        .await
        .unwrap();
    let done = wait_finished(&sys.client, &after.flow_id, Duration::from_secs(30)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert!(done
        .tasks
        .iter()
        .all(|t| t.agent_id.as_ref().map(AgentId::as_str) == Some("steady")));

    // Heartbeats reach the allocator again: it has heard one since.
    eventually(
        Duration::from_secs(10),
        "a heartbeat after the outage",
        || async {
            let cap = sys.client.capacity(&Default::default()).await.ok()?;
            let at = *cap.last_heartbeat_ms.get(&AgentId::new("steady").ok()?)?;
            (at > back_at_ms).then_some(())
        },
    )
    .await;
    let js = jetstream::new(sys.nats.clone());
    let loss_window = Duration::from_millis(3 * 500 + 500);
    tokio::time::sleep(loss_window.saturating_sub(back.elapsed())).await;
    let steady_id = AgentId::new("steady").unwrap();
    let cap = sys.client.capacity(&Default::default()).await.unwrap();
    assert_eq!(cap.agent_status[&steady_id], AgentStatus::Active);

    // The allocator's agents watch: a write another replica makes (here, the
    // test, with a compare-and-set straight into the bucket) reaches its view.
    let ghost = AgentId::new("ghost").unwrap();
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: ghost.clone(),
            capabilities: vec!["ghostly".into()],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 1.0)].into(),
            heartbeat_interval_ms: 300,
        })
        .await
        .unwrap();
    // It heartbeats until it has taken a task (below).
    let beating = {
        let (nats, ghost) = (sys.nats.clone(), ghost.clone());
        tokio::spawn(async move {
            loop {
                let beat = json!({"agent_id": ghost, "at_ms": common::now_ms(), "running": 0});
                let _ = nats
                    .publish(subject::heartbeat(&ghost), beat.to_string().into())
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let agents = js.get_key_value(common::nats::KV_AGENTS).await.unwrap();
    let entry = agents.entry("ghost").await.unwrap().unwrap();
    let mut record: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
    record["labels"]["zone"] = json!("written-elsewhere");
    agents
        .update(
            "ghost",
            serde_json::to_vec(&record).unwrap().into(),
            entry.revision,
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the allocator sees the write",
        || async {
            let c = sys.client.capacity(&Default::default()).await.ok()?;
            c.labels
                .contains_key("zone=written-elsewhere")
                .then_some(())
        },
    )
    .await;

    // The allocator's sweep and the orchestrator's consumer of its events: the
    // ghost takes a task, then goes silent; it is declared lost and the task
    // moves to an agent that joins later.
    let consumer = assignment_consumer(&js, &ghost).await;
    let mut t = cpu_task("t", &[]);
    t.requirements.capabilities = vec!["ghostly".into()];
    t.retry = RetryPolicy {
        max_attempts: 2,
        backoff_base_ms: 10,
        ..Default::default()
    };
    let orphan = sys
        .client
        .create_flow(&FlowSpec::new("orphan", vec![t]))
        .await
        .unwrap();
    let taken = take_assignment(&consumer).await;
    assert_eq!(taken.task_id, tid("t"));
    beating.abort();
    let mut opts = AgentOptions::new(AgentId::new("alive").unwrap())
        .capacity("cpu", 1.0)
        .capability("ghostly");
    opts.heartbeat_interval = Duration::from_millis(500);
    let (stop_alive, stopped) = oneshot::channel::<()>();
    let alive = tokio::spawn(agent::run(
        agent_nats.clone(),
        opts,
        |a| async move { Ok(json!(a.attempt)) },
        async {
            let _ = stopped.await;
        },
    ));
    let done = wait_finished(&sys.client, &orphan.flow_id, Duration::from_secs(30)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert_eq!(done.tasks[0].attempt, 2);
    assert_eq!(
        done.tasks[0].agent_id.as_ref().map(AgentId::as_str),
        Some("alive")
    );

    // The synchronizer's acknowledgement subscription and the agent's notice
    // subscription: a sync point taken after the outage completes.
    let second = sys.client.state_put(&put(first.revision, 2)).await.unwrap();
    let point = sys
        .client
        .syncpoint_initiate(&SyncPointInitiate {
            scope: Default::default(),
            agents: vec![AgentId::new("steady").unwrap()],
            label: "after the outage".into(),
        })
        .await
        .unwrap();
    assert_eq!(point.cut[&AgentId::new("steady").unwrap()], second.revision);
    let completed = sys
        .client
        .syncpoint_complete(&SyncPointWait {
            sync_point_id: point.id.clone(),
            timeout_ms: 5_000,
        })
        .await
        .unwrap();
    assert_eq!(completed.state, SyncPointState::Completed);

    // The monitor's subscription counted what happened after the outage.
    let metrics = eventually(Duration::from_secs(10), "the monitor counts", || async {
        let m = sys.client.metrics().await.ok()?;
        (m.flows_completed >= metrics_before.flows_completed + 2).then_some(m)
    })
    .await;
    assert!(metrics.tasks_completed >= metrics_before.tasks_completed + 3);

    // The audit log: no task succeeded twice, and the only agent declared lost
    // is the ghost. Events are core NATS publishes (at most once): one sent as
    // the server is killed can be missing, so for the flow running across the
    // outage "exactly once" rests on the agent's run counts and the stored
    // attempts above; the flows after the outage must be complete.
    let events = stored_events(&sys.nats).await;
    for (flow, tasks, across_outage) in [
        (&across.flow_id, 60, true),
        (&after.flow_id, 2, false),
        (&orphan.flow_id, 1, false),
    ] {
        let successes = count_successes(&events, flow);
        if across_outage {
            assert!(successes.len() <= tasks, "flow {flow}: {successes:?}");
        } else {
            assert_eq!(successes.len(), tasks, "flow {flow}: {successes:?}");
        }
        assert!(
            successes.values().all(|n| *n == 1),
            "flow {flow}: a task succeeded twice: {successes:?}"
        );
    }
    let lost: Vec<(AgentId, u64)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::AgentLost { agent_id, .. } => Some((agent_id.clone(), e.at_ms)),
            _ => None,
        })
        .collect();
    assert!(
        lost.iter().all(|(a, _)| *a == ghost),
        "lost after the outage (down at {down_at_ms}, back at {back_at_ms}): {lost:?}"
    );
    let failed: Vec<&FlowId> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::TaskTransition {
                flow_id,
                to: TaskState::Failed,
                ..
            } if *flow_id != orphan.flow_id => Some(flow_id),
            _ => None,
        })
        .collect();
    assert!(failed.is_empty(), "attempts failed: {failed:?}");

    let _ = stop_follower.send(());
    following.await.unwrap();
    let _ = stop_alive.send(());
    alive.await.unwrap().unwrap();
    let _ = stop_steady.send(());
    steady.await.unwrap().unwrap();
}

/// A server that stops answering without closing anything (a node cut off by
/// the network, a frozen host) is left for another in the URL list within
/// three of the connection's pings, not the client library's minutes.
#[tokio::test]
async fn a_connection_leaves_a_server_gone_silent_for_another() {
    let first = testkit::NatsServer::start();
    let mut second = testkit::NatsServer::start();
    // The first server through a relay that can go silent: it then stops
    // carrying bytes but keeps both sockets open, as a cut network does.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("nats://{}", relay.local_addr().unwrap());
    let target = first.url().trim_start_matches("nats://").to_owned();
    let (silence, silent) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((inbound, _)) = relay.accept().await {
            let outbound = tokio::net::TcpStream::connect(&target).await.unwrap();
            let mut silent = silent.clone();
            tokio::spawn(async move {
                let (mut ir, mut iw) = inbound.into_split();
                let (mut or, mut ow) = outbound.into_split();
                tokio::select! {
                    _ = tokio::io::copy(&mut ir, &mut ow) => {}
                    _ = tokio::io::copy(&mut or, &mut iw) => {}
                    _ = silent.wait_for(|s| *s) => {}
                }
                // Held open, carrying nothing, until the process ends.
                std::mem::forget((ir, iw, or, ow));
            });
        }
    });
    // The second server down while the client connects, so it lands on the
    // relay; then back.
    second.kill();
    let cfg = common::config::NatsConfig::new(format!("{relay_url},{}", second.url()));
    assert_eq!(
        cfg.ping_interval(),
        Duration::from_secs(5),
        "the shipped default"
    );
    let client = common::nats::connect(&cfg, "silent-test").await.unwrap();
    let port = |url: &str| url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    assert_ne!(client.server_info().port, port(second.url()));
    second.resume();

    silence.send_replace(true);
    let cut = Instant::now();
    eventually(
        Duration::from_secs(40),
        "the client on the second server",
        || async {
            (client.connection_state() == async_nats::connection::State::Connected
                && client.server_info().port == port(second.url()))
            .then_some(())
        },
    )
    .await;
    // Three pings 5 s apart, then the reconnect; the library's own default
    // (60 s) took three minutes.
    eprintln!("on the second server {:?} after the cut", cut.elapsed());
    client.flush().await.unwrap();
}
