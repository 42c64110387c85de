//! What `flow.status` and `flow.list` report: counts, progress, who runs what,
//! the critical path still ahead and an ETA from observed durations.

use std::collections::{BTreeMap, HashMap};

use common::msg::{FlowState, FlowStatus, FlowSummary, TaskState, TaskStatus};
use common::TaskId;
use petgraph::graph::{DiGraph, NodeIndex};

use super::{Flow, DEFAULT_ESTIMATE_MS};

/// Most tasks a status lists: a reply must fit in one NATS message.
pub const STATUS_TASKS: usize = 1_000;

/// How long a succeeded task vouches for the allocation it held (see
/// [`Flow::holds`]).
pub use common::msg::HAND_ON_VOUCH_MS;

impl Flow {
    /// Whether `task` holds `allocation` (assigned or running on it); if
    /// not, why, for the allocator's reconciliation to log and report.
    pub fn holds(
        &self,
        task: &TaskId,
        allocation: &common::AllocationId,
        now_ms: u64,
    ) -> Result<(), String> {
        let Some(t) = self.tasks.get(task) else {
            return Err(format!("flow {} has no task {task}", self.id));
        };
        // Asked for, its grant not recorded yet (see `Task::asked`).
        if t.state == TaskState::Ready && t.asked.as_ref() == Some(allocation) {
            return Ok(());
        }
        // Succeeded with it just now: its replica may be handing it on
        // (see `Task::last_allocation`).
        let ended = t.history.last().map_or(0, |h| h.ended_ms);
        if t.state == TaskState::Succeeded
            && t.last_allocation.as_ref() == Some(allocation)
            && now_ms < ended.saturating_add(HAND_ON_VOUCH_MS)
        {
            return Ok(());
        }
        if !t.state.is_active() {
            return Err(format!(
                "task {task} of flow {} is {}",
                self.id,
                t.state.as_str()
            ));
        }
        match &t.allocation {
            Some(a) if a == allocation => Ok(()),
            Some(a) => Err(format!(
                "task {task} of flow {} holds allocation {a} instead",
                self.id
            )),
            None => Err(format!(
                "task {task} of flow {} holds no allocation",
                self.id
            )),
        }
    }

    /// The status reply for this flow at `revision`, as of `now_ms`. A large
    /// flow lists its unfinished tasks first, up to [`STATUS_TASKS`].
    pub fn status(&self, revision: u64, now_ms: u64) -> FlowStatus {
        let mut status = self.overview(revision, now_ms);
        let mut listed: Vec<&super::Task> = self.tasks.values().collect();
        if listed.len() > STATUS_TASKS {
            // Stable: id order within the unfinished and the finished.
            listed.sort_by_key(|t| t.state.is_terminal());
            listed.truncate(STATUS_TASKS);
        }
        status.tasks_omitted = self.tasks.len() - listed.len();
        status.tasks = listed
            .into_iter()
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
                progress: t.progress,
                progress_message: t.progress_message.clone(),
            })
            .collect();
        status
    }

    /// The status without the per-task list: what watchers get after every
    /// step, so it must not copy every task's output.
    pub fn overview(&self, revision: u64, now_ms: u64) -> FlowStatus {
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
            tasks: Vec::new(),
            tasks_omitted: 0,
            created_at_ms: self.created_at_ms,
            finished_at_ms: self.finished_at_ms,
            running_by_agent,
            attempts: self.tasks.values().map(|t| t.attempt).sum(),
            failures: self.tasks.values().map(|t| t.failures).sum(),
            critical_path_remaining_ms: critical,
            eta_ms: (self.state == FlowState::Running).then_some(now_ms.saturating_add(critical)),
            warnings: self.warnings.clone(),
            started_by: self.started_by.clone(),
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
        // Dense integer nodes: this runs after every step of a large flow
        // (the watch's critical path), where hashing names dominated.
        let ids: Vec<&TaskId> = left.keys().copied().collect();
        let index: HashMap<&TaskId, NodeIndex> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, NodeIndex::new(i)))
            .collect();
        let mut graph = DiGraph::<(), ()>::with_capacity(ids.len(), ids.len());
        for _ in &ids {
            graph.add_node(());
        }
        for (i, id) in ids.iter().enumerate() {
            if let Some(t) = self.tasks.get(*id) {
                for d in t.dependents.iter().filter_map(|d| index.get(d)) {
                    graph.add_edge(NodeIndex::new(i), *d, ());
                }
            }
        }
        let Ok(order) = petgraph::algo::toposort(&graph, None) else {
            return (HashMap::new(), Vec::new());
        };
        // Rank and the next task on the longest chain below; ties go to the
        // smaller id, so the path is the same whatever the graph's order.
        let mut memo: Vec<(u64, Option<usize>)> = vec![(0, None); ids.len()];
        for n in order.into_iter().rev() {
            let below = graph
                .neighbors(n)
                .map(|d| (memo[d.index()].0, d.index()))
                .max_by(|a, b| a.0.cmp(&b.0).then(ids[b.1].cmp(ids[a.1])));
            let own = left.get(ids[n.index()]).copied().unwrap_or(0);
            memo[n.index()] = (
                own.saturating_add(below.map_or(0, |b| b.0)),
                below.map(|b| b.1),
            );
        }
        let mut path = Vec::new();
        let mut at =
            (0..ids.len()).max_by(|a, b| memo[*a].0.cmp(&memo[*b].0).then(ids[*b].cmp(ids[*a])));
        while let Some(i) = at {
            path.push(ids[i].clone());
            at = memo[i].1;
        }
        let ranks = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (*id, memo[i].0))
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
