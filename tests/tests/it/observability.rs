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
        prom_sample(&text, r#"coord_agents{state="online"}"#),
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
