//! The synchronizer stores and returns an agent's state document with its
//! revision; a put from a stale revision is a typed conflict carrying the
//! current document, and changes nothing.

use common::msg::StatePut;
use common::{AgentId, ErrorCode};
use serde_json::json;
use testkit::System;

#[tokio::test]
async fn put_with_expected_revision_and_get() {
    let sys = System::start().await;
    let agent = AgentId::new("planner-1").unwrap();
    let missing = sys.client.state_get(&agent).await.unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound);

    let first = sys
        .client
        .state_put(&StatePut {
            agent_id: agent.clone(),
            expected_revision: 0,
            doc: json!({"plan": 1}),
            scope: Default::default(),
            clock: None,
        })
        .await
        .unwrap();
    assert!(first.revision > 0);
    let got = sys.client.state_get(&agent).await.unwrap();
    assert_eq!(
        (got.revision, got.doc.clone()),
        (first.revision, json!({"plan": 1}))
    );

    let second = sys
        .client
        .state_put(&StatePut {
            agent_id: agent.clone(),
            expected_revision: first.revision,
            doc: json!({"plan": 2}),
            scope: Default::default(),
            clock: None,
        })
        .await
        .unwrap();
    assert!(second.revision > first.revision);

    // A writer still on the first revision loses, and learns what is there now.
    let stale = sys
        .client
        .state_put(&StatePut {
            agent_id: agent.clone(),
            expected_revision: first.revision,
            doc: json!({"plan": 99}),
            scope: Default::default(),
            clock: None,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code, ErrorCode::Conflict);
    assert_eq!(stale.details["current_revision"], json!(second.revision));
    assert_eq!(stale.details["current"], json!({"plan": 2}));
    // Creating again over an existing document is a conflict too.
    let recreate = sys
        .client
        .state_put(&StatePut {
            agent_id: agent.clone(),
            expected_revision: 0,
            doc: json!({}),
            scope: Default::default(),
            clock: None,
        })
        .await
        .unwrap_err();
    assert_eq!(recreate.code, ErrorCode::Conflict);

    let now = sys.client.state_get(&agent).await.unwrap();
    assert_eq!(
        (now.revision, now.doc),
        (second.revision, json!({"plan": 2}))
    );
}
