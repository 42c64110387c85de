//! On a 3-node JetStream cluster, with every stream and bucket on all three
//! nodes, losing one node mid-flow costs nothing: the flow completes on the
//! other two, and the node brought back catches up as a current replica.

use std::time::Duration;

use async_nats::jetstream;
use common::msg::FlowState;
use common::Client;
use coordkit::demo;
use testkit::{eventually, start_service, wait_for_service, NatsCluster};

/// Streams and buckets the flow's path goes through.
const REPLICATED: [&str; 4] = [
    "COORD_ASSIGN",
    "COORD_REPORTS",
    "KV_coord_flows",
    "KV_coord_agents",
];

#[tokio::test]
async fn a_flow_survives_losing_a_node_and_the_node_rejoins() {
    common::telemetry::init_for_tests();
    let mut cluster = NatsCluster::start(3).await;
    let cfg = cluster.config();
    let services: Vec<_> = ["orchestrator", "allocator", "synchronizer"]
        .into_iter()
        .map(|n| start_service(n, cfg.clone()))
        .collect();
    let nats = common::nats::connect(&cfg, "cluster-test").await.unwrap();
    for name in ["orchestrator", "allocator", "synchronizer"] {
        wait_for_service(&nats, name).await;
    }
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Losing a node stalls the streams it led until their leaders are
    // elected elsewhere, and the allocator's heartbeat watch until it is
    // re-created: several seconds in which no heartbeat is seen. The demo
    // agent's 1 s interval (lost after 3 s) would be declared lost; an agent on
    // a cluster needs an interval above the failover time.
    let mut opts = demo::demo_agent_options().unwrap();
    opts.heartbeat_interval = Duration::from_secs(5);
    let agent = tokio::spawn(coordkit::agent::run(
        common::nats::connect(&cfg, "cluster-agent").await.unwrap(),
        opts,
        |task| async move {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            Ok(serde_json::json!({ "task": task.task_id }))
        },
        async {
            let _ = stopped.await;
        },
    ));

    let created = client
        .create_flow(&demo::demo_flow().unwrap())
        .await
        .unwrap();
    eventually(Duration::from_secs(20), "the first task done", || async {
        let s = client.flow_status(&created.flow_id).await.ok()?;
        s.tasks
            .iter()
            .any(|t| t.state == common::msg::TaskState::Succeeded)
            .then_some(())
    })
    .await;

    // The seed node, which the others found each other through.
    cluster.kill(0);
    let status = eventually(Duration::from_secs(40), "flow done", || async {
        let s = client.flow_status(&created.flow_id).await.ok()?;
        (s.state != FlowState::Running).then_some(s)
    })
    .await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");

    cluster.resume(0);
    let js = jetstream::new(nats.clone());
    for name in REPLICATED {
        eventually(Duration::from_secs(30), "node 0 current again", || async {
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
            (nodes.contains(&"n0") && all_current && nodes.len() == 3).then_some(())
        })
        .await;
    }

    let _ = stop.send(());
    agent.await.unwrap().unwrap();
    for s in services {
        s.stop().await.unwrap();
    }
}
