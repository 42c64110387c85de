//! Monitor queries.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `coord.monitor.metrics` (empty request body or `{}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsRequest {}

/// Reply to `coord.monitor.metrics`: counts since the monitor started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SystemMetrics {
    pub since_ms: u64,
    pub at_ms: u64,
    /// Messages on `coord.>` since the monitor started; requests are counted
    /// by the services that took them (`$SRV.STATS`), within a second.
    pub messages_total: u64,
    /// Payload bytes of those messages, requests left out (their bodies are
    /// not seen by the monitor).
    pub bytes_total: u64,
    /// Messages per subject family (agent ids collapsed to `*`).
    #[serde(default)]
    pub messages_by_subject: BTreeMap<String, u64>,
    #[serde(default)]
    pub flows_created: u64,
    /// Completions, counted again when a re-run flow completes again, so
    /// `flows_completed` ≤ `flows_created` + `flows_rerun`.
    #[serde(default)]
    pub flows_completed: u64,
    /// Re-runs (`flow.rerun` events).
    #[serde(default)]
    pub flows_rerun: u64,
    #[serde(default)]
    pub tasks_assigned: u64,
    #[serde(default)]
    pub tasks_completed: u64,
    #[serde(default)]
    pub tasks_failed: u64,
    /// Agent events accepted, per type: at most 64 types, the rest under `(other)`.
    #[serde(default)]
    pub agent_events_by_type: BTreeMap<String, u64>,
    /// Messages per second per subject family over the sliding windows.
    #[serde(default)]
    pub message_rates: BTreeMap<String, WindowRates>,
    /// Bytes per second over the sliding windows, requests left out.
    #[serde(default)]
    pub byte_rate: WindowRates,
    /// Tasks started, succeeded and failed per second (`started`, `succeeded`, `failed`).
    #[serde(default)]
    pub task_rates: BTreeMap<String, WindowRates>,
    /// `queue_wait` (assigned to started), `run_time` (started to finished) and
    /// `end_to_end` (ready to finished), over the last hour.
    #[serde(default)]
    pub latency: BTreeMap<String, LatencySummary>,
    #[serde(default)]
    pub agents_online: usize,
    #[serde(default)]
    pub agents_lost: u64,
    /// Allocation requests answered with an error (from the allocator's `$SRV.STATS`).
    #[serde(default)]
    pub allocation_failures: u64,
    #[serde(default)]
    pub state_conflicts: u64,
    #[serde(default)]
    pub sync_points: u64,
    /// Tasks whose attempt the monitor is timing now (bounded).
    #[serde(default)]
    pub tasks_tracked: usize,
    /// Assignments sent to agents and not yet started (tasks in state
    /// `assigned`, from the events), at the monitor's last look at JetStream.
    #[serde(default)]
    pub queue_depth: u64,
    /// The same per agent, for agents with any waiting (bounded).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub queue_depth_by_agent: BTreeMap<String, u64>,
    /// The deepest the queue was seen over each window.
    #[serde(default)]
    pub queue_depth_peak: WindowPeaks,
}

/// The highest value a gauge was seen at over each sliding window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WindowPeaks {
    #[serde(default)]
    pub last_1m: f64,
    #[serde(default)]
    pub last_15m: f64,
    #[serde(default)]
    pub last_1h: f64,
}

/// Rates over the three sliding windows, per second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WindowRates {
    #[serde(default)]
    pub last_1m: f64,
    #[serde(default)]
    pub last_15m: f64,
    #[serde(default)]
    pub last_1h: f64,
}

/// Latency percentiles of one measure over one window, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LatencySummary {
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub p50_ms: u64,
    #[serde(default)]
    pub p90_ms: u64,
    #[serde(default)]
    pub p99_ms: u64,
    #[serde(default)]
    pub max_ms: u64,
}

/// `coord.monitor.analysis` (empty body or `{}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnalysisRequest {}

/// How one series moves: least-squares slope over the last 15 minutes and the
/// last minute against the minute before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Trend {
    pub series: String,
    /// Change of the per-second rate per minute, over the last 15 one-minute buckets.
    #[serde(default)]
    pub slope_per_min: f64,
    /// Per-second rate over the last minute.
    #[serde(default)]
    pub current: f64,
    /// Per-second rate over the minute before.
    #[serde(default)]
    pub previous: f64,
    /// `(current - previous) / previous`, `None` when the previous minute was empty.
    #[serde(default)]
    pub change: Option<f64>,
    /// `rising`, `falling` or `flat`.
    #[serde(default)]
    pub direction: String,
}

/// Run-time percentiles of one group (an agent or a task kind).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Slowest {
    pub name: String,
    #[serde(default)]
    pub runs: u64,
    #[serde(default)]
    pub p50_ms: u64,
    #[serde(default)]
    pub p99_ms: u64,
}

/// The most used resource of the pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Bottleneck {
    pub resource: String,
    /// `(allocated + reserved) / capacity`, 0 to 1.
    #[serde(default)]
    pub utilisation: f64,
    #[serde(default)]
    pub free: f64,
}

/// Reply to `coord.monitor.analysis`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PerformanceAnalysis {
    pub at_ms: u64,
    #[serde(default)]
    pub trends: Vec<Trend>,
    /// Slowest agents by p99 run time (last hour), slowest first.
    #[serde(default)]
    pub slowest_agents: Vec<Slowest>,
    /// Slowest task kinds by p99 run time (last hour), slowest first.
    #[serde(default)]
    pub slowest_kinds: Vec<Slowest>,
    /// Slowest flows by end-to-end time of their tasks (last hour), slowest first.
    #[serde(default)]
    pub slowest_flows: Vec<Slowest>,
    /// `None` when the allocator did not answer or no agent offers capacity.
    #[serde(default)]
    pub bottleneck: Option<Bottleneck>,
    /// Why a part of the analysis is missing, if one is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// What kind of anomaly (one event subject each: `coord.events.anomaly.{kind}`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyKind {
    /// A series left its usual range (robust z-score over its recent history).
    Outlier,
    ThroughputDrop,
    ErrorRateSpike,
    LatencySpike,
    /// A task running far past its kind's usual time.
    StuckTask,
    /// An agent missed its heartbeats.
    AgentLost,
    ResourceSaturation,
    ConsumerLag,
    /// A kind this build does not know.
    #[serde(other)]
    Unknown,
}

impl AnomalyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyKind::Outlier => "outlier",
            AnomalyKind::ThroughputDrop => "throughput_drop",
            AnomalyKind::ErrorRateSpike => "error_rate_spike",
            AnomalyKind::LatencySpike => "latency_spike",
            AnomalyKind::StuckTask => "stuck_task",
            AnomalyKind::AgentLost => "agent_lost",
            AnomalyKind::ResourceSaturation => "resource_saturation",
            AnomalyKind::ConsumerLag => "consumer_lag",
            AnomalyKind::Unknown => "unknown",
        }
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Critical,
    #[serde(other)]
    Unknown,
}

/// One detected anomaly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Anomaly {
    pub anomaly_id: String,
    pub kind: AnomalyKind,
    #[serde(default)]
    pub severity: Severity,
    /// The series or object it concerns (`tasks_completed`, an agent id, `flow/task`).
    #[serde(default)]
    pub subject: String,
    pub at_ms: u64,
    #[serde(default)]
    pub value: f64,
    /// What was expected instead (the baseline or the threshold).
    #[serde(default)]
    pub expected: f64,
    #[serde(default)]
    pub message: String,
    /// The flow it concerns, if one (a stuck task's), for links.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_id: Option<String>,
    /// The task it concerns, if one (a stuck task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// The agent it concerns, if one (lost, running a stuck task, or whose
    /// assignments pile up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
}

/// `coord.monitor.anomalies`: the recent anomalies, newest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AnomaliesRequest {
    /// Only those detected at or after this time.
    #[serde(default)]
    pub since_ms: Option<u64>,
    /// Only this kind.
    #[serde(default)]
    pub kind: Option<AnomalyKind>,
    /// At most this many (default and maximum: all kept, see `docs/protocol.md`).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Reply to `coord.monitor.anomalies`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AnomalyList {
    #[serde(default)]
    pub anomalies: Vec<Anomaly>,
    /// Detected since the monitor started (including those no longer kept).
    #[serde(default)]
    pub total: u64,
}

/// `coord.monitor.health` (empty body or `{}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthRequest {}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    #[default]
    Healthy,
    Degraded,
    Unhealthy,
    #[serde(other)]
    Unknown,
}

/// One service as its replicas answered `$SRV.PING` and `$SRV.STATS`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ServiceHealth {
    pub name: String,
    /// Instances that answered `$SRV.PING`.
    #[serde(default)]
    pub replicas: usize,
    #[serde(default)]
    pub requests: u64,
    /// Error replies (typed errors sent back to callers, expected refusals
    /// such as `no_capacity` included), over all endpoints and replicas.
    #[serde(default)]
    pub errors: u64,
    /// Failures among them (`internal`, `unavailable`, `timeout`: `$SRV.STATS`
    /// `num_errors`), over all endpoints and replicas.
    #[serde(default)]
    pub failures: u64,
    /// Requests over the last five minutes the monitor watched.
    #[serde(default)]
    pub recent_requests: u64,
    /// Failures over the last five minutes the monitor watched; what health judges.
    #[serde(default)]
    pub recent_failures: u64,
    /// Mean processing time per request, over all endpoints and replicas.
    #[serde(default)]
    pub average_processing_ms: f64,
    /// Error replies per endpoint name.
    #[serde(default)]
    pub errors_by_endpoint: BTreeMap<String, u64>,
    /// Error replies per error code (`no_capacity`, `internal`, …).
    #[serde(default)]
    pub errors_by_code: BTreeMap<String, u64>,
}

/// One JetStream stream and its consumers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StreamHealth {
    pub name: String,
    #[serde(default)]
    pub messages: u64,
    #[serde(default)]
    pub bytes: u64,
    /// Messages not yet delivered, per consumer.
    #[serde(default)]
    pub consumer_pending: BTreeMap<String, u64>,
    /// Delivered but not yet acknowledged, per consumer.
    #[serde(default)]
    pub consumer_ack_pending: BTreeMap<String, u64>,
}

/// Reply to `coord.monitor.health`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HealthStatus {
    pub at_ms: u64,
    pub verdict: Verdict,
    /// Why the verdict is not `healthy` (empty when it is).
    #[serde(default)]
    pub reasons: Vec<String>,
    /// What an operator should know that is not a fault and leaves the
    /// verdict alone, e.g. a saturated pool (work waits for capacity).
    #[serde(default)]
    pub findings: Vec<String>,
    #[serde(default)]
    pub services: Vec<ServiceHealth>,
    #[serde(default)]
    pub streams: Vec<StreamHealth>,
    /// The NATS server's `/varz` (selected fields), when `--nats-monitor-url` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_server: Option<serde_json::Value>,
}

/// `coord.monitor.validate` (empty body or `{}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SystemValidateRequest {}

/// One inconsistency between what the allocator and the orchestrator store.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub struct SystemViolation {
    /// `allocation_without_task`, `task_without_allocation`, `allocation_mismatch`,
    /// `task_on_lost_agent`, `orphaned_reservation`, `unreadable_record`.
    pub rule: String,
    /// What it concerns (`flow/task`, an allocation or reservation id).
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub message: String,
}

/// Reply to `coord.monitor.validate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SystemValidation {
    pub at_ms: u64,
    pub valid: bool,
    #[serde(default)]
    pub violations: Vec<SystemViolation>,
    #[serde(default)]
    pub agents_checked: usize,
    #[serde(default)]
    pub flows_checked: usize,
}

/// `coord.monitor.report` (empty body or `{}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportRequest {}

/// Reply to `coord.monitor.report` (and `GET /report`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HealthReport {
    pub at_ms: u64,
    pub health: HealthStatus,
    pub metrics: SystemMetrics,
    #[serde(default)]
    pub anomalies: Vec<Anomaly>,
    pub validation: SystemValidation,
    /// Where this monitor instance serves HTTP (`/metrics`, `/report`, the dashboard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
}
