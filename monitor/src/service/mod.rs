//! The monitor's adapter: subscriptions to every one-way subject and a poll
//! of the services' request counts feeding the
//! [`Monitor`](crate::machine::Monitor), request/reply endpoints for every
//! query, a detection tick, a probe loop, and the HTTP server.

mod actions;
mod board;
mod http;
mod probe;
mod views;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use common::msg::{
    AnalysisRequest, AnomaliesRequest, AnomalyList, CapacityStatus, EventKind, HealthReport,
    HealthRequest, HealthStatus, MetricsRequest, PerformanceAnalysis, ReportRequest, SystemMetrics,
    SystemValidateRequest, SystemValidation, Verdict,
};
use common::nats::{self as bus, EventPublisher};
use common::service::Service;
use common::{subject, Error};
use futures::StreamExt;
use serde_json::Value;

use crate::machine::{analysis, health, validate, Monitor, Settings};

/// Monitor settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub nats: common::config::NatsConfig,
    /// Where to serve `/metrics`, `/healthz`, `/report` and the dashboard (port 0: any free port).
    #[arg(long, env = "MONITOR_HTTP_ADDR", default_value = DEFAULT_HTTP_ADDR)]
    pub http_addr: String,
    /// The NATS server's monitoring endpoint (e.g. `http://127.0.0.1:8222`), read for health.
    #[arg(long, env = "MONITOR_NATS_MONITOR_URL")]
    pub nats_monitor_url: Option<String>,
    /// How often the series are judged for anomalies, in ms.
    #[arg(long, env = "MONITOR_DETECT_INTERVAL_MS", default_value_t = 10_000)]
    pub detect_interval_ms: u64,
    /// Intervals a series is watched before it is judged.
    #[arg(long, env = "MONITOR_DETECT_WARMUP", default_value_t = 8)]
    pub detect_warmup: usize,
    /// How often capacity, consumers and service stats are polled, in ms.
    #[arg(long, env = "MONITOR_PROBE_INTERVAL_MS", default_value_t = 15_000)]
    pub probe_interval_ms: u64,
    /// Turns the dashboard's actions on (pause, resume, cancel, rerun, drain):
    /// the token each action must carry as `Authorization: Bearer …`, at
    /// least 16 characters. Unset: the dashboard only shows.
    #[arg(long, env = "MONITOR_ACTIONS_TOKEN", hide_env_values = true)]
    pub actions_token: Option<String>,
    /// Time between two points of the dashboard's charts, in ms (it keeps
    /// 360: an hour at the default).
    #[arg(long, env = "MONITOR_HISTORY_STEP_MS", default_value_t = crate::machine::history::STEP_MS)]
    pub history_step_ms: u64,
}

pub const DEFAULT_HTTP_ADDR: &str = "0.0.0.0:9090";

impl Config {
    pub fn new(nats: common::config::NatsConfig) -> Self {
        Config {
            nats,
            http_addr: DEFAULT_HTTP_ADDR.to_owned(),
            nats_monitor_url: None,
            detect_interval_ms: 10_000,
            detect_warmup: 8,
            probe_interval_ms: 15_000,
            actions_token: None,
            history_step_ms: crate::machine::history::STEP_MS,
        }
    }
}

const NAME: &str = "monitor";
/// Anomalies returned by one query at most (all that are kept).
pub const MAX_ANOMALIES_REPLY: usize = crate::machine::MAX_ANOMALIES;

/// What the endpoints, loops and HTTP handlers share.
pub(crate) struct Shared {
    monitor: Mutex<Monitor>,
    nats: async_nats::Client,
    js: jetstream::Context,
    client: common::Client,
    nats_monitor_url: Option<String>,
    /// The last health verdict and the replicas of each service then.
    last_verdict: Mutex<(Option<Verdict>, std::collections::BTreeMap<String, u64>)>,
    http_addr: Option<String>,
    http: reqwest::Client,
    /// The dashboard actions' token; `None`: actions are off.
    actions_token: Option<String>,
    history_step_ms: u64,
    /// The flows bucket, kept current by a watch, for the dashboard.
    board: Arc<board::Board>,
}

fn poisoned() -> Error {
    Error::internal("monitor state lock poisoned")
}

impl Shared {
    fn with<R>(&self, f: impl FnOnce(&mut Monitor) -> R) -> Result<R, Error> {
        self.monitor
            .lock()
            .map(|mut m| f(&mut m))
            .map_err(|_| poisoned())
    }

    async fn metrics(&self) -> Result<SystemMetrics, Error> {
        self.with(|m| m.metrics(common::now_ms()))
    }

    async fn capacity(&self) -> Result<CapacityStatus, Error> {
        self.client.capacity(&Default::default()).await
    }

    async fn analysis(&self) -> Result<PerformanceAnalysis, Error> {
        let now = common::now_ms();
        let mut notes = Vec::new();
        let bottleneck = match self.capacity().await {
            Ok(cap) => analysis::bottleneck(&cap),
            Err(e) => {
                notes.push(format!("no bottleneck: allocator: {}", e.message));
                None
            }
        };
        let flows = match probe::flow_records(&self.js).await {
            Ok(f) => f.into_iter().map(|(_, v)| v).collect(),
            Err(e) => {
                notes.push(format!("no task kinds: {}", e.message));
                Vec::new()
            }
        };
        let slowest_kinds = analysis::slowest_kinds(&flows, now.saturating_sub(3_600_000));
        self.with(|m| {
            let n = analysis::TREND_MINUTES + 1;
            let mut trends: Vec<_> = m
                .task_minutes(now, n)
                .into_iter()
                .map(|(k, v)| analysis::trend(k, &v))
                .collect();
            trends.extend(
                m.family_minutes(now, n)
                    .into_iter()
                    .map(|(k, v)| analysis::trend(&format!("messages:{k}"), &v)),
            );
            PerformanceAnalysis {
                at_ms: now,
                trends,
                slowest_agents: m.slowest_agents(),
                slowest_kinds,
                slowest_flows: m.slowest_flows(),
                bottleneck,
                notes,
            }
        })
    }

    async fn anomalies(&self, req: AnomaliesRequest) -> Result<AnomalyList, Error> {
        let limit = req.limit.unwrap_or(MAX_ANOMALIES_REPLY);
        if limit == 0 {
            return Err(Error::bad_request("limit must be at least 1"));
        }
        // `unknown` stands for kinds newer than this build in events; as a
        // filter someone typed it is a typo that would silently match nothing.
        if req.kind == Some(common::msg::AnomalyKind::Unknown) {
            return Err(Error::bad_request("unknown anomaly kind"));
        }
        self.with(|m| AnomalyList {
            anomalies: m
                .anomalies()
                .filter(|a| req.since_ms.is_none_or(|s| a.at_ms >= s))
                .filter(|a| req.kind.is_none_or(|k| a.kind == k))
                .take(limit)
                .cloned()
                .collect(),
            total: m.anomalies_total(),
        })
    }

    /// Counts the requests the services took since their previous answers.
    async fn poll_requests(&self) -> Result<(), Error> {
        let stats = probe::gather(&self.nats, subject::SRV_STATS).await?;
        self.with(|m| m.observe_requests(common::now_ms(), &stats))
    }

    async fn health(&self) -> Result<HealthStatus, Error> {
        let (pings, stats) = tokio::join!(
            probe::gather(&self.nats, subject::SRV_PING),
            probe::gather(&self.nats, subject::SRV_STATS)
        );
        let stats = stats?;
        // Fresh answers are request counts too; older ones arriving late add nothing.
        self.with(|m| m.observe_requests(common::now_ms(), &stats))?;
        let mut services = health::services(&pings?, &stats);
        // A full pool is a finding of its own; read it fresh.
        if let Ok(cap) = self.capacity().await {
            self.with(|m| m.observe_capacity(common::now_ms(), &cap))?;
        }
        let (recent, saturated) =
            self.with(|m| (m.recent_requests(common::now_ms()), m.saturated()))?;
        health::with_recent(&mut services, &recent);
        let streams = probe::streams(&self.js).await;
        let nats_server = match &self.nats_monitor_url {
            Some(url) => Some(probe::http_get_json(&self.http, url, "/varz").await),
            None => None,
        };
        let (verdict, reasons) = health::verdict(&services, &streams, nats_server.as_ref());
        if let Ok(mut v) = self.last_verdict.lock() {
            let replicas = services
                .iter()
                .map(|s| (s.name.clone(), s.replicas as u64))
                .collect();
            *v = (Some(verdict), replicas);
        }
        let allocation_failures: u64 = services
            .iter()
            .filter(|s| s.name == "allocator")
            .flat_map(|s| s.errors_by_endpoint.iter())
            .filter(|(e, _)| e.starts_with("allocator-allocate"))
            .map(|(_, n)| n)
            .sum();
        let streams = streams.unwrap_or_default();
        let now = common::now_ms();
        self.with(|m| {
            m.set_allocation_failures(allocation_failures);
            m.observe_streams(now, &streams);
        })?;
        Ok(HealthStatus {
            at_ms: now,
            verdict,
            reasons,
            findings: health::findings(&saturated),
            services,
            streams,
            nats_server: nats_server.and_then(Result::ok).map(varz_summary),
        })
    }

    async fn validate(&self) -> Result<SystemValidation, Error> {
        let agents = probe::records(&self.js, bus::KV_AGENTS).await?;
        let flows = probe::flow_records(&self.js).await?;
        let now = common::now_ms();
        let violations = validate::validate(&agents, &flows, now);
        Ok(SystemValidation {
            at_ms: now,
            valid: violations.is_empty(),
            violations,
            agents_checked: agents.len(),
            flows_checked: flows.len(),
        })
    }

    async fn report(&self) -> Result<HealthReport, Error> {
        let (health, validation) = tokio::join!(self.health(), self.validate());
        let anomalies = self
            .anomalies(AnomaliesRequest {
                limit: Some(20),
                ..Default::default()
            })
            .await?
            .anomalies;
        Ok(HealthReport {
            at_ms: common::now_ms(),
            health: health?,
            metrics: self.metrics().await?,
            anomalies,
            validation: validation?,
            http_addr: self.http_addr.clone(),
        })
    }
}

/// The fields of `/varz` worth reporting.
fn varz_summary(v: Value) -> Value {
    let keep = [
        "server_name",
        "version",
        "uptime",
        "connections",
        "in_msgs",
        "out_msgs",
        "in_bytes",
        "out_bytes",
        "slow_consumers",
        "mem",
        "cpu",
    ];
    let mut out = serde_json::Map::new();
    for k in keep {
        if let Some(x) = v.get(k) {
            out.insert(k.to_owned(), x.clone());
        }
    }
    Value::Object(out)
}

async fn publish(events: &EventPublisher, found: Vec<common::msg::Anomaly>) {
    for anomaly in found {
        tracing::warn!(kind = anomaly.kind.as_str(), subject = %anomaly.subject, "{}", anomaly.message);
        events.publish(EventKind::AnomalyDetected { anomaly }).await;
    }
}

/// Longest time between two polls of the services' request counts; shorter
/// when detection runs more often, so every detection interval sees its
/// requests.
const REQUEST_POLL: Duration = Duration::from_secs(1);

/// Runs the monitor until `shutdown` resolves, then drains the connection.
///
/// Every replica sees all traffic (plain subscriptions, not a queue group, and
/// every service replica's request counts), so each answers for the whole
/// system.
pub async fn run(cfg: Config, shutdown: impl Future) -> anyhow::Result<()> {
    // NATS may not be up yet: wait for it, unless asked to stop first.
    tokio::pin!(shutdown);
    let actions_token = actions::token(cfg.actions_token.as_deref())?;
    let Some(nats) = bus::connect_until(&cfg.nats, NAME, shutdown.as_mut()).await? else {
        return Ok(());
    };
    let listener = tokio::net::TcpListener::bind(&cfg.http_addr)
        .await
        .map_err(|e| Error::unavailable(format_args!("bind {}", cfg.http_addr), e))?;
    let http_addr = listener.local_addr().ok().map(|a| a.to_string());
    let instance = uuid::Uuid::now_v7().simple().to_string();
    let settings = Settings {
        warmup: cfg.detect_warmup,
    };
    let shared = Arc::new(Shared {
        monitor: Mutex::new(Monitor::new(
            common::now_ms(),
            &instance[instance.len() - 8..],
            settings,
        )),
        js: jetstream::new(nats.clone()),
        client: common::Client::new(nats.clone()).with_timeout(cfg.nats.request_timeout()),
        nats: nats.clone(),
        nats_monitor_url: cfg.nats_monitor_url.clone(),
        last_verdict: Mutex::new(Default::default()),
        http_addr: http_addr.clone(),
        http: probe::http_client()?,
        actions_token,
        history_step_ms: cfg.history_step_ms.max(100),
        board: Default::default(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(board::follow(shared.js.clone(), shared.board.clone()));

    // Never a request subject: that interest would keep NATS from answering
    // "no responders" for a service that is down.
    let mut all = futures::stream::SelectAll::new();
    for s in subject::MONITOR_INTAKE {
        let sub = nats
            .subscribe(*s)
            .await
            .map_err(|e| Error::unavailable(format_args!("subscribe {s}"), e))?;
        all.push(sub);
    }
    let events = EventPublisher::new(nats.clone(), NAME);
    let s = shared.clone();
    let ev = events.clone();
    tasks.spawn(async move {
        while let Some(msg) = all.next().await {
            // An event is part of the trace of what it reports; the rest of
            // the traffic is only counted, and makes no spans.
            let traced = msg.subject.starts_with("coord.events.")
                && msg
                    .headers
                    .as_ref()
                    .is_some_and(|h| h.get("traceparent").is_some());
            let span = if traced {
                common::telemetry::consumer_span(&msg.subject, msg.headers.as_ref())
            } else {
                tracing::Span::none()
            };
            // Anomalies read straight from an event (an agent lost) go out at once.
            let found = span
                .in_scope(|| {
                    s.with(|m| {
                        m.observe(&msg.subject, &msg.payload, common::now_ms());
                        m.take_new_anomalies()
                    })
                })
                .unwrap_or_default();
            publish(&ev, found).await;
        }
    });

    let s = shared.clone();
    let every = Duration::from_millis(cfg.detect_interval_ms.max(10));
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let found = s
                .with(|m| {
                    m.tick(common::now_ms());
                    m.take_new_anomalies()
                })
                .unwrap_or_default();
            publish(&events, found).await;
        }
    });

    let s = shared.clone();
    let every = REQUEST_POLL.min(Duration::from_millis(cfg.detect_interval_ms.max(10)));
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = s.poll_requests().await {
                tracing::debug!(error = %e.message, "request counts not polled");
            }
        }
    });

    let s = shared.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(s.history_step_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = s.with(|m| m.sample_history(common::now_ms()));
        }
    });

    let s = shared.clone();
    let every = Duration::from_millis(cfg.probe_interval_ms.max(100));
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = s.health().await {
                tracing::debug!(error = %e.message, "health probe failed");
            }
        }
    });

    let mut service = Service::start(
        &nats,
        NAME,
        "Metrics, anomalies and health of the coordination plane",
    )
    .await?;
    let s = shared.clone();
    service
        .serve(subject::MONITOR_METRICS, move |_: MetricsRequest| {
            let s = s.clone();
            async move { s.metrics().await }
        })
        .await?;
    let s = shared.clone();
    service
        .serve(subject::MONITOR_ANALYSIS, move |_: AnalysisRequest| {
            let s = s.clone();
            async move { s.analysis().await }
        })
        .await?;
    let s = shared.clone();
    service
        .serve(subject::MONITOR_ANOMALIES, move |req: AnomaliesRequest| {
            let s = s.clone();
            async move { s.anomalies(req).await }
        })
        .await?;
    let s = shared.clone();
    service
        .serve(subject::MONITOR_HEALTH, move |_: HealthRequest| {
            let s = s.clone();
            async move { s.health().await }
        })
        .await?;
    let s = shared.clone();
    service
        .serve(
            subject::MONITOR_VALIDATE,
            move |_: SystemValidateRequest| {
                let s = s.clone();
                async move { s.validate().await }
            },
        )
        .await?;
    let s = shared.clone();
    service
        .serve(subject::MONITOR_REPORT, move |_: ReportRequest| {
            let s = s.clone();
            async move { s.report().await }
        })
        .await?;

    let s = shared.clone();
    tasks.spawn(async move {
        if let Err(e) = axum::serve(listener, http::router(s)).await {
            tracing::error!(error = %e, "monitor HTTP server stopped");
        }
    });
    tracing::info!(
        url = %cfg.nats.nats_url,
        http = ?http_addr,
        actions = shared.actions_token.is_some(),
        "monitor running"
    );

    shutdown.await;
    tracing::info!("monitor shutting down");
    service.stop().await;
    tasks.abort_all();
    nats.drain().await.ok();
    Ok(())
}
