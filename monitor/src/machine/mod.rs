//! The monitor's pure core: everything it knows is derived here from the
//! messages it is shown and the times it is told. No async, no NATS, no clock.
//!
//! Memory is bounded by constants, never by traffic: sliding windows are rings
//! of buckets ([`window`]), latencies are per-minute HDR histograms
//! ([`latency`]), and every map keyed by something the traffic names (subject
//! families, tasks in flight, agents, flows) has a cap.

pub mod analysis;
pub mod counters;
pub mod detect;
pub mod health;
pub mod history;
mod judge;
use judge::{About, Detectors};
pub mod latency;
pub mod prom;
pub mod requests;
pub mod seen;
pub mod validate;
mod views;
use views::{ranked_entry, Ranked};
pub mod window;

use std::collections::{BTreeMap, HashMap, VecDeque};

use common::msg::{
    AgentStatus, Anomaly, AnomalyKind, CapacityStatus, Event, EventKind, Severity, StreamHealth,
    SystemMetrics, TaskState,
};
use hdrhistogram::Histogram;

pub use counters::{Counters, MAX_FAMILIES, OTHER};
use detect::{Detector, Direction, Latch, Tuning};
use latency::{Buckets, Latency};
use requests::Requests;
use window::Windows;

/// Tasks timed at once; beyond it the oldest are forgotten (their latency is lost, not the count).
pub const MAX_TRACKED_TASKS: usize = 50_000;
/// Agents and flows kept for "slowest" rankings.
pub const MAX_RANKED: usize = 512;
/// Agents whose state (online, left, lost) is counted; beyond it new agents
/// are not, so the counts undercount rather than memory grow.
pub const MAX_TRACKED_AGENTS: usize = 10_000;
/// Flows seen created and not yet completed, counted by state; beyond it the
/// oldest are forgotten.
pub const MAX_TRACKED_FLOWS: usize = 50_000;
/// `(service, endpoint)` pairs whose requests are counted, and services whose
/// recent requests are judged for health.
pub const MAX_ENDPOINT_SERIES: usize = 512;
pub const MAX_SERVICES: usize = 64;
/// How far back health looks at failures.
pub const HEALTH_WINDOW_MS: u64 = 5 * 60_000;
/// Anomalies kept for queries.
pub const MAX_ANOMALIES: usize = 256;
/// Consumers and resources watched by the threshold rules.
pub const MAX_WATCHED: usize = 256;
/// Subject families with a traffic detector of their own; the first seen get
/// one (a detector keeps its last 60 samples, so this bounds the memory).
pub const MAX_FAMILY_DETECTORS: usize = 64;

/// A running task is stuck when it has run this many times its usual (p99) time…
pub const STUCK_FACTOR: u64 = 5;
/// …and at least this long.
pub const STUCK_MIN_MS: u64 = 30_000;
/// Runs needed before "usual time" means anything.
pub const STUCK_MIN_SAMPLES: u64 = 20;
/// A running task with a start-to-close timeout is stuck this long past it:
/// the orchestrator times an attempt out within a sweep (a second) of its
/// deadline, so by then nobody is enforcing it.
pub const STUCK_PAST_TIMEOUT_MS: u64 = 5_000;
/// Pool utilisation that counts as saturated, and where the state clears.
pub const SATURATED: f64 = 0.95;
pub const SATURATION_CLEARS: f64 = 0.85;
/// A consumer lags when it has this many pending and the backlog grew this many polls in a row.
pub const LAG_MIN_PENDING: u64 = 1_000;
pub const LAG_GROWING_POLLS: u32 = 3;

/// Detection settings the operator may change.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Samples before a series is judged.
    pub warmup: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings { warmup: 8 }
    }
}

#[derive(Debug, Clone)]
struct Tracked {
    seq: u64,
    /// The task's state as the last transition said.
    state: TaskState,
    attempt: u32,
    ready_ms: Option<u64>,
    assigned_ms: Option<u64>,
    started_ms: Option<u64>,
    /// The running attempt's start-to-close timeout, when its spec set one.
    timeout_ms: Option<u64>,
    /// The task's kind, once it runs.
    kind: Option<String>,
    agent: Option<String>,
    stuck_reported: bool,
}

impl Default for Tracked {
    fn default() -> Self {
        Tracked {
            seq: 0,
            state: TaskState::Blocked,
            attempt: 0,
            ready_ms: None,
            assigned_ms: None,
            started_ms: None,
            timeout_ms: None,
            kind: None,
            agent: None,
            stuck_reported: false,
        }
    }
}

/// Counts for the Prometheus exposition: bounded label values only (states,
/// kinds, codes, services, endpoints, subject families), never an id.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub metrics: SystemMetrics,
    pub queue_wait: Buckets,
    pub run_time: Buckets,
    pub end_to_end: Buckets,
    /// Task transitions by target state.
    pub transitions: BTreeMap<&'static str, u64>,
    /// Tasks in flight by state (tasks the monitor tracks).
    pub tasks: BTreeMap<&'static str, u64>,
    /// Flows seen created and not finished, by state.
    pub flows: BTreeMap<&'static str, u64>,
    /// Flows finished, by final state.
    pub flows_completed: BTreeMap<&'static str, u64>,
    pub agents: BTreeMap<&'static str, u64>,
    pub anomalies: BTreeMap<&'static str, u64>,
    pub endpoints: BTreeMap<(String, String), requests::Counts>,
    /// Share of each pool resource in use (allocated and reserved), 0 to 1.
    pub pool_used: BTreeMap<String, f64>,
}
/// Everything the monitor tracks.
#[derive(Debug, Clone)]
pub struct Monitor {
    instance: String,
    /// The dashboard's charts.
    history: history::History,
    counters: Counters,
    /// Request counts of every service replica, from `$SRV.STATS`.
    requests: Requests,
    bytes: Windows,
    families: BTreeMap<String, Windows>,
    started: Windows,
    succeeded: Windows,
    failed: Windows,
    queue_wait: Latency,
    run_time: Latency,
    end_to_end: Latency,
    buckets: [Buckets; 3],
    transitions: BTreeMap<&'static str, u64>,
    tasks: HashMap<(String, String), Tracked>,
    /// Flows seen created and not finished: `(seq, paused)`.
    flows: HashMap<String, (u64, bool)>,
    flows_completed: BTreeMap<&'static str, u64>,
    agents: BTreeMap<String, AgentStatus>,
    agents_lost: u64,
    by_agent: HashMap<String, Ranked>,
    /// Successful run times per task kind: the usual time a stuck task of
    /// that kind is judged by.
    by_kind: HashMap<String, Ranked>,
    by_flow: HashMap<String, Ranked>,
    state_conflicts: u64,
    sync_points: u64,
    allocation_failures: u64,
    /// Event ids seen lately: a repeat is traffic, not another fact.
    seen: seen::Seen,
    seq: u64,
    anomalies: VecDeque<Anomaly>,
    anomalies_total: u64,
    anomalies_by_kind: BTreeMap<&'static str, u64>,
    outbox: Vec<Anomaly>,
    /// Requests, failures and error replies per `(service, endpoint)` since
    /// the monitor started.
    endpoints: BTreeMap<(String, String), requests::Counts>,
    /// Requests and failures per service over sliding windows, for health.
    recent: BTreeMap<String, (Windows, Windows)>,
    pool_used: BTreeMap<String, f64>,
    /// Agents by status as the allocator last told (`active`, `draining`,
    /// `lost`, `left`); `None` until it has.
    agent_status: Option<BTreeMap<&'static str, u64>>,
    detectors: Detectors,
    saturation: BTreeMap<String, Latch>,
    lag: BTreeMap<String, (u64, u32, Latch)>,
    /// Assignments waiting in all, and per agent (capped), from the last
    /// look at the streams.
    queue_depth: u64,
    queue_depth_windows: Windows,
    queue: BTreeMap<String, u64>,
}

impl Monitor {
    /// `instance` prefixes anomaly ids, so replicas never issue the same id.
    pub fn new(now_ms: u64, instance: impl Into<String>, settings: Settings) -> Self {
        Monitor {
            instance: instance.into(),
            history: history::History::default(),
            counters: Counters::new(now_ms),
            requests: Requests::default(),
            bytes: Windows::default(),
            families: BTreeMap::new(),
            started: Windows::default(),
            succeeded: Windows::default(),
            failed: Windows::default(),
            queue_wait: Latency::default(),
            run_time: Latency::default(),
            end_to_end: Latency::default(),
            buckets: Default::default(),
            transitions: BTreeMap::new(),
            tasks: HashMap::new(),
            flows: HashMap::new(),
            flows_completed: BTreeMap::new(),
            agents: BTreeMap::new(),
            agents_lost: 0,
            by_agent: HashMap::new(),
            by_kind: HashMap::new(),
            by_flow: HashMap::new(),
            state_conflicts: 0,
            sync_points: 0,
            allocation_failures: 0,
            seen: seen::Seen::default(),
            seq: 0,
            anomalies: VecDeque::new(),
            anomalies_total: 0,
            anomalies_by_kind: BTreeMap::new(),
            outbox: Vec::new(),
            endpoints: BTreeMap::new(),
            recent: BTreeMap::new(),
            pool_used: BTreeMap::new(),
            agent_status: None,
            detectors: Detectors::new(settings),
            saturation: BTreeMap::new(),
            lag: BTreeMap::new(),
            queue_depth: 0,
            queue_depth_windows: Windows::default(),
            queue: BTreeMap::new(),
        }
    }

    /// Takes one message seen on the monitor's subscriptions
    /// ([`MONITOR_INTAKE`](common::subject::MONITOR_INTAKE)) at `now_ms`.
    /// An event whose id was seen within the stream's duplicate window (one
    /// published again after a crash) counts as traffic only.
    pub fn observe(&mut self, subject: &str, payload: &[u8], now_ms: u64) {
        self.bytes.add(now_ms, payload.len() as f64);
        self.family_window(subject).add(now_ms, 1.0);
        let event = subject
            .starts_with("coord.events.")
            .then(|| serde_json::from_slice::<Event>(payload).ok())
            .flatten();
        match event {
            Some(e) if !self.seen.first(&e.event_id, now_ms) => {
                self.counters.traffic(subject, payload);
            }
            Some(e) => {
                self.counters.observe(subject, payload, Some(&e.kind));
                self.event(&e, now_ms);
            }
            None => self.counters.observe(subject, payload, None),
        }
        // An agent event sent again within the duplicate window is stored
        // once but reaches subscribers each time: counted once.
        if subject.starts_with("coord.agent_events.") {
            if let Ok(e) = serde_json::from_slice::<common::msg::AgentEvent>(payload) {
                let id = common::msg::event_msg_id(&e.agent_id, &e.event_id);
                if self.seen.first(&id, now_ms) {
                    self.counters.agent_event(&e.event_type);
                }
            }
        }
    }

    /// Takes one gather of `$SRV.STATS` answers at `now_ms`: the requests each
    /// endpoint took since the previous answers count as traffic on its
    /// subject, now (see [`requests`]).
    pub fn observe_requests(&mut self, now_ms: u64, stats: &[serde_json::Value]) {
        let delta = self.requests.observe(stats);
        for (subject, n) in delta.by_subject {
            self.counters.count(&subject, n);
            self.family_window(&subject).add(now_ms, n as f64);
        }
        for (key, c) in delta.by_endpoint {
            if self.recent.len() < MAX_SERVICES || self.recent.contains_key(&key.0) {
                let (req, fail) = self.recent.entry(key.0.clone()).or_default();
                req.add(now_ms, c.requests as f64);
                fail.add(now_ms, c.failures as f64);
            }
            if self.endpoints.len() < MAX_ENDPOINT_SERIES || self.endpoints.contains_key(&key) {
                self.endpoints.entry(key).or_default().add(&c);
            }
        }
    }

    /// Requests and failures per service over the last [`HEALTH_WINDOW_MS`].
    pub fn recent_requests(&self, now_ms: u64) -> BTreeMap<String, (u64, u64)> {
        self.recent
            .iter()
            .map(|(s, (req, fail))| {
                (
                    s.clone(),
                    (
                        req.sum_recent(now_ms, HEALTH_WINDOW_MS) as u64,
                        fail.sum_recent(now_ms, HEALTH_WINDOW_MS) as u64,
                    ),
                )
            })
            .collect()
    }

    /// Resources whose pool is saturated now (past [`SATURATED`], not yet
    /// back under [`SATURATION_CLEARS`]), with the share in use.
    pub fn saturated(&self) -> Vec<(String, f64)> {
        self.saturation
            .iter()
            .filter(|(_, l)| l.is_on())
            .map(|(r, _)| (r.clone(), self.pool_used.get(r).copied().unwrap_or(1.0)))
            .collect()
    }

    /// The sliding windows of a subject's family, or of [`OTHER`] once
    /// [`MAX_FAMILIES`] are kept.
    fn family_window(&mut self, subject: &str) -> &mut Windows {
        let family = common::subject::family(subject);
        let key = if self.families.len() < MAX_FAMILIES || self.families.contains_key(&family) {
            family
        } else {
            OTHER.to_owned()
        };
        self.families.entry(key).or_default()
    }

    fn event(&mut self, e: &Event, now_ms: u64) {
        match &e.kind {
            EventKind::TaskTransition {
                flow_id,
                task_id,
                to,
                attempt,
                agent_id,
                timeout_ms,
                task_kind,
                ..
            } => self.transition(
                flow_id.as_str(),
                task_id.as_str(),
                *to,
                (*attempt, *timeout_ms, task_kind.as_deref()),
                agent_id.as_ref().map(|a| a.as_str()),
                e.at_ms,
                now_ms,
            ),
            EventKind::AgentRegistered { agent_id, .. } => {
                self.agent_seen(agent_id.as_str(), AgentStatus::Active);
            }
            EventKind::AgentDeregistered { agent_id, .. } => {
                self.agent_seen(agent_id.as_str(), AgentStatus::Draining);
            }
            EventKind::AgentLeft { agent_id, .. } => {
                self.agent_seen(agent_id.as_str(), AgentStatus::Left);
            }
            EventKind::FlowCreated { flow_id, .. } | EventKind::FlowRerun { flow_id, .. } => {
                self.flow_seen(flow_id.as_str(), false);
            }
            EventKind::FlowResumed { flow_id } => self.flow_seen(flow_id.as_str(), false),
            EventKind::FlowPaused { flow_id } => self.flow_seen(flow_id.as_str(), true),
            EventKind::FlowCompleted { flow_id, state } => {
                self.flows.remove(flow_id.as_str());
                *self.flows_completed.entry(state.as_str()).or_default() += 1;
            }
            EventKind::AgentLost {
                agent_id,
                last_seen_ms,
                released,
            } => {
                self.agent_seen(agent_id.as_str(), AgentStatus::Lost);
                self.agents_lost += 1;
                self.raise(
                    About::agent(agent_id.as_str()),
                    AnomalyKind::AgentLost,
                    Severity::Critical,
                    agent_id.as_str(),
                    now_ms,
                    now_ms.saturating_sub(*last_seen_ms) as f64,
                    0.0,
                    format!(
                        "agent {agent_id} missed its heartbeats (last seen {} ms ago); {} allocations released",
                        e.at_ms.saturating_sub(*last_seen_ms),
                        released.len()
                    ),
                );
            }
            EventKind::StateConflict { .. } => self.state_conflicts += 1,
            EventKind::SyncPointInitiated { .. } => self.sync_points += 1,
            _ => {}
        }
    }

    fn agent_seen(&mut self, agent: &str, phase: AgentStatus) {
        if self.agents.len() < MAX_TRACKED_AGENTS || self.agents.contains_key(agent) {
            self.agents.insert(agent.to_owned(), phase);
        }
    }

    fn flow_seen(&mut self, flow: &str, paused: bool) {
        self.seq += 1;
        if !self.flows.contains_key(flow) && self.flows.len() >= MAX_TRACKED_FLOWS {
            // The oldest sixteenth at once, as for tasks.
            let mut seqs: Vec<u64> = self.flows.values().map(|f| f.0).collect();
            let cut = (MAX_TRACKED_FLOWS / 16).min(seqs.len().saturating_sub(1));
            let (_, nth, _) = seqs.select_nth_unstable(cut);
            let limit = *nth;
            self.flows.retain(|_, f| f.0 > limit);
        }
        self.flows.insert(flow.to_owned(), (self.seq, paused));
    }

    #[allow(clippy::too_many_arguments)]
    fn transition(
        &mut self,
        flow: &str,
        task: &str,
        to: TaskState,
        (attempt, timeout_ms, kind): (u32, Option<u64>, Option<&str>),
        agent: Option<&str>,
        at_ms: u64,
        now_ms: u64,
    ) {
        self.seq += 1;
        let seq = self.seq;
        let key = (flow.to_owned(), task.to_owned());
        if !self.tasks.contains_key(&key) && self.tasks.len() >= MAX_TRACKED_TASKS {
            self.evict_oldest_tasks();
        }
        *self.transitions.entry(to.as_str()).or_default() += 1;
        let t = self.tasks.entry(key.clone()).or_default();
        t.seq = seq;
        t.state = to;
        match to {
            // A wait task waits for an agent's event, on no agent: neither
            // queued nor running, so never stuck.
            TaskState::Blocked | TaskState::Waiting => {}
            TaskState::Ready => {
                t.ready_ms.get_or_insert(at_ms);
                t.assigned_ms = None;
                t.started_ms = None;
            }
            TaskState::Assigned => {
                t.attempt = attempt;
                t.assigned_ms = Some(at_ms);
                t.started_ms = None;
                t.stuck_reported = false;
                t.agent = agent.map(str::to_owned);
            }
            TaskState::Running => {
                t.started_ms = Some(at_ms);
                t.timeout_ms = timeout_ms;
                if kind.is_some() {
                    t.kind = kind.map(str::to_owned);
                }
                if agent.is_some() {
                    t.agent = agent.map(str::to_owned);
                }
                self.started.add(now_ms, 1.0);
                if let Some(a) = t.assigned_ms {
                    let wait = at_ms.saturating_sub(a);
                    self.queue_wait.record(now_ms, wait);
                    self.buckets[0].record(wait);
                    if let Some(h) = &mut self.detectors.wait_interval {
                        h.saturating_record(wait.clamp(1, latency::MAX_LATENCY_MS));
                    }
                }
            }
            TaskState::Succeeded
            | TaskState::Failed
            | TaskState::TimedOut
            | TaskState::Cancelled
            | TaskState::Skipped => {
                let Some(t) = self.tasks.remove(&key) else {
                    return;
                };
                match to {
                    TaskState::Succeeded => self.succeeded.add(now_ms, 1.0),
                    TaskState::Failed | TaskState::TimedOut => self.failed.add(now_ms, 1.0),
                    _ => {}
                }
                if let Some(s) = t.started_ms {
                    let run = at_ms.saturating_sub(s);
                    self.run_time.record(now_ms, run);
                    self.buckets[1].record(run);
                    if let Some(h) = &mut self.detectors.run_interval {
                        h.saturating_record(run.clamp(1, latency::MAX_LATENCY_MS));
                    }
                    if let Some(a) = t.agent.as_deref().or(agent) {
                        ranked_entry(&mut self.by_agent, a).record(seq, run);
                    }
                    if let (Some(k), TaskState::Succeeded) = (&t.kind, to) {
                        ranked_entry(&mut self.by_kind, k).record(seq, run);
                    }
                }
                if let Some(r) = t.ready_ms {
                    let e2e = at_ms.saturating_sub(r);
                    self.end_to_end.record(now_ms, e2e);
                    self.buckets[2].record(e2e);
                    ranked_entry(&mut self.by_flow, flow).record(seq, e2e);
                }
            }
        }
    }

    /// Drops the oldest sixteenth of the tracked tasks at once, so eviction is
    /// amortised rather than a scan per new task.
    fn evict_oldest_tasks(&mut self) {
        let mut seqs: Vec<u64> = self.tasks.values().map(|t| t.seq).collect();
        let cut = (MAX_TRACKED_TASKS / 16)
            .max(1)
            .min(seqs.len().saturating_sub(1));
        let (_, nth, _) = seqs.select_nth_unstable(cut);
        let limit = *nth;
        self.tasks.retain(|_, t| t.seq > limit);
    }

    #[allow(clippy::too_many_arguments)]
    fn raise(
        &mut self,
        about: About,
        kind: AnomalyKind,
        severity: Severity,
        subject: &str,
        now_ms: u64,
        value: f64,
        expected: f64,
        message: String,
    ) {
        self.anomalies_total += 1;
        *self.anomalies_by_kind.entry(kind.as_str()).or_default() += 1;
        let a = Anomaly {
            anomaly_id: format!("{}-{}", self.instance, self.anomalies_total),
            kind,
            severity,
            subject: subject.to_owned(),
            at_ms: now_ms,
            value,
            expected,
            message,
            flow_id: about.flow,
            task_id: about.task,
            agent_id: about.agent,
        };
        if self.anomalies.len() >= MAX_ANOMALIES {
            self.anomalies.pop_back();
        }
        self.anomalies.push_front(a.clone());
        if self.outbox.len() < MAX_ANOMALIES {
            self.outbox.push(a);
        }
    }

    /// Anomalies detected since the last call, to publish as events.
    pub fn take_new_anomalies(&mut self) -> Vec<Anomaly> {
        std::mem::take(&mut self.outbox)
    }

    /// Recent anomalies, newest first.
    pub fn anomalies(&self) -> impl Iterator<Item = &Anomaly> {
        self.anomalies.iter()
    }

    pub fn anomalies_total(&self) -> u64 {
        self.anomalies_total
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_prom;
