//! A stalled replica's cost is bounded: real service processes frozen with
//! `SIGSTOP` (sockets open, nothing running, every timer expired on waking).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{FlowSpec, FlowState, TaskState};
use common::{AgentId, FlowId};
use serde_json::json;
use testkit::{eventually, wait_for_service, NatsServer, Process, Replica};
use tokio::sync::Notify;

use crate::orchestrator::{cpu_task, spawn_agent, wait_finished, wait_registered};

/// The task's start-to-close timeout: longer than the reports' acknowledgement
/// wait (2 s) with room for a loaded machine, shorter than the 5 s it was.
const START_TO_CLOSE_MS: u64 = 5_000;

/// An orchestrator frozen while it holds an agent's completion report (pulled,
/// not yet applied) delays it by the reports' acknowledgement wait at most:
/// the other replica gets it then and applies it, and the attempt is not
/// timed out and run again for the stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_held_by_a_frozen_orchestrator_reaches_another_in_time() {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let client = common::Client::new(nats.clone());
    let _allocator = Replica::start("allocator", server.config());
    let frozen = Process::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_coord-proc")),
        [
            "--nats-url",
            server.url(),
            "orchestrator",
            "--sweep-ms",
            "200",
        ],
    );
    wait_for_service(&nats, "allocator").await;
    wait_for_service(&nats, "orchestrator").await;

    let release = Arc::new(Notify::new());
    let agent = {
        let release = release.clone();
        spawn_agent(&nats, "w", 1.0, move |a| {
            let release = release.clone();
            async move {
                release.notified().await;
                Ok(json!({"task": a.task_id}))
            }
        })
    };
    wait_registered(&client, "w").await;
    let flow_id = FlowId::new("held").unwrap();
    let mut t = cpu_task("t", &[]);
    t.timeouts.start_to_close_ms = Some(START_TO_CLOSE_MS);
    let mut spec = FlowSpec::new("held", vec![t]);
    spec.id = Some(flow_id.clone());
    client.create_flow(&spec).await.unwrap();
    eventually(Duration::from_secs(20), "t running", || async {
        let s = client.flow_status(&flow_id).await.ok()?;
        (s.tasks[0].state == TaskState::Running).then_some(())
    })
    .await;

    // Frozen, the only orchestrator still has its pull open: the server
    // hands it the completion, which it cannot apply.
    frozen.stop();
    release.notify_one();
    let js = jetstream::new(nats.clone());
    eventually(
        Duration::from_secs(10),
        "the report held, unacknowledged",
        || {
            let js = js.clone();
            async move {
                let mut stream = js.get_stream(common::nats::STREAM_REPORTS).await.ok()?;
                let messages = stream.info().await.ok()?.state.messages;
                let mut consumer: jetstream::consumer::PullConsumer = stream
                    .get_consumer(common::nats::CONSUMER_ORCHESTRATOR)
                    .await
                    .ok()?;
                let c = consumer.info().await.ok()?;
                (messages == 1 && c.num_ack_pending == 1).then_some(())
            }
        },
    )
    .await;

    // What is asserted is that the attempt is not run again; how soon the
    // other replica, started on a loaded machine, applies the report is not.
    let _other = Replica::start("orchestrator", server.config());
    let done = wait_finished(&client, &flow_id, Duration::from_secs(90)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert_eq!(
        done.tasks[0].attempt, 1,
        "the stall made the attempt time out: {:?}",
        done.tasks[0]
    );
    assert_eq!(done.tasks[0].agent_id, Some(AgentId::new("w").unwrap()));
    let _ = agent.0.send(());
    drop(frozen);
}

/// An allocator frozen for 3.5 s wakes with every timer expired and the
/// agents' heartbeats of the pause still unread: its pause is not the
/// agents' silence, so a live agent is never declared lost for it. Frozen
/// three times over, since the wake-up race does not lose every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_allocator_does_not_declare_a_live_agent_lost_on_waking() {
    use futures::StreamExt;

    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let client = common::Client::new(nats.clone());
    let allocator = Process::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_coord-proc")),
        ["--nats-url", server.url(), "allocator", "--sweep-ms", "200"],
    );
    wait_for_service(&nats, "allocator").await;
    let mut lost = nats
        .subscribe(common::subject::event::AGENT_LOST)
        .await
        .unwrap();
    nats.flush().await.unwrap();
    // Heartbeats every 300 ms: silent for 900 ms, an agent is lost.
    let agent_nats = common::nats::connect(&server.config(), "agent-live")
        .await
        .unwrap();
    let mut opts =
        coordkit::agent::AgentOptions::new(AgentId::new("live").unwrap()).capacity("cpu", 1.0);
    opts.heartbeat_interval = Duration::from_millis(300);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(coordkit::agent::run(
        agent_nats,
        opts,
        |_| async { Ok(json!(null)) },
        async {
            let _ = stopped.await;
        },
    ));
    wait_registered(&client, "live").await;

    for round in 0..3 {
        allocator.stop();
        tokio::time::sleep(Duration::from_millis(3_500)).await;
        allocator.resume();
        // Two seconds awake: many sweeps, with the agent heartbeating.
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(2), lost.next()).await {
            panic!(
                "round {round}: a live agent was declared lost on waking: {}",
                String::from_utf8_lossy(&m.payload)
            );
        }
    }
    let cap = client.capacity(&Default::default()).await.unwrap();
    assert_eq!(
        cap.agent_status[&AgentId::new("live").unwrap()],
        common::msg::AgentStatus::Active
    );
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
    drop(allocator);
}
