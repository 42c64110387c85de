//! The flow state machine: validation, readiness, assignment and report handling.
//!
//! Pure and deterministic: no IO, no clock, no random ids. Time and ids come in as
//! arguments and every decision comes out as [`Effect`]s for the adapter to carry
//! out *after* the new state has been stored with a compare-and-set. Because the
//! adapter re-runs a step from fresh state whenever it loses a CAS race, every
//! method here must be safe to call on any stored revision.
//!
//! Task transitions (every one is an event):
//!
//! ```text
//! blocked ─deps succeeded─▶ ready ─assign─▶ assigned ─started─▶ running
//!                             ▲                │  └───completed/failed──┐   │
//!                             └──publish failed┘                        ▼   ▼
//!                                                         succeeded | failed
//! blocked ─a dependency failed or was skipped─▶ skipped
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use common::msg::{
    AgentReport, EventKind, FlowSpec, FlowState, FlowStatus, FlowSummary, ReportKind, TaskSpec,
    TaskState, TaskStatus, ValidationProblem,
};
use common::{AgentId, AllocationId, FlowId, TaskId};
use petgraph::graphmap::DiGraphMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most tasks one flow may hold (one KV entry holds the whole flow).
pub const MAX_TASKS: usize = 10_000;

/// A flow and the state of each of its tasks, as stored in KV.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flow {
    pub id: FlowId,
    pub name: String,
    pub state: FlowState,
    pub created_at_ms: u64,
    #[serde(default)]
    pub finished_at_ms: Option<u64>,
    pub tasks: BTreeMap<TaskId, Task>,
}

/// One task's spec and run state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub spec: TaskSpec,
    pub state: TaskState,
    /// Attempts made; the current attempt when assigned or running.
    pub attempt: u32,
    #[serde(default)]
    pub agent: Option<AgentId>,
    #[serde(default)]
    pub allocation: Option<AllocationId>,
    /// Tasks that depend on this one (derived from the specs at creation).
    #[serde(default)]
    pub dependents: Vec<TaskId>,
    /// Upward rank: tasks on the longest remaining chain below this one, itself included.
    #[serde(default)]
    pub rank: u32,
    /// When the task last changed state.
    #[serde(default)]
    pub since_ms: u64,
    #[serde(default)]
    pub output: Value,
    #[serde(default)]
    pub error: Option<String>,
}

/// Something the adapter must do once the new state is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Event(EventKind),
    /// Place and assign this ready task.
    Dispatch(TaskId),
    /// Give an allocation back to the allocator.
    Release {
        agent: AgentId,
        allocation: AllocationId,
    },
}

/// Why a report or assignment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("flow has finished")]
    FlowFinished,
    #[error("no task {0} in this flow")]
    UnknownTask(TaskId),
    #[error("attempt {got} is stale, the current attempt is {current}")]
    StaleAttempt { got: u32, current: u32 },
    #[error("agent {got} does not hold the task")]
    WrongAgent { got: AgentId },
    #[error("task is {0:?}, not running")]
    NotActive(TaskState),
    #[error("task is {0:?}, not ready")]
    NotReady(TaskState),
    #[error("unknown report type")]
    UnknownReport,
}

/// Checks a spec and returns *every* problem, not just the first.
pub fn validate(spec: &FlowSpec) -> Result<(), Vec<ValidationProblem>> {
    let mut problems = Vec::new();
    let problem = |code: &str, message: String, task_id: Option<&TaskId>| ValidationProblem {
        code: code.to_owned(),
        message,
        task_id: task_id.cloned(),
        path: Vec::new(),
    };
    if spec.tasks.is_empty() {
        problems.push(problem(
            "empty_flow",
            "a flow needs at least one task".into(),
            None,
        ));
    }
    if spec.tasks.len() > MAX_TASKS {
        problems.push(problem(
            "too_many_tasks",
            format!("{} tasks, at most {MAX_TASKS} per flow", spec.tasks.len()),
            None,
        ));
    }
    let mut ids = HashSet::new();
    for t in &spec.tasks {
        if !ids.insert(&t.id) {
            problems.push(problem(
                "duplicate_task",
                format!("task id {} is used more than once", t.id),
                Some(&t.id),
            ));
        }
        for (resource, amount) in &t.requirements.resources {
            if !amount.is_finite() || *amount < 0.0 {
                problems.push(problem(
                    "invalid_requirement",
                    format!(
                        "task {} asks for {amount} of {resource}; amounts must be finite and >= 0",
                        t.id
                    ),
                    Some(&t.id),
                ));
            }
        }
    }
    for t in &spec.tasks {
        for d in &t.depends_on {
            if d == &t.id {
                problems.push(problem(
                    "self_dependency",
                    format!("task {} depends on itself", t.id),
                    Some(&t.id),
                ));
            } else if !ids.contains(d) {
                problems.push(problem(
                    "unknown_dependency",
                    format!("task {} depends on {d}, which is not in the flow", t.id),
                    Some(&t.id),
                ));
            }
        }
    }
    problems.extend(cycles(spec));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// One problem per cycle (strongly connected component), each with a path through it.
fn cycles(spec: &FlowSpec) -> Vec<ValidationProblem> {
    let graph = dependency_graph(spec);
    let mut out = Vec::new();
    for scc in petgraph::algo::tarjan_scc(&graph) {
        if scc.len() < 2 {
            continue; // self-dependencies are reported on their own
        }
        let members: HashSet<&str> = scc.iter().copied().collect();
        let start = scc.iter().copied().min().unwrap_or_default();
        let path = cycle_path(&graph, &members, start);
        let shown: Vec<&str> = path.iter().map(TaskId::as_str).collect();
        out.push(ValidationProblem {
            code: "cycle".into(),
            message: format!("dependency cycle: {}", shown.join(" -> ")),
            task_id: path.first().cloned(),
            path,
        });
    }
    out
}

/// Edges run from a dependency to its dependant (the order tasks run in).
fn dependency_graph(spec: &FlowSpec) -> DiGraphMap<&str, ()> {
    let mut g = DiGraphMap::new();
    for t in &spec.tasks {
        g.add_node(t.id.as_str());
        for d in &t.depends_on {
            if d != &t.id {
                g.add_edge(d.as_str(), t.id.as_str(), ());
            }
        }
    }
    g
}

/// Breadth-first search inside one strongly connected component from `start`
/// back to itself; the shortest such path is the clearest to report.
fn cycle_path(graph: &DiGraphMap<&str, ()>, members: &HashSet<&str>, start: &str) -> Vec<TaskId> {
    let mut prev: HashMap<&str, &str> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    let mut end = None;
    while let Some(n) = queue.pop_front() {
        for next in graph.neighbors(n) {
            if !members.contains(next) {
                continue;
            }
            if next == start {
                end = Some(n);
                queue.clear();
                break;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(next) {
                e.insert(n);
                queue.push_back(next);
            }
        }
    }
    let mut path = vec![start];
    let mut cur = end;
    let mut back = Vec::new();
    while let Some(n) = cur {
        if n == start {
            break;
        }
        back.push(n);
        cur = prev.get(n).copied();
    }
    back.reverse();
    path.extend(back);
    path.push(start);
    path.into_iter()
        .filter_map(|s| TaskId::new(s).ok())
        .collect()
}

impl Flow {
    /// A new flow from a validated spec. Tasks without dependencies become ready
    /// at once.
    pub fn new(id: FlowId, spec: FlowSpec, now_ms: u64) -> (Flow, Vec<Effect>) {
        let ranks = upward_ranks(&spec);
        let mut dependents: HashMap<TaskId, Vec<TaskId>> = HashMap::new();
        for t in &spec.tasks {
            for d in &t.depends_on {
                dependents.entry(d.clone()).or_default().push(t.id.clone());
            }
        }
        let tasks = spec
            .tasks
            .into_iter()
            .map(|spec| {
                let task = Task {
                    state: TaskState::Blocked,
                    attempt: 0,
                    agent: None,
                    allocation: None,
                    dependents: dependents.remove(&spec.id).unwrap_or_default(),
                    rank: ranks.get(&spec.id).copied().unwrap_or(1),
                    since_ms: now_ms,
                    output: Value::Null,
                    error: None,
                    spec,
                };
                (task.spec.id.clone(), task)
            })
            .collect::<BTreeMap<_, _>>();
        let mut flow = Flow {
            id: id.clone(),
            name: spec.name,
            state: FlowState::Running,
            created_at_ms: now_ms,
            finished_at_ms: None,
            tasks,
        };
        let mut effects = vec![Effect::Event(EventKind::FlowCreated {
            flow_id: id,
            name: flow.name.clone(),
            tasks: flow.tasks.len(),
        })];
        let roots: Vec<TaskId> = flow
            .tasks
            .values()
            .filter(|t| t.spec.depends_on.is_empty())
            .map(|t| t.spec.id.clone())
            .collect();
        for t in roots {
            flow.transition(&t, TaskState::Ready, now_ms, &mut effects);
        }
        effects.extend(flow.ready_in_order().into_iter().map(Effect::Dispatch));
        (flow, effects)
    }

    /// Ready tasks in dispatch order: priority, then critical path (upward rank), then id.
    pub fn ready_in_order(&self) -> Vec<TaskId> {
        let mut ready: Vec<&Task> = self
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Ready)
            .collect();
        ready.sort_by(|a, b| {
            b.spec
                .priority
                .cmp(&a.spec.priority)
                .then(b.rank.cmp(&a.rank))
                .then(a.spec.id.cmp(&b.spec.id))
        });
        ready.into_iter().map(|t| t.spec.id.clone()).collect()
    }

    /// Records that `task` was placed on `agent` and is being sent to it.
    /// Returns the new attempt number.
    pub fn assign(
        &mut self,
        task: &TaskId,
        agent: &AgentId,
        allocation: &AllocationId,
        now_ms: u64,
    ) -> Result<(u32, Vec<Effect>), Rejection> {
        if self.state.is_terminal() {
            return Err(Rejection::FlowFinished);
        }
        let t = self
            .tasks
            .get_mut(task)
            .ok_or_else(|| Rejection::UnknownTask(task.clone()))?;
        if t.state != TaskState::Ready {
            return Err(Rejection::NotReady(t.state));
        }
        t.attempt += 1;
        t.agent = Some(agent.clone());
        t.allocation = Some(allocation.clone());
        let attempt = t.attempt;
        let mut effects = Vec::new();
        self.transition(task, TaskState::Assigned, now_ms, &mut effects);
        Ok((attempt, effects))
    }

    /// Undoes an assignment whose message could not be sent: the task is ready
    /// again and its allocation goes back.
    pub fn unassign(
        &mut self,
        task: &TaskId,
        attempt: u32,
        now_ms: u64,
    ) -> Result<Vec<Effect>, Rejection> {
        let t = self
            .tasks
            .get_mut(task)
            .ok_or_else(|| Rejection::UnknownTask(task.clone()))?;
        if t.attempt != attempt {
            return Err(Rejection::StaleAttempt {
                got: attempt,
                current: t.attempt,
            });
        }
        if t.state != TaskState::Assigned {
            return Err(Rejection::NotActive(t.state));
        }
        let mut effects = Vec::new();
        if let (Some(agent), Some(allocation)) = (t.agent.take(), t.allocation.take()) {
            effects.push(Effect::Release { agent, allocation });
        }
        self.transition(task, TaskState::Ready, now_ms, &mut effects);
        Ok(effects)
    }

    /// Applies an agent's report. Fencing: only the current attempt, from the
    /// agent that holds it, while it is assigned or running, is accepted.
    pub fn report(&mut self, report: &AgentReport, now_ms: u64) -> Result<Vec<Effect>, Rejection> {
        if self.state.is_terminal() {
            return Err(Rejection::FlowFinished);
        }
        let t = self
            .tasks
            .get(&report.task_id)
            .ok_or_else(|| Rejection::UnknownTask(report.task_id.clone()))?;
        if report.attempt != t.attempt {
            return Err(Rejection::StaleAttempt {
                got: report.attempt,
                current: t.attempt,
            });
        }
        if t.agent.as_ref() != Some(&report.agent_id) {
            return Err(Rejection::WrongAgent {
                got: report.agent_id.clone(),
            });
        }
        let state = t.state;
        if !matches!(state, TaskState::Assigned | TaskState::Running) {
            return Err(Rejection::NotActive(state));
        }
        let id = report.task_id.clone();
        let mut effects = Vec::new();
        match &report.kind {
            ReportKind::Started | ReportKind::Progress { .. } => {
                // A repeated `started` or a progress report on a running task changes nothing.
                if state == TaskState::Assigned {
                    self.transition(&id, TaskState::Running, now_ms, &mut effects);
                }
            }
            ReportKind::Completed { output } => {
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.output = output.clone();
                }
                self.finish_task(&id, TaskState::Succeeded, now_ms, &mut effects);
            }
            ReportKind::Failed { error, .. } => {
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.error = Some(error.clone());
                }
                self.finish_task(&id, TaskState::Failed, now_ms, &mut effects);
            }
            ReportKind::Unknown => return Err(Rejection::UnknownReport),
        }
        Ok(effects)
    }

    fn finish_task(&mut self, id: &TaskId, to: TaskState, now_ms: u64, effects: &mut Vec<Effect>) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        if let (Some(agent), Some(allocation)) = (t.agent.clone(), t.allocation.take()) {
            effects.push(Effect::Release { agent, allocation });
        }
        let dependents = t.dependents.clone();
        self.transition(id, to, now_ms, effects);
        if to == TaskState::Succeeded {
            for d in dependents {
                let ready = self.tasks.get(&d).is_some_and(|dt| {
                    dt.state == TaskState::Blocked
                        && dt.spec.depends_on.iter().all(|p| {
                            self.tasks
                                .get(p)
                                .is_some_and(|pt| pt.state == TaskState::Succeeded)
                        })
                });
                if ready {
                    self.transition(&d, TaskState::Ready, now_ms, effects);
                }
            }
            let newly_ready: Vec<TaskId> = effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Event(EventKind::TaskTransition {
                        task_id,
                        to: TaskState::Ready,
                        ..
                    }) => Some(task_id.clone()),
                    _ => None,
                })
                .collect();
            let order = self.ready_in_order();
            effects.extend(
                order
                    .into_iter()
                    .filter(|t| newly_ready.contains(t))
                    .map(Effect::Dispatch),
            );
        } else {
            self.skip_downstream(id, now_ms, effects);
        }
        self.maybe_finish(now_ms, effects);
    }

    /// Everything downstream of a failed task can never run.
    fn skip_downstream(&mut self, from: &TaskId, now_ms: u64, effects: &mut Vec<Effect>) {
        let mut stack = self
            .tasks
            .get(from)
            .map(|t| t.dependents.clone())
            .unwrap_or_default();
        let mut seen = BTreeSet::new();
        while let Some(d) = stack.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            let Some(t) = self.tasks.get(&d) else {
                continue;
            };
            if t.state == TaskState::Blocked {
                stack.extend(t.dependents.iter().cloned());
                self.transition(&d, TaskState::Skipped, now_ms, effects);
            }
        }
    }

    fn maybe_finish(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        if self.state.is_terminal() || !self.tasks.values().all(|t| t.state.is_terminal()) {
            return;
        }
        let ok = self.tasks.values().all(|t| t.state == TaskState::Succeeded);
        self.state = if ok {
            FlowState::Succeeded
        } else {
            FlowState::Failed
        };
        self.finished_at_ms = Some(now_ms);
        effects.push(Effect::Event(EventKind::FlowCompleted {
            flow_id: self.id.clone(),
            state: self.state,
        }));
    }

    fn transition(&mut self, id: &TaskId, to: TaskState, now_ms: u64, effects: &mut Vec<Effect>) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        let from = t.state;
        t.state = to;
        t.since_ms = now_ms;
        effects.push(Effect::Event(EventKind::TaskTransition {
            flow_id: self.id.clone(),
            task_id: id.clone(),
            from,
            to,
            attempt: t.attempt,
            agent_id: t.agent.clone(),
        }));
    }

    /// The status reply for this flow at `revision`.
    pub fn status(&self, revision: u64) -> FlowStatus {
        let mut counts = BTreeMap::new();
        for t in self.tasks.values() {
            *counts.entry(t.state).or_insert(0) += 1;
        }
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
                })
                .collect(),
            created_at_ms: self.created_at_ms,
            finished_at_ms: self.finished_at_ms,
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

    /// The spec the flow was created from, with its id.
    pub fn spec(&self) -> FlowSpec {
        FlowSpec {
            id: Some(self.id.clone()),
            name: self.name.clone(),
            tasks: self.tasks.values().map(|t| t.spec.clone()).collect(),
        }
    }
}

/// Longest chain of tasks from each task to a sink, counting the task itself.
/// Ready tasks with a higher rank sit on the critical path and go first.
fn upward_ranks(spec: &FlowSpec) -> HashMap<TaskId, u32> {
    let graph = dependency_graph(spec);
    let mut ranks: HashMap<&str, u32> = HashMap::new();
    if let Ok(order) = petgraph::algo::toposort(&graph, None) {
        for n in order.into_iter().rev() {
            let below = graph
                .neighbors(n)
                .filter_map(|m| ranks.get(m))
                .max()
                .copied()
                .unwrap_or(0);
            ranks.insert(n, below + 1);
        }
    }
    ranks
        .into_iter()
        .filter_map(|(k, v)| TaskId::new(k).ok().map(|id| (id, v)))
        .collect()
}

#[cfg(test)]
mod tests;
