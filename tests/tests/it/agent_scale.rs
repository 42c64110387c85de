//! Many agents on one deployment: an agent whose assignment consumer is past
//! the server's default limit of consumers per stream (1,000 in nats-server
//! 2.15) still gets its work, and no task is placed on an agent that has no
//! consumer to receive it.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use common::msg::{
    AllocateRequest, FlowSpec, FlowState, Heartbeat, RegisterAgent, Requirements, TaskRef,
};
use common::{AgentId, ErrorCode, FlowId, TaskId};
use futures::StreamExt;
use serde_json::json;
use testkit::{eventually, System};

use crate::orchestrator::{cpu_task, spawn_agent, wait_finished, wait_registered};

/// The server's default limit of consumers on one stream.
const SERVER_DEFAULT_LIMIT: usize = 1000;

#[tokio::test]
async fn an_agent_past_a_thousand_assignment_consumers_gets_work() {
    let sys = System::start().await;
    let js = jetstream::new(sys.nats.clone());
    let stream = js
        .get_stream(common::nats::STREAM_ASSIGN)
        .await
        .expect("COORD_ASSIGN");
    // A thousand consumers already there, as a thousand agents would have.
    let made: Vec<_> = futures::stream::iter(0..SERVER_DEFAULT_LIMIT)
        .map(|i| {
            let stream = stream.clone();
            async move {
                stream
                    .create_consumer(consumer::pull::Config {
                        durable_name: Some(format!("filler-{i}")),
                        filter_subject: format!("coord.agents.filler{i}.assign"),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ..Default::default()
                    })
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let failed = made.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        failed,
        0,
        "filler consumers refused: {:?}",
        made.iter().find(|r| r.is_err())
    );

    let _agent = spawn_agent(&sys.nats, "past-limit", 1.0, |a| async move {
        Ok(json!(a.task_id))
    });
    wait_registered(&sys.client, "past-limit").await;
    let id = FlowId::new("past-limit").unwrap();
    let mut spec = FlowSpec::new("past-limit", vec![cpu_task("t", &[])]);
    spec.id = Some(id.clone());
    sys.client.create_flow(&spec).await.unwrap();
    let status = wait_finished(&sys.client, &id, Duration::from_secs(60)).await;
    assert_eq!(status.state, FlowState::Succeeded);
    let mut stream = stream;
    let consumers = stream.info().await.unwrap().state.consumer_count;
    assert!(consumers > SERVER_DEFAULT_LIMIT, "{consumers} consumers");
}

/// An assignments stream made by an earlier version, with the server's
/// default limit, gets the services' limit when they start.
#[tokio::test]
async fn an_earlier_assignments_stream_has_its_consumer_limit_raised() {
    let server = testkit::NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats);
    let mut old = common::nats::Stream::Assign.config(1);
    old.max_consumers = 0;
    js.create_stream(old).await.unwrap();
    let _sys = System::start_on(server).await;
    let mut stream = js.get_stream(common::nats::STREAM_ASSIGN).await.unwrap();
    let limit = stream.info().await.unwrap().config.max_consumers;
    assert_eq!(limit, common::nats::MAX_AGENT_CONSUMERS);
}

/// An agent registered and heartbeating but without an assignments
/// consumer gets no task: a flow runs on the agent that has one, and a
/// task's allocation that only it could take is refused, saying why, until
/// its consumer exists.
#[tokio::test]
async fn a_placement_never_targets_an_agent_without_a_work_path() {
    let sys = System::start().await;
    let ghost = AgentId::new("ghost").unwrap();
    sys.client
        .register_agent(&RegisterAgent {
            agent_id: ghost.clone(),
            capabilities: vec!["gpu".into()],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 100.0)].into(),
            heartbeat_interval_ms: 500,
        })
        .await
        .unwrap();
    // It stays alive for the whole test: silence would get it declared lost.
    let nats = sys.nats.clone();
    let beats = tokio::spawn({
        let ghost = ghost.clone();
        async move {
            loop {
                let beat = Heartbeat {
                    agent_id: ghost.clone(),
                    at_ms: common::now_ms(),
                    running: 0,
                };
                let body = serde_json::to_vec(&beat).unwrap();
                let _ = nats
                    .publish(common::subject::heartbeat(&ghost), body.into())
                    .await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });

    // A flow wider than the agent that can take work: every task runs there.
    let _agent = spawn_agent(
        &sys.nats,
        "real",
        1.0,
        |a| async move { Ok(json!(a.task_id)) },
    );
    wait_registered(&sys.client, "real").await;
    let id = FlowId::new("reachable").unwrap();
    let tasks = (0..4).map(|i| cpu_task(&format!("t{i}"), &[])).collect();
    let mut spec = FlowSpec::new("reachable", tasks);
    spec.id = Some(id.clone());
    sys.client.create_flow(&spec).await.unwrap();
    let status = wait_finished(&sys.client, &id, Duration::from_secs(30)).await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");
    for t in &status.tasks {
        assert_eq!(
            t.agent_id.as_ref().map(|a| a.as_str()),
            Some("real"),
            "{t:?}"
        );
    }

    // A task only the agent without a consumer could take.
    let ask = AllocateRequest {
        owner: "gpu-flow/t".into(),
        requirements: Requirements {
            resources: [("cpu".to_string(), 1.0)].into(),
            capabilities: vec!["gpu".into()],
            ..Default::default()
        },
        priority: 0,
        allocation_id: None,
        deadline_ms: None,
        task: Some(TaskRef {
            flow_id: FlowId::new("gpu-flow").unwrap(),
            task_id: TaskId::new("t").unwrap(),
        }),
        ttl_ms: None,
    };
    let refused = sys.client.allocate(&ask).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::NoCapacity, "{refused:?}");
    assert!(
        refused.message.contains("no assignments consumer") && refused.message.contains("ghost"),
        "{}",
        refused.message
    );

    // Its consumer made, as the agent would: now it may be chosen.
    let js = jetstream::new(sys.nats.clone());
    let stream = js.get_stream(common::nats::STREAM_ASSIGN).await.unwrap();
    stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(common::nats::agent_consumer(&ghost)),
            filter_subject: common::subject::assign(&ghost),
            ack_policy: consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();
    let placed = eventually(Duration::from_secs(10), "a placement on ghost", || {
        let (client, ask) = (sys.client.clone(), ask.clone());
        async move { client.allocate(&ask).await.ok() }
    })
    .await;
    assert_eq!(placed.agent_id, ghost);
    beats.abort();
}
