//! A malicious agent on the isolating server, logged in as itself, sends a
//! request on its own subject (`coord.agents.{id}.state.get`) with the reply
//! subject set to somewhere it may not publish: another agent's state, a flow
//! or the agent registry in their KV buckets, another agent's subjects, an
//! event subject. The server checks only the subject a client publishes on,
//! not the reply subject it names, and the services may publish anywhere: so
//! the services must not answer there.
//!
//! On the isolating server the reply travels back into the agent's own
//! account, and services answer only inbox (or `_R_.…`) reply subjects.
//!
//! Each test watches every such subject as the operator before the attack,
//! waits until the synchronizer has counted the request (or fails at once if
//! a reply shows up), then reads back as the operator everything the reply
//! would have changed. The last test follows the allocator's probe of an
//! agent's assignment subject, whose reply subject is in the services'
//! account.

use std::time::Duration;

use async_nats::jetstream;
use common::msg::{FlowListRequest, FlowState, FlowStatus, StateDoc};
use common::nats::{KV_AGENTS, KV_FLOWS, KV_STATE, STREAM_EVENTS, STREAM_REPORTS};
use common::{subject, AgentId, Client};
use coordkit::demo;
use futures::StreamExt;
use serde_json::json;
use testkit::{eventually, NatsServer, ServiceHandle};

use super::{
    agent_login, agent_revision, isolated_server, login, put, refused, registration,
    serve_isolated, watched, SERVICE,
};

/// The synchronizer's endpoint for `coord.agents.*.state.get`, as `$SRV.STATS` names it.
const STATE_GET_ENDPOINT: &str = "agents-id-state-get";
/// An event subject no service publishes on.
const INJECTED_EVENT: &str = "coord.events.injected";

/// Two agents on the isolating server: B registered with a state document of
/// its own, A with its own document (the content a reply would carry), and a
/// flow, cancelled so that nothing moves it any more.
struct Scene {
    _server: NatsServer,
    services: Vec<ServiceHandle>,
    operator: async_nats::Client,
    ops: Client,
    a: AgentId,
    b: AgentId,
    a_nats: async_nats::Client,
    flow: FlowStatus,
}

impl Scene {
    async fn new() -> Scene {
        let (a, b) = (
            AgentId::new("atk-a").unwrap(),
            AgentId::new("atk-b").unwrap(),
        );
        let server = isolated_server(&[a.as_str(), b.as_str()]);
        let (services, operator, ops) = serve_isolated(&server).await;
        let b_client = Client::new(
            common::nats::connect(&agent_login(&server, &b), "atk-b")
                .await
                .unwrap(),
        );
        b_client.register_agent(&registration(&b)).await.unwrap();
        b_client
            .state_put(&put(&b, 0, json!({"owner": "b"})))
            .await
            .unwrap();
        let a_nats = common::nats::connect(&agent_login(&server, &a), "atk-a")
            .await
            .unwrap();
        Client::new(a_nats.clone())
            .state_put(&put(&a, 0, json!({"owner": "a"})))
            .await
            .unwrap();
        let created = ops.create_flow(&demo::demo_flow().unwrap()).await.unwrap();
        ops.cancel_flow(&created.flow_id).await.unwrap();
        // The cancel's events leave the flow's outbox with one more write:
        // after it, nothing writes the flow's record again.
        let kv = jetstream::new(operator.clone())
            .get_key_value(KV_FLOWS)
            .await
            .unwrap();
        eventually(
            Duration::from_secs(20),
            "the flow's outbox emptied",
            || async {
                let (_, _, stored) = orchestrator::store::read(&kv, &created.flow_id)
                    .await
                    .ok()??;
                stored.kept.outbox.is_empty().then_some(())
            },
        )
        .await;
        let flow = ops.flow_status(&created.flow_id).await.unwrap();
        assert_eq!(flow.state, FlowState::Cancelled);
        Scene {
            _server: server,
            services,
            operator,
            ops,
            a,
            b,
            a_nats,
            flow,
        }
    }

    /// Every subject the attacks aim a reply at.
    fn targets(&self) -> Vec<String> {
        let b = &self.b;
        vec![
            format!("$KV.{KV_STATE}.default.{b}"),
            format!("$KV.{KV_FLOWS}.{}", self.flow.flow_id),
            format!("$KV.{KV_AGENTS}.{b}"),
            subject::heartbeat(b),
            subject::report(b),
            subject::cancel(b),
            subject::sync_notice(b),
            INJECTED_EVENT.to_owned(),
        ]
    }

    /// What a reply on any target would change, read as the operator.
    async fn snapshot(&self) -> Snapshot {
        let js = jetstream::new(self.operator.clone());
        let b_doc = self.ops.state_get(&self.b).await.unwrap();
        let flow = self.ops.flow_status(&self.flow.flow_id).await.unwrap();
        let listed = self
            .ops
            .list_flows(&FlowListRequest::default())
            .await
            .unwrap()
            .flows
            .into_iter()
            .find(|f| f.flow_id == self.flow.flow_id)
            .map(|f| f.state);
        let agents = js.get_key_value(KV_AGENTS).await.unwrap();
        let b_listed = agents
            .keys()
            .await
            .unwrap()
            .filter_map(|k| async move { k.ok() })
            .any(|k| async move { k == self.b.as_str() })
            .await;
        // What the allocator heard last from `b` (its beats are not stored).
        let b_beat = self
            .ops
            .capacity(&Default::default())
            .await
            .unwrap()
            .last_heartbeat_ms
            .get(&self.b)
            .copied();
        Snapshot {
            b_doc: (b_doc.revision, b_doc.doc),
            flow: (flow.state, flow.revision),
            listed,
            b_registered: (b_listed, agent_revision(&self.operator, &self.b).await),
            b_beat,
            b_reports: last_on(&js, STREAM_REPORTS, &subject::report(&self.b)).await,
            injected: last_on(&js, STREAM_EVENTS, INJECTED_EVENT).await,
        }
    }

    /// How many requests on `coord.agents.*.state.get` the synchronizer has
    /// received (0 while it counts none). On the isolating server the reply
    /// subject A names reaches the synchronizer as a `_R_.…` subject that the
    /// server carries back into A's account, so the request is answered
    /// there; a server without accounts hands over A's subject as it is and
    /// the synchronizer drops the request (counted as `refused_replies`).
    async fn handled(&self) -> u64 {
        let stats = self
            .operator
            .request(format!("{}.synchronizer", subject::SRV_STATS), "".into())
            .await
            .unwrap();
        let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == STATE_GET_ENDPOINT)
            .and_then(|e| e["num_requests"].as_u64())
            .unwrap_or(0)
    }

    async fn stop(self) {
        for s in self.services {
            s.stop().await.unwrap();
        }
    }
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    /// B's state document: revision and content.
    b_doc: (u64, serde_json::Value),
    /// The flow's state and revision.
    flow: (FlowState, u64),
    /// The flow's state in the listing.
    listed: Option<FlowState>,
    /// B among the agents' keys, and its record's revision.
    b_registered: (bool, u64),
    /// When the allocator last heard B's heartbeat.
    b_beat: Option<u64>,
    /// The sequence of the last report stored on B's report subject.
    b_reports: Option<u64>,
    /// The sequence of the last event stored on the injected subject.
    injected: Option<u64>,
}

/// The stream sequence of the last message `stream` holds on `subject`.
async fn last_on(js: &jetstream::Context, stream: &str, subject: &str) -> Option<u64> {
    let stream = js.get_stream(stream).await.unwrap();
    stream
        .get_last_raw_message_by_subject(subject)
        .await
        .ok()
        .map(|m| m.sequence)
}

/// A asks for its own state on its own subject, with the reply aimed at the
/// target `aim` picks: no reply may be published there and nothing may change.
async fn a_reply_aimed_at(aim: fn(&Scene) -> String) {
    common::telemetry::init_for_tests();
    let scene = Scene::new().await;
    let target = aim(&scene);
    let mut watch = futures::stream::SelectAll::new();
    for t in scene.targets() {
        watch.push(scene.operator.subscribe(t).await.unwrap());
    }
    scene.operator.flush().await.unwrap();
    let before = scene.snapshot().await;
    let handled_before = scene.handled().await;

    scene
        .a_nats
        .publish_with_reply(
            subject::agent_state_get(&scene.a),
            target.clone(),
            json!({"agent_id": scene.a}).to_string().into(),
        )
        .await
        .unwrap();
    scene.a_nats.flush().await.unwrap();

    // A reply on any watched subject fails the test as soon as it arrives.
    let counted = eventually(Duration::from_secs(10), "the request counted", || async {
        (scene.handled().await > handled_before).then_some(())
    });
    tokio::select! {
        () = counted => {}
        Some(m) = watch.next() => panic!(
            "a reply aimed at {target} was published on {}: {:?}",
            m.subject, m.payload
        ),
    }
    // The window gives a wrongly sent reply time to show.
    if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), watch.next()).await {
        panic!(
            "a reply aimed at {target} was published on {}: {:?}",
            m.subject, m.payload
        );
    }

    let after = scene.snapshot().await;
    assert_eq!(after, before, "a reply aimed at {target} changed something");
    assert_eq!(after.b_doc.1, json!({"owner": "b"}));
    assert_eq!(after.listed, Some(FlowState::Cancelled));
    assert!(after.b_registered.0, "B is still among the agents");
    assert_eq!((after.b_reports, after.injected), (None, None));

    // A's own request, with its own inbox, is answered as ever.
    let mine: StateDoc = Client::new(scene.a_nats.clone())
        .state_get(&scene.a)
        .await
        .unwrap();
    assert_eq!(mine.doc, json!({"owner": "a"}));
    scene.stop().await;
}

#[tokio::test]
async fn a_reply_aimed_at_another_agents_state_is_not_sent() {
    a_reply_aimed_at(|s| format!("$KV.{KV_STATE}.default.{}", s.b)).await;
}

#[tokio::test]
async fn a_reply_aimed_at_a_flow_is_not_sent() {
    a_reply_aimed_at(|s| format!("$KV.{KV_FLOWS}.{}", s.flow.flow_id)).await;
}

#[tokio::test]
async fn a_reply_aimed_at_another_agents_registration_is_not_sent() {
    a_reply_aimed_at(|s| format!("$KV.{KV_AGENTS}.{}", s.b)).await;
}

#[tokio::test]
async fn a_reply_aimed_at_another_agents_heartbeat_is_not_sent() {
    a_reply_aimed_at(|s| subject::heartbeat(&s.b)).await;
}

#[tokio::test]
async fn a_reply_aimed_at_another_agents_report_is_not_sent() {
    a_reply_aimed_at(|s| subject::report(&s.b)).await;
}

#[tokio::test]
async fn a_reply_aimed_at_another_agents_cancel_notices_is_not_sent() {
    a_reply_aimed_at(|s| subject::cancel(&s.b)).await;
}

#[tokio::test]
async fn a_reply_aimed_at_another_agents_sync_notices_is_not_sent() {
    a_reply_aimed_at(|s| subject::sync_notice(&s.b)).await;
}

#[tokio::test]
async fn a_reply_aimed_at_an_event_subject_is_not_sent() {
    a_reply_aimed_at(|_| INJECTED_EVENT.to_owned()).await;
}

/// The services' own login may not publish what only agents send, so no
/// message reflected by a service can pass for an agent's heartbeat, report,
/// acknowledgement or request.
#[tokio::test]
async fn the_services_login_cannot_publish_what_only_agents_send() {
    let b = AgentId::new("atk-b").unwrap();
    let server = isolated_server(&[b.as_str()]);
    let mut cfg = login(&server, SERVICE);
    cfg.nats_inbox_prefix = Some("_INBOX".to_owned());
    let (service, mut errors) = watched(&cfg).await;
    for subj in [
        subject::heartbeat(&b),
        subject::report(&b),
        subject::sync_ack(&b),
        subject::agent_leave(&b),
        subject::agent_register(&b),
        subject::agent_deregister(&b),
        subject::agent_state_put(&b),
        subject::agent_state_delete(&b),
    ] {
        service.publish(subj.clone(), "{}".into()).await.unwrap();
        refused(&mut errors, "the services' login", &subj).await;
    }
}

/// The allocator's probe of an agent's assignment subject (an empty message
/// with a reply subject) crosses into the agent's account through the
/// stream import: the agent sees it, and the server's "no responders" for a
/// silent agent reaches the allocator. The reply subject it carries is the
/// allocator's, in the services' account: an agent publishing there is
/// refused, so a probe gives an agent no way to answer into that account.
#[tokio::test]
async fn a_probe_reaches_the_agent_and_its_reply_subject_does_not() {
    common::telemetry::init_for_tests();
    let scene = Scene::new().await;
    let mut probes = scene
        .a_nats
        .subscribe(subject::assign(&scene.a))
        .await
        .unwrap();
    scene.a_nats.flush().await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(subject::PROBE_HEADER, "1");
    // As the allocator sends it, from the services' account; again until it
    // arrives (the import's interest reaches the services' account after the
    // agent's subscription is in).
    let inbox = scene.operator.new_inbox();
    let mut answers = scene.operator.subscribe(inbox.clone()).await.unwrap();
    let probe = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            scene
                .operator
                .publish_with_reply_and_headers(
                    subject::assign(&scene.a),
                    inbox.clone(),
                    headers.clone(),
                    "".into(),
                )
                .await
                .unwrap();
            if let Ok(got) = tokio::time::timeout(Duration::from_millis(200), probes.next()).await {
                break got.unwrap();
            }
        }
    })
    .await
    .expect("the probe reaches the agent");
    // The probes sent before the interest arrived were answered "no
    // responders": not what is looked for below.
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), answers.next()).await {
        assert_eq!(
            m.status,
            Some(async_nats::StatusCode::NO_RESPONDERS),
            "{m:?}"
        );
    }
    assert!(probe.payload.is_empty(), "{probe:?}");
    // B does not listen: the server answers "no responders" for it.
    let inbox = scene.operator.new_inbox();
    let mut silent = scene.operator.subscribe(inbox.clone()).await.unwrap();
    scene
        .operator
        .publish_with_reply(subject::assign(&scene.b), inbox, "".into())
        .await
        .unwrap();
    let none = tokio::time::timeout(Duration::from_secs(10), silent.next())
        .await
        .expect("no responders is answered")
        .unwrap();
    assert_eq!(
        none.status,
        Some(async_nats::StatusCode::NO_RESPONDERS),
        "{none:?}"
    );
    // The agent answering the probe's reply subject reaches nobody.
    if let Some(reply) = probe.reply.clone() {
        scene.a_nats.publish(reply, "forged".into()).await.unwrap();
        scene.a_nats.flush().await.unwrap();
        let got = tokio::time::timeout(Duration::from_millis(500), answers.next()).await;
        assert!(
            got.is_err(),
            "an agent's answer reached the services: {got:?}"
        );
    }
    scene.stop().await;
}
