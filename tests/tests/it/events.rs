//! Events derived from committed state reach the events stream at least once
//! and are stored once, under ids consumers can tell repeats by, even when the
//! replica that committed a step dies before publishing anything of it.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{Event, EventKind, FlowSpec, FlowState, TaskState};
use common::{FlowId, TaskId};
use serde_json::json;
use testkit::{eventually, start_service, wait_for_service, NatsServer, Replica};

use crate::orchestrator::{cpu_task, spawn_agent, tid, wait_finished, wait_registered};

/// The flow an event is about, if it is one of the flow events.
fn flow_of(kind: &EventKind) -> Option<&FlowId> {
    match kind {
        EventKind::FlowCreated { flow_id, .. }
        | EventKind::FlowCompleted { flow_id, .. }
        | EventKind::TaskTransition { flow_id, .. } => Some(flow_id),
        _ => None,
    }
}

/// Every event of `flow` the events stream holds, in order, each with its
/// `Nats-Msg-Id`.
async fn stored_events(js: &jetstream::Context, flow: &FlowId) -> Vec<(Event, String)> {
    let mut stream = js.get_stream(common::nats::STREAM_EVENTS).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let Ok(msg) = stream.get_raw_message(seq).await else {
            continue;
        };
        let event: Event = serde_json::from_slice(&msg.payload).unwrap();
        if flow_of(&event.kind) == Some(flow) {
            let id = msg
                .headers
                .get("Nats-Msg-Id")
                .map(|v| v.to_string())
                .unwrap_or_default();
            out.push((event, id));
        }
    }
    out
}

/// What the stored events say happened: flow events by type, task
/// transitions by task and new state, each with how often it was stored.
fn tally(events: &[(Event, String)]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (e, _) in events {
        let what = match &e.kind {
            EventKind::TaskTransition { task_id, to, .. } => format!("{task_id} {to:?}"),
            other => other.subject().to_owned(),
        };
        *out.entry(what).or_insert(0) += 1;
    }
    out
}

#[tokio::test]
async fn events_of_steps_a_killed_replica_never_published_are_stored_once() {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let _services: Vec<_> = ["allocator", "monitor"]
        .into_iter()
        .map(|n| start_service(n, server.config()))
        .collect();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    let client = common::Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    for name in ["allocator", "monitor"] {
        wait_for_service(&nats, name).await;
    }
    let flow = FlowId::new("held").unwrap();
    // The first replica stops after each write of the flow, before anything
    // that follows from it is published.
    orchestrator::failpoints::hold_after_write(&flow);
    let first = Replica::start("orchestrator", server.config());
    wait_for_service(&nats, "orchestrator").await;
    let (stop, agent) = spawn_agent(&nats, "w", 1.0, |a| async move { Ok(json!(a.attempt)) });
    wait_registered(&client, "w").await;

    let mut spec = FlowSpec::new("held", vec![cpu_task("a", &[]), cpu_task("b", &["a"])]);
    spec.id = Some(flow.clone());
    // Held right after its write, the replica answers nothing more: the
    // creation's reply, like its events, is what it never sent.
    let _creating = tokio::spawn({
        let client = client.clone();
        async move { client.create_flow(&spec).await }
    });
    // Created with a booked beside the write: written (a ready, its
    // assignment not sent), nothing published.
    let state_of = |s: &common::msg::FlowStatus, t: &TaskId| {
        s.tasks.iter().find(|x| &x.task_id == t).map(|x| x.state)
    };
    eventually(Duration::from_secs(20), "a stored as ready", || async {
        let s = client.flow_status(&flow).await.ok()?;
        (state_of(&s, &tid("a")) == Some(TaskState::Ready)).then_some(())
    })
    .await;
    assert!(
        stored_events(&js, &flow).await.is_empty(),
        "the held replica published nothing of the flow"
    );
    first.kill();
    orchestrator::failpoints::release_after_write();

    let _second = Replica::start("orchestrator", server.config());
    let done = wait_finished(&client, &flow, Duration::from_secs(60)).await;
    assert_eq!(done.state, FlowState::Succeeded);
    // The last events are published after the write that finishes the flow,
    // and its outbox is emptied once the stream has them all: after that
    // nothing of the flow is published again.
    let kv = js.get_key_value(common::nats::KV_FLOWS).await.unwrap();
    eventually(Duration::from_secs(20), "the outbox emptied", || async {
        let (_, _, stored) = orchestrator::store::read(&kv, &flow).await.ok()??;
        stored.kept.outbox.is_empty().then_some(())
    })
    .await;

    let stored = stored_events(&js, &flow).await;
    let mut expected = BTreeMap::new();
    for what in ["coord.events.flow.created", "coord.events.flow.completed"] {
        expected.insert(what.to_owned(), 1);
    }
    for t in ["a", "b"] {
        for to in ["Ready", "Assigned", "Running", "Succeeded"] {
            expected.insert(format!("{t} {to}"), 1);
        }
    }
    assert_eq!(tally(&stored), expected, "every transition stored once");
    for (e, id) in &stored {
        assert_eq!(&e.event_id, id, "the message id is the event's id");
        assert!(e.event_id.starts_with("held."), "{}", e.event_id);
    }

    // The monitor read the same events off the subjects: it counts each once.
    let m = eventually(Duration::from_secs(10), "the monitor's counts", || async {
        let m = client.metrics().await.ok()?;
        (m.flows_completed == 1 && m.tasks_completed == 2).then_some(m)
    })
    .await;
    assert_eq!(
        (
            m.flows_created,
            m.flows_completed,
            m.tasks_assigned,
            m.tasks_completed
        ),
        (1, 1, 2, 2)
    );
    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

/// The events stream stores without waiting for the disk on one node: a
/// server killed the moment a flow's last events went out may lose them
/// although it acknowledged them. The outbox keeps a batch until its
/// acknowledgement has outlived any outage, so they are published again and
/// stored once when the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_acknowledged_just_before_the_server_dies_are_stored_once() {
    common::telemetry::init_for_tests();
    let mut server = NatsServer::start();
    let services: Vec<_> = testkit::SERVICES
        .iter()
        .map(|n| start_service(n, server.config()))
        .collect();
    let nats = server.connect().await;
    for name in testkit::SERVICES {
        wait_for_service(&nats, name).await;
    }
    let client = common::Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    let (_stop, _agent) = spawn_agent(&nats, "w", 1.0, |a| async move { Ok(json!(a.attempt)) });
    wait_registered(&client, "w").await;
    let mut completed = nats
        .subscribe(common::subject::event::FLOW_COMPLETED)
        .await
        .unwrap();
    nats.flush().await.unwrap();

    let flow = FlowId::new("dies").unwrap();
    let mut spec = FlowSpec::new("dies", vec![cpu_task("a", &[])]);
    spec.id = Some(flow.clone());
    client.create_flow(&spec).await.unwrap();
    // The moment the flow's last event is out, before the server's flush.
    tokio::time::timeout(
        Duration::from_secs(30),
        futures::StreamExt::next(&mut completed),
    )
    .await
    .expect("flow.completed within 30 s");
    tokio::task::block_in_place(|| server.kill());
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| server.resume());

    let nats = server.connect().await;
    let js = jetstream::new(nats);
    let stored = eventually(Duration::from_secs(30), "the flow's events stored", || {
        let js = js.clone();
        let flow = flow.clone();
        async move {
            let stored = stored_events(&js, &flow).await;
            tally(&stored)
                .contains_key("coord.events.flow.completed")
                .then_some(stored)
        }
    })
    .await;
    let mut expected = BTreeMap::new();
    for what in ["coord.events.flow.created", "coord.events.flow.completed"] {
        expected.insert(what.to_owned(), 1);
    }
    for to in ["Ready", "Assigned", "Running", "Succeeded"] {
        expected.insert(format!("a {to}"), 1);
    }
    assert_eq!(tally(&stored), expected, "every transition stored once");
    drop(services);
}

/// A step with more events than its JetStream context lends permits for
/// (one per publish until its acknowledgement is read) is published whole:
/// each acknowledgement is read as it comes, not held until the step ends.
/// Before, a burst of wide flows' creations (200 flows of 300 tasks) held
/// all 5,000 of the orchestrator's permits between them, each waiting for
/// one more, and every flow write waited with them: the orchestrator stood
/// still. Here one step meets a context of 8 permits with 41 events.
#[tokio::test]
async fn a_step_with_more_events_than_the_context_has_permits_is_published_whole() {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let js = jetstream::new(nats.clone());
    common::nats::ensure_stream(&js, common::nats::Stream::Events, 1)
        .await
        .unwrap();
    let few = jetstream::ContextBuilder::new()
        .max_ack_inflight(8)
        .build(nats.clone());

    let tasks = (0..40).map(|i| cpu_task(&format!("t{i}"), &[])).collect();
    let mut spec = FlowSpec::new("wide", tasks);
    let id = FlowId::new("wide").unwrap();
    spec.id = Some(id.clone());
    let now = common::now_ms();
    let (mut flow, effects) = orchestrator::machine::Flow::new(id.clone(), spec, now);
    let events: Vec<EventKind> = effects
        .into_iter()
        .filter_map(|e| match e {
            orchestrator::machine::Effect::Event(kind) => Some(kind),
            _ => None,
        })
        .collect();
    assert_eq!(events.len(), 41, "the flow's creation and each task ready");

    let ledger = std::sync::Arc::new(orchestrator::outbox::Ledger::default());
    let mut outbox = Vec::new();
    let (mut cursor, _) = ledger.stage(&mut flow, &mut outbox, &events, now);
    let publishing = async {
        for kind in events.iter().cloned() {
            ledger.publish(&few, &mut cursor, kind).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), publishing)
        .await
        .expect("the step's publishes wait for permits its own unread acknowledgements hold");
    ledger.sent(cursor, common::now_ms());

    let stored = eventually(Duration::from_secs(10), "every event stored", || async {
        let stored = stored_events(&js, &id).await;
        (stored.len() == events.len()).then_some(stored)
    })
    .await;
    assert_eq!(
        tally(&stored).values().sum::<usize>(),
        41,
        "each stored once"
    );
}
