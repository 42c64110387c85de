//! Flows that react to agents' events, against a real nats-server: a wait
//! task completes on the first matching event stored after it began waiting
//! (and its dependant reads that event), a wait times out with
//! `wait_timed_out`, and a trigger starts exactly one flow per stored event
//! with two orchestrator replicas, and with a replica killed between
//! creating a triggered flow and acknowledging its event.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{
    AgentEventPublish, FieldMatch, FlowListRequest, FlowSpec, FlowState, FlowStatus, TaskSpec,
    TaskState, Trigger, WaitFor, TRIGGER_EVENT_KEY,
};
use common::{AgentId, Client, ErrorCode, FlowId};
use serde_json::{json, Value};
use testkit::{eventually, start_service, wait_for_service, NatsServer, Replica, System};

use crate::orchestrator::{cpu_task, spawn_agent, tid, wait_finished, wait_registered};

/// Publishes an agent event through the synchronizer's ingest, as the
/// agent would, and waits until it is stored.
async fn store_event(nats: &async_nats::Client, agent: &str, kind: &str, id: &str, data: Value) {
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    let event = AgentEventPublish {
        data,
        event_id: Some(id.to_owned()),
    };
    client
        .publish_event(&AgentId::new(agent).unwrap(), kind, &event)
        .await
        .unwrap();
}

fn wait_task(id: &str, deps: &[&str], timeout_ms: Option<u64>) -> TaskSpec {
    let mut t = TaskSpec::new(tid(id));
    t.depends_on = deps.iter().map(|d| tid(d)).collect();
    t.wait_for = Some(WaitFor {
        event_type: "approval".into(),
        agent_id: Some(AgentId::new("reviewer").unwrap()),
        field: Some(FieldMatch {
            path: "/approved".into(),
            equals: json!(true),
        }),
        timeout_ms,
    });
    t
}

fn task_of<'a>(s: &'a FlowStatus, id: &str) -> &'a common::msg::TaskStatus {
    s.tasks.iter().find(|t| t.task_id.as_str() == id).unwrap()
}

#[tokio::test]
async fn a_flow_waits_for_an_approval_and_continues_with_the_event() {
    let sys = System::start().await;
    // The task after the approval reads it the way any task reads another's
    // output: from the flow's status.
    let reader = Client::new(sys.nats.clone()).with_timeout(Duration::from_secs(5));
    let (stop, agent) = spawn_agent(&sys.nats, "w", 2.0, move |a| {
        let reader = reader.clone();
        async move {
            if a.kind != "publish" {
                return Ok(json!("prepared"));
            }
            let s = reader.flow_status(&a.flow_id).await.unwrap();
            Ok(task_of(&s, "approve").output.clone())
        }
    });
    wait_registered(&sys.client, "w").await;

    // Stored before anything waits: it must not count.
    store_event(
        &sys.nats,
        "reviewer",
        "approval",
        "early",
        json!({"approved": true}),
    )
    .await;
    let mut publish = cpu_task("publish", &["approve"]);
    publish.kind = "publish".into();
    let spec = FlowSpec::new(
        "approval",
        vec![
            cpu_task("prepare", &[]),
            wait_task("approve", &["prepare"], Some(120_000)),
            publish,
        ],
    );
    let flow = sys.client.create_flow(&spec).await.unwrap().flow_id;
    eventually(Duration::from_secs(20), "approve waiting", || async {
        let s = sys.client.flow_status(&flow).await.ok()?;
        (task_of(&s, "approve").state == TaskState::Waiting).then_some(())
    })
    .await;

    // Neither a refusal, another type, nor another agent's approval counts.
    store_event(
        &sys.nats,
        "reviewer",
        "approval",
        "no",
        json!({"approved": false}),
    )
    .await;
    store_event(
        &sys.nats,
        "reviewer",
        "comment",
        "c1",
        json!({"approved": true}),
    )
    .await;
    store_event(
        &sys.nats,
        "intruder",
        "approval",
        "x1",
        json!({"approved": true}),
    )
    .await;
    let s = sys.client.flow_status(&flow).await.unwrap();
    assert_eq!(task_of(&s, "approve").state, TaskState::Waiting);
    store_event(
        &sys.nats,
        "reviewer",
        "approval",
        "yes",
        json!({"approved": true, "by": "ana"}),
    )
    .await;

    let done = wait_finished(&sys.client, &flow, Duration::from_secs(30)).await;
    assert_eq!(done.state, FlowState::Succeeded, "{done:?}");
    let approval = &task_of(&done, "approve").output;
    assert_eq!(
        approval["event_id"], "yes",
        "the first match after waiting began: {approval}"
    );
    assert_eq!(approval["agent_id"], "reviewer");
    assert_eq!(approval["data"]["by"], "ana");
    assert_eq!(
        &task_of(&done, "publish").output,
        approval,
        "the next task saw the event"
    );
    let _ = stop.send(());
    let _ = agent.await;
}

#[tokio::test]
async fn a_wait_times_out_with_wait_timed_out_and_a_bad_wait_is_refused() {
    let sys = System::start().await;
    let spec = FlowSpec::new(
        "timeout",
        vec![
            wait_task("approve", &[], Some(300)),
            cpu_task("after", &["approve"]),
        ],
    );
    let flow = sys.client.create_flow(&spec).await.unwrap().flow_id;
    let done = wait_finished(&sys.client, &flow, Duration::from_secs(20)).await;
    assert_eq!(done.state, FlowState::Failed);
    let approve = task_of(&done, "approve");
    assert_eq!(approve.state, TaskState::TimedOut);
    let error = approve.error.as_deref().unwrap_or_default();
    assert!(error.starts_with("wait_timed_out:"), "{error}");
    assert_eq!(task_of(&done, "after").state, TaskState::Skipped);

    // A bad wait is refused at creation with every problem named.
    let mut bad = wait_task("w", &[], Some(0));
    bad.wait_for.as_mut().unwrap().event_type = "Not A Type".into();
    let err = sys
        .client
        .create_flow(&FlowSpec::new("bad", vec![bad]))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::ValidationFailed);
    assert_eq!(
        err.details["problems"][0]["code"], "invalid_wait_for",
        "{err:?}"
    );
    // The service is still there.
    sys.client.flow_status(&flow).await.unwrap();
}

fn trigger(name: &str) -> Trigger {
    let mut work = cpu_task("index", &[]);
    work.input = json!({"mode": "full"});
    Trigger {
        name: name.into(),
        event_type: "doc-indexed".into(),
        agent_id: None,
        field: Some(FieldMatch {
            path: "/lang".into(),
            equals: json!("en"),
        }),
        flow: FlowSpec::new("on doc", vec![work]),
    }
}

/// The flows `trigger` started, with their status; `None` while no
/// orchestrator answers.
async fn triggered(client: &Client, trigger: &str) -> Option<Vec<FlowStatus>> {
    let mut out = Vec::new();
    let list = client.list_flows(&FlowListRequest::default()).await.ok()?;
    for f in list.flows {
        if !f.flow_id.as_str().starts_with(&format!("trg-{trigger}-")) {
            continue;
        }
        out.push(client.flow_status(&f.flow_id).await.ok()?);
    }
    Some(out)
}

/// Every triggered flow of `trigger` succeeded, once per event in `events`,
/// each with its event as input.
async fn one_flow_per_event(client: &Client, trigger: &str, events: &[&str]) {
    let want: BTreeSet<String> = events.iter().map(|e| e.to_string()).collect();
    let flows = eventually(
        Duration::from_secs(40),
        "a flow per event, finished",
        || async {
            let flows = triggered(client, trigger).await?;
            let done =
                flows.len() >= want.len() && flows.iter().all(|f| f.state == FlowState::Succeeded);
            done.then_some(flows)
        },
    )
    .await;
    assert_eq!(flows.len(), want.len(), "exactly one flow per event");
    let mut seen = BTreeSet::new();
    for f in &flows {
        let origin = f
            .started_by
            .as_ref()
            .expect("a triggered flow names its origin");
        assert_eq!(origin.trigger, trigger);
        assert!(origin.stream_seq > 0);
        // The agent echoes its input: the event is in it, beside the template's input.
        let input = &task_of(f, "index").output;
        assert_eq!(input["mode"], "full");
        assert_eq!(
            input[TRIGGER_EVENT_KEY]["event_id"],
            origin.event_id.as_str()
        );
        assert!(
            seen.insert(origin.event_id.clone()),
            "event {} twice",
            origin.event_id
        );
    }
    assert_eq!(seen, want);
}

/// Waits until every stored agent event was handled and acknowledged by
/// the orchestrators' trigger consumer.
async fn triggers_caught_up(nats: &async_nats::Client) {
    let js = jetstream::new(nats.clone());
    eventually(
        Duration::from_secs(40),
        "trigger consumer caught up",
        || async {
            let stream = js
                .get_stream(common::nats::STREAM_AGENT_EVENTS)
                .await
                .ok()?;
            let mut c: jetstream::consumer::PullConsumer = stream
                .get_consumer(common::nats::CONSUMER_ORCHESTRATOR_TRIGGERS)
                .await
                .ok()?;
            let info = c.info().await.ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        },
    )
    .await;
}

async fn echo(a: common::msg::Assignment) -> Result<Value, coordkit::agent::TaskFailure> {
    Ok(a.input)
}

#[tokio::test]
async fn a_trigger_starts_exactly_one_flow_per_event_with_two_replicas() {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let _allocator = start_service("allocator", server.config());
    let _synchronizer = start_service("synchronizer", server.config());
    let _one = Replica::start("orchestrator", server.config());
    let _two = Replica::start("orchestrator", server.config());
    let nats = server.connect().await;
    wait_for_service(&nats, "allocator").await;
    wait_for_service(&nats, "synchronizer").await;
    wait_for_service(&nats, "orchestrator").await;
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    let (stop, agent) = spawn_agent(&nats, "w", 4.0, echo);
    wait_registered(&client, "w").await;

    // Bad triggers get typed errors.
    let mut bad = trigger("bad name!");
    assert_eq!(
        client.set_trigger(&bad).await.unwrap_err().code,
        ErrorCode::InvalidId
    );
    bad = trigger("bad");
    bad.event_type = "Doc.Indexed".into();
    bad.flow.id = Some(FlowId::new("fixed").unwrap());
    bad.flow.tasks[0].input = json!("text");
    let err = client.set_trigger(&bad).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::ValidationFailed);
    assert_eq!(
        err.details["problems"].as_array().unwrap().len(),
        3,
        "{err:?}"
    );
    assert_eq!(
        client.get_trigger("nope").await.unwrap_err().code,
        ErrorCode::NotFound
    );

    let t = trigger("docs");
    assert_eq!(client.set_trigger(&t).await.unwrap(), t);
    assert_eq!(client.get_trigger("docs").await.unwrap(), t);
    assert_eq!(client.list_triggers().await.unwrap().triggers, vec![t]);

    let ids: Vec<String> = (0..8).map(|i| format!("e{i}")).collect();
    for id in &ids {
        store_event(&nats, "indexer", "doc-indexed", id, json!({"lang": "en"})).await;
    }
    // A re-sent event is stored once; others do not match.
    store_event(&nats, "indexer", "doc-indexed", "e3", json!({"lang": "en"})).await;
    store_event(&nats, "indexer", "doc-indexed", "fr", json!({"lang": "fr"})).await;
    store_event(&nats, "indexer", "doc-removed", "rm", json!({"lang": "en"})).await;

    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    one_flow_per_event(&client, "docs", &ids).await;
    triggers_caught_up(&nats).await;
    // Every event handled: still one flow each.
    assert_eq!(triggered(&client, "docs").await.unwrap().len(), ids.len());

    let gone = client.delete_trigger("docs").await.unwrap();
    assert!(gone.deleted);
    assert!(client.list_triggers().await.unwrap().triggers.is_empty());
    let _ = stop.send(());
    let _ = agent.await;
}

#[tokio::test]
async fn a_replica_killed_mid_trigger_still_starts_exactly_one_flow_per_event() {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let _allocator = start_service("allocator", server.config());
    let _synchronizer = start_service("synchronizer", server.config());
    let nats = server.connect().await;
    wait_for_service(&nats, "allocator").await;
    wait_for_service(&nats, "synchronizer").await;
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    let (stop, agent) = spawn_agent(&nats, "w", 4.0, echo);
    wait_registered(&client, "w").await;

    // The first replica stops after creating the flow of an event, before
    // acknowledging the event.
    orchestrator::failpoints::hold_before_trigger_ack("held");
    let first = Replica::start("orchestrator", server.config());
    wait_for_service(&nats, "orchestrator").await;
    client.set_trigger(&trigger("held")).await.unwrap();
    store_event(&nats, "indexer", "doc-indexed", "k1", json!({"lang": "en"})).await;
    eventually(Duration::from_secs(20), "the flow created", || async {
        (triggered(&client, "held").await?.len() == 1).then_some(())
    })
    .await;
    first.kill();
    orchestrator::failpoints::release_before_trigger_ack();

    // Two fresh replicas: the unacknowledged event comes again to one of them.
    let _two = Replica::start("orchestrator", server.config());
    let _three = Replica::start("orchestrator", server.config());
    store_event(&nats, "indexer", "doc-indexed", "k2", json!({"lang": "en"})).await;
    one_flow_per_event(&client, "held", &["k1", "k2"]).await;
    triggers_caught_up(&nats).await;
    assert_eq!(
        triggered(&client, "held").await.unwrap().len(),
        2,
        "none twice after the redelivery"
    );
    let _ = stop.send(());
    let _ = agent.await;
}
