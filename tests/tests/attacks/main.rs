//! The attack suite: an agent that tries to act as someone else, on the
//! isolating deployment as the docs describe it (`deploy/nats-auth.conf` with
//! an account per agent from `deploy/agent-user.sh`, `testkit::isolated`).
//! Every attempt asserts both the refusal and, read back as the operator,
//! that no state changed.
//!
//! Here: direct publishes and subscribes outside the agent's permissions
//! (another agent's assignments by core subject, durable consumer or inbox,
//! its reports, registration and state; `$JS.API`, `$KV`, `$SRV`
//! impersonation, operator endpoints; logins without or with another agent's
//! password), requests on the agent's own subjects that name another agent,
//! and reports for another agent's lease (fencing, on an open server too).
//! `replies`: replies aimed by an agent at subjects it may not publish on,
//! whether a service or JetStream would send them. `events`: agent events
//! published as another agent. `limits`: one agent's floods of heartbeats,
//! state writes and scopes.

// Test helpers fail fast, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod events;
mod limits;
mod replies;

use std::time::Duration;

use common::config::NatsConfig;
use common::msg::{
    AgentInfo, DeregisterAgent, Event, EventKind, FlowState, RegisterAgent, StateDelete,
    StateDeleted, StateDoc, StateGet, StateHistory, StateHistoryRequest, StatePut,
};
use common::{subject, AgentId, Client, ErrorCode};
use coordkit::{agent, demo};
use futures::StreamExt;
use serde_json::json;
use testkit::isolated::{
    agent_login, isolated_server, login, password, serve_isolated, OPERATOR, SERVICE,
};
use testkit::{eventually, System};
use tokio::sync::mpsc;

/// A connection as `cfg` says that hands over every error the server sends it.
async fn watched(cfg: &NatsConfig) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(
        cfg.nats_user.clone().unwrap(),
        cfg.nats_password.clone().unwrap(),
    )
    .custom_inbox_prefix(cfg.nats_inbox_prefix.clone().unwrap())
    .event_callback(move |event| {
        let tx = tx.clone();
        async move {
            if let async_nats::Event::ServerError(e) = event {
                let _ = tx.send(e.to_string());
            }
        }
    })
    .connect(&cfg.nats_url)
    .await
    .expect("agent connects with its password");
    (client, rx)
}

fn registration(agent: &AgentId) -> RegisterAgent {
    RegisterAgent {
        agent_id: agent.clone(),
        capabilities: vec![],
        labels: Default::default(),
        capacity: [("cpu".to_string(), 1.0)].into(),
        // Long enough that no sweep declares it lost while the test runs.
        heartbeat_interval_ms: 600_000,
    }
}

fn put(agent: &AgentId, expected_revision: u64, doc: serde_json::Value) -> StatePut {
    StatePut {
        agent_id: agent.clone(),
        expected_revision,
        doc,
        scope: Default::default(),
        clock: None,
    }
}

/// The revision of `agent`'s record in the agents bucket: any registration,
/// deregistration or booking moves it.
async fn agent_revision(nats: &async_nats::Client, agent: &AgentId) -> u64 {
    let agents = async_nats::jetstream::new(nats.clone())
        .get_key_value(common::nats::KV_AGENTS)
        .await
        .unwrap();
    agents
        .entry(agent.as_str())
        .await
        .unwrap()
        .expect("the agent is registered")
        .revision
}

/// Requests on `me`'s own subjects whose bodies name `other`: every one is
/// refused by the service with `forbidden`.
async fn acting_for_another_is_forbidden(
    client: &Client,
    me: &AgentId,
    other: &AgentId,
    other_revision: u64,
) {
    let results: Vec<(&str, Result<(), common::Error>)> = vec![
        (
            "put",
            client
                .request::<_, StateDoc>(
                    &subject::agent_state_put(me),
                    &put(other, other_revision, json!({"owner": "intruder"})),
                )
                .await
                .map(drop),
        ),
        (
            "delete",
            client
                .request::<_, StateDeleted>(
                    &subject::agent_state_delete(me),
                    &StateDelete {
                        agent_id: other.clone(),
                        scope: Default::default(),
                        expected_revision: None,
                    },
                )
                .await
                .map(drop),
        ),
        (
            "get",
            client
                .request::<_, StateDoc>(
                    &subject::agent_state_get(me),
                    &StateGet {
                        agent_id: other.clone(),
                        scope: Default::default(),
                        revision: None,
                    },
                )
                .await
                .map(drop),
        ),
        (
            "history",
            client
                .request::<_, StateHistory>(
                    &subject::agent_state_history(me),
                    &StateHistoryRequest {
                        agent_id: other.clone(),
                        scope: Default::default(),
                    },
                )
                .await
                .map(drop),
        ),
        (
            "register",
            client
                .request::<_, AgentInfo>(&subject::agent_register(me), &registration(other))
                .await
                .map(drop),
        ),
        (
            "deregister",
            client
                .request::<_, AgentInfo>(
                    &subject::agent_deregister(me),
                    &DeregisterAgent {
                        agent_id: other.clone(),
                    },
                )
                .await
                .map(drop),
        ),
    ];
    for (what, result) in results {
        let err = result.expect_err(what);
        assert_eq!(err.code, ErrorCode::Forbidden, "{what}: {err}");
    }
}

/// Waits for the server's permissions violation naming `subject`.
async fn refused(errors: &mut mpsc::UnboundedReceiver<String>, what: &str, subject: &str) {
    let quoted = format!("\"{subject}\"");
    let seen = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(e) = errors.recv().await {
            if e.contains("Permissions Violation") && e.contains(&quoted) {
                return Some(e);
            }
        }
        None
    })
    .await;
    assert!(
        matches!(seen, Ok(Some(_))),
        "{what}: the server did not refuse {subject}"
    );
}

#[tokio::test]
async fn an_agent_runs_as_itself_and_cannot_touch_another_agents_work() {
    common::telemetry::init_for_tests();
    let (a, b) = (
        AgentId::new("iso-a").unwrap(),
        AgentId::new("iso-b").unwrap(),
    );
    let server = isolated_server(&[a.as_str(), b.as_str()]);
    let (services, operator, ops) = serve_isolated(&server).await;

    // A, through the agent runtime on its own login, runs a whole flow.
    let a_nats = common::nats::connect(&agent_login(&server, &a), "iso-a")
        .await
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = tokio::spawn(demo::run_echo_agent(
        a_nats.clone(),
        a.clone(),
        Duration::from_millis(10),
        async {
            let _ = stopped.await;
        },
    ));
    let created = ops.create_flow(&demo::demo_flow().unwrap()).await.unwrap();
    let status = eventually(Duration::from_secs(30), "flow done", || async {
        let s = ops.flow_status(&created.flow_id).await.ok()?;
        (s.state != FlowState::Running).then_some(s)
    })
    .await;
    assert_eq!(status.state, FlowState::Succeeded, "{status:?}");
    assert!(status.tasks.iter().all(|t| t.agent_id.as_ref() == Some(&a)));

    // A keeps its own state through the synchronizer.
    let a_client = Client::new(a_nats.clone()).with_timeout(Duration::from_secs(10));
    let mine = a_client
        .state_put(&put(&a, 0, json!({"step": 1})))
        .await
        .unwrap();
    assert_eq!(a_client.state_get(&a).await.unwrap().doc, mine.doc);

    // B, registered and with its state, written by B.
    let b_client = Client::new(
        common::nats::connect(&agent_login(&server, &b), "iso-b")
            .await
            .unwrap(),
    );
    b_client.register_agent(&registration(&b)).await.unwrap();
    let b_doc = b_client
        .state_put(&put(&b, 0, json!({"owner": "b"})))
        .await
        .unwrap();
    let b_registered = agent_revision(&operator, &b).await;

    // Everything A might try against B, each refused by the server.
    let (spy, mut errors) = watched(&agent_login(&server, &a)).await;
    let b_inbox = format!("{}.>", agent::inbox_prefix(&b));
    for (what, subj) in [
        ("B's assignments", subject::assign(&b)),
        ("B's inbox, where its replies arrive", b_inbox),
        ("every inbox", "_INBOX.>".to_owned()),
        ("B's cancel notices", subject::cancel(&b)),
        ("B's sync notices", subject::sync_notice(&b)),
        (
            "the services' pings",
            format!("{}.orchestrator", subject::SRV_PING),
        ),
    ] {
        let _sub = spy.subscribe(subj.clone()).await.unwrap();
        refused(&mut errors, what, &subj).await;
    }
    // Nor may A answer requests as a service would, in its queue group.
    for subj in [subject::FLOW_CREATE, subject::ALLOCATE, subject::STATE_PUT] {
        let _sub = spy
            .queue_subscribe(subj.to_owned(), "orchestrator".to_owned())
            .await
            .unwrap();
        refused(&mut errors, "a service's queue group", subj).await;
    }
    let report = json!({
        "flow_id": created.flow_id, "task_id": "a", "attempt": 1, "agent_id": b,
        "type": "completed", "output": {"forged": true}
    })
    .to_string();
    let forged_put =
        serde_json::to_string(&put(&b, b_doc.revision, json!({"owner": "a"}))).unwrap();
    let naming_b = json!({"agent_id": b}).to_string();
    let forged_registration = serde_json::to_string(&registration(&b)).unwrap();
    for (what, subj, body) in [
        // No JetStream API at all: an agent's reports are publishes on
        // its own subject, stored by the services' account.
        (
            "the JetStream API",
            "$JS.API.INFO".to_owned(),
            String::new(),
        ),
        (
            "a consumer on the reports stream",
            format!("$JS.API.CONSUMER.CREATE.{}", common::nats::STREAM_REPORTS),
            String::new(),
        ),
        (
            "reading the agents' bucket directly",
            "$JS.API.DIRECT.GET.KV_coord_agents".to_owned(),
            String::new(),
        ),
        ("an assignment to B", subject::assign(&b), String::new()),
        ("a report on B's subject", subject::report(&b), report),
        ("B's heartbeat", subject::heartbeat(&b), String::new()),
        (
            "an assignment to itself",
            subject::assign(&a),
            String::new(),
        ),
        (
            "the state bucket directly",
            "$JS.API.STREAM.INFO.KV_coord_state".to_owned(),
            String::new(),
        ),
        // Registration and state, on B's own subjects and on the shared ones
        // (which name the agent only in the JSON).
        (
            "B's state put",
            subject::agent_state_put(&b),
            forged_put.clone(),
        ),
        (
            "a shared state put",
            subject::STATE_PUT.to_owned(),
            forged_put,
        ),
        (
            "B's state delete",
            subject::agent_state_delete(&b),
            naming_b.clone(),
        ),
        (
            "a shared state delete",
            subject::STATE_DELETE.to_owned(),
            naming_b.clone(),
        ),
        (
            "B's own state read",
            subject::agent_state_get(&b),
            naming_b.clone(),
        ),
        (
            "registering as B",
            subject::agent_register(&b),
            forged_registration.clone(),
        ),
        (
            "a shared registration",
            subject::AGENT_REGISTER.to_owned(),
            forged_registration,
        ),
        (
            "deregistering B",
            subject::agent_deregister(&b),
            naming_b.clone(),
        ),
        (
            "a shared deregistration",
            subject::AGENT_DEREGISTER.to_owned(),
            naming_b,
        ),
        // The buckets under the services, and the operators' endpoints.
        (
            "B's state in the bucket",
            format!("$KV.coord_state.default.{b}"),
            json!({"owner": "a"}).to_string(),
        ),
        (
            "B's record in the agents bucket",
            format!("$KV.coord_agents.{b}"),
            String::new(),
        ),
        (
            "creating a flow",
            subject::FLOW_CREATE.to_owned(),
            serde_json::to_string(&demo::demo_flow().unwrap()).unwrap(),
        ),
        (
            "setting a quota",
            subject::QUOTA_SET.to_owned(),
            json!({"owner": "iso-b", "limits": {"cpu": 0.0}}).to_string(),
        ),
        (
            "pinging the services",
            subject::SRV_PING.to_owned(),
            String::new(),
        ),
    ] {
        spy.publish_with_reply(subj.clone(), spy.new_inbox(), body.into())
            .await
            .unwrap();
        refused(&mut errors, what, &subj).await;
    }

    // On its own subjects the service refuses A a body naming B.
    acting_for_another_is_forbidden(&a_client, &a, &b, b_doc.revision).await;

    // Logging in takes the agent's own password: none, or another agent's,
    // gets no connection.
    let url = &server.config().nats_url;
    for (user, pass) in [
        (a.as_str(), password(b.as_str())),
        (b.as_str(), password(a.as_str())),
        (b.as_str(), String::new()),
    ] {
        let attempt = async_nats::ConnectOptions::with_user_and_password(user.into(), pass)
            .connect(url)
            .await;
        assert!(attempt.is_err(), "{user} logged in with a wrong password");
    }
    assert!(
        async_nats::connect(url).await.is_err(),
        "an anonymous login"
    );

    // B's registration and state are as B left them, and the only flow is
    // the one the operator made.
    assert_eq!(agent_revision(&operator, &b).await, b_registered);
    let flows = ops.list_flows(&Default::default()).await.unwrap().flows;
    let ids: Vec<_> = flows.iter().map(|f| &f.flow_id).collect();
    assert_eq!(ids, [&created.flow_id]);
    let b_now = ops.state_get(&b).await.unwrap();
    assert_eq!(
        (b_now.revision, &b_now.doc),
        (b_doc.revision, &json!({"owner": "b"}))
    );

    // Refusals close nothing: A's own requests still work, and it may read
    // B's state through the shared, read-only subject.
    a_client.register_agent(&registration(&a)).await.unwrap();
    let again = a_client
        .state_put(&put(&a, mine.revision, json!({"step": 2})))
        .await
        .unwrap();
    assert!(again.revision > mine.revision);
    let history = a_client
        .state_history(&StateHistoryRequest {
            agent_id: a.clone(),
            scope: Default::default(),
        })
        .await
        .unwrap();
    assert_eq!(history.entries.len(), 2);
    let peer: StateDoc = a_client
        .request(
            subject::STATE_GET,
            &StateGet {
                agent_id: b.clone(),
                scope: Default::default(),
                revision: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(peer.doc, json!({"owner": "b"}));
    let _ = stop.send(());
    runtime.await.unwrap().unwrap();
    for s in services {
        s.stop().await.unwrap();
    }
}

/// On a server that lets anyone publish anywhere, the services still take the
/// agent from the subject of its own requests: a body naming another agent is
/// refused with `forbidden`, the other agent's registration and state stay as
/// they were, and the agent's requests for itself go through.
#[tokio::test]
async fn services_refuse_a_request_for_another_agent_on_an_open_server() {
    let sys = System::start().await;
    let (a, b) = (
        AgentId::new("open-a").unwrap(),
        AgentId::new("open-b").unwrap(),
    );
    sys.client.register_agent(&registration(&b)).await.unwrap();
    let b_doc = sys
        .client
        .state_put(&put(&b, 0, json!({"owner": "b"})))
        .await
        .unwrap();
    let b_registered = agent_revision(&sys.nats, &b).await;
    sys.client.register_agent(&registration(&a)).await.unwrap();

    acting_for_another_is_forbidden(&sys.client, &a, &b, b_doc.revision).await;

    assert_eq!(agent_revision(&sys.nats, &b).await, b_registered);
    let b_now = sys.client.state_get(&b).await.unwrap();
    assert_eq!(
        (b_now.revision, &b_now.doc),
        (b_doc.revision, &json!({"owner": "b"}))
    );
    let mine = sys
        .client
        .state_put(&put(&a, 0, json!({"owner": "a"})))
        .await
        .unwrap();
    let deleted = sys
        .client
        .state_delete(&StateDelete {
            agent_id: a.clone(),
            scope: Default::default(),
            expected_revision: Some(mine.revision),
        })
        .await
        .unwrap();
    assert!(deleted.deleted);
    let left = sys.client.deregister_agent(&a).await.unwrap();
    assert_eq!(left.status, common::msg::AgentStatus::Draining);
}

/// On a server that lets anyone publish anywhere, a report for an attempt
/// another agent holds is rejected whichever way it names its sender, and the
/// holder's own report still decides the task.
#[tokio::test]
async fn fencing_rejects_a_report_for_another_agents_lease_on_an_open_server() {
    let sys = System::start().await;
    let mut rejected = sys
        .nats
        .subscribe(subject::event::REPORT_REJECTED)
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let (holder, intruder) = (
        AgentId::new("holder").unwrap(),
        AgentId::new("intruder").unwrap(),
    );
    let (release, released) = tokio::sync::watch::channel(false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut opts = demo::demo_agent_options().unwrap();
    opts.agent_id = holder.clone();
    let runtime = tokio::spawn(agent::run(
        sys.nats.clone(),
        opts,
        move |task| {
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|r| *r).await;
                Ok(json!({"by": "holder", "task": task.task_id}))
            }
        },
        async {
            let _ = stopped.await;
        },
    ));
    let mut spec = demo::demo_flow().unwrap();
    spec.tasks.truncate(1);
    let created = sys.client.create_flow(&spec).await.unwrap();
    let running = eventually(Duration::from_secs(30), "task a running", || async {
        let s = sys.client.flow_status(&created.flow_id).await.ok()?;
        s.tasks
            .iter()
            .any(|t| t.state == common::msg::TaskState::Running)
            .then_some(s)
    })
    .await;
    let attempt = running.tasks[0].attempt;

    let js = async_nats::jetstream::new(sys.nats.clone());
    for (sender, named, why) in [
        (&intruder, &intruder, "does not hold"),
        (&intruder, &holder, "another agent's subject"),
    ] {
        let body = json!({
            "flow_id": created.flow_id, "task_id": "a", "attempt": attempt, "agent_id": named,
            "type": "completed", "output": {"by": "intruder"}
        });
        js.publish(subject::report(sender), body.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
        let msg = tokio::time::timeout(Duration::from_secs(10), rejected.next())
            .await
            .expect("a rejection event")
            .unwrap();
        let event: Event = serde_json::from_slice(&msg.payload).unwrap();
        assert!(
            matches!(event.kind, EventKind::ReportRejected { ref reason, .. } if reason.contains(why)),
            "{why}: {event:?}"
        );
    }
    let still = sys.client.flow_status(&created.flow_id).await.unwrap();
    assert_eq!(still.state, FlowState::Running, "{still:?}");

    release.send(true).unwrap();
    let done = eventually(Duration::from_secs(30), "flow done", || async {
        let s = sys.client.flow_status(&created.flow_id).await.ok()?;
        (s.state != FlowState::Running).then_some(s)
    })
    .await;
    assert_eq!(done.state, FlowState::Succeeded);
    assert_eq!(done.tasks[0].output["by"], "holder");
    let _ = stop.send(());
    runtime.await.unwrap().unwrap();
}
