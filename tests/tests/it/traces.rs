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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::msg::{Event, EventKind, FlowSpec, FlowState, Requirements, TaskSpec};
use common::{subject, telemetry, AgentId, TaskId};
use coordkit::agent::{self, AgentOptions};
use futures::StreamExt;
use opentelemetry::trace::{SpanId, TraceContextExt};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_sdk::trace::SpanData;
use prost::Message as _;
use testkit::{eventually, wait_for_service, workspace_root, NatsServer, Process, System};
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

/// What a span is, for comparing chains: its name (a message span's names
/// its operation and subject family), and a placement's task.
fn label(span: &SpanData) -> String {
    match span.name.as_ref() {
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

/// Runs an agent that answers every task with `{"done": true}` and waits
/// until the allocator has it; the sender stops it.
async fn registered_agent(
    sys: &System,
    opts: AgentOptions,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), common::Error>>,
) {
    let agent_id = opts.agent_id.clone();
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
    (stop, agent)
}

#[tokio::test]
async fn one_trace_follows_a_task_from_creation_to_completion() {
    let capture = telemetry::SpanCapture::start();
    // Every placement asks the allocator: b is not handed a's allocation
    // (see the orchestrator's `spare`).
    let sys = System::start_tuned(|c| c.keep_allocation_ms = 0).await;
    let mut events = sys.nats.subscribe(subject::EVENTS_ALL).await.unwrap();
    sys.nats.flush().await.unwrap();

    // Room for both tasks at once, so b is placed the moment a completes
    // (not by a later sweep) whether or not a's resources are back yet.
    let mut opts = AgentOptions::new(AgentId::new("tracer").unwrap()).capacity("cpu", 2.0);
    opts.heartbeat_interval = Duration::from_millis(500);
    let (stop, agent) = registered_agent(&sys, opts).await;

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
        path.iter().any(|l| l == "flow step"),
        "the orchestrator's steps are on the path: {path:?}"
    );
    path.retain(|l| l != "flow step");
    let task = [
        "publish coord.agents.*.assign",
        "process coord.agents.*.assign",
        "publish coord.agents.*.report",
        "process coord.agents.*.report",
    ];
    let expected: Vec<String> = [
        "test-create",
        &format!("request {}", subject::FLOW_CREATE),
        &format!("process {}", subject::FLOW_CREATE),
    ]
    .into_iter()
    .chain(task)
    .chain(["place b"])
    .chain(task)
    .chain(["publish coord.events.flow.completed"])
    .map(str::to_owned)
    .collect();
    assert_eq!(
        path, expected,
        "creation (placing a) → assignment → report → placement of b → … → completion, parent to child"
    );
    // Each hop between services came over NATS, in the message's headers:
    // every span processing a message continues a remote parent.
    for s in &spans {
        let label = label(s);
        if label.starts_with("process ") {
            assert!(s.parent_span_is_remote, "{label} continues a remote parent");
            let kind = if label.contains("flow.create") {
                opentelemetry::trace::SpanKind::Server
            } else {
                opentelemetry::trace::SpanKind::Consumer
            };
            assert_eq!(s.span_kind, kind, "{label}");
        }
    }

    // Each placement asked the allocator within the same trace (a's at
    // creation, beside the path; b's on it).
    let all = capture.trace(&trace_id.to_string());
    for t in ["a", "b"] {
        let place = all
            .iter()
            .find(|s| label(s) == format!("place {t}"))
            .unwrap_or_else(|| panic!("a span places {t}"));
        let asked = all.iter().any(|client| {
            client.parent_span_id == place.span_context.span_id()
                && label(client) == format!("request {}", subject::ALLOCATE)
                && all.iter().any(|server| {
                    server.parent_span_id == client.span_context.span_id()
                        && label(server) == format!("process {}", subject::ALLOCATE)
                        && server.parent_span_is_remote
                })
        });
        assert!(asked, "placing {t} is an allocator request in the trace");
    }

    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

/// With two orchestrator replicas, a report taken by the replica that does
/// not write its flow is handed to the one that does, and the trace goes
/// with it: the writer's span for the hand-over continues the taking
/// replica's request span, which continues the agent's report, and the
/// writer's step continues the hand-over.
#[tokio::test]
async fn a_report_handed_to_the_flows_writer_stays_in_the_agents_trace() {
    const HANDED: &str = "request coord.orchestrator.replica.*.report";
    const TAKEN: &str = "process coord.orchestrator.replica.*.report";
    let capture = telemetry::SpanCapture::start();
    let sys = System::start().await;
    let _second = testkit::start_service("orchestrator", sys.server.config());
    eventually(Duration::from_secs(60), "two orchestrators", || async {
        (testkit::replicas(&sys.nats, "orchestrator").await == 2).then_some(())
    })
    .await;
    let opts = AgentOptions::new(AgentId::new("handed").unwrap()).capacity("cpu", 8.0);
    let (stop, agent) = registered_agent(&sys, opts).await;

    // Each report goes to either replica: a few flows see one handed over.
    let mut handed = Vec::new();
    for round in 0..30 {
        let tasks = (0..10).map(|i| task(&format!("t{i}"), &[])).collect();
        let created = sys
            .client
            .create_flow(&FlowSpec::new(format!("handed {round}"), tasks))
            .await
            .unwrap();
        eventually(Duration::from_secs(30), "the flow succeeds", || async {
            let s = sys.client.flow_status(&created.flow_id).await.ok()?;
            (s.state == FlowState::Succeeded).then_some(())
        })
        .await;
        handed = capture.named(HANDED);
        if !handed.is_empty() {
            break;
        }
    }
    assert!(!handed.is_empty(), "no report was handed over in 30 flows");

    // The writer's spans end a little after the hand-over's.
    let client = &handed[0];
    let trace = client.span_context.trace_id().to_string();
    let (taken, stepped, chain_up) = eventually(
        Duration::from_secs(10),
        "the writer's spans of the hand-over",
        || {
            let all = capture.trace(&trace);
            async move {
                let taken = all
                    .iter()
                    .find(|s| {
                        label(s) == TAKEN && s.parent_span_id == client.span_context.span_id()
                    })?
                    .clone();
                let stepped = all.iter().any(|s| {
                    label(s) == "flow step" && s.parent_span_id == taken.span_context.span_id()
                });
                let (up, _) = chain(&all, client.span_context.span_id());
                let up: Vec<String> = up.iter().map(label).collect();
                stepped.then_some((taken, stepped, up))
            }
        },
    )
    .await;
    assert!(
        taken.parent_span_is_remote,
        "the writer continues a remote parent"
    );
    assert_eq!(taken.span_kind, opentelemetry::trace::SpanKind::Consumer);
    assert!(stepped, "the writer's step continues the hand-over");
    assert!(
        chain_up
            .iter()
            .any(|l| l == "process coord.agents.*.report"),
        "the hand-over continues the report as the other replica took it: {chain_up:?}"
    );

    let _ = stop.send(());
    agent.await.unwrap().unwrap();
}

/// A span as a real OTLP/HTTP receiver decoded it, with its resource.
#[derive(Debug, Clone)]
struct Exported {
    resource: HashMap<String, String>,
    trace_id: String,
    span_id: String,
    parent_id: String,
    name: String,
    kind: SpanKind,
    attributes: HashMap<String, String>,
}

fn proto_values(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                Some(any_value::Value::IntValue(i)) => i.to_string(),
                Some(any_value::Value::BoolValue(b)) => b.to_string(),
                Some(other) => format!("{other:?}"),
                None => String::new(),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn service_of(e: &Exported) -> &str {
    e.resource.get("service.name").map_or("", String::as_str)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP trace receiver on a free loopback port: decodes each export
/// (`POST /v1/traces`, protobuf) by the protocol's own message definitions and
/// keeps its spans; a body that does not decode is answered 400.
async fn otlp_receiver() -> (String, Arc<Mutex<Vec<Exported>>>) {
    let got: Arc<Mutex<Vec<Exported>>> = Arc::default();
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let keep = keep.clone();
            async move {
                let Ok(req) = ExportTraceServiceRequest::decode(body.as_ref()) else {
                    return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                };
                let mut spans = keep.lock().unwrap();
                for rs in req.resource_spans {
                    let resource = rs
                        .resource
                        .map(|r| proto_values(&r.attributes))
                        .unwrap_or_default();
                    for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                        spans.push(Exported {
                            resource: resource.clone(),
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent_id: hex(&span.parent_span_id),
                            kind: span.kind(),
                            name: span.name,
                            attributes: proto_values(&span.attributes),
                        });
                    }
                }
                let ok = ExportTraceServiceResponse::default().encode_to_vec();
                (axum::http::StatusCode::OK, ok)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), got)
}

/// A service replica as its own process, exporting its spans to `endpoint`
/// with logs at `warn`: quiet logs must not cut traces.
fn exporting(nats_url: &str, endpoint: &str, service: &str) -> Process {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_coord-proc"));
    cmd.args(["--nats-url", nats_url, service])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("RUST_LOG", "warn")
        .env_remove("COORD_TRACE_FILTER")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    Process::command(cmd)
}

/// The whole path of one flow run on the Python example agent, as an operator
/// sees it in a tracing backend: every service in its own process with logs at
/// `warn`, exporting over OTLP/HTTP to a real receiver; the agent copies the
/// assignment's `traceparent` onto its reports, state writes and events. The
/// spans received, with the test's own (it created the flow), are one trace
/// with one root, every parent present; they come from every service, by the
/// messaging conventions (kinds, `messaging.*`), and each process's resource
/// names the service's version and the instance `$SRV.INFO` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_on_the_python_agent_is_one_trace_in_an_otlp_receiver() {
    let capture = telemetry::SpanCapture::start();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let client = common::Client::new(nats.clone());
    let (endpoint, received) = otlp_receiver().await;
    let services = ["orchestrator", "allocator", "synchronizer", "monitor"];
    let _procs: Vec<Process> = services
        .iter()
        .map(|s| exporting(server.url(), &endpoint, s))
        .collect();
    for s in services {
        wait_for_service(&nats, s).await;
    }
    let python = workspace_root().join(".local/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `source scripts/setup.sh` (it installs nats-py)",
        python.display()
    );
    let agent_id = AgentId::new("py-traced").unwrap();
    let mut agent = tokio::process::Command::new(python);
    testkit::tie_to_parent(agent.as_std_mut());
    let _agent = agent
        .arg("-u")
        .arg(workspace_root().join("examples/python/agent.py"))
        .args(["--agent-id", agent_id.as_str(), "--capability", "python"])
        .env("NATS_URL", server.url())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the Python agent registered",
        || async {
            let c = client.capacity(&Default::default()).await.ok()?;
            c.agents.contains_key(&agent_id).then_some(())
        },
    )
    .await;

    let root = tracing::info_span!("test-create");
    let trace_id = root.context().span().span_context().trace_id().to_string();
    let mut tasks = vec![task("a", &[]), task("b", &["a"])];
    for t in &mut tasks {
        t.requirements.capabilities = vec!["python".into()];
    }
    let created = client
        .create_flow(&FlowSpec::new("traced-py", tasks))
        .instrument(root)
        .await
        .unwrap();
    let done = eventually(Duration::from_secs(60), "the flow to finish", || async {
        let s = client.flow_status(&created.flow_id).await.ok()?;
        s.state.is_terminal().then_some(s)
    })
    .await;
    assert_eq!(done.state, FlowState::Succeeded, "{done:?}");

    // Every service exported its part, and the parts join up: the exports
    // come in batches, so wait for the whole trace rather than one of them.
    let mut instances = HashMap::new();
    for s in services {
        let info = nats
            .request(format!("{}.{s}", subject::SRV_INFO), "".into())
            .await
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
        instances.insert(
            format!("coord-{s}"),
            info["id"].as_str().unwrap().to_owned(),
        );
    }
    let ours: Vec<(String, String, String)> = capture
        .trace(&trace_id)
        .iter()
        .map(|s| {
            (
                s.span_context.span_id().to_string(),
                s.parent_span_id.to_string(),
                s.name.to_string(),
            )
        })
        .collect();
    // The hops each service must show; the agent's state write and event
    // for the last task may come after the flow is finished.
    let expected = [
        (
            "orchestrator",
            SpanKind::Server,
            format!("process {}", subject::FLOW_CREATE),
        ),
        (
            "orchestrator",
            SpanKind::Producer,
            "publish coord.agents.*.assign".to_owned(),
        ),
        (
            "orchestrator",
            SpanKind::Consumer,
            "process coord.agents.*.report".to_owned(),
        ),
        (
            "allocator",
            SpanKind::Server,
            format!("process {}", subject::ALLOCATE),
        ),
        (
            "synchronizer",
            SpanKind::Server,
            "process coord.agents.*.state.put".to_owned(),
        ),
        (
            "synchronizer",
            SpanKind::Server,
            "process coord.agents.*.events.task_done".to_owned(),
        ),
        (
            "orchestrator",
            SpanKind::Client,
            format!("request {}", subject::ALLOCATE),
        ),
        (
            "monitor",
            SpanKind::Consumer,
            "process coord.events.flow.completed".to_owned(),
        ),
    ];
    let absent = |spans: &[Exported]| -> Vec<String> {
        expected
            .iter()
            .filter(|(service, kind, name)| {
                !spans.iter().any(|e| {
                    service_of(e) == format!("coord-{service}")
                        && e.kind == *kind
                        && e.name == *name
                })
            })
            .map(|(service, kind, name)| format!("{kind:?} {name} from {service}"))
            .collect()
    };
    let joined = |spans: &[Exported]| -> Result<(), String> {
        let missing: Vec<String> = services
            .iter()
            .map(|s| format!("coord-{s}"))
            .filter(|name| !spans.iter().any(|e| service_of(e) == name))
            .collect();
        if !missing.is_empty() {
            return Err(format!("no spans yet from {missing:?}"));
        }
        let ids: std::collections::HashSet<&str> = spans
            .iter()
            .map(|e| e.span_id.as_str())
            .chain(ours.iter().map(|(id, _, _)| id.as_str()))
            .collect();
        let orphans: Vec<String> = spans
            .iter()
            .filter(|e| !ids.contains(e.parent_id.as_str()))
            .map(|e| format!("{} ({})", e.name, service_of(e)))
            .collect();
        if !orphans.is_empty() {
            return Err(format!(
                "spans whose parent is not in the trace: {orphans:?}"
            ));
        }
        let absent = absent(spans);
        if !absent.is_empty() {
            let names: std::collections::BTreeSet<String> = spans
                .iter()
                .map(|e| format!("{} {:?} {}", service_of(e), e.kind, e.name))
                .collect();
            return Err(format!("no span {absent:?}; there are {names:#?}"));
        }
        Ok(())
    };
    let started = std::time::Instant::now();
    let spans = loop {
        let spans: Vec<Exported> = received
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.trace_id == trace_id)
            .cloned()
            .collect();
        match joined(&spans) {
            Ok(()) => break spans,
            Err(why) => assert!(
                started.elapsed() < Duration::from_secs(30),
                "the flow's trace is not whole 30 s after it finished: {why}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let roots: Vec<&(String, String, String)> = ours
        .iter()
        .filter(|(_, parent, _)| parent == &SpanId::INVALID.to_string())
        .collect();
    assert_eq!(
        roots.iter().map(|r| r.2.as_str()).collect::<Vec<_>>(),
        ["test-create"],
        "one root: the span the flow was created in"
    );

    // By the messaging conventions, and with the resource an operator filters on.
    for e in &spans {
        let service = service_of(e);
        assert_eq!(
            e.resource.get("service.version").map(String::as_str),
            Some(common::service::VERSION),
            "{service}"
        );
        assert_eq!(
            e.resource.get("service.instance.id"),
            instances.get(service),
            "{service}'s spans name the instance $SRV.INFO shows"
        );
        if e.kind != SpanKind::Internal {
            assert_eq!(
                e.attributes.get("messaging.system").map(String::as_str),
                Some("nats"),
                "{e:?}"
            );
            assert!(
                e.attributes.contains_key("messaging.destination.name"),
                "{e:?}"
            );
            assert!(
                e.attributes.contains_key("messaging.operation.type"),
                "{e:?}"
            );
        }
    }
}
