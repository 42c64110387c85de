//! Events external agents publish on their own subjects: stored once per
//! `{agent}.{event id}` with the identity the subject gives, checked against
//! the type's registered schema, refused with a code the agent receives
//! whether it asked for a reply or not, listed by every filter in pages, and
//! followed by subscribing to the stored subjects.

use std::time::Duration;

use common::msg::{
    AgentEvent, AgentEventPublish, AgentEventQuery, EventSchemaSet, FieldMatch, RejectReason,
    ReportRejected,
};
use common::{subject, AgentId, ErrorCode};
use futures::StreamExt;
use serde_json::{json, Value};
use testkit::{eventually, start_service, wait_for_service, NatsServer, ServiceHandle};

fn aid(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

/// A server with a synchronizer, and an operator's client.
struct Bench {
    _server: NatsServer,
    _sync: ServiceHandle,
    nats: async_nats::Client,
    client: common::Client,
}

async fn start() -> Bench {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let sync = start_service("synchronizer", server.config());
    let nats = server.connect().await;
    wait_for_service(&nats, "synchronizer").await;
    let client = common::Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    Bench {
        _server: server,
        _sync: sync,
        nats,
        client,
    }
}

fn publish(data: Value, id: Option<&str>) -> AgentEventPublish {
    AgentEventPublish {
        data,
        event_id: id.map(str::to_owned),
    }
}

/// How many events the stream holds.
async fn stored(nats: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(nats.clone());
    let mut s = js
        .get_stream(common::nats::STREAM_AGENT_EVENTS)
        .await
        .unwrap();
    s.info().await.unwrap().state.messages
}

/// The next verdict on an agent's `rejected` subscription.
async fn verdict(sub: &mut async_nats::Subscriber) -> ReportRejected {
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a verdict")
        .unwrap();
    serde_json::from_slice(&msg.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_stored_once_per_id_under_the_subjects_agent() {
    let b = start().await;
    let w1 = aid("w1");
    let first = b
        .client
        .publish_event(
            &w1,
            "doc_indexed",
            &publish(json!({"doc": "d1"}), Some("ix-1")),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            first.event_id.as_str(),
            first.agent_id.as_str(),
            first.event_type.as_str()
        ),
        ("ix-1", "w1", "doc_indexed")
    );
    assert_eq!(first.data, json!({"doc": "d1"}));

    // Sent again (say after a lost reply): stored once, answered with the first.
    let again = b
        .client
        .publish_event(
            &w1,
            "doc_indexed",
            &publish(json!({"doc": "other"}), Some("ix-1")),
        )
        .await
        .unwrap();
    assert_eq!(again, first);
    // The same id from another agent is another event.
    let other = b
        .client
        .publish_event(&aid("w2"), "doc_indexed", &publish(json!(1), Some("ix-1")))
        .await
        .unwrap();
    assert_eq!(other.agent_id, aid("w2"));
    // Without an id, each gets a fresh one.
    let a = b
        .client
        .publish_event(&w1, "docked", &AgentEventPublish::default())
        .await
        .unwrap();
    let c = b
        .client
        .publish_event(&w1, "docked", &AgentEventPublish::default())
        .await
        .unwrap();
    assert_ne!(a.event_id, c.event_id);
    assert_eq!(a.data, Value::Null);
    assert_eq!(stored(&b.nats).await, 4);

    // Stored where the subject says, with the agent's identity.
    let js = async_nats::jetstream::new(b.nats.clone());
    let s = js
        .get_stream(common::nats::STREAM_AGENT_EVENTS)
        .await
        .unwrap();
    let msg = s
        .get_last_raw_message_by_subject("coord.agent_events.doc_indexed.w1")
        .await
        .unwrap();
    assert_eq!(
        msg.headers.get("Nats-Msg-Id").map(|v| v.to_string()),
        Some("w1.ix-1".to_owned())
    );
    assert_eq!(
        serde_json::from_slice::<AgentEvent>(&msg.payload).unwrap(),
        first
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_refused_with_a_code_the_agent_receives() {
    let b = start().await;
    let w1 = aid("w1");
    b.client
        .event_schema_set(&EventSchemaSet {
            event_type: "approved".into(),
            schema: Some(json!({
                "type": "object",
                "required": ["approved"],
                "properties": {"approved": {"type": "boolean"}}
            })),
        })
        .await
        .unwrap();

    // Asked as a request: the reply is the error.
    let e = b
        .client
        .publish_event(&w1, "approved", &publish(json!({"approved": "yes"}), None))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::ValidationFailed);
    assert_eq!(e.details["violations"][0]["pointer"], "/approved");
    let raw = |subject: String, body: &str| {
        let nats = b.nats.clone();
        let body = body.to_owned();
        async move {
            let reply = nats.request(subject, body.into()).await.unwrap();
            serde_json::from_slice::<common::error::ErrorBody>(&reply.payload)
                .unwrap()
                .error
                .code
        }
    };
    let on = subject::agent_event(&w1, "approved").unwrap();
    assert_eq!(raw(on.clone(), "not json").await, ErrorCode::BadRequest);
    assert_eq!(raw(on.clone(), "").await, ErrorCode::BadRequest);
    assert_eq!(
        raw(on.clone(), r#"{"data": {}, "agent_id": "w2"}"#).await,
        ErrorCode::BadRequest
    );
    assert_eq!(raw(on.clone(), "[{}, \"id\"]").await, ErrorCode::BadRequest);
    assert_eq!(
        raw(on.clone(), r#"{"data": 1, "event_id": "a b"}"#).await,
        ErrorCode::InvalidId
    );
    assert_eq!(
        raw("coord.agents.w1.events.Approved".into(), "{}").await,
        ErrorCode::InvalidId
    );

    // Published plainly: the verdict comes on the agent's `rejected` subject.
    let mut verdicts = b.nats.subscribe(subject::rejected(&w1)).await.unwrap();
    b.nats.flush().await.unwrap();
    // Served concurrently: the verdicts may come in any order.
    for (on, body) in [
        (
            on.clone(),
            r#"{"data": {"approved": 3}, "event_id": "ap-1"}"#,
        ),
        (on.clone(), "[1]"),
        ("coord.agents.w1.events.UP".to_owned(), "{}"),
    ] {
        b.nats.publish(on, body.into()).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        let v = verdict(&mut verdicts).await;
        got.push((v.code, v.reason, v.event_type, v.event_id));
    }
    got.sort_by_key(|(code, ..)| code.as_str());
    assert_eq!(
        got,
        [
            (
                ErrorCode::BadRequest,
                RejectReason::Malformed,
                Some("approved".to_owned()),
                None
            ),
            (
                ErrorCode::InvalidId,
                RejectReason::InvalidEventType,
                Some("UP".to_owned()),
                None
            ),
            (
                ErrorCode::ValidationFailed,
                RejectReason::SchemaViolation,
                Some("approved".to_owned()),
                Some("ap-1".to_owned())
            ),
        ]
    );

    // Nothing of it was stored; a valid event, and one of a type without a
    // schema, are.
    b.nats
        .publish(on.clone(), r#"{"data": {"approved": true}}"#.into())
        .await
        .unwrap();
    b.client
        .publish_event(&w1, "unchecked", &publish(json!("anything"), None))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(10),
        "the valid events stored",
        || async { (stored(&b.nats).await == 2).then_some(()) },
    )
    .await;
    let listed = b
        .client
        .list_events(&AgentEventQuery::default())
        .await
        .unwrap();
    let types: Vec<&str> = listed
        .events
        .iter()
        .map(|r| r.event.event_type.as_str())
        .collect();
    assert_eq!(types.len(), 2);
    assert!(types.contains(&"approved") && types.contains(&"unchecked"));
    // No verdict for the accepted plain publish.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), verdicts.next())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_are_registered_read_listed_and_removed() {
    let b = start().await;
    let set = |t: &str, schema: Option<Value>| {
        let client = b.client.clone();
        let req = EventSchemaSet {
            event_type: t.to_owned(),
            schema,
        };
        async move { client.event_schema_set(&req).await }
    };
    set("approved", Some(json!({"type": "object"})))
        .await
        .unwrap();
    set("docked", Some(json!({"type": "null"}))).await.unwrap();
    let got = b.client.event_schema_get("approved").await.unwrap();
    assert_eq!(got.schema, Some(json!({"type": "object"})));
    let all = b.client.event_schema_list().await.unwrap();
    let names: Vec<&str> = all.schemas.iter().map(|s| s.event_type.as_str()).collect();
    assert_eq!(names, ["approved", "docked"]);
    assert_eq!(
        set("bad", Some(json!({"type": 12})))
            .await
            .unwrap_err()
            .code,
        ErrorCode::ValidationFailed
    );
    assert_eq!(
        set("Bad", None).await.unwrap_err().code,
        ErrorCode::InvalidId
    );
    assert_eq!(
        b.client.event_schema_get("nope").await.unwrap_err().code,
        ErrorCode::NotFound
    );
    // Removed: events of the type are accepted as they come again.
    let w1 = aid("w1");
    assert!(b
        .client
        .publish_event(&w1, "docked", &publish(json!(1), None))
        .await
        .is_err());
    set("docked", None).await.unwrap();
    assert_eq!(
        b.client.event_schema_get("docked").await.unwrap_err().code,
        ErrorCode::NotFound
    );
    b.client
        .publish_event(&w1, "docked", &publish(json!(1), None))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_listed_by_every_filter_and_in_pages() {
    let b = start().await;
    let mut sent = Vec::new();
    for (agent, t, data) in [
        ("w1", "approved", json!({"approved": true, "by": "ann"})),
        ("w2", "approved", json!({"approved": false})),
        ("w1", "docked", json!({"bay": 3})),
        ("w2", "docked", json!({"bay": 4})),
        ("w1", "approved", json!({"approved": true, "by": "bob"})),
    ] {
        let e = b
            .client
            .publish_event(&aid(agent), t, &publish(data, None))
            .await
            .unwrap();
        sent.push(e);
    }
    let list = |q: AgentEventQuery| {
        let client = b.client.clone();
        async move {
            let page = client.list_events(&q).await.unwrap();
            page.events
                .into_iter()
                .map(|r| r.event.event_id)
                .collect::<Vec<_>>()
        }
    };
    let ids =
        |idx: &[usize]| -> Vec<String> { idx.iter().map(|i| sent[*i].event_id.clone()).collect() };
    assert_eq!(
        list(AgentEventQuery::default()).await,
        ids(&[0, 1, 2, 3, 4])
    );
    assert_eq!(
        list(AgentEventQuery {
            event_type: Some("approved".into()),
            ..Default::default()
        })
        .await,
        ids(&[0, 1, 4])
    );
    assert_eq!(
        list(AgentEventQuery {
            agent_id: Some(aid("w2")),
            ..Default::default()
        })
        .await,
        ids(&[1, 3])
    );
    assert_eq!(
        list(AgentEventQuery {
            field: Some(FieldMatch {
                path: "/approved".into(),
                equals: json!(true),
            }),
            ..Default::default()
        })
        .await,
        ids(&[0, 4])
    );
    // Time range: at or after since, before until.
    let (since, until) = (sent[2].published_ms, sent[4].published_ms);
    let within: Vec<String> = sent
        .iter()
        .filter(|e| e.published_ms >= since && e.published_ms < until)
        .map(|e| e.event_id.clone())
        .collect();
    assert!(within.contains(&sent[2].event_id));
    assert_eq!(
        list(AgentEventQuery {
            since_ms: Some(since),
            until_ms: Some(until),
            ..Default::default()
        })
        .await,
        within
    );
    assert_eq!(
        list(AgentEventQuery {
            since_ms: Some(sent[4].published_ms + 1),
            ..Default::default()
        })
        .await,
        Vec::<String>::new()
    );

    // Pages of two, following `next_seq`.
    let mut from = None;
    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        let page = b
            .client
            .list_events(&AgentEventQuery {
                limit: Some(2),
                from_seq: from,
                ..Default::default()
            })
            .await
            .unwrap();
        pages += 1;
        paged.extend(page.events.into_iter().map(|r| r.event.event_id));
        match page.next_seq {
            Some(n) => from = Some(n),
            None => break,
        }
    }
    assert_eq!((paged, pages), (ids(&[0, 1, 2, 3, 4]), 3));

    // Bad queries get typed errors.
    let bad = |body: Value| {
        let client = b.client.clone();
        async move {
            client
                .request::<_, Value>(subject::AGENT_EVENTS_LIST, &body)
                .await
                .unwrap_err()
                .code
        }
    };
    assert_eq!(bad(json!({"limit": 0})).await, ErrorCode::BadRequest);
    assert_eq!(bad(json!({"limit": 5000})).await, ErrorCode::BadRequest);
    assert_eq!(
        bad(json!({"event_type": "A.B"})).await,
        ErrorCode::InvalidId
    );
    assert_eq!(bad(json!({"agent_id": "a b"})).await, ErrorCode::InvalidId);
    assert_eq!(
        bad(json!({"match": {"path": "approved", "equals": true}})).await,
        ErrorCode::BadRequest
    );
    assert_eq!(bad(json!({"typo": 1})).await, ErrorCode::BadRequest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_events_can_be_followed_by_subscribing() {
    let b = start().await;
    let mut watch = b
        .nats
        .subscribe(
            subject::agent_events_filter(Some("approved"), None)
                .unwrap()
                .to_string(),
        )
        .await
        .unwrap();
    b.nats.flush().await.unwrap();
    let w1 = aid("w1");
    b.client
        .publish_event(&w1, "docked", &publish(json!(1), None))
        .await
        .unwrap();
    let sent = b
        .client
        .publish_event(&w1, "approved", &publish(json!({"ok": true}), Some("a-1")))
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(msg.subject.as_str(), "coord.agent_events.approved.w1");
    assert_eq!(
        serde_json::from_slice::<AgentEvent>(&msg.payload).unwrap(),
        sent
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_counts_accepted_events_per_type_once_each() {
    let b = start().await;
    let _monitor = start_service("monitor", b._server.config());
    wait_for_service(&b.nats, "monitor").await;
    // The monitor subscribes as it starts: wait until it sees traffic.
    let w1 = aid("w1");
    eventually(Duration::from_secs(20), "the monitor counting", || async {
        b.client
            .publish_event(&w1, "warmup", &publish(json!(1), None))
            .await
            .unwrap();
        let m = b.client.metrics().await.ok()?;
        m.agent_events_by_type.contains_key("warmup").then_some(())
    })
    .await;
    for (t, id) in [
        ("approved", "a1"),
        ("approved", "a1"),
        ("approved", "a2"),
        ("docked", "d1"),
    ] {
        b.client
            .publish_event(&w1, t, &publish(json!(1), Some(id)))
            .await
            .unwrap();
    }
    // Published one after another, seen in that order: once the last is
    // counted, so is every one before it.
    let m = eventually(Duration::from_secs(20), "docked counted", || async {
        let m = b.client.metrics().await.ok()?;
        m.agent_events_by_type.contains_key("docked").then_some(m)
    })
    .await;
    assert_eq!(m.agent_events_by_type.get("approved"), Some(&2), "{m:?}");
    assert_eq!(m.agent_events_by_type.get("docked"), Some(&1));
}
