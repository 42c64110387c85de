//! What `flow.status` and `flow.list` report: counts, progress, who runs what,
//! the critical path still ahead and an ETA from observed durations.

use std::collections::{BTreeMap, HashMap};

use common::msg::{FlowState, FlowStatus, FlowSummary, TaskState, TaskStatus};
use common::TaskId;
use petgraph::graphmap::DiGraphMap;

use super::{Flow, DEFAULT_ESTIMATE_MS};

impl Flow {
    /// The status reply for this flow at `revision`, as of `now_ms`.
    pub fn status(&self, revision: u64, now_ms: u64) -> FlowStatus {
        let mut counts = BTreeMap::new();
        let mut running_by_agent: BTreeMap<_, Vec<TaskId>> = BTreeMap::new();
        for t in self.tasks.values() {
            *counts.entry(t.state).or_insert(0) += 1;
            if let (true, Some(agent)) = (t.state.is_active(), &t.agent) {
                running_by_agent
                    .entry(agent.clone())
                    .or_default()
                    .push(t.spec.id.clone());
            }
        }
        let critical = self.critical_path_remaining_ms(now_ms);
        FlowStatus {
            flow_id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            revision,
            counts,
            progress: self.progress(),
            tasks: self
                .tasks
                .values()
                .map(|t| TaskStatus {
                    task_id: t.spec.id.clone(),
                    state: t.state,
                    attempt: t.attempt,
                    agent_id: t.agent.clone(),
                    allocation_id: t.allocation.clone(),
                    error: t.error.clone(),
                    output: t.output.clone(),
                    not_before_ms: (t.state == TaskState::Ready && t.not_before_ms > now_ms)
                        .then_some(t.not_before_ms),
                    deadline_ms: t.deadline_ms,
                })
                .collect(),
            created_at_ms: self.created_at_ms,
            finished_at_ms: self.finished_at_ms,
            running_by_agent,
            attempts: self.tasks.values().map(|t| t.attempt).sum(),
            failures: self.tasks.values().map(|t| t.failures).sum(),
            critical_path_remaining_ms: critical,
            eta_ms: (self.state == FlowState::Running).then_some(now_ms.saturating_add(critical)),
            warnings: self.warnings.clone(),
        }
    }

    pub fn summary(&self) -> FlowSummary {
        FlowSummary {
            flow_id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            tasks: self.tasks.len(),
            progress: self.progress(),
        }
    }

    fn progress(&self) -> f64 {
        if self.tasks.is_empty() {
            return 1.0;
        }
        let done = self
            .tasks
            .values()
            .filter(|t| t.state.is_terminal())
            .count();
        done as f64 / self.tasks.len() as f64
    }

    /// Mean observed run time per task kind in this flow (successful runs only).
    fn observed_ms(&self) -> HashMap<&str, u64> {
        let mut sums: HashMap<&str, (u64, u64)> = HashMap::new();
        for t in self
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Succeeded)
        {
            if let Some(run) = t
                .history
                .last()
                .and_then(|h| h.started_ms.map(|s| h.ended_ms.saturating_sub(s)))
            {
                let e = sums.entry(t.spec.kind.as_str()).or_insert((0, 0));
                e.0 = e.0.saturating_add(run);
                e.1 += 1;
            }
        }
        sums.into_iter()
            .map(|(k, (sum, n))| (k, sum / n.max(1)))
            .collect()
    }

    /// Work left per unfinished task: its estimate (or the observed mean of its
    /// kind), minus what a running task has already done.
    pub(super) fn remaining_ms(&self, now_ms: u64) -> HashMap<&TaskId, u64> {
        let observed = self.observed_ms();
        self.tasks
            .values()
            .filter(|t| !t.state.is_terminal())
            .map(|t| {
                let full = t
                    .spec
                    .estimated_duration_ms
                    .or_else(|| observed.get(t.spec.kind.as_str()).copied())
                    .unwrap_or(DEFAULT_ESTIMATE_MS);
                let left = match (t.state, t.started_ms) {
                    (TaskState::Running, Some(s)) => full.saturating_sub(now_ms.saturating_sub(s)),
                    _ => full,
                };
                (&t.spec.id, left)
            })
            .collect()
    }

    /// Upward rank of every unfinished task over the work left (its own plus
    /// the longest chain below it), and the longest chain itself.
    pub(super) fn remaining_ranks(&self, now_ms: u64) -> (HashMap<&TaskId, u64>, Vec<TaskId>) {
        let left = self.remaining_ms(now_ms);
        let by_name: HashMap<&str, &TaskId> = left.keys().map(|id| (id.as_str(), *id)).collect();
        let mut graph = DiGraphMap::<&str, ()>::new();
        for id in left.keys() {
            graph.add_node(id.as_str());
        }
        for id in left.keys() {
            if let Some(t) = self.tasks.get(*id) {
                for d in t.dependents.iter().filter(|d| left.contains_key(d)) {
                    graph.add_edge(id.as_str(), d.as_str(), ());
                }
            }
        }
        let Ok(order) = petgraph::algo::toposort(&graph, None) else {
            return (HashMap::new(), Vec::new());
        };
        // Rank and the next task on the longest chain below.
        let mut memo: HashMap<&str, (u64, Option<&str>)> = HashMap::new();
        for id in order.into_iter().rev() {
            let below = graph
                .neighbors(id)
                .filter_map(|d| memo.get(d).map(|(r, _)| (*r, d)))
                .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(a.1)));
            let own = by_name
                .get(id)
                .and_then(|t| left.get(*t))
                .copied()
                .unwrap_or(0);
            memo.insert(
                id,
                (
                    own.saturating_add(below.map_or(0, |b| b.0)),
                    below.map(|b| b.1),
                ),
            );
        }
        let mut path = Vec::new();
        let mut at = memo
            .iter()
            .max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.0.cmp(a.0)))
            .map(|(id, _)| *id);
        while let Some(id) = at {
            if let Some(t) = by_name.get(id) {
                path.push((*t).clone());
            }
            at = memo.get(id).and_then(|(_, next)| *next);
        }
        let ranks = left
            .keys()
            .map(|id| (*id, memo.get(id.as_str()).map_or(0, |(r, _)| *r)))
            .collect();
        (ranks, path)
    }

    /// Longest chain of unfinished work, in estimated milliseconds.
    pub fn critical_path_remaining_ms(&self, now_ms: u64) -> u64 {
        self.remaining_ranks(now_ms)
            .0
            .values()
            .max()
            .copied()
            .unwrap_or(0)
    }
}
