//! Per-agent limits inside the services: an agent's heartbeats cost the
//! allocator no stored message, flooded or not, and the synchronizer bounds one agent's state
//! writes a second and the scopes its documents live in. Operators' writes
//! on `coord.sync.state.put` are not limited.

use std::time::Duration;

use common::msg::{Heartbeat, RegisterAgent, StateDoc, StateGet, StatePut};
use common::nats::{KV_AGENTS, STREAM_EVENTS};
use common::{subject, AgentId, Client, ErrorCode, ScopeId};
use futures::TryStreamExt;
use serde_json::json;
use testkit::{eventually, wait_for_service, NatsServer, ServiceHandle, System};

fn registration(agent: &AgentId) -> RegisterAgent {
    RegisterAgent {
        agent_id: agent.clone(),
        capabilities: vec![],
        labels: Default::default(),
        capacity: [("cpu".to_string(), 1.0)].into(),
        // A recorded heartbeat holds the next back for a quarter of this,
        // far longer than the test runs.
        heartbeat_interval_ms: 600_000,
    }
}

/// Messages stored so far in every stream but the events (telemetry any
/// service may add to at any time).
async fn stored_writes(js: &async_nats::jetstream::Context) -> u64 {
    let streams: Vec<_> = js.streams().try_collect().await.unwrap();
    streams
        .iter()
        .filter(|s| s.config.name != STREAM_EVENTS)
        .map(|s| s.state.last_sequence)
        .sum()
}

/// When the allocator last heard `agent`, 0 if never.
async fn heard(sys: &System, agent: &AgentId) -> u64 {
    let cap = sys.client.capacity(&Default::default()).await.unwrap();
    cap.last_heartbeat_ms.get(agent).copied().unwrap_or(0)
}

#[tokio::test]
async fn a_heartbeat_flood_from_one_agent_stores_nothing() {
    let sys = System::start().await;
    let js = async_nats::jetstream::new(sys.nats.clone());
    let (flooder, marker) = (
        AgentId::new("flooder").unwrap(),
        AgentId::new("marker").unwrap(),
    );
    sys.client
        .register_agent(&registration(&flooder))
        .await
        .unwrap();
    sys.client
        .register_agent(&registration(&marker))
        .await
        .unwrap();
    let before = stored_writes(&js).await;

    let beat = serde_json::to_vec(&Heartbeat {
        agent_id: flooder.clone(),
        at_ms: 0,
        running: 0,
    })
    .unwrap();
    for _ in 0..20_000 {
        sys.nats
            .publish(subject::heartbeat(&flooder), beat.clone().into())
            .await
            .unwrap();
    }
    // Sent after the flood on the same connection, so heard after every
    // heartbeat of the flood has been taken up.
    let last = serde_json::to_vec(&Heartbeat {
        agent_id: marker.clone(),
        at_ms: 0,
        running: 0,
    })
    .unwrap();
    sys.nats
        .publish(subject::heartbeat(&marker), last.into())
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    eventually(
        Duration::from_secs(20),
        "the marker's heartbeat heard",
        || async { (heard(&sys, &marker).await > 0).then_some(()) },
    )
    .await;

    let writes = stored_writes(&js).await - before;
    assert_eq!(
        writes, 0,
        "{writes} stored messages for a flood of 20,000 heartbeats"
    );
    assert!(heard(&sys, &flooder).await > 0);
    let record = js
        .get_key_value(KV_AGENTS)
        .await
        .unwrap()
        .get(flooder.as_str())
        .await
        .unwrap()
        .expect("the flooder is registered");
    let record: serde_json::Value = serde_json::from_slice(&record).unwrap();
    assert_eq!(record["status"], "active", "{record}");
}

/// A server with only the synchronizer, configured by `tune`.
async fn synchronizer(
    tune: impl FnOnce(&mut synchronizer::Config),
) -> (NatsServer, ServiceHandle, Client) {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let mut cfg = synchronizer::Config::new(server.config());
    tune(&mut cfg);
    let service = ServiceHandle::spawn("synchronizer", move |rx| {
        synchronizer::run(cfg, async move {
            let _ = rx.await;
        })
    });
    let nats = server.connect().await;
    wait_for_service(&nats, "synchronizer").await;
    let client = Client::new(nats).with_timeout(Duration::from_secs(10));
    (server, service, client)
}

fn put_in(agent: &AgentId, scope: &ScopeId, expected_revision: u64, n: u64) -> StatePut {
    StatePut {
        agent_id: agent.clone(),
        expected_revision,
        doc: json!({ "n": n }),
        scope: scope.clone(),
        clock: None,
    }
}

fn scope(i: usize) -> ScopeId {
    ScopeId::new(format!("s{i}")).unwrap()
}

#[tokio::test]
async fn an_agent_has_documents_in_at_most_so_many_scopes() {
    let (_server, _service, client) = synchronizer(|_| {}).await;
    let agent = AgentId::new("hoarder").unwrap();
    let mut refused = 0;
    for i in 0..100 {
        match client.state_put(&put_in(&agent, &scope(i), 0, 1)).await {
            Ok(doc) => assert!(i < 16, "scope {i} accepted: {doc:?}"),
            Err(e) => {
                assert_eq!(e.code, ErrorCode::QuotaExceeded, "scope {i}: {e}");
                assert_eq!(e.details["resource"], "scopes", "{e:?}");
                assert_eq!(e.details["limit"], 16, "{e:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 84);
    // The scopes it has stay readable and writable.
    for i in 0..16 {
        let got: StateDoc = client
            .state_get_at(&StateGet {
                agent_id: agent.clone(),
                scope: scope(i),
                revision: None,
            })
            .await
            .unwrap();
        assert_eq!(got.doc, json!({"n": 1}));
        let put = client
            .state_put(&put_in(&agent, &scope(i), got.revision, 2))
            .await
            .unwrap();
        assert!(put.revision > got.revision);
    }
    // Nothing was written in the refused ones.
    let missing = client
        .state_get_at(&StateGet {
            agent_id: agent.clone(),
            scope: scope(16),
            revision: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound);
    // Deleting a document frees its scope.
    client
        .state_delete(&common::msg::StateDelete {
            agent_id: agent.clone(),
            scope: scope(0),
            expected_revision: None,
        })
        .await
        .unwrap();
    client
        .state_put(&put_in(&agent, &scope(16), 0, 1))
        .await
        .unwrap();
    let full = client
        .state_put(&put_in(&agent, &scope(17), 0, 1))
        .await
        .unwrap_err();
    assert_eq!(full.code, ErrorCode::QuotaExceeded);
    // An operator's write is not held to the agent's cap.
    let _: StateDoc = client
        .request(subject::STATE_PUT, &put_in(&agent, &scope(50), 0, 1))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_agent_writing_state_faster_than_its_rate_is_told_to_slow_down() {
    // One put per thousand seconds after a burst of five: whatever the pace
    // of the test, the sixth put within it is refused.
    let (_server, _service, client) = synchronizer(|c| {
        c.agent_put_rate = 0.001;
        c.agent_put_burst = 5.0;
    })
    .await;
    let agent = AgentId::new("chatty").unwrap();
    let other = AgentId::new("quiet").unwrap();
    let s = ScopeId::default();
    let mut revision = 0;
    for n in 0..5 {
        revision = client
            .state_put(&put_in(&agent, &s, revision, n))
            .await
            .unwrap()
            .revision;
    }
    for n in 5..10 {
        let e = client
            .state_put(&put_in(&agent, &s, revision, n))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited, "{e}");
    }
    let kept = client.state_get(&agent).await.unwrap();
    assert_eq!((kept.revision, kept.doc), (revision, json!({"n": 4})));
    // Another agent has its own budget.
    client.state_put(&put_in(&other, &s, 0, 0)).await.unwrap();
    // Operators are not held to the agents' rate.
    for n in 10..30 {
        revision = client
            .request::<_, StateDoc>(subject::STATE_PUT, &put_in(&agent, &s, revision, n))
            .await
            .unwrap()
            .revision;
    }
}
