//! Per-agent limits inside the services: the allocator records an agent's
//! heartbeats at a bounded rate.

use std::time::Duration;

use common::msg::{Heartbeat, RegisterAgent};
use common::nats::{KV_AGENTS, KV_HEARTBEATS};
use common::{subject, AgentId};
use testkit::{eventually, System};

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

async fn heartbeat_writes(js: &async_nats::jetstream::Context) -> u64 {
    js.get_stream(format!("KV_{KV_HEARTBEATS}"))
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence
}

#[tokio::test]
async fn a_heartbeat_flood_from_one_agent_costs_a_handful_of_writes() {
    let sys = System::start().await;
    let js = async_nats::jetstream::new(sys.nats.clone());
    let (flooder, marker) = (AgentId::new("flooder").unwrap(), AgentId::new("marker").unwrap());
    sys.client.register_agent(&registration(&flooder)).await.unwrap();
    sys.client.register_agent(&registration(&marker)).await.unwrap();
    let before = heartbeat_writes(&js).await;

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
    // Sent after the flood on the same connection, so recorded after every
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
    let beats = js.get_key_value(KV_HEARTBEATS).await.unwrap();
    eventually(Duration::from_secs(20), "the marker's heartbeat recorded", || async {
        beats.get(marker.as_str()).await.ok()?.map(drop)
    })
    .await;

    let writes = heartbeat_writes(&js).await - before;
    // The flood's first heartbeat and the marker's.
    assert!(writes <= 2, "{writes} heartbeat writes for a flood of 20,000");
    assert!(beats.get(flooder.as_str()).await.unwrap().is_some());
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
