//! Wait tasks: a task with `wait_for` runs on no agent but waits for a
//! matching agent event, which the adapter looks up and hands in; it succeeds
//! with the event as its output or times out for good at its deadline.

use common::msg::TaskState;
use common::{AgentId, TaskId};
use serde_json::Value;

use super::{Effect, Flow, Rejection, Task};

/// An agent event as a wait task sees it: the parts it matches on, and the
/// whole event (its output).
#[derive(Debug, Clone, Copy)]
pub struct AgentEventRef<'a> {
    pub event_type: &'a str,
    pub agent_id: &'a AgentId,
    pub data: &'a Value,
    pub whole: &'a Value,
}

/// The code a wait task's error starts with when its event did not come in time.
pub const WAIT_TIMED_OUT: &str = "wait_timed_out";

impl Flow {
    /// The wait tasks waiting now (none without a pass when there are none).
    pub fn waiting_tasks(&self) -> impl Iterator<Item = &Task> {
        self.tasks
            .values()
            .take(if self.waiting == 0 { 0 } else { usize::MAX })
            .filter(|t| t.state == TaskState::Waiting)
    }

    /// An agent event that may be what a waiting task waits for, stored at
    /// `stored_ms`: it succeeds with `event` as its output when the event
    /// matches and was stored while it waited (from the moment it began,
    /// up to its deadline).
    pub fn event_arrived(
        &mut self,
        task: &TaskId,
        event: &AgentEventRef<'_>,
        stored_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<Effect>, Rejection> {
        if self.state.is_terminal() {
            return Err(Rejection::FlowFinished);
        }
        let t = self
            .tasks
            .get_mut(task)
            .ok_or_else(|| Rejection::UnknownTask(task.clone()))?;
        if t.state != TaskState::Waiting {
            return Err(Rejection::NotWaiting(t.state));
        }
        let Some(wait) = &t.spec.wait_for else {
            return Err(Rejection::NotWaiting(t.state));
        };
        let since = t.started_ms.unwrap_or(t.since_ms);
        if !wait.matches(event.event_type, event.agent_id, event.data)
            || stored_ms < since
            || t.deadline_ms.is_some_and(|d| stored_ms > d)
        {
            return Err(Rejection::NoMatch);
        }
        t.output = event.whole.clone();
        t.error = None;
        let mut effects = Vec::new();
        self.succeed(task, now_ms, &mut effects);
        Ok(effects)
    }

    /// A wait task's deadline passed with no matching event: it times out
    /// for good (waits are not retried) and the failure mode decides the rest.
    pub(super) fn wait_timed_out(&mut self, id: &TaskId, now_ms: u64, effects: &mut Vec<Effect>) {
        let Some(t) = self.tasks.get_mut(id) else {
            return;
        };
        if t.state != TaskState::Waiting || self.state.is_terminal() {
            return;
        }
        let waited = t
            .deadline_ms
            .unwrap_or(now_ms)
            .saturating_sub(t.started_ms.unwrap_or(now_ms));
        let event = t
            .spec
            .wait_for
            .as_ref()
            .map(|w| w.event_type.clone())
            .unwrap_or_default();
        let error = format!("{WAIT_TIMED_OUT}: no matching {event} event within {waited} ms");
        t.failures += 1;
        t.error = Some(error.clone());
        t.deadline_ms = None;
        self.transition(id, TaskState::TimedOut, now_ms, Some(error), effects);
        self.after_failure(id, now_ms, effects);
    }
}
