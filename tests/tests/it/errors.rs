//! Bad input gets a typed error reply (micro-service error headers plus the JSON
//! body with a documented code), the service stays up, and no state changes.

use common::msg::{AllocateRequest, FlowListRequest, Requirements};
use common::{subject, ErrorCode};
use serde_json::{json, Value};
use testkit::System;

/// Sends raw bytes and returns (Nats-Service-Error-Code header, JSON body).
async fn raw(sys: &System, subject: &str, body: &[u8]) -> (Option<String>, Value) {
    let reply = sys
        .nats
        .request(subject.to_owned(), body.to_vec().into())
        .await
        .unwrap();
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
        .map(|v| v.as_str().to_owned());
    (code, serde_json::from_slice(&reply.payload).unwrap())
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("<no error>")
}

#[tokio::test]
async fn malformed_requests_get_typed_errors_and_change_nothing() {
    let sys = System::start().await;

    let (header, body) = raw(&sys, subject::FLOW_CREATE, b"this is not json").await;
    assert_eq!(header.as_deref(), Some("400"));
    assert_eq!(code(&body), "bad_request");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());

    let (_, body) = raw(
        &sys,
        subject::FLOW_CREATE,
        json!({"tasks": [{"id": "a b"}]}).to_string().as_bytes(),
    )
    .await;
    assert_eq!(code(&body), "invalid_id");
    let (_, body) = raw(&sys, subject::FLOW_STATUS, br#"{"flow_id":"x.>"}"#).await;
    assert_eq!(code(&body), "invalid_id");

    // A typo in a human-written spec is named, not ignored.
    let (_, body) = raw(
        &sys,
        subject::FLOW_CREATE,
        json!({"tasks": [{"id": "a", "dependson": ["b"]}]})
            .to_string()
            .as_bytes(),
    )
    .await;
    assert_eq!(code(&body), "bad_request");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("dependson"));

    // Every validation problem at once, the cycle with its path.
    let spec = json!({"tasks": [
        {"id": "x", "depends_on": ["z"]}, {"id": "y", "depends_on": ["x"]}, {"id": "z", "depends_on": ["y"]},
        {"id": "d"}, {"id": "d", "depends_on": ["ghost"]}
    ]});
    let (header, body) = raw(&sys, subject::FLOW_CREATE, spec.to_string().as_bytes()).await;
    assert_eq!(header.as_deref(), Some("422"));
    assert_eq!(code(&body), "validation_failed");
    let problems = body["error"]["details"]["problems"].as_array().unwrap();
    let codes: Vec<&str> = problems
        .iter()
        .map(|p| p["code"].as_str().unwrap())
        .collect();
    assert!(
        codes.contains(&"cycle")
            && codes.contains(&"duplicate_task")
            && codes.contains(&"unknown_dependency"),
        "{codes:?}"
    );
    let cycle = problems.iter().find(|p| p["code"] == "cycle").unwrap();
    assert_eq!(cycle["path"], json!(["x", "y", "z", "x"]));

    let (_, body) = raw(&sys, subject::FLOW_STATUS, br#"{"flow_id":"nope"}"#).await;
    assert_eq!(code(&body), "not_found");

    let negative = AllocateRequest {
        owner: "me".into(),
        requirements: Requirements {
            resources: [("cpu".to_string(), -2.0)].into(),
            ..Default::default()
        },
        priority: 0,
        allocation_id: None,
        deadline_ms: None,
        task: None,
        ttl_ms: None,
    };
    assert_eq!(
        sys.client.allocate(&negative).await.unwrap_err().code,
        ErrorCode::ValidationFailed
    );
    let (_, body) = raw(
        &sys,
        subject::ALLOCATE,
        br#"{"owner":"me","requirements":{"resources":{"cpu":"lots"}}}"#,
    )
    .await;
    assert_eq!(code(&body), "bad_request");
    let nothing = AllocateRequest {
        owner: "me".into(),
        requirements: Requirements::default(),
        priority: 0,
        allocation_id: None,
        deadline_ms: None,
        task: None,
        ttl_ms: None,
    };
    let err = sys.client.allocate(&nothing).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NoCapacity);
    assert_eq!(err.message, "no agent is registered");

    let (_, body) = raw(&sys, subject::STATE_PUT, br#"{"agent_id":"a","doc":{}}"#).await;
    assert_eq!(code(&body), "bad_request", "expected_revision is required");

    let big = vec![b'x'; 900 * 1024];
    let (_, body) = raw(&sys, subject::FLOW_CREATE, &big).await;
    assert_eq!(code(&body), "bad_request");

    // Still up, and nothing was stored.
    let flows = sys
        .client
        .list_flows(&FlowListRequest::default())
        .await
        .unwrap();
    assert!(flows.flows.is_empty(), "{flows:?}");
    let cap = sys.client.capacity(&Default::default()).await.unwrap();
    assert!(cap.agents.is_empty());
}
