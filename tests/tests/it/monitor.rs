//! The monitor against a real nats-server: every query over the wire, the
//! HTTP endpoints, cross-service
//! validation finding a planted violation, and anomaly detection seeing an
//! injected latency spike and throughput drop once each, and nothing in a
//! steady run; health reading the NATS server's monitoring endpoint; queue
//! depth read from the assignments stream. The dashboard is in `dashboard`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::msg::{
    AllocateRequest, AnomaliesRequest, AnomalyKind, Event, EventKind, FlowSpec, Requirements,
    TaskSpec, Verdict,
};
use common::{subject, AgentId, Client, ErrorCode, FlowId, TaskId};
use coordkit::agent::{self, AgentOptions, TaskFailure};
use futures::StreamExt;
use serde_json::{json, Value};
use testkit::{
    eventually, prom_sample, start_service, wait_for_service, NatsServer, ServiceHandle, System,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

pub(crate) fn work(id: &str, deps: &[&str]) -> TaskSpec {
    let mut t = TaskSpec::new(TaskId::new(id).unwrap());
    t.kind = "work".into();
    t.requirements = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    t.depends_on = deps.iter().map(|d| TaskId::new(*d).unwrap()).collect();
    t
}

pub(crate) fn flow(id: &str, tasks: Vec<TaskSpec>) -> FlowSpec {
    serde_json::from_value(json!({"id": id, "name": id, "tasks": tasks})).unwrap()
}

/// An agent whose tasks take `delay` ms each; stops when the sender fires.
pub(crate) fn agent_with_delay(
    nats: &async_nats::Client,
    id: &str,
    cpu: f64,
    delay: Arc<AtomicU64>,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), common::Error>>,
) {
    let mut opts = AgentOptions::new(AgentId::new(id).unwrap()).capacity("cpu", cpu);
    opts.heartbeat_interval = Duration::from_millis(300);
    opts.concurrency = cpu as usize;
    let (stop, stopped) = oneshot::channel::<()>();
    let handler = move |_a: common::msg::Assignment| {
        let delay = delay.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(delay.load(Ordering::Relaxed))).await;
            Ok::<_, TaskFailure>(json!({"ok": true}))
        }
    };
    let handle = tokio::spawn(agent::run(nats.clone(), opts, handler, async {
        let _ = stopped.await;
    }));
    (stop, handle)
}

pub(crate) async fn wait_registered(client: &Client, agent: &str) {
    let id = AgentId::new(agent).unwrap();
    eventually(Duration::from_secs(10), "agent registered", || async {
        client
            .capacity(&Default::default())
            .await
            .ok()?
            .agents
            .contains_key(&id)
            .then_some(())
    })
    .await;
}

pub(crate) async fn run_flow(client: &Client, id: &str, tasks: Vec<TaskSpec>) -> FlowId {
    let created = client.create_flow(&flow(id, tasks)).await.unwrap();
    let fid = created.flow_id.clone();
    eventually(Duration::from_secs(30), "flow to finish", || async {
        let s = client.flow_status(&fid).await.ok()?;
        s.state.is_terminal().then_some(())
    })
    .await;
    fid
}

/// `GET path` on `addr`: status and body.
pub(crate) async fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("content-type: "))
        .unwrap_or("")
        .to_owned();
    (status, content_type, body.to_owned())
}

#[tokio::test]
async fn monitor_queries_answer_over_the_wire_after_a_flow_runs() {
    let sys = System::start().await;
    let delay = Arc::new(AtomicU64::new(5));
    let (stop, agent) = agent_with_delay(&sys.nats, "mon-w1", 4.0, delay);
    wait_registered(&sys.client, "mon-w1").await;
    run_flow(
        &sys.client,
        "mon-f1",
        vec![work("a", &[]), work("b", &["a"]), work("c", &["a"])],
    )
    .await;

    let m = eventually(Duration::from_secs(10), "latencies measured", || async {
        let m = sys.client.metrics().await.ok()?;
        (m.latency.get("run_time")?.count >= 3).then_some(m)
    })
    .await;
    assert!(m.tasks_completed >= 3);
    assert!(m.latency["queue_wait"].count >= 3);
    assert!(m.latency["end_to_end"].count >= 3);
    assert!(m.task_rates["succeeded"].last_1m > 0.0);
    assert!(m.agents_online >= 1, "{m:?}");
    assert!(m.message_rates.contains_key("coord.agents.*.report"));

    let a = sys.client.analysis().await.unwrap();
    assert_eq!(a.slowest_agents[0].name, "mon-w1");
    assert_eq!(a.slowest_kinds[0].name, "work");
    assert_eq!(a.slowest_kinds[0].runs, 3);
    assert!(a.slowest_flows.iter().any(|f| f.name == "mon-f1"));
    assert_eq!(a.bottleneck.as_ref().unwrap().resource, "cpu");
    assert!(a.trends.iter().any(|t| t.series == "tasks_succeeded"));

    let h = sys.client.health().await.unwrap();
    assert_eq!(h.verdict, Verdict::Healthy, "{:?}", h.reasons);
    for name in testkit::SERVICES {
        let s = h.services.iter().find(|s| s.name == name).unwrap();
        assert_eq!(s.replicas, 1, "{name}");
    }
    assert!(h
        .streams
        .iter()
        .any(|s| s.name == common::nats::STREAM_EVENTS));

    let v = sys.client.validate_system().await.unwrap();
    assert!(v.valid, "{:?}", v.violations);
    assert!(v.agents_checked >= 1 && v.flows_checked >= 1);

    let r = sys.client.health_report().await.unwrap();
    assert!(r.http_addr.is_some());
    assert!(r.metrics.tasks_completed >= 3);
    assert!(r.validation.valid);

    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn bad_monitor_requests_get_typed_errors_and_the_monitor_stays_up() {
    let sys = System::start().await;
    let err = sys
        .client
        .request::<_, Value>(subject::MONITOR_ANOMALIES, &json!({"limt": 3}))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    assert!(err.message.contains("limt"), "{}", err.message);
    let err = sys
        .client
        .anomalies(&AnomaliesRequest {
            limit: Some(0),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    let err = sys
        .client
        .request::<_, Value>(subject::MONITOR_REPORT, &json!([1]))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    // Still serving, and the error replies show up in its own stats.
    sys.client.metrics().await.unwrap();
    let h = sys.client.health().await.unwrap();
    let me = h.services.iter().find(|s| s.name == "monitor").unwrap();
    assert!(me.errors >= 3, "{me:?}");
}

#[tokio::test]
async fn queue_depth_counts_assignments_an_agent_has_not_taken() {
    let sys = System::start().await;
    // An agent that registers and listens, then never starts what it is sent.
    let agent = AgentId::new("queue-w1").unwrap();
    let reg: common::msg::RegisterAgent = serde_json::from_value(json!({
        "agent_id": agent,
        "capacity": {"cpu": 4.0},
        "heartbeat_interval_ms": 60_000,
    }))
    .unwrap();
    sys.client.register_agent(&reg).await.unwrap();
    let _listens = sys.nats.subscribe(subject::assign(&agent)).await.unwrap();
    sys.nats.flush().await.unwrap();
    let tasks = vec![work("a", &[]), work("b", &[]), work("c", &[])];
    sys.client
        .create_flow(&flow("queue-f1", tasks))
        .await
        .unwrap();
    let m = eventually(
        Duration::from_secs(20),
        "three assignments waiting",
        || async {
            // A health check reads the streams (as the probe loop does).
            sys.client.health().await.ok()?;
            let m = sys.client.metrics().await.ok()?;
            (m.queue_depth == 3).then_some(m)
        },
    )
    .await;
    assert_eq!(m.queue_depth_by_agent, [("queue-w1".to_string(), 3)].into());
    assert_eq!(m.queue_depth_peak.last_1m, 3.0, "{:?}", m.queue_depth_peak);
    assert_eq!(m.queue_depth_peak.last_1h, 3.0);
    let (_, _, text) = http_get(
        &sys.client.health_report().await.unwrap().http_addr.unwrap(),
        "/metrics",
    )
    .await;
    assert!(text.contains("coord_queue_depth 3"), "{text}");
    // Per-agent depth is the JSON API's; an agent id is never a label value.
    assert!(!text.contains("queue-w1"), "{text}");
}

#[tokio::test]
async fn validation_lists_an_allocation_no_task_holds() {
    let sys = System::start().await;
    let (stop, agent) = agent_with_delay(&sys.nats, "val-w1", 2.0, Arc::new(AtomicU64::new(1)));
    wait_registered(&sys.client, "val-w1").await;
    let fid = run_flow(&sys.client, "val-f1", vec![work("a", &[])]).await;
    assert!(sys.client.validate_system().await.unwrap().valid);

    // Capacity taken in the name of a task that has finished.
    let req: AllocateRequest = serde_json::from_value(json!({
        "owner": format!("{fid}/a"),
        "requirements": {"resources": {"cpu": 1.0}},
    }))
    .unwrap();
    let alloc = sys.client.allocate(&req).await.unwrap();
    let v = sys.client.validate_system().await.unwrap();
    assert!(!v.valid);
    assert_eq!(v.violations.len(), 1, "{:?}", v.violations);
    assert_eq!(v.violations[0].rule, "allocation_without_task");
    assert_eq!(v.violations[0].subject, alloc.allocation_id.as_str());
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn http_serves_prometheus_text_health_report_flows_and_the_dashboard() {
    let sys = System::start().await;
    let (stop, agent) = agent_with_delay(&sys.nats, "http-w1", 2.0, Arc::new(AtomicU64::new(1)));
    wait_registered(&sys.client, "http-w1").await;
    run_flow(
        &sys.client,
        "http-f1",
        vec![work("a", &[]), work("b", &["a"])],
    )
    .await;
    let addr = sys.client.health_report().await.unwrap().http_addr.unwrap();

    let (status, ctype, body) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    assert!(prom_sample(&body, "coord_messages_total").unwrap() > 0.0);
    assert!(
        prom_sample(&body, r#"coord_task_transitions_total{state="succeeded"}"#).unwrap() >= 2.0,
        "{body}"
    );
    assert!(prom_sample(&body, "coord_task_run_seconds_count").unwrap() >= 2.0);

    let (status, _, body) = http_get(&addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    let h: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["verdict"], "healthy");

    let (status, _, body) = http_get(&addr, "/report").await;
    assert_eq!(status, 200);
    let r: Value = serde_json::from_str(&body).unwrap();
    assert!(r["metrics"]["tasks_completed"].as_u64().unwrap() >= 2);

    // Served from the monitor's watch of the flows bucket, not a read of it.
    let f: Value = eventually(Duration::from_secs(10), "flows from the watch", || async {
        let (status, _, body) = http_get(&addr, "/api/flows?q=http-f1").await;
        assert_eq!(status, 200, "{body}");
        let f: Value = serde_json::from_str(&body).unwrap();
        (f["source"] == "watch" && f["flows"][0]["state"] == "succeeded").then_some(f)
    })
    .await;
    let fl = f["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "http-f1")
        .unwrap();
    assert_eq!(fl["tasks"].as_array().unwrap().len(), 2);
    assert!(f["agents"]["http-w1"]["cpu"]["capacity"].as_f64().unwrap() == 2.0);

    let (status, ctype, body) = http_get(&addr, "/").await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/html"), "{ctype}");
    assert!(body.contains("coordkit monitor") && body.contains("/api/flows"));
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_lost_agent_is_an_anomaly_event_and_queryable() {
    let sys = System::start().await;
    let mut events = sys
        .nats
        .subscribe(subject::event::anomaly(AnomalyKind::AgentLost))
        .await
        .unwrap();
    // Registered with a short heartbeat interval, and then silent.
    let reg: common::msg::RegisterAgent = serde_json::from_value(json!({
        "agent_id": "lost-w1", "capacity": {"cpu": 1.0}, "heartbeat_interval_ms": 150
    }))
    .unwrap();
    sys.client.register_agent(&reg).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("anomaly event")
        .unwrap();
    let event: Event = serde_json::from_slice(&msg.payload).unwrap();
    let EventKind::AnomalyDetected { anomaly } = event.kind else {
        panic!("not an anomaly: {event:?}");
    };
    assert_eq!(anomaly.subject, "lost-w1");
    assert_eq!(event.source, "monitor");
    let list = sys
        .client
        .anomalies(&AnomaliesRequest {
            kind: Some(AnomalyKind::AgentLost),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(list.anomalies.len(), 1);
    assert_eq!(list.anomalies[0].anomaly_id, anomaly.anomaly_id);
    assert!(sys.client.metrics().await.unwrap().agents_lost >= 1);
}

/// The other three services on a fresh server, and a monitor judging every
/// `interval_ms`, started once traffic flows (so its baseline is the steady run).
#[tokio::test]
async fn an_injected_latency_spike_and_throughput_drop_are_each_reported_once() {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let _services: Vec<ServiceHandle> = ["orchestrator", "allocator", "synchronizer"]
        .into_iter()
        .map(|n| start_service(n, server.config()))
        .collect();
    let nats = server.connect().await;
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(10));
    for n in ["orchestrator", "allocator", "synchronizer"] {
        wait_for_service(&nats, n).await;
    }
    let delay = Arc::new(AtomicU64::new(10));
    let (stop, agent) = agent_with_delay(&nats, "an-w1", 16.0, delay.clone());
    wait_registered(&client, "an-w1").await;

    // Steady load: one single-task flow every 50 ms.
    let feeding = Arc::new(AtomicBool::new(true));
    let feeder = {
        let (client, feeding) = (client.clone(), feeding.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while feeding.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let _ = client
                    .create_flow(&flow(&format!("an-{n}"), vec![work("a", &[])]))
                    .await;
            }
        })
    };
    eventually(Duration::from_secs(20), "tasks flowing", || async {
        let s = client.list_flows(&Default::default()).await.ok()?;
        (s.flows.len() >= 20).then_some(())
    })
    .await;

    let mut events = nats.subscribe(subject::event::ANOMALY_ALL).await.unwrap();
    let monitor = ServiceHandle::spawn("monitor", {
        let mut c = ::monitor::Config::new(server.config());
        c.http_addr = "127.0.0.1:0".into();
        c.detect_interval_ms = 1_000;
        c.detect_warmup = 6;
        move |rx| async move {
            ::monitor::run(c, async {
                let _ = rx.await;
            })
            .await
        }
    });
    wait_for_service(&nats, "monitor").await;

    // Steady: past the warm-up and a while longer, nothing is reported.
    eventually(
        Duration::from_secs(60),
        "a steady run past the warm-up",
        || async {
            let m = client.metrics().await.ok()?;
            (m.at_ms.saturating_sub(m.since_ms) >= 12_000).then_some(())
        },
    )
    .await;
    let quiet = client.anomalies(&Default::default()).await.unwrap();
    assert_eq!(quiet.anomalies, vec![], "anomalies in a steady run");

    // Latency spike: every task now takes 300 ms (the agent has room for them all).
    delay.store(300, Ordering::Relaxed);
    let spike = eventually(
        Duration::from_secs(30),
        "latency spike reported",
        || async {
            let l = client.anomalies(&Default::default()).await.ok()?;
            l.anomalies
                .into_iter()
                .find(|a| a.kind == AnomalyKind::LatencySpike && a.subject == "run_time")
        },
    )
    .await;
    assert!(spike.value >= 250.0, "{spike:?}");
    delay.store(10, Ordering::Relaxed);
    // Back to normal for a few intervals, then the feed stops.
    let back = client.metrics().await.unwrap().at_ms;
    eventually(Duration::from_secs(30), "recovered", || async {
        let m = client.metrics().await.ok()?;
        (m.at_ms >= back + 4_000).then_some(())
    })
    .await;
    // On a loaded machine the spike may have slowed completions enough to
    // be a drop of its own; the one asserted is the drop the stopped feed
    // makes, reported once however long the silence lasts.
    let earlier: Vec<String> = client
        .anomalies(&Default::default())
        .await
        .unwrap()
        .anomalies
        .into_iter()
        .filter(|a| a.kind == AnomalyKind::ThroughputDrop)
        .map(|a| a.anomaly_id)
        .collect();
    feeding.store(false, Ordering::Relaxed);
    feeder.await.unwrap();
    let drop = eventually(
        Duration::from_secs(30),
        "throughput drop reported",
        || async {
            let l = client.anomalies(&Default::default()).await.ok()?;
            l.anomalies
                .into_iter()
                .find(|a| a.kind == AnomalyKind::ThroughputDrop && !earlier.contains(&a.anomaly_id))
        },
    )
    .await;
    assert!(drop.expected > drop.value, "{drop:?}");
    // A few more intervals of silence: still one drop.
    let after = client.metrics().await.unwrap().at_ms;
    eventually(Duration::from_secs(30), "more intervals", || async {
        let m = client.metrics().await.ok()?;
        (m.at_ms >= after + 3_000).then_some(())
    })
    .await;

    let all = client
        .anomalies(&Default::default())
        .await
        .unwrap()
        .anomalies;
    let drops = all
        .iter()
        .filter(|a| a.kind == AnomalyKind::ThroughputDrop && !earlier.contains(&a.anomaly_id))
        .count();
    assert_eq!(drops, 1, "{all:#?}");
    let run_spikes = all
        .iter()
        .filter(|a| a.kind == AnomalyKind::LatencySpike && a.subject == "run_time")
        .count();
    assert_eq!(run_spikes, 1, "{all:#?}");

    // Each was also published as an event.
    let mut seen = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
        seen.push(m.subject.to_string());
    }
    assert!(
        seen.contains(&subject::event::anomaly(AnomalyKind::ThroughputDrop).to_owned()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&subject::event::anomaly(AnomalyKind::LatencySpike).to_owned()),
        "{seen:?}"
    );

    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
    monitor.stop().await.unwrap();
}

/// A nats-server with its monitoring port on, killed on drop.
struct MonitoredServer {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    nats_url: String,
    http_url: String,
}

impl Drop for MonitoredServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn monitored_server() -> MonitoredServer {
    let dir = tempfile::tempdir().unwrap();
    let ports = dir.path().join("ports");
    std::fs::create_dir_all(&ports).unwrap();
    let mut command = std::process::Command::new(testkit::nats_server_bin().unwrap());
    command
        .args(["-a", "127.0.0.1", "-p", "-1", "-m", "-1", "-js", "-sd"])
        .arg(dir.path().join("store"))
        .arg("--ports_file_dir")
        .arg(&ports)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = testkit::spawn_tied(command).unwrap();
    let mut server = MonitoredServer {
        child,
        _dir: dir,
        nats_url: String::new(),
        http_url: String::new(),
    };
    let (nats_url, http_url) = eventually(Duration::from_secs(20), "ports file", || async {
        let entry = std::fs::read_dir(&ports).ok()?.next()?.ok()?;
        let v: Value = serde_json::from_str(&std::fs::read_to_string(entry.path()).ok()?).ok()?;
        Some((
            v["nats"][0].as_str()?.to_owned(),
            v["monitoring"][0].as_str()?.to_owned(),
        ))
    })
    .await;
    server.nats_url = nats_url;
    server.http_url = http_url;
    server
}

#[tokio::test]
async fn health_reads_the_nats_server_monitoring_endpoint_when_configured() {
    common::telemetry::init_for_tests();
    let server = monitored_server().await;
    let cfg = common::config::NatsConfig::new(server.nats_url.clone());
    let _services: Vec<ServiceHandle> = ["orchestrator", "allocator", "synchronizer"]
        .into_iter()
        .map(|n| start_service(n, cfg.clone()))
        .collect();
    let mut c = ::monitor::Config::new(cfg);
    c.http_addr = "127.0.0.1:0".into();
    c.nats_monitor_url = Some(server.http_url.clone());
    let monitor = ServiceHandle::spawn("monitor", move |rx| async move {
        ::monitor::run(c, async {
            let _ = rx.await;
        })
        .await
    });
    let nats = async_nats::connect(&server.nats_url).await.unwrap();
    for n in testkit::SERVICES {
        wait_for_service(&nats, n).await;
    }
    let client = Client::new(nats);
    let h = client.health().await.unwrap();
    assert_eq!(h.verdict, Verdict::Healthy, "{:?}", h.reasons);
    let varz = h.nats_server.expect("the server's /varz");
    assert!(varz["version"].as_str().unwrap().starts_with('2'), "{varz}");
    assert!(varz["connections"].as_u64().unwrap() >= 4, "{varz}");
    monitor.stop().await.unwrap();
}
