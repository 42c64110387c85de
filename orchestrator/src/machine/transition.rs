//! How a task moves between states, and what each move sets off: attempts
//! closed and failed, retries and back-off, downstream tasks readied or
//! skipped, the flow finished.

use std::collections::BTreeSet;

use common::msg::{
    CancelCode, CancelNotice, EventKind, FailureKind, FailureMode, FlowSpec, FlowState, TaskState,
};
use common::{AgentId, TaskId};

use super::*;

impl Flow {
    pub(super) fn deps_succeeded(&self, t: &Task) -> bool {
        t.spec.depends_on.iter().all(|p| {
            self.tasks
                .get(p)
                .is_some_and(|pt| pt.state == TaskState::Succeeded)
        })
    }

    pub(super) fn succeed(&mut self, id: &TaskId, now_ms: u64, effects: &mut Vec<Effect>) {
        self.close_attempt(id, "succeeded", now_ms, effects);
        let dependents = self
            .tasks
            .get(id)
            .map(|t| t.dependents.clone())
            .unwrap_or_default();
        self.transition(id, TaskState::Succeeded, now_ms, None, effects);
        for d in dependents {
            let ready = self
                .tasks
                .get(&d)
                .is_some_and(|dt| dt.state == TaskState::Blocked && self.deps_succeeded(dt));
            if ready {
                self.transition(&d, TaskState::Ready, now_ms, None, effects);
            }
        }
        self.maybe_finish(now_ms, effects);
    }

    /// Ends the current attempt's hold on its agent: history, release.
    pub(super) fn close_attempt(
        &mut self,
        id: &TaskId,
        outcome: &str,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        if let (Some(agent), Some(allocation)) = (t.agent.clone(), t.allocation.take()) {
            // Only a success's: the agent answered just now, so its
            // allocation is worth handing on.
            let done = outcome == "succeeded";
            if done {
                t.last_allocation = Some(allocation.clone());
            }
            effects.push(Effect::Release {
                agent,
                allocation,
                after: done.then(|| id.clone()),
            });
        }
        if let Some(c) = &t.spec.concurrency {
            effects.push(Effect::FreeSlot {
                key: c.key.clone(),
                holder: slot_holder(&self.id, id, t.attempt),
            });
        }
        t.history.push(AttemptRecord {
            attempt: t.attempt,
            agent: t.agent.clone(),
            outcome: outcome.to_owned(),
            assigned_ms: t.assigned_ms,
            started_ms: t.started_ms,
            ended_ms: now_ms,
        });
        if t.history.len() > HISTORY_KEEP {
            let extra = t.history.len() - HISTORY_KEEP;
            t.history.drain(..extra);
        }
        t.deadline_ms = None;
    }

    /// An attempt its agent handed back on leaving: ready again at once, its
    /// agent told to stop, and not a failure.
    pub(super) fn hand_back(
        &mut self,
        id: &TaskId,
        agent: &AgentId,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let cancel = CancelNotice {
            flow_id: self.id.clone(),
            task_id: id.clone(),
            attempt: 0,
            code: CancelCode::AgentLeft,
            reason: "agent left: the attempt is handed back".into(),
        };
        let why = format!("handed back by agent {agent} on leaving");
        self.take_back(
            id,
            agent,
            cancel,
            "handed back: agent left",
            &why,
            now_ms,
            effects,
        );
    }

    /// Takes an active attempt back from `agent` without counting it against
    /// the retry budget (it did not fail: its agent left, or its allocation
    /// was not handed on to it), telling the agent with `cancel` (its attempt
    /// filled in), and makes the task ready at once: `closing` ends the
    /// attempt's record, `why` leads the transition's reason.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn take_back(
        &mut self,
        id: &TaskId,
        agent: &AgentId,
        mut cancel: CancelNotice,
        closing: &str,
        why: &str,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get(id) else { return };
        if !t.state.is_active() {
            return;
        }
        cancel.attempt = t.attempt;
        effects.push(Effect::Cancel {
            agent: agent.clone(),
            notice: cancel,
        });
        self.close_attempt(id, closing, now_ms, effects);
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        t.uncounted += 1;
        t.not_before_ms = 0;
        t.allocation = None;
        let reason = format!("{why}; attempt {} next", t.attempt + 1);
        self.transition(id, TaskState::Ready, now_ms, Some(reason), effects);
        if let Some(t) = self.tasks.get_mut(id) {
            t.agent = None;
        }
    }

    /// A failed attempt: retried after back-off while the policy allows, else
    /// the task fails for good and the failure mode decides about the rest.
    /// `cancel`: the attempt is taken from an agent that may still work on it,
    /// which is told so.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn fail_attempt(
        &mut self,
        id: &TaskId,
        kind: FailureKind,
        retryable: bool,
        error: &str,
        cancel: Option<CancelCode>,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get(id) else { return };
        // A step that ends several attempts (a tick, a lost agent) may already have
        // ended this one through fail-fast.
        if !t.state.is_active() {
            return;
        }
        let (attempt, agent) = (t.attempt, t.agent.clone());
        if let (Some(code), Some(agent)) = (cancel, agent) {
            // The agent may still be working on it: tell it to stop.
            let reason = match code {
                CancelCode::TimedOut => format!("attempt timed out: {error}"),
                _ => error.to_owned(),
            };
            effects.push(Effect::Cancel {
                agent,
                notice: CancelNotice {
                    flow_id: self.id.clone(),
                    task_id: id.clone(),
                    attempt,
                    code,
                    reason,
                },
            });
        }
        let outcome = match kind {
            FailureKind::Error => format!("failed: {error}"),
            FailureKind::Timeout => format!("timed out: {error}"),
            FailureKind::AgentLost => error.to_owned(),
        };
        self.close_attempt(id, &outcome, now_ms, effects);
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        t.failures += 1;
        t.error = Some(outcome.clone());
        let policy = &t.spec.retry;
        let retry = t.attempt.saturating_sub(t.uncounted) < policy.max_attempts
            && policy.retry_on.contains(&kind)
            && (kind != FailureKind::Error || retryable);
        if retry {
            let wait = policy.backoff_ms(t.attempt);
            t.not_before_ms = now_ms.saturating_add(wait);
            t.allocation = None;
            let reason = format!("{outcome}; attempt {} in {wait} ms", t.attempt + 1);
            self.transition(id, TaskState::Ready, now_ms, Some(reason), effects);
            if let Some(t) = self.tasks.get_mut(id) {
                t.agent = None;
            }
            return;
        }
        let end = if kind == FailureKind::Timeout {
            TaskState::TimedOut
        } else {
            TaskState::Failed
        };
        self.transition(id, end, now_ms, Some(outcome), effects);
        self.after_failure(id, now_ms, effects);
    }

    /// A task failed for good: its dependants are skipped, or (fail-fast)
    /// everything unfinished is stopped.
    pub(super) fn after_failure(&mut self, id: &TaskId, now_ms: u64, effects: &mut Vec<Effect>) {
        match self.failure_mode {
            FailureMode::Continue => self.skip_downstream(id, now_ms, effects),
            FailureMode::FailFast => {
                let open: Vec<TaskId> = self
                    .tasks
                    .values()
                    .filter(|t| !t.state.is_terminal())
                    .map(|t| t.spec.id.clone())
                    .collect();
                for other in open {
                    let to = if self.tasks.get(&other).is_some_and(|t| t.state.is_active()) {
                        TaskState::Cancelled
                    } else {
                        TaskState::Skipped
                    };
                    self.stop_task(
                        &other,
                        to,
                        &format!("fail-fast: task {id} failed"),
                        CancelCode::FailFast,
                        now_ms,
                        effects,
                    );
                }
            }
        }
        self.maybe_finish(now_ms, effects);
    }

    /// Ends an unfinished task without running it (further).
    pub(crate) fn stop_task(
        &mut self,
        id: &TaskId,
        to: TaskState,
        reason: &str,
        code: CancelCode,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get(id) else { return };
        if t.state.is_active() {
            if let Some(agent) = t.agent.clone() {
                effects.push(Effect::Cancel {
                    agent,
                    notice: CancelNotice {
                        flow_id: self.id.clone(),
                        task_id: id.clone(),
                        attempt: t.attempt,
                        code,
                        reason: reason.to_owned(),
                    },
                });
            }
            self.close_attempt(id, reason, now_ms, effects);
        }
        self.transition(id, to, now_ms, Some(reason.to_owned()), effects);
    }

    /// Everything downstream of a failed task can never run.
    pub(super) fn skip_downstream(
        &mut self,
        from: &TaskId,
        now_ms: u64,
        effects: &mut Vec<Effect>,
    ) {
        let mut stack = self
            .tasks
            .get(from)
            .map(|t| t.dependents.clone())
            .unwrap_or_default();
        let mut seen = BTreeSet::new();
        let reason = format!("dependency {from} did not succeed");
        while let Some(d) = stack.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            let Some(t) = self.tasks.get(&d) else {
                continue;
            };
            if matches!(t.state, TaskState::Blocked | TaskState::Ready) {
                stack.extend(t.dependents.iter().cloned());
                self.transition(
                    &d,
                    TaskState::Skipped,
                    now_ms,
                    Some(reason.clone()),
                    effects,
                );
            }
        }
    }

    pub(super) fn maybe_finish(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        if self.state != FlowState::Running || self.has_unfinished() {
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

    /// Whether some task is not final, looking from the hint onwards first.
    pub(super) fn has_unfinished(&mut self) -> bool {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let (after, before) = match self.unfinished.0.as_ref() {
            Some(h) => (
                self.tasks.range::<TaskId, _>((Included(h), Unbounded)),
                Some(self.tasks.range::<TaskId, _>((Unbounded, Excluded(h)))),
            ),
            None => (self.tasks.range::<TaskId, _>(..), None),
        };
        let found = after
            .chain(before.into_iter().flatten())
            .find(|(_, t)| !t.state.is_terminal())
            .map(|(id, _)| id.clone());
        let unfinished = found.is_some();
        self.unfinished.0 = found;
        unfinished
    }

    pub(super) fn transition(
        &mut self,
        id: &TaskId,
        to: TaskState,
        now_ms: u64,
        reason: Option<String>,
        effects: &mut Vec<Effect>,
    ) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        let from = t.state;
        // A wait task never queues for an agent: it begins waiting instead.
        let to = match (&t.spec.wait_for, to) {
            (Some(_), TaskState::Ready) => TaskState::Waiting,
            _ => to,
        };
        t.state = to;
        t.since_ms = now_ms;
        // Set again by the replica that writes the step (`Flow::claim_ready`).
        t.readied_by = None;
        // An id asked with is for the task's current wait for a grant only.
        t.asked = None;
        if from == TaskState::Waiting {
            self.waiting = self.waiting.saturating_sub(1);
        }
        if to == TaskState::Waiting {
            self.waiting += 1;
        }
        if !to.is_active() {
            t.deadline_ms = None;
        }
        if to == TaskState::Waiting {
            t.started_ms = Some(now_ms);
            t.deadline_ms = t
                .spec
                .wait_for
                .as_ref()
                .and_then(|w| w.timeout_ms)
                .map(|ms| now_ms.saturating_add(ms));
        }
        effects.push(Effect::Event(EventKind::TaskTransition {
            flow_id: self.id.clone(),
            task_id: id.clone(),
            from,
            to,
            attempt: t.attempt,
            agent_id: t.agent.clone(),
            reason,
            timeout_ms: if to == TaskState::Running {
                t.spec.timeouts.start_to_close_ms
            } else {
                None
            },
            task_kind: (to == TaskState::Running && !t.spec.kind.is_empty())
                .then(|| t.spec.kind.clone()),
        }));
    }

    /// The spec the flow was created from, with its id.
    pub fn spec(&self) -> FlowSpec {
        FlowSpec {
            id: Some(self.id.clone()),
            name: self.name.clone(),
            tasks: self.tasks.values().map(|t| t.spec.clone()).collect(),
            max_parallelism: self.max_parallelism,
            failure_mode: self.failure_mode,
            require_feasible: false,
            tasks_object: None,
            owner: self.owner.clone(),
        }
    }

    /// What task `task`'s last allocation may be handed on as (see
    /// [`super::HandOn`]).
    pub fn hand_on(&self, task: &TaskId) -> Option<super::HandOn> {
        let t = self.tasks.get(task)?;
        Some(super::HandOn {
            from: common::msg::TaskRef {
                flow_id: self.id.clone(),
                task_id: task.clone(),
            },
            owner: self.allocation_owner(task),
            requirements: t.spec.requirements.clone(),
            priority: t.spec.priority,
        })
    }

    /// The owner of `task`'s allocations: `{owner}/{flow}/{task}`, or
    /// `{flow}/{task}` for a flow without an owner.
    pub fn allocation_owner(&self, task: &TaskId) -> String {
        match &self.owner {
            Some(owner) => format!("{owner}/{}/{task}", self.id),
            None => format!("{}/{task}", self.id),
        }
    }
}

impl Task {
    /// The timing contract of the attempt assigned at `assigned_at_ms`, as the
    /// assignment tells the agent; `tick_ms` is how often deadlines are checked.
    pub fn lease(&self, assigned_at_ms: u64, tick_ms: u64) -> common::msg::AttemptLease {
        let t = &self.spec.timeouts;
        let schedule_to_start_ms = t
            .schedule_to_start_ms
            .unwrap_or(DEFAULT_SCHEDULE_TO_START_MS);
        let start_by_ms = assigned_at_ms.saturating_add(schedule_to_start_ms);
        common::msg::AttemptLease {
            schedule_to_start_ms,
            start_by_ms,
            start_to_close_ms: t.start_to_close_ms,
            heartbeat_ms: t.heartbeat_ms,
            deadline_ms: t.start_to_close_ms.map(|d| start_by_ms.saturating_add(d)),
            tick_ms,
        }
    }
}

/// The lease of a running attempt: the earlier of the start-to-close deadline
/// and the next heartbeat due; `None` when the spec sets neither (the agent's
/// own heartbeats to the allocator still cover a crash). Timeouts are whatever
/// the spec says, up to `u64::MAX`, so the sums saturate.
pub(super) fn running_deadline(t: &Task, now_ms: u64) -> Option<u64> {
    let close = t
        .spec
        .timeouts
        .start_to_close_ms
        .map(|d| t.started_ms.unwrap_or(now_ms).saturating_add(d));
    let beat = t
        .spec
        .timeouts
        .heartbeat_ms
        .map(|d| now_ms.saturating_add(d));
    match (close, beat) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
