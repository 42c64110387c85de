//! The sweep's work follows the flows in progress, not every flow ever run:
//! with its flows finished, an orchestrator lists no bucket and reads no
//! flow back, however often it sweeps, whichever replica finished them.

use std::time::Duration;

use common::msg::{FlowSpec, FlowState};
use futures::StreamExt;
use serde_json::Value;
use testkit::{Replica, System};

use crate::orchestrator::{cpu_task, spawn_agent, wait_finished, wait_registered};

/// Requests that read the flows bucket: a flow's entry (direct or not) or the
/// stream's subjects (the listing of every key).
const FLOW_READS: [&str; 4] = [
    "$JS.API.DIRECT.GET.KV_coord_flows",
    "$JS.API.DIRECT.GET.KV_coord_flows.>",
    "$JS.API.STREAM.MSG.GET.KV_coord_flows",
    "$JS.API.STREAM.INFO.KV_coord_flows",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_reads_no_finished_flow_back() {
    // A sweep every 50 ms: twenty a second to read with. Two replicas: a
    // flow the other one finished is read here once, not every sweep (it
    // was, for as long as this replica's actor for it lived).
    let sys = System::start_tuned(|c| c.sweep_ms = 50).await;
    let _other = Replica::start_orchestrator(sys.server.config(), |c| c.sweep_ms = 50);
    let _agent = spawn_agent(&sys.nats, "w", 4.0, |_| async { Ok(Value::Null) });
    wait_registered(&sys.client, "w").await;
    let mut flows = Vec::new();
    for _ in 0..20 {
        let spec = FlowSpec::new("swept", vec![cpu_task("a", &[]), cpu_task("b", &["a"])]);
        flows.push(sys.client.create_flow(&spec).await.unwrap().flow_id);
    }
    for id in &flows {
        let done = wait_finished(&sys.client, id, Duration::from_secs(60)).await;
        assert_eq!(done.state, FlowState::Succeeded);
    }
    let mut reads = Vec::new();
    for s in FLOW_READS {
        reads.push(sys.nats.subscribe(s).await.unwrap());
    }
    sys.nats.flush().await.unwrap();
    let mut reads = futures::stream::select_all(reads);
    // Their last writes settle (outboxes emptied, actors gone), then the
    // sweep goes on with nothing to read: a whole second passes without a
    // read of the flows (listing them was one every sweep, and each
    // finished flow was read back every 10 s).
    let mut seen = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::timeout(Duration::from_secs(1), reads.next())
        .await
        .is_ok()
    {
        seen += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "the flows were read {seen} times in a minute after the last finished"
        );
    }
    // And flows still run, swept as before.
    let spec = FlowSpec::new("after", vec![cpu_task("a", &[])]);
    let id = sys.client.create_flow(&spec).await.unwrap().flow_id;
    let done = wait_finished(&sys.client, &id, Duration::from_secs(60)).await;
    assert_eq!(
        done.state,
        FlowState::Succeeded,
        "{seen} reads before quiet"
    );
}
