//! What moves a flow on from outside: agents' reports, the passing of time
//! (deadlines, back-offs) and the operator's pause, resume and cancel.

use common::msg::{
    AgentReport, CancelCode, EventKind, FailureKind, FlowState, ReportKind, TaskState,
};
use common::TaskId;

use super::transition::running_deadline;
use super::*;

impl Flow {
    /// Applies an agent's report. Fencing: only the current attempt, from the
    /// agent that holds it, while it is assigned or running, is accepted.
    ///
    /// A report on the attempt a ready task was sent ahead of its record
    /// (`Task::asked`: the replica that sent it died before recording it)
    /// records the attempt on the reporting agent first: the agent may
    /// ignore the same assignment sent again if it finished it already.
    pub fn report(&mut self, report: &AgentReport, now_ms: u64) -> Result<Vec<Effect>, Rejection> {
        let t = self
            .tasks
            .get(&report.task_id)
            .ok_or_else(|| Rejection::UnknownTask(report.task_id.clone()))?;
        if let (TaskState::Ready, Some(asked)) = (t.state, &t.asked) {
            if report.attempt == t.attempt + 1 {
                // On a copy: a report refused leaves the flow as it was.
                let mut next = self.clone();
                let mut effects = next.assign(&report.task_id, &report.agent_id, asked, now_ms)?;
                effects.retain(|e| !matches!(e, Effect::Assign { .. }));
                effects.extend(next.report(report, now_ms)?);
                *self = next;
                return Ok(effects);
            }
        }
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
        // Only a completion of this attempt by this agent reaches `succeeded`,
        // so anything but a failure arriving then is a report seen again.
        if t.state == TaskState::Succeeded && !matches!(report.kind, ReportKind::Failed { .. }) {
            return Err(Rejection::AlreadyApplied);
        }
        if self.state.is_terminal() {
            return Err(Rejection::FlowFinished);
        }
        let state = t.state;
        if !state.is_active() {
            return Err(Rejection::NotActive(state));
        }
        if let ReportKind::Progress { progress, message } = &report.kind {
            if let Some(p) = progress {
                if !p.is_finite() || !(0.0..=1.0).contains(p) {
                    return Err(Rejection::ProgressOutOfRange(format!(
                        "progress {p} is outside 0..=1"
                    )));
                }
            }
            if message
                .as_ref()
                .is_some_and(|m| m.len() > MAX_PROGRESS_MESSAGE)
            {
                return Err(Rejection::ProgressOutOfRange(format!(
                    "progress message is over {MAX_PROGRESS_MESSAGE} bytes"
                )));
            }
        }
        let id = report.task_id.clone();
        let mut effects = Vec::new();
        // A final report implies `started` (work that ends at once may skip
        // it): the attempt passes through running, so its events and timings
        // read the same either way.
        let last = matches!(
            report.kind,
            ReportKind::Completed { .. } | ReportKind::Failed { .. }
        );
        if last && state == TaskState::Assigned {
            if let Some(t) = self.tasks.get_mut(&id) {
                t.started_ms = Some(now_ms);
            }
            self.transition(&id, TaskState::Running, now_ms, None, &mut effects);
        }
        match &report.kind {
            ReportKind::Started | ReportKind::Progress { .. } => {
                if let (ReportKind::Progress { progress, message }, Some(t)) =
                    (&report.kind, self.tasks.get_mut(&id))
                {
                    if progress.is_some() {
                        t.progress = *progress;
                    }
                    if message.is_some() {
                        t.progress_message = message.clone();
                    }
                }
                if state == TaskState::Assigned {
                    if let Some(t) = self.tasks.get_mut(&id) {
                        t.started_ms = Some(now_ms);
                    }
                    self.transition(&id, TaskState::Running, now_ms, None, &mut effects);
                }
                // Every report from the holder renews its lease.
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.deadline_ms = running_deadline(t, now_ms);
                }
            }
            ReportKind::Completed { output } => {
                if let Some(t) = self.tasks.get_mut(&id) {
                    t.output = output.clone();
                    t.error = None;
                }
                self.succeed(&id, now_ms, &mut effects);
            }
            ReportKind::Failed { error, retryable } => {
                self.fail_attempt(
                    &id,
                    FailureKind::Error,
                    *retryable,
                    error,
                    None,
                    now_ms,
                    &mut effects,
                );
            }
            ReportKind::Unknown => return Err(Rejection::UnknownReport),
        }
        Ok(effects)
    }

    /// Expires attempts whose deadline has passed and makes blocked tasks whose
    /// dependencies all succeeded ready (a repair for steps lost to a crash).
    /// Derived from stored deadlines only, so a restarted orchestrator picks up
    /// every timer where it was.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.state.is_terminal() {
            return effects;
        }
        // One pass: on a flow of a million tasks it costs tens of ms.
        let unblocked: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Blocked && self.deps_succeeded(t))
            .map(|t| t.spec.id.clone())
            .collect();
        self.expire_due(now_ms, &mut effects);
        for id in unblocked {
            // Unless an expiry above ended the flow meanwhile.
            if self.state.is_terminal()
                || self
                    .tasks
                    .get(&id)
                    .is_none_or(|t| t.state != TaskState::Blocked)
            {
                continue;
            }
            self.transition(&id, TaskState::Ready, now_ms, None, &mut effects);
        }
        self.maybe_finish(now_ms, &mut effects);
        effects
    }

    /// The timers due by `now_ms` alone, without the repair pass of
    /// [`Flow::tick`]: what a wake-up at [`Flow::next_wakeup`] is for.
    pub fn expire(&mut self, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if !self.state.is_terminal() {
            self.expire_due(now_ms, &mut effects);
            self.maybe_finish(now_ms, &mut effects);
        }
        effects
    }

    /// Ends the attempts and waits whose deadline passed, earliest first,
    /// found in the timers kept with the tasks.
    fn expire_due(&mut self, now_ms: u64, effects: &mut Vec<Effect>) {
        let mut expired: Vec<(TaskId, TaskState)> = Vec::new();
        let mut waited_out: Vec<TaskId> = Vec::new();
        for id in self.tasks.due_by(now_ms) {
            let Some(t) = self.tasks.get(&id) else {
                continue;
            };
            if t.state == TaskState::Waiting && t.deadline_ms.is_some_and(|d| d < now_ms) {
                waited_out.push(id);
            } else if t.state.is_active() && t.deadline_ms.is_some_and(|d| d <= now_ms) {
                expired.push((id, t.state));
            }
        }
        for (id, state) in expired {
            let what = match self.tasks.get(&id) {
                _ if state == TaskState::Assigned => {
                    "schedule_to_start: no `started` report in time"
                }
                Some(t)
                    if t.spec.timeouts.start_to_close_ms.is_some_and(|d| {
                        t.started_ms.unwrap_or(now_ms).saturating_add(d) <= now_ms
                    }) =>
                {
                    "start_to_close: not finished in time"
                }
                _ => "heartbeat: no `progress` report in time",
            };
            self.fail_attempt(
                &id,
                FailureKind::Timeout,
                true,
                what,
                Some(CancelCode::TimedOut),
                now_ms,
                effects,
            );
        }
        for id in waited_out {
            self.wait_timed_out(&id, now_ms, effects);
        }
    }

    /// Stops new dispatch; running tasks finish and are recorded.
    pub fn pause(&mut self) -> Result<Vec<Effect>, Rejection> {
        match self.state {
            FlowState::Paused => Ok(Vec::new()),
            FlowState::Running => {
                self.state = FlowState::Paused;
                Ok(vec![Effect::Event(EventKind::FlowPaused {
                    flow_id: self.id.clone(),
                })])
            }
            s => Err(Rejection::WrongFlowState(s, "pause")),
        }
    }

    /// Dispatch continues.
    pub fn resume(&mut self, now_ms: u64) -> Result<Vec<Effect>, Rejection> {
        match self.state {
            FlowState::Running => Ok(Vec::new()),
            FlowState::Paused => {
                self.state = FlowState::Running;
                let mut effects = vec![Effect::Event(EventKind::FlowResumed {
                    flow_id: self.id.clone(),
                })];
                // Tasks that finished while paused may have completed the flow.
                self.maybe_finish(now_ms, &mut effects);
                Ok(effects)
            }
            s => Err(Rejection::WrongFlowState(s, "resume")),
        }
    }

    /// Ends the flow: running attempts are told to stop, every allocation goes
    /// back, every unfinished task is cancelled.
    pub fn cancel(&mut self, now_ms: u64) -> Result<Vec<Effect>, Rejection> {
        if self.state.is_terminal() {
            return Err(Rejection::WrongFlowState(self.state, "cancel"));
        }
        let mut effects = Vec::new();
        let open: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| !t.state.is_terminal())
            .map(|t| t.spec.id.clone())
            .collect();
        for id in open {
            self.stop_task(
                &id,
                TaskState::Cancelled,
                "flow cancelled",
                CancelCode::FlowCancelled,
                now_ms,
                &mut effects,
            );
        }
        self.state = FlowState::Cancelled;
        self.finished_at_ms = Some(now_ms);
        effects.push(Effect::Event(EventKind::FlowCompleted {
            flow_id: self.id.clone(),
            state: self.state,
        }));
        Ok(effects)
    }
}
