//! What the monitor's state is read as: the metrics reply, the Prometheus
//! exposition's snapshot, the per-minute series, the slowest rankings and
//! the dashboard's chart history.

use super::*;

#[derive(Debug, Clone, Default)]
pub(super) struct Ranked {
    pub(super) seq: u64,
    pub(super) runs: u64,
    pub(super) hist: Option<Histogram<u32>>,
}

impl Ranked {
    pub(super) fn record(&mut self, seq: u64, ms: u64) {
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
pub(super) fn ranked_entry<'a>(map: &'a mut HashMap<String, Ranked>, key: &str) -> &'a mut Ranked {
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

impl Monitor {
    /// Adds the charts' point for `now_ms` (every [`history::STEP_MS`] unless
    /// configured).
    pub fn sample_history(&mut self, now_ms: u64) {
        let sample = history::Sample {
            succeeded_total: self.counters.tasks_completed(),
            failed_total: self.counters.tasks_failed(),
            run_time_p90_ms: self.run_time.summary(now_ms, 2).p90_ms,
            queue_wait_p90_ms: self.queue_wait.summary(now_ms, 2).p90_ms,
            agents_online: self
                .agents
                .values()
                .filter(|p| **p == AgentStatus::Active)
                .count(),
        };
        self.history.record(now_ms, sample);
    }

    /// The charts' points, oldest first.
    pub fn history(&self) -> Vec<history::Point> {
        self.history.points().cloned().collect()
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
        m.agents_online = self
            .agents
            .values()
            .filter(|p| **p == AgentStatus::Active)
            .count();
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

    /// Everything the Prometheus exposition shows.
    pub fn exposition(&self, now_ms: u64) -> Exposition {
        let count = |it: &mut dyn Iterator<Item = &'static str>| {
            let mut out = BTreeMap::new();
            for k in it {
                *out.entry(k).or_default() += 1;
            }
            out
        };
        let [queue_wait, run_time, end_to_end] = self.buckets.clone();
        Exposition {
            metrics: self.metrics(now_ms),
            queue_wait,
            run_time,
            end_to_end,
            transitions: self.transitions.clone(),
            tasks: count(&mut self.tasks.values().map(|t| t.state.as_str())),
            flows: count(
                &mut self
                    .flows
                    .values()
                    .map(|(_, paused)| if *paused { "paused" } else { "running" }),
            ),
            flows_completed: self.flows_completed.clone(),
            // The allocator's word when there is one: it knows the agents
            // that registered before this monitor started.
            agents: self
                .agent_status
                .clone()
                .unwrap_or_else(|| count(&mut self.agents.values().map(|p| p.as_str()))),
            anomalies: self.anomalies_by_kind.clone(),
            endpoints: self.endpoints.clone(),
            pool_used: self.pool_used.clone(),
        }
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
