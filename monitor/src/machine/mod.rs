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
pub mod latency;
pub mod prom;
pub mod requests;
pub mod seen;
pub mod validate;
pub mod window;

use std::collections::{BTreeMap, HashMap, VecDeque};

use common::msg::{
    Anomaly, AnomalyKind, CapacityStatus, Event, EventKind, Severity, StreamHealth, SystemMetrics,
    TaskState,
};
use hdrhistogram::Histogram;

pub use counters::{Counters, MAX_FAMILIES, OTHER};
use detect::{Detector, Direction, Latch, Tuning};
use latency::Latency;
use requests::Requests;
use window::Windows;

/// Tasks timed at once; beyond it the oldest are forgotten (their latency is lost, not the count).
pub const MAX_TRACKED_TASKS: usize = 50_000;
/// Agents and flows kept for "slowest" rankings.
pub const MAX_RANKED: usize = 512;
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

#[derive(Debug, Clone, Default)]
struct Tracked {
    seq: u64,
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

#[derive(Debug, Clone, Default)]
struct Ranked {
    seq: u64,
    runs: u64,
    hist: Option<Histogram<u32>>,
}

impl Ranked {
    fn record(&mut self, seq: u64, ms: u64) {
        self.seq = seq;
        self.runs += 1;
        if self.hist.is_none() {
            self.hist = latency::interval_histogram();
        }
        if let Some(h) = &mut self.hist {
            h.saturating_record(ms.clamp(1, latency::MAX_LATENCY_MS));
        }
    }
}

/// Inserts into a capped map, evicting the least recently touched entry when full.
fn ranked_entry<'a>(map: &'a mut HashMap<String, Ranked>, key: &str) -> &'a mut Ranked {
    if !map.contains_key(key) && map.len() >= MAX_RANKED {
        if let Some(oldest) = map
            .iter()
            .min_by_key(|(_, r)| r.seq)
            .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
    }
    map.entry(key.to_owned()).or_default()
}

/// Series judged once per detection interval.
#[derive(Debug, Clone)]
struct Detectors {
    succeeded: Detector,
    failed: Detector,
    messages: Detector,
    run_time: Detector,
    queue_wait: Detector,
    /// Messages per interval of each subject family, with the family's count
    /// at the previous tick.
    families: BTreeMap<String, (Detector, u64)>,
    traffic: Tuning,
    /// Counts at the previous tick.
    last: (u64, u64, u64),
    run_interval: Option<Histogram<u32>>,
    wait_interval: Option<Histogram<u32>>,
}

impl Detectors {
    fn new(s: Settings) -> Self {
        let base = Tuning {
            warmup: s.warmup,
            ..Tuning::default()
        };
        let counts = Tuning {
            min_delta: 3.0,
            ..base
        };
        // Throughput falling to (almost) nothing is a drop however noisy it was.
        let throughput = Tuning {
            collapse_ratio: 0.1,
            ..counts
        };
        let latency = Tuning {
            min_delta: 50.0,
            min_ratio: 1.0,
            ..base
        };
        let traffic = Tuning {
            min_delta: 200.0,
            min_ratio: 3.0,
            ..base
        };
        Detectors {
            succeeded: Detector::new(Direction::Down, throughput),
            failed: Detector::new(Direction::Up, counts),
            messages: Detector::new(Direction::Up, traffic),
            run_time: Detector::new(Direction::Up, latency),
            queue_wait: Detector::new(Direction::Up, latency),
            families: BTreeMap::new(),
            traffic,
            last: (0, 0, 0),
            run_interval: latency::interval_histogram(),
            wait_interval: latency::interval_histogram(),
        }
    }
}

/// Everything the monitor tracks.
#[derive(Debug, Clone)]
pub struct Monitor {
    instance: String,
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
    tasks: HashMap<(String, String), Tracked>,
    agents: BTreeMap<String, bool>,
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
    outbox: Vec<Anomaly>,
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
            tasks: HashMap::new(),
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
            outbox: Vec::new(),
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
                self.counters.observe(subject, payload);
                self.event(&e, now_ms);
            }
            None => self.counters.observe(subject, payload),
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
        for (subject, n) in self.requests.observe(stats) {
            self.counters.count(&subject, n);
            self.family_window(&subject).add(now_ms, n as f64);
        }
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
                self.agent_seen(agent_id.as_str(), true);
            }
            EventKind::AgentDeregistered { agent_id, .. } => {
                self.agent_seen(agent_id.as_str(), false);
            }
            EventKind::AgentLost {
                agent_id,
                last_seen_ms,
                released,
            } => {
                self.agent_seen(agent_id.as_str(), false);
                self.agents_lost += 1;
                self.raise(
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

    fn agent_seen(&mut self, agent: &str, online: bool) {
        if self.agents.len() < MAX_RANKED || self.agents.contains_key(agent) {
            self.agents.insert(agent.to_owned(), online);
        }
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
        let t = self.tasks.entry(key.clone()).or_default();
        t.seq = seq;
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
        kind: AnomalyKind,
        severity: Severity,
        subject: &str,
        now_ms: u64,
        value: f64,
        expected: f64,
        message: String,
    ) {
        self.anomalies_total += 1;
        let a = Anomaly {
            anomaly_id: format!("{}-{}", self.instance, self.anomalies_total),
            kind,
            severity,
            subject: subject.to_owned(),
            at_ms: now_ms,
            value,
            expected,
            message,
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

    /// Judges the series over the interval since the previous tick, and looks for stuck tasks.
    pub fn tick(&mut self, now_ms: u64) {
        let m = &self.counters;
        let (succ, fail, msgs) = (m.tasks_completed(), m.tasks_failed(), m.messages_total());
        let (ls, lf, lm) = self.detectors.last;
        self.detectors.last = (succ, fail, msgs);
        let d = &mut self.detectors;
        let mut found = Vec::new();
        if let Some(s) = d.succeeded.observe(succ.saturating_sub(ls) as f64) {
            found.push((
                AnomalyKind::ThroughputDrop,
                Severity::Warning,
                "tasks_succeeded",
                s,
                "tasks succeeded per interval fell",
            ));
        }
        if let Some(s) = d.failed.observe(fail.saturating_sub(lf) as f64) {
            found.push((
                AnomalyKind::ErrorRateSpike,
                Severity::Warning,
                "tasks_failed",
                s,
                "tasks failed per interval rose",
            ));
        }
        if let Some(s) = d.messages.observe(msgs.saturating_sub(lm) as f64) {
            found.push((
                AnomalyKind::Outlier,
                Severity::Info,
                "messages",
                s,
                "messages per interval rose",
            ));
        }
        let mut by_family = Vec::new();
        let traffic = d.traffic;
        for (family, count) in m.families() {
            if !d.families.contains_key(family) && d.families.len() >= MAX_FAMILY_DETECTORS {
                continue;
            }
            // A family first seen had no messages at the previous tick.
            let (det, last) = d
                .families
                .entry(family.to_owned())
                .or_insert_with(|| (Detector::new(Direction::Up, traffic), 0));
            if let Some(s) = det.observe(count.saturating_sub(*last) as f64) {
                by_family.push((format!("messages:{family}"), s));
            }
            *last = count;
        }
        for (hist, det, name) in [
            (&mut d.run_interval, &mut d.run_time, "run_time"),
            (&mut d.wait_interval, &mut d.queue_wait, "queue_wait"),
        ] {
            if let Some(h) = hist {
                if !h.is_empty() {
                    // The median, not a high percentile: a couple of slow runs on
                    // a busy host are not a spike; the typical run moving is.
                    if let Some(s) = det.observe(h.value_at_quantile(0.5) as f64) {
                        found.push((
                            AnomalyKind::LatencySpike,
                            Severity::Warning,
                            name,
                            s,
                            "median latency (ms) per interval rose",
                        ));
                    }
                    h.reset();
                }
            }
        }
        for (kind, severity, subject, s, what) in found {
            let message = format!(
                "{what}: {:.1} against a median of {:.1} (robust z {:.1})",
                s.value, s.median, s.z
            );
            self.raise(
                kind, severity, subject, now_ms, s.value, s.expected, message,
            );
        }
        for (subject, s) in by_family {
            let message = format!(
                "messages per interval on {} rose: {:.1} against a median of {:.1} (robust z {:.1})",
                &subject["messages:".len()..],
                s.value,
                s.median,
                s.z
            );
            self.raise(
                AnomalyKind::Outlier,
                Severity::Info,
                &subject,
                now_ms,
                s.value,
                s.expected,
                message,
            );
        }
        self.stuck_tasks(now_ms);
    }

    /// A running task is stuck when it is well past its own start-to-close
    /// timeout, or, without one, far past the usual (p99) run time of its
    /// kind — or of all tasks while its kind has too few runs — once there is
    /// a usual time to speak of.
    fn stuck_tasks(&mut self, now_ms: u64) {
        let usual = self.run_time.summary(now_ms, 60);
        let limit_of = |p99: u64| (p99.max(1) * STUCK_FACTOR).max(STUCK_MIN_MS);
        let usual_all = (usual.count >= STUCK_MIN_SAMPLES).then_some(usual.p99_ms);
        let mut stuck = Vec::new();
        for ((flow, task), t) in self.tasks.iter_mut() {
            let (Some(s), false) = (t.started_ms, t.stuck_reported) else {
                continue;
            };
            let of_kind = t.kind.as_ref().and_then(|k| {
                let r = self.by_kind.get(k)?;
                let p99 = r.hist.as_ref()?.value_at_quantile(0.99);
                (r.runs >= STUCK_MIN_SAMPLES).then(|| (k.clone(), p99))
            });
            let (limit, usual_ms, kind) = match (t.timeout_ms, of_kind, usual_all) {
                (Some(timeout), _, _) => {
                    (timeout.saturating_add(STUCK_PAST_TIMEOUT_MS), timeout, None)
                }
                (None, Some((k, p99)), _) => (limit_of(p99), p99, Some(k)),
                (None, None, Some(p99)) => (limit_of(p99), p99, None),
                (None, None, None) => continue,
            };
            let ran = now_ms.saturating_sub(s);
            if ran > limit {
                t.stuck_reported = true;
                stuck.push((
                    format!("{flow}/{task}"),
                    ran,
                    t.attempt,
                    t.agent.clone(),
                    t.timeout_ms,
                    (usual_ms, kind),
                ));
            }
        }
        for (subject, ran, attempt, agent, timeout, (usual_ms, kind)) in stuck {
            let on = agent.as_deref().unwrap_or("an unknown agent");
            let (expected, message) = match timeout {
                Some(timeout) => (
                    timeout,
                    format!(
                        "attempt {attempt} on {on} has run {ran} ms, past its start-to-close timeout of {timeout} ms"
                    ),
                ),
                None => (
                    usual_ms,
                    match kind {
                        Some(k) => format!(
                            "attempt {attempt} on {on} has run {ran} ms; tasks of kind {k} usually finish within {usual_ms} ms (p99)"
                        ),
                        None => format!(
                            "attempt {attempt} on {on} has run {ran} ms; tasks usually finish within {usual_ms} ms (p99)"
                        ),
                    },
                ),
            };
            self.raise(
                AnomalyKind::StuckTask,
                Severity::Warning,
                &subject,
                now_ms,
                ran as f64,
                expected as f64,
                message,
            );
        }
    }

    /// Resource saturation, from the allocator's capacity report.
    pub fn observe_capacity(&mut self, now_ms: u64, cap: &CapacityStatus) {
        for (resource, c) in &cap.pool {
            if c.capacity <= 0.0 {
                continue;
            }
            if !self.saturation.contains_key(resource) && self.saturation.len() >= MAX_WATCHED {
                continue;
            }
            let used = ((c.allocated + c.reserved) / c.capacity).clamp(0.0, 1.0);
            let latch = self.saturation.entry(resource.clone()).or_default();
            if latch.update(used >= SATURATED, used <= SATURATION_CLEARS) {
                self.raise(
                    AnomalyKind::ResourceSaturation,
                    Severity::Warning,
                    resource,
                    now_ms,
                    used,
                    SATURATED,
                    format!(
                        "{resource} is {:.0}% used ({:.2} free of {:.2})",
                        used * 100.0,
                        c.free,
                        c.capacity
                    ),
                );
            }
        }
    }

    /// Queue depth and consumer lag that keeps growing, from the JetStream
    /// consumer infos.
    pub fn observe_streams(&mut self, now_ms: u64, streams: &[StreamHealth]) {
        if let Some(assign) = streams
            .iter()
            .find(|s| s.name == common::nats::STREAM_ASSIGN)
        {
            self.queue_depth = assign.consumer_pending.values().sum();
            self.queue_depth_windows
                .observe(now_ms, self.queue_depth as f64);
            // Each agent reads its assignments through the durable `agent-{id}`.
            self.queue = assign
                .consumer_pending
                .iter()
                .filter(|(_, n)| **n > 0)
                .take(MAX_WATCHED)
                .map(|(c, n)| (c.strip_prefix("agent-").unwrap_or(c).to_owned(), *n))
                .collect();
        }
        for s in streams {
            for (consumer, pending) in &s.consumer_pending {
                let key = format!("{}/{consumer}", s.name);
                if !self.lag.contains_key(&key) && self.lag.len() >= MAX_WATCHED {
                    continue;
                }
                let (last, growing, latch) = self.lag.entry(key.clone()).or_default();
                *growing = if *pending > *last { *growing + 1 } else { 0 };
                *last = *pending;
                let fire = *growing >= LAG_GROWING_POLLS && *pending >= LAG_MIN_PENDING;
                if latch.update(fire, *growing == 0) {
                    let pending = *pending;
                    self.raise(
                        AnomalyKind::ConsumerLag,
                        Severity::Warning,
                        &key,
                        now_ms,
                        pending as f64,
                        LAG_MIN_PENDING as f64,
                        format!(
                            "consumer {key} has {pending} pending and the backlog keeps growing"
                        ),
                    );
                }
            }
        }
    }

    pub fn set_allocation_failures(&mut self, n: u64) {
        self.allocation_failures = n;
    }

    pub fn metrics(&self, now_ms: u64) -> SystemMetrics {
        let mut m = self.counters.snapshot(now_ms);
        m.message_rates = self
            .families
            .iter()
            .map(|(k, w)| (k.clone(), w.rates(now_ms)))
            .collect();
        m.byte_rate = self.bytes.rates(now_ms);
        m.task_rates = [
            ("started", &self.started),
            ("succeeded", &self.succeeded),
            ("failed", &self.failed),
        ]
        .into_iter()
        .map(|(k, w)| (k.to_owned(), w.rates(now_ms)))
        .collect();
        m.latency = [
            ("queue_wait", &self.queue_wait),
            ("run_time", &self.run_time),
            ("end_to_end", &self.end_to_end),
        ]
        .into_iter()
        .map(|(k, l)| (k.to_owned(), l.summary(now_ms, 60)))
        .collect();
        m.agents_online = self.agents.values().filter(|on| **on).count();
        m.agents_lost = self.agents_lost;
        m.allocation_failures = self.allocation_failures;
        m.state_conflicts = self.state_conflicts;
        m.sync_points = self.sync_points;
        m.tasks_tracked = self.tasks.len();
        m.queue_depth = self.queue_depth;
        m.queue_depth_peak = self.queue_depth_windows.peaks(now_ms);
        m.queue_depth_by_agent = self.queue.clone();
        m
    }

    /// Minute totals of the task series, for trends.
    pub fn task_minutes(&self, now_ms: u64, n: usize) -> Vec<(&'static str, Vec<f64>)> {
        vec![
            ("tasks_started", self.started.minutes(now_ms, n)),
            ("tasks_succeeded", self.succeeded.minutes(now_ms, n)),
            ("tasks_failed", self.failed.minutes(now_ms, n)),
        ]
    }

    /// Minute totals of every subject family, for trends.
    pub fn family_minutes(&self, now_ms: u64, n: usize) -> Vec<(String, Vec<f64>)> {
        self.families
            .iter()
            .map(|(k, w)| (k.clone(), w.minutes(now_ms, n)))
            .collect()
    }

    pub fn slowest_agents(&self) -> Vec<common::msg::Slowest> {
        analysis::rank(
            self.by_agent
                .iter()
                .map(|(k, r)| (k.as_str(), r.runs, r.hist.as_ref())),
        )
    }

    pub fn slowest_flows(&self) -> Vec<common::msg::Slowest> {
        analysis::rank(
            self.by_flow
                .iter()
                .map(|(k, r)| (k.as_str(), r.runs, r.hist.as_ref())),
        )
    }
}

#[cfg(test)]
mod tests;
