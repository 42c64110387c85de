//! Many agents on one deployment: an agent whose assignment consumer is past
//! the server's default limit of consumers per stream (1,000 in nats-server
//! 2.15) still gets its work.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use common::msg::{FlowSpec, FlowState};
use common::FlowId;
use futures::StreamExt;
use serde_json::json;
use testkit::System;

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
