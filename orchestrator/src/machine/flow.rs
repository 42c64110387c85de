//! A flow's creation, what is due to run, and recording an assignment
//! (or taking back one that could not be sent).

use std::collections::HashMap;

use common::msg::{EventKind, FlowSpec, FlowState, TaskSpec, TaskState};
use common::{AgentId, AllocationId, FlowId, TaskId};
use serde_json::Value;

use super::*;

impl Flow {
    /// A flow `f` of `n` independent tasks `t0`…, for tests.
    #[cfg(test)]
    pub(crate) fn independent(n: usize) -> Flow {
        let tasks = (0..n)
            .map(|i| TaskSpec::new(TaskId::new(format!("t{i}")).expect("valid id")))
            .collect();
        Flow::new(
            FlowId::new("f").expect("valid id"),
            FlowSpec::new("f", tasks),
            1,
        )
        .0
    }

    /// [`Flow::assign`] with the new attempt's number taken out of its
    /// [`Effect::Assign`], for tests.
    #[cfg(test)]
    pub(crate) fn assign_attempt(
        &mut self,
        task: &TaskId,
        agent: &AgentId,
        allocation: &AllocationId,
        now_ms: u64,
    ) -> Result<(u32, Vec<Effect>), Rejection> {
        let effects = self.assign(task, agent, allocation, now_ms)?;
        let attempt = effects
            .iter()
            .find_map(|e| match e {
                Effect::Assign { attempt, .. } => Some(*attempt),
                _ => None,
            })
            .expect("an assignment is sent");
        Ok((attempt, effects))
    }

    /// A new flow from a validated spec. Tasks without dependencies become ready
    /// at once.
    pub fn new(id: FlowId, spec: FlowSpec, now_ms: u64) -> (Flow, Vec<Effect>) {
        let ranks = validate::upward_ranks(&spec, |t: &TaskSpec| {
            t.estimated_duration_ms.unwrap_or(DEFAULT_ESTIMATE_MS)
        });
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
                    rank: ranks.get(&spec.id).copied().unwrap_or(DEFAULT_ESTIMATE_MS),
                    since_ms: now_ms,
                    not_before_ms: 0,
                    deadline_ms: None,
                    assigned_ms: None,
                    started_ms: None,
                    output: Value::Null,
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
                };
                (task.spec.id.clone(), task)
            })
            .collect::<Tasks>();
        let mut flow = Flow {
            id: id.clone(),
            name: spec.name,
            state: FlowState::Running,
            created_at_ms: now_ms,
            finished_at_ms: None,
            max_parallelism: spec.max_parallelism,
            failure_mode: spec.failure_mode,
            owner: spec.owner,
            warnings: Vec::new(),
            started_by: None,
            trace: None,
            events: 0,
            waiting: 0,
            tasks,
            unfinished: Hint::default(),
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
            flow.transition(&t, TaskState::Ready, now_ms, None, &mut effects);
        }
        (flow, effects)
    }

    /// Tasks assigned or running now.
    pub fn active(&self) -> usize {
        self.tasks.values().filter(|t| t.state.is_active()).count()
    }

    /// How many more tasks may be started, `in_flight` being placed already:
    /// the flow's parallelism budget, the one place it is computed.
    pub fn room(&self, in_flight: usize) -> usize {
        match self.max_parallelism {
            // Counting active tasks is a scan of the flow: only when it matters.
            Some(max) => (max as usize).saturating_sub(self.active() + in_flight),
            None => usize::MAX,
        }
    }

    /// Ready tasks in dispatch order: priority, then critical path (upward rank), then id.
    pub fn ready_in_order(&mut self) -> Vec<TaskId> {
        let ready = self.tasks.ready_in_order();
        ready.iter().map(|(_, id)| id.clone()).collect()
    }

    /// The ready tasks to place now, in order, within the parallelism budget:
    /// none while the flow is paused or finished, none still backing off.
    pub fn dispatchable(&mut self, now_ms: u64) -> Vec<TaskId> {
        self.dispatchable_up_to(now_ms, usize::MAX)
    }

    /// The first `limit` of [`Flow::dispatchable`], read off the ready tasks
    /// kept in order: a wide flow has far more ready tasks than can be
    /// placed at once, and finding them must not be a pass over every task.
    pub fn dispatchable_up_to(&mut self, now_ms: u64, limit: usize) -> Vec<TaskId> {
        self.tasks.settle();
        if self.state != FlowState::Running {
            return Vec::new();
        }
        let budget = self.room(0).min(limit);
        if budget == 0 {
            return Vec::new();
        }
        let mut due = Vec::new();
        self.visit_dispatchable(now_ms, |t| {
            due.push(t.spec.id.clone());
            due.len() < budget
        });
        due
    }

    /// Hands the ready tasks due at `now_ms` to `visit`, in dispatch order,
    /// until it returns `false`; the parallelism budget is the caller's. The
    /// order is read as of the tasks' last `settle`.
    pub(super) fn visit_dispatchable<'a>(
        &'a self,
        now_ms: u64,
        mut visit: impl FnMut(&'a Task) -> bool,
    ) {
        if self.state != FlowState::Running {
            return;
        }
        for (_, id) in self.tasks.ready_order() {
            let Some(t) = self.tasks.get(id).filter(|t| t.not_before_ms <= now_ms) else {
                continue;
            };
            if !visit(t) {
                return;
            }
        }
    }

    /// The earliest time something is due: a back-off ending or a deadline
    /// passing (kept in order with the tasks, not a pass over them).
    pub fn next_wakeup(&mut self) -> Option<u64> {
        if self.state.is_terminal() {
            return None;
        }
        self.tasks.next_due()
    }

    /// The first time something is due after `now_ms`: when a flow's
    /// wake-up is to be set (what is due already is acted on meanwhile).
    pub fn next_wakeup_after(&mut self, now_ms: u64) -> Option<u64> {
        if self.state.is_terminal() {
            return None;
        }
        self.tasks.next_due_after(now_ms)
    }

    /// Records that `task` was placed on `agent`; the new attempt goes out
    /// as an [`Effect::Assign`].
    pub fn assign(
        &mut self,
        task: &TaskId,
        agent: &AgentId,
        allocation: &AllocationId,
        now_ms: u64,
    ) -> Result<Vec<Effect>, Rejection> {
        match self.state {
            FlowState::Running => {}
            FlowState::Paused => return Err(Rejection::FlowPaused),
            _ => return Err(Rejection::FlowFinished),
        }
        let full = self.room(0) == 0;
        let t = self
            .tasks
            .get_mut(task)
            .ok_or_else(|| Rejection::UnknownTask(task.clone()))?;
        if t.state != TaskState::Ready {
            return Err(Rejection::NotReady(t.state));
        }
        if t.not_before_ms > now_ms {
            return Err(Rejection::NotDue(t.not_before_ms));
        }
        if let (Some(max), true) = (self.max_parallelism, full) {
            return Err(Rejection::ParallelismLimit(max));
        }
        t.attempt += 1;
        t.agent = Some(agent.clone());
        t.allocation = Some(allocation.clone());
        t.asked = None;
        t.assigned_ms = Some(now_ms);
        t.started_ms = None;
        t.progress = None;
        t.progress_message = None;
        t.deadline_ms = Some(
            now_ms.saturating_add(
                t.spec
                    .timeouts
                    .schedule_to_start_ms
                    .unwrap_or(DEFAULT_SCHEDULE_TO_START_MS),
            ),
        );
        let attempt = t.attempt;
        let mut effects = Vec::new();
        self.transition(task, TaskState::Assigned, now_ms, None, &mut effects);
        effects.push(Effect::Assign {
            task: task.clone(),
            attempt,
            agent: agent.clone(),
            allocation: allocation.clone(),
        });
        Ok(effects)
    }

    /// Undoes an assignment whose message could not be sent: the task is ready
    /// again and its allocation goes back. The attempt number stays used, so a
    /// message that did get through after all is fenced off.
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
            effects.push(Effect::Release {
                agent,
                allocation,
                after: None,
            });
        }
        if let Some(c) = &t.spec.concurrency {
            effects.push(Effect::FreeSlot {
                key: c.key.clone(),
                holder: slot_holder(&self.id, task, attempt),
            });
        }
        t.deadline_ms = None;
        self.transition(
            task,
            TaskState::Ready,
            now_ms,
            Some("assignment not delivered".into()),
            &mut effects,
        );
        Ok(effects)
    }
}
