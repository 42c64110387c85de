//! Changing a flow after it started: modify (add, remove, re-prioritise, new
//! inputs, new dependencies) and re-run from a task.
//!
//! A modification is checked as a whole against the flow as it is (the adapter
//! has already checked the client's revision) and applied all at once or not at
//! all; the resulting spec goes through the same validation as a new flow.

use std::collections::{BTreeSet, HashMap};

use common::msg::{FlowChanges, FlowSpec, TaskState, ValidationProblem};
use common::TaskId;

use super::validate::{upward_ranks, validate};
use super::{Effect, Flow, Task, DEFAULT_ESTIMATE_MS};

/// Why a change was refused: every problem found.
pub type Problems = Vec<ValidationProblem>;

fn problem(code: &str, message: String, task: Option<&TaskId>) -> ValidationProblem {
    ValidationProblem {
        code: code.to_owned(),
        message,
        task_id: task.cloned(),
        path: Vec::new(),
    }
}

fn not_started(state: TaskState) -> bool {
    matches!(state, TaskState::Blocked | TaskState::Ready)
}

impl Flow {
    /// Applies `changes` atomically. Refuses with every problem at once.
    pub fn modify(&mut self, changes: &FlowChanges, now_ms: u64) -> Result<Vec<Effect>, Problems> {
        if self.state.is_terminal() {
            return Err(vec![problem(
                "flow_finished",
                format!("flow is {}", self.state),
                None,
            )]);
        }
        let mut problems = Vec::new();
        let state_of = |id: &TaskId| self.tasks.get(id).map(|t| t.state);
        for id in &changes.remove {
            match state_of(id) {
                None => problems.push(problem(
                    "unknown_task",
                    format!("no task {id} to remove"),
                    Some(id),
                )),
                Some(s) if !not_started(s) => problems.push(problem(
                    "task_started",
                    format!("task {id} is {s}; only tasks that have not started can be removed"),
                    Some(id),
                )),
                _ => {}
            }
        }
        for id in changes.priorities.keys() {
            match state_of(id) {
                None => problems.push(problem(
                    "unknown_task",
                    format!("no task {id} to re-prioritise"),
                    Some(id),
                )),
                Some(s) if !not_started(s) => problems.push(problem(
                    "task_started",
                    format!(
                        "task {id} is {s}; only tasks that have not started can be re-prioritised"
                    ),
                    Some(id),
                )),
                _ => {}
            }
        }
        for id in changes.inputs.keys() {
            match state_of(id) {
                None => problems.push(problem(
                    "unknown_task",
                    format!("no task {id} to change"),
                    Some(id),
                )),
                Some(s) if !not_started(s) => problems.push(problem(
                    "task_started",
                    format!("task {id} is {s}; inputs can change only before assignment"),
                    Some(id),
                )),
                _ => {}
            }
        }
        for dep in &changes.add_dependencies {
            match state_of(&dep.task_id) {
                // A task added in the same change may get dependencies too.
                None if changes.add.iter().any(|t| t.id == dep.task_id) => {}
                None => problems.push(problem(
                    "unknown_task",
                    format!("no task {} to add a dependency to", dep.task_id),
                    Some(&dep.task_id),
                )),
                Some(s) if !not_started(s) => problems.push(problem(
                    "task_started",
                    format!(
                        "task {} is {s}; no dependency can be added to it",
                        dep.task_id
                    ),
                    Some(&dep.task_id),
                )),
                _ => {}
            }
        }

        // The spec as it would be, validated like a new flow.
        let removed: BTreeSet<&TaskId> = changes.remove.iter().collect();
        let mut specs: Vec<_> = self
            .tasks
            .values()
            .filter(|t| !removed.contains(&t.spec.id))
            .map(|t| t.spec.clone())
            .collect();
        specs.extend(changes.add.iter().cloned());
        for s in &mut specs {
            if let Some(p) = changes.priorities.get(&s.id) {
                s.priority = *p;
            }
            if let Some(input) = changes.inputs.get(&s.id) {
                s.input = input.clone();
            }
            for dep in changes
                .add_dependencies
                .iter()
                .filter(|d| d.task_id == s.id)
            {
                if !s.depends_on.contains(&dep.depends_on) {
                    s.depends_on.push(dep.depends_on.clone());
                }
            }
        }
        for s in &specs {
            if let Some(gone) = s.depends_on.iter().find(|d| removed.contains(d)) {
                problems.push(problem(
                    "dependency_removed",
                    format!("task {} depends on {gone}, which would be removed", s.id),
                    Some(&s.id),
                ));
            }
        }
        let spec = FlowSpec {
            tasks: specs,
            ..self.spec()
        };
        if let Err(more) = validate(&spec) {
            // A removed dependency is reported once, as such.
            problems.extend(more.into_iter().filter(|p| {
                !(p.code == "unknown_dependency"
                    && p.task_id.as_ref().is_some_and(|t| {
                        problems_mention(&changes.remove, spec.tasks.iter().find(|s| &s.id == t))
                    }))
            }));
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        // Apply.
        let mut effects = Vec::new();
        for id in &changes.remove {
            if let Some(t) = self.tasks.remove(id) {
                effects.push(Effect::Event(common::msg::EventKind::TaskTransition {
                    flow_id: self.id.clone(),
                    task_id: id.clone(),
                    from: t.state,
                    to: TaskState::Cancelled,
                    attempt: t.attempt,
                    agent_id: None,
                    reason: Some("removed from the flow".into()),
                    timeout_ms: None,
                    task_kind: None,
                }));
            }
        }
        for s in spec.tasks {
            match self.tasks.get_mut(&s.id) {
                Some(t) => t.spec = s,
                None => {
                    let task = Task::fresh(s, now_ms);
                    self.tasks.insert(task.spec.id.clone(), task);
                }
            }
        }
        self.relink();
        self.settle_readiness(now_ms, &mut effects);
        Ok(effects)
    }

    /// Resets a finished task and everything downstream of it, so they run
    /// again, each with its retry budget renewed (attempt numbers go on, so
    /// reports of earlier attempts stay fenced). Attempts of the downstream
    /// tasks still running are stopped. A `flow.rerun` event says so; the
    /// resets are `task.reset` transitions.
    pub fn rerun(&mut self, task: &TaskId, now_ms: u64) -> Result<Vec<Effect>, Problems> {
        let Some(t) = self.tasks.get(task) else {
            return Err(vec![problem(
                "unknown_task",
                format!("no task {task}"),
                Some(task),
            )]);
        };
        if !t.state.is_terminal() {
            return Err(vec![problem(
                "task_not_finished",
                format!(
                    "task {task} is {}; only a finished task can be re-run",
                    t.state
                ),
                Some(task),
            )]);
        }
        if self.state == common::msg::FlowState::Cancelled {
            return Err(vec![problem(
                "flow_cancelled",
                "a cancelled flow cannot be re-run".into(),
                None,
            )]);
        }
        let mut effects = Vec::new();
        let mut reset = vec![task.clone()];
        let mut seen = BTreeSet::new();
        while let Some(id) = reset.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            reset.extend(t.dependents.iter().cloned());
            if t.state.is_active() {
                self.stop_task(
                    &id,
                    TaskState::Blocked,
                    "re-run upstream",
                    common::msg::CancelCode::Rerun,
                    now_ms,
                    &mut effects,
                );
            } else if t.state != TaskState::Blocked {
                self.transition(
                    &id,
                    TaskState::Blocked,
                    now_ms,
                    Some(format!("re-run from {task}")),
                    &mut effects,
                );
            }
            if let Some(t) = self.tasks.get_mut(&id) {
                t.not_before_ms = 0;
                t.error = None;
                t.output = serde_json::Value::Null;
                t.agent = None;
                t.allocation = None;
                t.uncounted = t.attempt;
                t.progress = None;
                t.progress_message = None;
            }
        }
        let was_finished = self.state.is_terminal();
        if was_finished {
            self.state = common::msg::FlowState::Running;
            self.finished_at_ms = None;
        }
        effects.push(Effect::Event(common::msg::EventKind::FlowRerun {
            flow_id: self.id.clone(),
            task_id: task.clone(),
            reset: seen.len(),
            was_finished,
        }));
        self.settle_readiness(now_ms, &mut effects);
        Ok(effects)
    }

    /// Recomputes dependents and ranks from the specs.
    fn relink(&mut self) {
        let spec = self.spec();
        let ranks = upward_ranks(&spec, |t| {
            t.estimated_duration_ms.unwrap_or(DEFAULT_ESTIMATE_MS)
        });
        let mut dependents: HashMap<TaskId, Vec<TaskId>> = HashMap::new();
        for t in &spec.tasks {
            for d in &t.depends_on {
                dependents.entry(d.clone()).or_default().push(t.id.clone());
            }
        }
        for (id, t) in self.tasks.iter_mut() {
            t.dependents = dependents.remove(id).unwrap_or_default();
            t.rank = ranks.get(id).copied().unwrap_or(DEFAULT_ESTIMATE_MS);
        }
    }

    /// Blocked and ready tasks follow their dependencies again: ready when all
    /// succeeded, skipped when one can no longer succeed, blocked otherwise.
    fn settle_readiness(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let open: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| not_started(t.state))
            .map(|t| t.spec.id.clone())
            .collect();
        for id in open {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            let deps: Vec<TaskState> = t
                .spec
                .depends_on
                .iter()
                .filter_map(|d| self.tasks.get(d).map(|dt| dt.state))
                .collect();
            let dead = deps
                .iter()
                .any(|s| s.is_terminal() && *s != TaskState::Succeeded);
            let ready = deps.iter().all(|s| *s == TaskState::Succeeded);
            let to = if dead && self.failure_mode == common::msg::FailureMode::Continue {
                TaskState::Skipped
            } else if ready {
                TaskState::Ready
            } else {
                TaskState::Blocked
            };
            if to != t.state {
                self.transition(&id, to, now_ms, None, effects);
            }
        }
        self.maybe_finish(now_ms, effects);
    }
}

fn problems_mention(removed: &[TaskId], spec: Option<&common::msg::TaskSpec>) -> bool {
    spec.is_some_and(|s| s.depends_on.iter().any(|d| removed.contains(d)))
}

impl Task {
    /// A task that has never run.
    pub(super) fn fresh(spec: common::msg::TaskSpec, now_ms: u64) -> Task {
        Task {
            state: TaskState::Blocked,
            attempt: 0,
            agent: None,
            allocation: None,
            dependents: Vec::new(),
            rank: DEFAULT_ESTIMATE_MS,
            since_ms: now_ms,
            not_before_ms: 0,
            deadline_ms: None,
            assigned_ms: None,
            started_ms: None,
            output: serde_json::Value::Null,
            error: None,
            failures: 0,
            history: Vec::new(),
            uncounted: 0,
            progress: None,
            progress_message: None,
            readied_by: None,
            asked: None,
            last_allocation: None,
            spec,
        }
    }
}
