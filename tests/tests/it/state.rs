//! The synchronizer stores and returns an agent's state document with its
//! revision; a put from a stale revision is a typed conflict carrying the
//! current document, and changes nothing. A put is first tried as a
//! compare-and-set on its base revision: only the stored revision (or, after
//! a deletion, the deletion's) passes that way; any other base, including
//! another document's revision, goes through the scope's policy.

use common::msg::{StateDelete, StateHistoryRequest, StatePut};
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

#[tokio::test]
async fn only_the_stored_revision_is_written_without_the_policy() {
    let sys = System::start().await;
    let a = AgentId::new("a").unwrap();
    let b = AgentId::new("b").unwrap();
    let put = |agent: &AgentId, expected_revision, doc| StatePut {
        agent_id: agent.clone(),
        expected_revision,
        doc,
        scope: Default::default(),
        clock: None,
    };
    let a1 = sys
        .client
        .state_put(&put(&a, 0, json!({"v": 1})))
        .await
        .unwrap();
    let b1 = sys
        .client
        .state_put(&put(&b, 0, json!({"v": 1})))
        .await
        .unwrap();
    assert!(a1.resolution.is_none() && b1.resolution.is_none());
    // Another document's revision is never this one's base, even when it is
    // the bucket's latest.
    let foreign = sys
        .client
        .state_put(&put(&a, b1.revision, json!({"v": 2})))
        .await
        .unwrap_err();
    assert_eq!(foreign.code, ErrorCode::Conflict);
    assert_eq!(foreign.details["current_revision"], json!(a1.revision));
    // A revision ahead of the stored one is no base either.
    let ahead = sys
        .client
        .state_put(&put(&a, b1.revision + 100, json!({"v": 2})))
        .await
        .unwrap_err();
    assert_eq!(ahead.code, ErrorCode::Conflict);
    let a2 = sys
        .client
        .state_put(&put(&a, a1.revision, json!({"v": 2})))
        .await
        .unwrap();
    assert!(a2.resolution.is_none());

    // After a deletion: the old revision is stale, 0 recreates, and so does
    // the deletion's own revision (what a watcher of the document saw last).
    sys.client
        .state_delete(&StateDelete {
            agent_id: a.clone(),
            scope: Default::default(),
            expected_revision: Some(a2.revision),
        })
        .await
        .unwrap();
    let stale = sys
        .client
        .state_put(&put(&a, a2.revision, json!({"v": 3})))
        .await
        .unwrap_err();
    assert_eq!(stale.code, ErrorCode::Conflict);
    let history = |agent: &AgentId| StateHistoryRequest {
        agent_id: agent.clone(),
        scope: Default::default(),
    };
    let h = sys.client.state_history(&history(&a)).await.unwrap();
    let deletion = h.entries.last().unwrap();
    assert!(deletion.deleted);
    let a3 = sys
        .client
        .state_put(&put(&a, deletion.revision, json!({"v": 3})))
        .await
        .unwrap();
    assert!(a3.resolution.is_none());
    sys.client
        .state_delete(&StateDelete {
            agent_id: b.clone(),
            scope: Default::default(),
            expected_revision: None,
        })
        .await
        .unwrap();
    let b2 = sys
        .client
        .state_put(&put(&b, 0, json!({"v": 2})))
        .await
        .unwrap();
    assert!(b2.resolution.is_none());

    // Every accepted put is exactly one new revision; refused ones wrote nothing.
    let revisions = |h: common::msg::StateHistory| -> Vec<(u64, bool)> {
        h.entries.iter().map(|e| (e.revision, e.deleted)).collect()
    };
    let a_history = revisions(sys.client.state_history(&history(&a)).await.unwrap());
    assert_eq!(
        a_history,
        vec![
            (a1.revision, false),
            (a2.revision, false),
            (deletion.revision, true),
            (a3.revision, false)
        ]
    );
    let b_history = revisions(sys.client.state_history(&history(&b)).await.unwrap());
    assert_eq!(b_history.len(), 3);
    assert_eq!(b_history[2], (b2.revision, false));
}
