//! On a 3-node JetStream cluster, with every stream and bucket on all three
//! nodes: losing one node mid-flow (the agents' bucket's leader) costs
//! nothing (the flow completes on the other two, no agent heartbeating every
//! second is declared lost during the failover, and the node brought back
//! catches up as a current replica); a
//! node cut off from the other two while it keeps running acknowledges no
//! write, while the two carry the flow to its end exactly once, and it is a
//! current replica again once the cut heals; flows submitted while a node is
//! down complete.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use common::msg::{Event, EventKind, FlowSpec, FlowState, FlowStatus, TaskSpec};
use common::{subject, Client, FlowId, TaskId};
use coordkit::demo;
use futures::StreamExt;
use testkit::{eventually, start_service, wait_for_service, NatsCluster};

use crate::orchestrator::count_successes;
use crate::reconnect::read_events;

/// Streams and buckets the flow's path goes through.
const REPLICATED: [&str; 3] = ["COORD_REPORTS", "KV_coord_flows", "KV_coord_agents"];

/// Waits until node `n{node}` is a current replica of stream `name`, read through `js`.
async fn current_again(js: &jetstream::Context, name: &str, node: usize) {
    let node = format!("n{node}");
    eventually(
        Duration::from_secs(30),
        "the node current again",
        || async {
            let mut stream = js.get_stream(name).await.ok()?;
            let info = stream.info().await.ok()?;
            assert_eq!(info.config.num_replicas, 3, "{name} on every node");
            let cluster = info.cluster.clone()?;
            let nodes: Vec<&str> = cluster
                .leader
                .iter()
                .map(String::as_str)
                .chain(cluster.replicas.iter().map(|p| p.name.as_str()))
                .collect();
            let all_current = cluster.replicas.iter().all(|p| p.current && !p.offline);
            (nodes.contains(&node.as_str()) && all_current && nodes.len() == 3).then_some(())
        },
    )
    .await;
}

/// Every event stored, once JetStream answers (after a failover or a healed
/// cut its leaders may still be being elected).
async fn stored_events(nats: &async_nats::Client) -> Vec<Event> {
    eventually(Duration::from_secs(30), "the events read back", || async {
        read_events(nats).await.ok()
    })
    .await
}

/// Every `agent.lost` event published while the test runs, as seen by `nats`.
async fn watch_losses(nats: &async_nats::Client) -> tokio::sync::mpsc::UnboundedReceiver<Event> {
    let mut sub = nats.subscribe(subject::event::AGENT_LOST).await.unwrap();
    nats.flush().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Ok(e) = serde_json::from_slice::<Event>(&msg.payload) {
                let _ = tx.send(e);
            }
        }
    });
    rx
}

/// No agent was declared lost: neither an event seen live nor one stored.
async fn assert_no_agent_lost(
    live: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    nats: &async_nats::Client,
) {
    let mut lost: Vec<Event> = Vec::new();
    while let Ok(e) = live.try_recv() {
        lost.push(e);
    }
    lost.extend(
        stored_events(nats)
            .await
            .into_iter()
            .filter(|e| matches!(e.kind, EventKind::AgentLost { .. })),
    );
    assert!(lost.is_empty(), "agents declared lost: {lost:?}");
}

/// The demo agent (1 s heartbeats, so lost after 3 s of silence) on `cfg`,
/// each task taking 1.5 s; it stops when the sender is dropped or sent to.
async fn demo_agent(
    cfg: &common::config::NatsConfig,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), common::Error>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let opts = demo::demo_agent_options().unwrap();
    assert_eq!(opts.heartbeat_interval, Duration::from_secs(1));
    let agent = tokio::spawn(coordkit::agent::run(
        common::nats::connect(cfg, "cluster-agent").await.unwrap(),
        opts,
        |task| async move {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            Ok(serde_json::json!({ "task": task.task_id }))
        },
        async {
            let _ = stopped.await;
        },
    ));
    (stop, agent)
}

/// The orchestrator, allocator and synchronizer on `cfg`, and a test
/// connection on `client` once all three answer.
async fn services_on(
    cfg: &common::config::NatsConfig,
    client: &common::config::NatsConfig,
) -> (Vec<testkit::ServiceHandle>, async_nats::Client) {
    let services = ["orchestrator", "allocator", "synchronizer"]
        .into_iter()
        .map(|n| start_service(n, cfg.clone()))
        .collect();
    let nats = common::nats::connect(client, "cluster-test").await.unwrap();
    for name in ["orchestrator", "allocator", "synchronizer"] {
        wait_for_service(&nats, name).await;
    }
    (services, nats)
}

#[tokio::test]
async fn a_flow_survives_losing_a_node_and_the_node_rejoins() {
    common::telemetry::init_for_tests();
    let mut cluster = NatsCluster::start(3).await;
    let cfg = cluster.config();
    let (services, nats) = services_on(&cfg, &cfg).await;
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    let mut losses = watch_losses(&nats).await;
    // Losing a node stalls the streams it led until their leaders are
    // elected elsewhere, and cuts off the connections it served: seconds in
    // which heartbeats sent through it are heard by no allocator. The
    // allocators count the stall as an outage, so the demo agent's 1 s
    // interval (lost after 3 s) holds.
    let (stop, agent) = demo_agent(&cfg).await;

    let created = client
        .create_flow(&demo::demo_flow().unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(60), "the first task done", || async {
        let s = client.flow_status(&created.flow_id).await.ok()?;
        s.tasks
            .iter()
            .any(|t| t.state == common::msg::TaskState::Succeeded)
            .then_some(())
    })
    .await;

    // The agents' bucket's leader: until a new one is elected no transition
    // can be written, and the allocators must not take the election's
    // silence (agents on the killed node reconnecting) for agents lost.
    let js = jetstream::new(nats.clone());
    let leader = eventually(
        Duration::from_secs(10),
        "the agents' bucket's leader",
        || async {
            let mut stream = js.get_stream("KV_coord_agents").await.ok()?;
            let leader = stream.info().await.ok()?.cluster.clone()?.leader?;
            leader.strip_prefix('n')?.parse::<usize>().ok()
        },
    )
    .await;
    cluster.kill(leader);
    let status = eventually(Duration::from_secs(120), "flow done", || async {
        let s = client.flow_status(&created.flow_id).await.ok()?;
        (s.state != FlowState::Running).then_some(s)
    })
    .await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");

    cluster.resume(leader);
    for name in REPLICATED {
        current_again(&js, name, leader).await;
    }
    assert_no_agent_lost(&mut losses, &nats).await;

    let _ = stop.send(());
    agent.await.unwrap().unwrap();
    for s in services {
        s.stop().await.unwrap();
    }
}

/// The flow's status once it is no longer running; a failure shows where it stood.
async fn finished(client: &Client, flow: &FlowId, within: Duration) -> FlowStatus {
    let started = std::time::Instant::now();
    loop {
        let status = client.flow_status(flow).await;
        if let Ok(s) = &status {
            if s.state != FlowState::Running {
                return s.clone();
            }
        }
        assert!(
            started.elapsed() < within,
            "flow {flow} still running after {within:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A chain of `n` demo tasks, each after the one before.
fn chain(n: usize) -> FlowSpec {
    let template = demo::demo_flow().unwrap().tasks.remove(0);
    let tasks: Vec<TaskSpec> = (0..n)
        .map(|i| {
            let mut t = template.clone();
            t.id = TaskId::new(format!("t{i}")).unwrap();
            t.depends_on = (i > 0)
                .then(|| TaskId::new(format!("t{}", i - 1)).unwrap())
                .into_iter()
                .collect();
            t
        })
        .collect();
    FlowSpec::new("a chain", tasks)
}

#[tokio::test]
async fn a_node_cut_off_from_the_others_acknowledges_nothing_and_rejoins() {
    common::telemetry::init_for_tests();
    let cluster = NatsCluster::start_partitionable(3).await;
    let majority = cluster.config_of(&[0, 1]);
    let minority = cluster.config_of(&[2]);
    // The services on nodes 0 and 1, then (once they have made the streams
    // and buckets) a second orchestrator on node 2 alone.
    let mut services: Vec<_> = ["orchestrator", "allocator", "synchronizer"]
        .into_iter()
        .map(|n| start_service(n, majority.clone()))
        .collect();
    let nats = common::nats::connect(&majority, "majority-test")
        .await
        .unwrap();
    for name in ["orchestrator", "allocator", "synchronizer"] {
        wait_for_service(&nats, name).await;
    }
    services.push(start_service("orchestrator", minority.clone()));
    let lone = common::nats::connect(&minority, "minority-test")
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "both orchestrators up", || async {
        (testkit::replicas(&lone, "orchestrator").await == 2).then_some(())
    })
    .await;
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    let lone_client = Client::new(lone.clone()).with_timeout(Duration::from_secs(15));
    let mut losses = watch_losses(&nats).await;
    let (stop, agent) = demo_agent(&majority).await;

    // A bucket of its own, handles to it through both sides taken while
    // every node answers.
    let js = jetstream::new(nats.clone());
    let probe = js
        .create_key_value(kv::Config {
            bucket: "partition_probe".into(),
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    // A new replicated stream takes a moment to elect its first leader.
    let before = eventually(
        Duration::from_secs(30),
        "the bucket takes writes",
        || async { probe.put("k", "before".into()).await.ok() },
    )
    .await;
    let lone_js = jetstream::new(lone.clone());
    let lone_probe = lone_js.get_key_value("partition_probe").await.unwrap();

    let created = client.create_flow(&chain(6)).await.unwrap();
    eventually(Duration::from_secs(60), "the first task done", || async {
        let s = client.flow_status(&created.flow_id).await.ok()?;
        s.tasks
            .iter()
            .any(|t| t.state == common::msg::TaskState::Succeeded)
            .then_some(())
    })
    .await;

    cluster.partition(2).await;
    // Through the cut-off node: a compare-and-set is not acknowledged, and a
    // flow is not reported created unless the majority holds it.
    let cas = tokio::time::timeout(
        Duration::from_secs(20),
        lone_probe.update("k", "minority".into(), before),
    )
    .await;
    assert!(
        !matches!(cas, Ok(Ok(_))),
        "a compare-and-set through the cut-off node was acknowledged: {cas:?}"
    );
    let mut spec = chain(1);
    let cut_off = FlowId::new("cut-off").unwrap();
    spec.id = Some(cut_off.clone());
    let via_minority = lone_client.create_flow(&spec).await;
    if let Ok(reply) = &via_minority {
        let stored = client.flow_status(&cut_off).await;
        assert!(
            stored.is_ok(),
            "reported created through the cut-off node ({reply:?}) but not stored: {stored:?}"
        );
    }
    // The majority carries on: its own compare-and-set goes through (once a
    // leader is elected there, if node 2 led the bucket).
    let after = eventually(
        Duration::from_secs(30),
        "a write on the majority",
        || async { probe.update("k", "majority".into(), before).await.ok() },
    )
    .await;
    let status = finished(&client, &created.flow_id, Duration::from_secs(120)).await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");

    cluster.heal();
    let heal_js = jetstream::new(nats.clone());
    for name in REPLICATED.into_iter().chain(["KV_partition_probe"]) {
        current_again(&heal_js, name, 2).await;
    }
    // Node 2 serves the majority's value, and takes writes again.
    let seen = eventually(
        Duration::from_secs(30),
        "node 2 reads the value",
        || async {
            let e = lone_probe.entry("k").await.ok()??;
            (e.revision == after).then_some(e)
        },
    )
    .await;
    assert_eq!(seen.value.as_ref(), b"majority");
    eventually(
        Duration::from_secs(30),
        "a write through node 2",
        || async { lone_probe.update("k", "healed".into(), after).await.ok() },
    )
    .await;

    // Exactly once: every task of the flow succeeded (its stored status) and
    // none was reported succeeded twice. Events are published on core NATS
    // and kept by a stream, so one sent while that stream had no leader (or
    // through the cut-off node) may be missing: fewer than six is allowed,
    // a second success of a task is not.
    assert!(
        status
            .tasks
            .iter()
            .all(|t| t.state == common::msg::TaskState::Succeeded),
        "{status:?}"
    );
    let events = stored_events(&nats).await;
    let successes = count_successes(&events, &created.flow_id);
    assert!(successes.len() <= 6, "{successes:?}");
    assert!(successes.values().all(|n| *n == 1), "{successes:?}");
    if via_minority.is_err() {
        // Refused or unanswered: either way no one was told it exists; if
        // it was stored after all, it is whole and runs like any other.
        if let Ok(s) = client.flow_status(&cut_off).await {
            assert_eq!(s.tasks.len(), 1, "{s:?}");
        }
    }
    assert_no_agent_lost(&mut losses, &nats).await;

    let _ = stop.send(());
    agent.await.unwrap().unwrap();
    for s in services {
        s.stop().await.unwrap();
    }
}

/// Flows submitted while one node is down (each node in turn but the one
/// the client is on) are created, once a new leader takes the writes, and
/// complete on the other two.
#[tokio::test]
async fn flows_submitted_while_a_node_is_down_complete() {
    common::telemetry::init_for_tests();
    let mut cluster = NatsCluster::start(3).await;
    let cfg = cluster.config();
    let (services, nats) = services_on(&cfg, &cluster.config_of(&[0])).await;
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    let (stop, agent) = demo_agent(&cfg).await;
    let first = client.create_flow(&chain(2)).await.unwrap();
    let s = finished(&client, &first.flow_id, Duration::from_secs(60)).await;
    assert_eq!(s.state, FlowState::Succeeded, "{s:?}");
    for node in [1, 2] {
        cluster.kill(node);
        let mut ids = Vec::new();
        for _ in 0..3 {
            // Refused (unavailable) while the flows bucket elects a leader
            // or a service reconnects; a caller retries.
            let spec = chain(2);
            let made = eventually(Duration::from_secs(60), "a flow created", || async {
                client.create_flow(&spec).await.ok()
            })
            .await;
            ids.push(made.flow_id);
        }
        for id in &ids {
            let s = finished(&client, id, Duration::from_secs(120)).await;
            assert_eq!(s.state, FlowState::Succeeded, "node {node} down: {s:?}");
        }
        cluster.resume(node);
        let js = jetstream::new(nats.clone());
        for name in REPLICATED {
            current_again(&js, name, node).await;
        }
    }
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
    for s in services {
        s.stop().await.unwrap();
    }
}
