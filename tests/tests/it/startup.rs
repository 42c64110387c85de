//! Services started while NATS is down: they wait for it (a service asked to
//! stop meanwhile stops), then make their streams and buckets and work; a
//! command someone waits on gives up instead.

use std::time::Duration;

use common::msg::{FlowSpec, FlowState};
use common::{AgentId, Client, ErrorCode};
use serde_json::json;
use testkit::{eventually, start_service, wait_for_service, NatsServer, SERVICES};

use crate::orchestrator::{cpu_task, spawn_agent, wait_finished, wait_registered};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_started_before_nats_connect_when_it_comes_up() {
    common::telemetry::init_for_tests();
    let mut server = NatsServer::start();
    server.kill();
    // A short request deadline: a service that sent its first requests into
    // the void would have given up long before the server comes.
    let mut cfg = server.config();
    cfg.request_timeout_ms = 500;
    let services: Vec<_> = SERVICES
        .iter()
        .map(|name| start_service(name, cfg.clone()))
        .collect();
    let quitter = start_service("orchestrator", cfg.clone());
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    // Still waiting, not failed; and one asked to stop meanwhile stops.
    for s in &services {
        assert!(s.is_running(), "{} gave up waiting for NATS", s.name);
    }
    tokio::time::timeout(Duration::from_secs(5), quitter.stop())
        .await
        .expect("a service waiting for NATS stops when asked")
        .unwrap();
    // A command someone waits on does not wait for ever.
    let err = common::nats::connect_within(&cfg, "impatient", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Unavailable, "{err}");

    tokio::task::block_in_place(|| server.resume());
    let nats = server.connect().await;
    for name in SERVICES {
        wait_for_service(&nats, name).await;
    }
    // Each one works: its streams and buckets were made once the server came.
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    let (stop, agent) = spawn_agent(&nats, "early", 1.0, |a| async move { Ok(json!(a.attempt)) });
    wait_registered(&client, "early").await;
    let created = client
        .create_flow(&FlowSpec::new("late", vec![cpu_task("a", &[])]))
        .await
        .unwrap();
    let done = wait_finished(&client, &created.flow_id, Duration::from_secs(30)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    let doc = client
        .state_put(&common::msg::StatePut {
            agent_id: AgentId::new("early").unwrap(),
            expected_revision: 0,
            doc: json!({"up": true}),
            scope: Default::default(),
            clock: None,
        })
        .await
        .unwrap();
    assert_eq!(doc.doc, json!({"up": true}));
    eventually(Duration::from_secs(10), "the monitor counts", || async {
        let m = client.metrics().await.ok()?;
        (m.flows_completed >= 1).then_some(())
    })
    .await;
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
    for s in services {
        s.stop().await.unwrap();
    }
}
