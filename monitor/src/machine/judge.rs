//! The monitor's periodic judgements: each tick's detectors and stuck
//! tasks, and what the service reads off the bus now and then (the pool's
//! capacity, the streams' health).

use super::*;

/// What an anomaly is about, beyond its series: the objects a reader can
/// open (the dashboard links them).
#[derive(Debug, Default)]
pub(super) struct About {
    pub(super) flow: Option<String>,
    pub(super) task: Option<String>,
    pub(super) agent: Option<String>,
}

impl About {
    pub(super) fn agent(id: &str) -> About {
        About {
            agent: Some(id.to_owned()),
            ..About::default()
        }
    }
}

/// Series judged once per detection interval.
#[derive(Debug, Clone)]
pub(super) struct Detectors {
    pub(super) succeeded: Detector,
    pub(super) failed: Detector,
    pub(super) messages: Detector,
    pub(super) run_time: Detector,
    pub(super) queue_wait: Detector,
    /// Messages per interval of each subject family, with the family's count
    /// at the previous tick.
    pub(super) families: BTreeMap<String, (Detector, u64)>,
    pub(super) traffic: Tuning,
    /// Counts at the previous tick.
    pub(super) last: (u64, u64, u64),
    pub(super) run_interval: Option<Histogram<u32>>,
    pub(super) wait_interval: Option<Histogram<u32>>,
}

impl Detectors {
    pub(super) fn new(s: Settings) -> Self {
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

impl Monitor {
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
                About::default(),
                kind,
                severity,
                subject,
                now_ms,
                s.value,
                s.expected,
                message,
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
                About::default(),
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
    pub(super) fn stuck_tasks(&mut self, now_ms: u64) {
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
                    (flow.clone(), task.clone()),
                    ran,
                    t.attempt,
                    t.agent.clone(),
                    t.timeout_ms,
                    (usual_ms, kind),
                ));
            }
        }
        for ((flow, task), ran, attempt, agent, timeout, (usual_ms, kind)) in stuck {
            let subject = format!("{flow}/{task}");
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
            let about = About {
                flow: Some(flow),
                task: Some(task),
                agent: agent.clone(),
            };
            self.raise(
                about,
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

    /// Resource saturation and agents by status, from the allocator's capacity report.
    pub fn observe_capacity(&mut self, now_ms: u64, cap: &CapacityStatus) {
        let mut status = BTreeMap::new();
        for s in cap.agent_status.values() {
            *status.entry(s.as_str()).or_default() += 1;
        }
        self.agent_status = Some(status);
        for (resource, c) in &cap.pool {
            if c.capacity <= 0.0 {
                continue;
            }
            if !self.saturation.contains_key(resource) && self.saturation.len() >= MAX_WATCHED {
                continue;
            }
            let used = ((c.allocated + c.reserved) / c.capacity).clamp(0.0, 1.0);
            self.pool_used.insert(resource.clone(), used);
            let latch = self.saturation.entry(resource.clone()).or_default();
            if latch.update(used >= SATURATED, used <= SATURATION_CLEARS) {
                self.raise(
                    About::default(),
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

    /// Queue depth (from the tasks tracked) and consumer lag that keeps
    /// growing (from the JetStream consumer infos).
    pub fn observe_streams(&mut self, now_ms: u64, streams: &[StreamHealth]) {
        // Assigned and not started: sent to the agent, not yet taken up.
        let mut queue: BTreeMap<String, u64> = BTreeMap::new();
        for t in self.tasks.values() {
            if t.state == TaskState::Assigned {
                let agent = t.agent.clone().unwrap_or_default();
                *queue.entry(agent).or_default() += 1;
            }
        }
        self.queue_depth = queue.values().sum();
        self.queue_depth_windows
            .observe(now_ms, self.queue_depth as f64);
        self.queue = queue.into_iter().take(MAX_WATCHED).collect();
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
                        About::default(),
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
}
