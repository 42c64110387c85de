//! What an operator reads, checked with the ecosystem's own tools against
//! real services: the Prometheus scrape passes `promtool check metrics` and
//! names no id; `$SRV.STATS` `num_errors` counts failures and not refusals;
//! health stays `healthy` through a burst of `no_capacity` refusals on a
//! full pool, which it reports as a finding of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::msg::{AllocateRequest, Verdict};
use common::service::Service;
use common::{Error, ErrorCode};
use serde_json::{json, Value};
use testkit::{eventually, prom_sample, promtool, run_promtool, NatsServer, System};

use crate::monitor::{agent_with_delay, http_get, run_flow, wait_registered, work};

/// `GET /metrics` once the monitor has seen `at_least` tasks succeed.
async fn scrape(sys: &System, at_least: f64) -> String {
    let addr = sys.client.health_report().await.unwrap().http_addr.unwrap();
    eventually(Duration::from_secs(20), "tasks counted", || async {
        let (status, _, body) = http_get(&addr, "/metrics").await;
        let done = prom_sample(&body, r#"coord_task_transitions_total{state="succeeded"}"#)?;
        (status == 200 && done >= at_least).then_some(body)
    })
    .await
}

#[tokio::test]
async fn a_scrape_after_a_real_flow_passes_promtool_and_no_label_value_is_an_id() {
    let sys = System::start().await;
    // Ids no metric name, help text or label value could contain by chance.
    let (stop, agent) =
        agent_with_delay(&sys.nats, "zq7agent-k2v", 2.0, Arc::new(AtomicU64::new(1)));
    wait_registered(&sys.client, "zq7agent-k2v").await;
    run_flow(
        &sys.client,
        "zq7flow-x9w",
        vec![work("zq7task-a", &[]), work("zq7task-b", &["zq7task-a"])],
    )
    .await;
    // A health check fills in the verdict and the replicas.
    assert_eq!(sys.client.health().await.unwrap().verdict, Verdict::Healthy);
    let text = scrape(&sys, 2.0).await;
    assert!(!text.contains("zq7"), "an id became a label value:\n{text}");
    assert_eq!(
        prom_sample(&text, "coord_task_run_seconds_count"),
        Some(2.0)
    );
    assert_eq!(
        prom_sample(&text, r#"coord_flows_completed_total{state="succeeded"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        prom_sample(&text, r#"coord_agents{state="active"}"#),
        Some(1.0)
    );
    assert_eq!(
        prom_sample(&text, r#"coord_service_replicas{service="allocator"}"#),
        Some(1.0)
    );
    assert_eq!(
        prom_sample(
            &text,
            &format!(
                r#"coord_build_info{{version="{}"}}"#,
                common::service::VERSION
            )
        ),
        Some(1.0)
    );
    assert!(
        prom_sample(
            &text,
            r#"coord_requests_total{service="orchestrator",endpoint="orchestrator-flow-create"}"#
        )
        .is_some(),
        "{text}"
    );
    if let Some(promtool) = promtool() {
        let (ok, said) = run_promtool(&promtool, &["check", "metrics"], &text);
        assert!(ok, "promtool check metrics:\n{said}\n{text}");
    }
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();
}

/// The `$SRV.STATS` entry of `endpoint` of the service `name`.
async fn endpoint_stats(nats: &async_nats::Client, name: &str, endpoint: &str) -> Value {
    let reply = nats
        .request(format!("{}.{name}", common::subject::SRV_STATS), "".into())
        .await
        .unwrap();
    let stats: Value = serde_json::from_slice(&reply.payload).unwrap();
    stats["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == endpoint)
        .cloned()
        .unwrap_or_else(|| panic!("no endpoint {endpoint} in {stats}"))
}

#[tokio::test]
async fn num_errors_counts_a_failure_and_not_a_refusal() {
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let nats = server.connect().await;
    let mut service = Service::start(&nats, "obs-probe", "answers with the error asked for")
        .await
        .unwrap();
    service
        .serve("coord.obsprobe.answer", |req: Value| async move {
            let code: ErrorCode = serde_json::from_value(req["code"].clone()).unwrap();
            Err::<Value, _>(Error::new(code, format!("asked for {code}")))
        })
        .await
        .unwrap();
    for code in ["no_capacity", "conflict", "internal", "not_found"] {
        let reply = nats
            .request(
                "coord.obsprobe.answer",
                json!({ "code": code }).to_string().into(),
            )
            .await
            .unwrap();
        // The caller reads the usual JSON body and headers, failure or not.
        let body: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(body["error"]["code"], code, "{body}");
        let header = reply
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
            .map(|v| v.to_string());
        assert!(header.is_some(), "{code}: no error header");
    }
    let e = endpoint_stats(&nats, "obs-probe", "obsprobe-answer").await;
    assert_eq!(e["num_requests"], 4, "{e}");
    assert_eq!(e["num_errors"], 1, "only `internal` is a failure: {e}");
    assert_eq!(e["last_error"], "500:asked for internal", "{e}");
    assert_eq!(e["data"]["error_replies"], 4, "{e}");
    assert_eq!(e["data"]["errors_by_code"]["no_capacity"], 1, "{e}");
    assert_eq!(e["data"]["errors_by_code"]["internal"], 1, "{e}");
    service.stop().await;
}

#[tokio::test]
async fn health_stays_healthy_through_a_burst_of_no_capacity_refusals_on_a_full_pool() {
    let sys = System::start().await;
    let reg: common::msg::RegisterAgent = serde_json::from_value(json!({
        "agent_id": "burst-w1",
        "capacity": {"cpu": 1.0},
        "heartbeat_interval_ms": 60_000,
    }))
    .unwrap();
    sys.client.register_agent(&reg).await.unwrap();
    let ask = |owner: &str| -> AllocateRequest {
        serde_json::from_value(json!({
            "owner": owner,
            "requirements": {"resources": {"cpu": 1.0}},
        }))
        .unwrap()
    };
    // The pool is full…
    sys.client.allocate(&ask("holder")).await.unwrap();
    // …and every further request is refused, as it should be. The monitor
    // counts requests from its first look at the services on; wait until it
    // counts the allocator's, so the whole burst is after that look.
    let refused = AtomicU64::new(0);
    eventually(
        Duration::from_secs(20),
        "allocator requests counted",
        || async {
            let n = refused.fetch_add(1, Ordering::Relaxed);
            let err = sys
                .client
                .allocate(&ask(&format!("early-{n}")))
                .await
                .err()?;
            assert_eq!(err.code, ErrorCode::NoCapacity, "{err:?}");
            let h = sys.client.health().await.ok()?;
            let a = h.services.iter().find(|s| s.name == "allocator")?;
            (a.recent_requests >= 1).then_some(())
        },
    )
    .await;
    const BURST: u64 = 60;
    for i in 0..BURST {
        let err = sys
            .client
            .allocate(&ask(&format!("burst-{i}")))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::NoCapacity, "{err:?}");
    }
    let e = endpoint_stats(&sys.nats, "allocator", "allocator-allocate").await;
    assert_eq!(e["num_errors"], 0, "refusals are not failures: {e}");
    assert!(
        e["data"]["errors_by_code"]["no_capacity"].as_u64().unwrap() >= BURST,
        "{e}"
    );
    // Health has counted the burst (it polls the counts every second) and
    // still says healthy, with the full pool as a finding of its own.
    let h = eventually(Duration::from_secs(20), "the burst counted", || async {
        let h = sys.client.health().await.ok()?;
        let a = h.services.iter().find(|s| s.name == "allocator")?;
        (a.recent_requests >= BURST).then_some(h)
    })
    .await;
    assert_eq!(h.verdict, Verdict::Healthy, "{h:?}");
    assert!(h.reasons.is_empty(), "{:?}", h.reasons);
    let a = h.services.iter().find(|s| s.name == "allocator").unwrap();
    assert_eq!((a.failures, a.recent_failures), (0, 0), "{a:?}");
    assert!(a.errors_by_code["no_capacity"] >= BURST, "{a:?}");
    assert!(
        h.findings.iter().any(|f| f.contains("pool saturated: cpu")),
        "{:?}",
        h.findings
    );
    let addr = h_addr(&sys).await;
    let (_, _, text) = http_get(&addr, "/metrics").await;
    let refused = prom_sample(
        &text,
        r#"coord_request_errors_total{service="allocator",endpoint="allocator-allocate",code="no_capacity"}"#,
    )
    .unwrap_or(0.0);
    assert!(refused >= BURST as f64, "{text}");
    assert_eq!(
        prom_sample(
            &text,
            r#"coord_request_failures_total{service="allocator",endpoint="allocator-allocate"}"#
        ),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        prom_sample(&text, r#"coord_health{verdict="healthy"}"#),
        Some(1.0)
    );
    assert_eq!(
        prom_sample(&text, r#"coord_pool_used_ratio{resource="cpu"}"#),
        Some(1.0)
    );
}

async fn h_addr(sys: &System) -> String {
    sys.client.health_report().await.unwrap().http_addr.unwrap()
}

/// Every metric family a scrape declares (`# TYPE`), with a histogram's
/// `_bucket`, `_sum` and `_count` series.
fn declared(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for l in text.lines() {
        let mut parts = l
            .strip_prefix("# TYPE ")
            .into_iter()
            .flat_map(|r| r.split(' '));
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        out.insert(name.to_owned());
        if kind == "histogram" {
            for s in ["_bucket", "_sum", "_count"] {
                out.insert(format!("{name}{s}"));
            }
        }
    }
    out
}

/// The `coord_…` metric names a PromQL expression reads.
fn metrics_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("coord_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.push(name);
    }
    out
}

/// The shipped Prometheus config, alert rules and Grafana dashboard: valid by
/// promtool, the rules' own unit tests pass, and every metric they read is
/// one a real scrape declares.
#[tokio::test]
async fn the_operator_kit_reads_only_metrics_a_real_scrape_has() {
    let root = testkit::workspace_root();
    let dir = root.join("deploy/prometheus");
    if let Some(promtool) = promtool() {
        for args in [
            vec!["check", "rules", "alerts.yml"],
            vec!["check", "config", "prometheus.yml"],
            vec!["test", "rules", "alerts.test.yml"],
        ] {
            let out = std::process::Command::new(&promtool)
                .args(&args)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "promtool {args:?}:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    let sys = System::start().await;
    let (stop, agent) = agent_with_delay(&sys.nats, "kit-w1", 1.0, Arc::new(AtomicU64::new(1)));
    wait_registered(&sys.client, "kit-w1").await;
    run_flow(&sys.client, "kit-f1", vec![work("a", &[])]).await;
    sys.client.health().await.unwrap();
    let known = declared(&scrape(&sys, 1.0).await);
    stop.send(()).unwrap();
    agent.await.unwrap().unwrap();

    let rules: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("alerts.yml")).unwrap()).unwrap();
    let mut alerts = std::collections::BTreeSet::new();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            alerts.insert(name.to_owned());
            let expr = rule["expr"].as_str().unwrap();
            for m in metrics_in(expr) {
                assert!(
                    known.contains(&m),
                    "alert {name} reads {m}, which no scrape has"
                );
            }
        }
    }
    for wanted in [
        "CoordAgentLost",
        "CoordFlowStuck",
        "CoordErrorSpike",
        "CoordPoolSaturated",
        "CoordNatsDown",
        "CoordAgentEventSurge",
        "CoordAgentEventsSilent",
    ] {
        assert!(alerts.contains(wanted), "{wanted} missing: {alerts:?}");
    }

    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/coordkit.json")).unwrap(),
    )
    .unwrap();
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let inputs: Vec<String> = dash["__inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| format!("${{{}}}", i["name"].as_str().unwrap()))
        .collect();
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut ids = std::collections::BTreeSet::new();
    let mut read = std::collections::BTreeSet::new();
    for p in panels {
        let title = p["title"].as_str().unwrap();
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "{title}: id repeated"
        );
        assert!(
            ["stat", "timeseries"].contains(&p["type"].as_str().unwrap()),
            "{title}"
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().unwrap(), g["w"].as_u64().unwrap());
        assert!(x + w <= 24 && g["h"].as_u64().unwrap() > 0, "{title}: {g}");
        assert!(
            inputs.contains(&p["datasource"]["uid"].as_str().unwrap().to_owned()),
            "{title}: datasource not an input"
        );
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        let mut refs = std::collections::BTreeSet::new();
        for t in targets {
            assert!(
                refs.insert(t["refId"].as_str().unwrap()),
                "{title}: refId repeated"
            );
            let expr = t["expr"].as_str().unwrap();
            let metrics = metrics_in(expr);
            assert!(!metrics.is_empty(), "{title}: {expr} reads no coord metric");
            for m in metrics {
                assert!(
                    known.contains(&m),
                    "panel {title} reads {m}, which no scrape has"
                );
                read.insert(m);
            }
        }
    }
    for m in [
        "coord_requests_total",
        "coord_request_failures_total",
        "coord_task_run_seconds_bucket",
        "coord_agents",
        "coord_pool_used_ratio",
    ] {
        assert!(read.contains(m), "the dashboard shows {m}");
    }
}
