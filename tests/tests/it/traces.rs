//! One OpenTelemetry trace follows a flow across the services: creation,
//! placement through the allocator, the assignment the agent takes, its reports
//! and completion. Spans are kept in memory ([`telemetry::SpanCapture`]) and
//! the test walks the parent links from the span that published
//! `flow.completed` back to the span the test created the flow in.
//!
//! The services and the agent run in-process, but every hop between them
//! crosses the real nats-server: each service starts its spans from the
//! `traceparent` header of the message it handles, which the test checks by
//! asking that those spans have a remote parent.

use std::collections::HashMap;
use std::time::Duration;

use common::msg::{Event, EventKind, FlowSpec, Requirements, TaskSpec};
use common::{subject, telemetry, AgentId, TaskId};
use coordkit::agent::{self, AgentOptions};
use futures::StreamExt;
use opentelemetry::trace::{SpanId, TraceContextExt};
use opentelemetry_sdk::trace::SpanData;
use testkit::{eventually, System};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

fn task(id: &str, deps: &[&str]) -> TaskSpec {
    let mut t = TaskSpec::new(TaskId::new(id).unwrap());
    t.kind = "work".into();
    t.requirements = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    t.depends_on = deps.iter().map(|d| TaskId::new(*d).unwrap()).collect();
    t
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// What a span is, for comparing chains: its name and what it handled.
fn label(span: &SpanData) -> String {
    match span.name.as_ref() {
        "request" | "assignment" | "report" => {
            let subject = attribute(span, "subject").unwrap_or_default();
            format!("{} {subject}", span.name)
        }
        "place" => format!("place {}", attribute(span, "task").unwrap_or_default()),
        other => other.to_owned(),
    }
}

/// The span `id` and its ancestors that have ended (spans are recorded when
/// they end), nearest first, and whether the chain reaches a root.
fn chain(spans: &[SpanData], id: SpanId) -> (Vec<SpanData>, bool) {
    let by_id: HashMap<SpanId, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let mut out = Vec::new();
    let mut next = id;
    while next != SpanId::INVALID {
        let Some(span) = by_id.get(&next) else {
            return (out, false);
        };
        out.push((*span).clone());
        next = span.parent_span_id;
    }
    (out, true)
}

#[tokio::test]
async fn one_trace_follows_a_task_from_creation_to_completion() {
    let capture = telemetry::SpanCapture::start();
    let sys = System::start().await;
    let mut events = sys.nats.subscribe(subject::EVENTS_ALL).await.unwrap();
    sys.nats.flush().await.unwrap();

    // Room for both tasks at once, so b is placed the moment a completes
    // (not by a later sweep) whether or not a's resources are back yet.
    let agent_id = AgentId::new("tracer").unwrap();
    let mut opts = AgentOptions::new(agent_id.clone()).capacity("cpu", 2.0);
    opts.heartbeat_interval = Duration::from_millis(500);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(agent::run(
        sys.nats.clone(),
        opts,
        |_| async { Ok(serde_json::json!({"done": true})) },
        async {
            let _ = stopped.await;
        },
    ));
    eventually(Duration::from_secs(10), "agent registered", || async {
        let c = sys.client.capacity(&Default::default()).await.ok()?;
        c.agents.contains_key(&agent_id).then_some(())
    })
    .await;

    let root = tracing::info_span!("test-create");
    let root_cx = root.context();
    let trace_id = root_cx.span().span_context().trace_id();
    let root_id = root_cx.span().span_context().span_id();
    let spec = FlowSpec::new("traced", vec![task("a", &[]), task("b", &["a"])]);
    let created = sys
        .client
        .create_flow(&spec)
        .instrument(root)
        .await
        .unwrap();

    // The span that published flow.completed, from the event's `traceparent`.
    let completed_in = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(msg) = events.next().await {
            let event: Event = serde_json::from_slice(&msg.payload).unwrap();
            if let EventKind::FlowCompleted { flow_id, .. } = event.kind {
                if flow_id == created.flow_id {
                    let tp = msg.headers.as_ref().and_then(|h| h.get("traceparent"));
                    return tp.map(|v| v.as_str().to_owned());
                }
            }
        }
        panic!("event subscription ended");
    })
    .await
    .expect("the flow completes within 30 s")
    .expect("flow.completed carries a traceparent");
    let parts: Vec<&str> = completed_in.split('-').collect();
    assert_eq!(
        parts[1],
        trace_id.to_string(),
        "flow.completed is in the trace the flow was created in"
    );
    let end = SpanId::from_hex(parts[2]).unwrap();

    // Ancestors end a little after completion (their work winds down).
    let started = std::time::Instant::now();
    let spans = loop {
        let (spans, complete) = chain(&capture.trace(&trace_id.to_string()), end);
        if complete {
            break spans;
        }
        let ended: Vec<String> = spans.iter().rev().map(label).collect();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the spans from completion back to creation never all ended; \
             ended so far, nearest last: {ended:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut path: Vec<String> = spans.iter().rev().map(label).collect();
    assert_eq!(
        spans.last().unwrap().span_context.span_id(),
        root_id,
        "the chain ends at the span the flow was created in: {path:?}"
    );
    assert!(
        path.iter().filter(|l| *l == "flow step").count() >= 2,
        "the orchestrator's steps are on the path: {path:?}"
    );
    path.retain(|l| l != "flow step");
    let assign = format!("assignment {}", subject::assign(&agent_id));
    let report = format!("report {}", subject::report(&agent_id));
    assert_eq!(
        path,
        [
            "test-create".to_owned(),
            format!("request {}", subject::FLOW_CREATE),
            "place a".to_owned(),
            assign.clone(),
            report.clone(),
            "place b".to_owned(),
            assign.clone(),
            report.clone(),
        ],
        "creation → placement → assignment → report → (b) → completion, parent to child"
    );
    // Each hop between services came over NATS, in the message's headers.
    for s in &spans {
        let label = label(s);
        if label.starts_with("request") || label == assign || label == report {
            assert!(s.parent_span_is_remote, "{label} continues a remote parent");
        }
    }

    // Each placement asked the allocator within the same trace.
    let all = capture.trace(&trace_id.to_string());
    for t in ["a", "b"] {
        let place = spans
            .iter()
            .find(|s| label(s) == format!("place {t}"))
            .unwrap();
        let asked = all.iter().any(|s| {
            s.parent_span_id == place.span_context.span_id()
                && label(s) == format!("request {}", subject::ALLOCATE)
                && s.parent_span_is_remote
        });
        assert!(asked, "placing {t} is an allocator request in the trace");
    }

    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}
