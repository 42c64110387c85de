//! Agent events on the isolating server: an agent publishes events on its
//! own subject and hears the verdict, but the server refuses it another
//! agent's event subject, so nothing is ever stored as coming from an agent
//! that did not send it (read back as the operator).

use std::time::Duration;

use common::msg::{AgentEventPublish, AgentEventQuery};
use common::{subject, AgentId, Client};
use serde_json::json;
use testkit::{start_service, wait_for_service};

use super::{agent_login, isolated_server, login, refused, watched, OPERATOR, SERVICE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_publishes_its_own_events_and_cannot_publish_as_another() {
    common::telemetry::init_for_tests();
    let (a, b) = (AgentId::new("ev-a").unwrap(), AgentId::new("ev-b").unwrap());
    let server = isolated_server(&[a.as_str(), b.as_str()]);
    let _sync = start_service("synchronizer", login(&server, SERVICE));
    let operator = common::nats::connect(&login(&server, OPERATOR), "operator")
        .await
        .unwrap();
    wait_for_service(&operator, "synchronizer").await;
    let ops = Client::new(operator.clone()).with_timeout(Duration::from_secs(10));

    // A, logged in as itself: its own event is stored, the reply reaches it.
    let a_client = Client::new(
        common::nats::connect(&agent_login(&server, &a), "ev-a")
            .await
            .unwrap(),
    )
    .with_timeout(Duration::from_secs(10));
    let event = |id: &str| AgentEventPublish {
        data: json!({"approved": true}),
        event_id: Some(id.to_owned()),
    };
    let mine = a_client
        .publish_event(&a, "approved", &event("a-1"))
        .await
        .unwrap();
    assert_eq!(mine.agent_id, a);

    // On B's subject, as a plain publish and as a request: the server refuses both.
    let (spy, mut errors) = watched(&agent_login(&server, &a)).await;
    let as_b = subject::agent_event(&b, "approved").unwrap();
    let body = serde_json::to_vec(&event("forged")).unwrap();
    spy.publish(as_b.clone(), body.clone().into())
        .await
        .unwrap();
    spy.flush().await.unwrap();
    refused(&mut errors, "a plain publish as B", &as_b).await;
    assert!(a_client
        .clone()
        .with_timeout(Duration::from_secs(1))
        .publish_event(&b, "approved", &event("forged-2"))
        .await
        .is_err());

    // After one more of A's own, read back as the operator: only A's are stored.
    a_client
        .publish_event(&a, "approved", &event("a-2"))
        .await
        .unwrap();
    let listed = ops.list_events(&AgentEventQuery::default()).await.unwrap();
    let stored: Vec<(String, String)> = listed
        .events
        .iter()
        .map(|r| (r.event.agent_id.to_string(), r.event.event_id.clone()))
        .collect();
    assert_eq!(
        stored,
        [("ev-a".into(), "a-1".into()), ("ev-a".into(), "a-2".into())]
    );
    let by_b = ops
        .list_events(&AgentEventQuery {
            agent_id: Some(b.clone()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(by_b.events.is_empty(), "{by_b:?}");
}
