//! "Why is it stuck?": every reason a task is where it is, from the flow alone.
//! The adapter adds what only the allocator knows (which resource is short
//! where) for tasks that wait for placement.

use common::msg::{FlowState, TaskExplanation, TaskState};
use common::TaskId;

use super::Flow;

impl Flow {
    /// Reasons for `only` (or every unfinished task). The second value lists
    /// ready tasks whose only obstacle is placement: the caller asks the allocator.
    pub fn explain(
        &self,
        only: Option<&TaskId>,
        now_ms: u64,
    ) -> (Vec<TaskExplanation>, Vec<TaskId>) {
        let mut out = Vec::new();
        let mut placement = Vec::new();
        let active = self.active();
        for t in self.tasks.values() {
            if only.is_some_and(|id| id != &t.spec.id) || (only.is_none() && t.state.is_terminal())
            {
                continue;
            }
            let mut reasons = Vec::new();
            match t.state {
                TaskState::Blocked => {
                    for d in &t.spec.depends_on {
                        if let Some(dt) = self.tasks.get(d) {
                            if dt.state != TaskState::Succeeded {
                                reasons.push(format!(
                                    "waiting on dependency {d} ({})",
                                    dt.state.as_str()
                                ));
                            }
                        }
                    }
                }
                TaskState::Ready => {
                    let mut waiting_for_agent = true;
                    match self.state {
                        FlowState::Paused => {
                            reasons.push("the flow is paused".into());
                            waiting_for_agent = false;
                        }
                        s if s.is_terminal() => {
                            reasons.push(format!("the flow is {}", s.as_str()));
                            waiting_for_agent = false;
                        }
                        _ => {}
                    }
                    if t.not_before_ms > now_ms {
                        let after = t.error.as_deref().unwrap_or("a failed attempt");
                        reasons.push(format!(
                            "backing off for {} ms more after {after} (attempt {} of {})",
                            t.not_before_ms - now_ms,
                            t.attempt + 1,
                            t.spec.retry.max_attempts
                        ));
                        waiting_for_agent = false;
                    }
                    if let Some(max) = self.max_parallelism {
                        if active >= max as usize {
                            reasons.push(format!(
                                "the flow already runs its maximum of {max} tasks at once"
                            ));
                            waiting_for_agent = false;
                        }
                    }
                    if waiting_for_agent {
                        placement.push(t.spec.id.clone());
                    }
                }
                TaskState::Assigned => {
                    let agent = t.agent.as_ref().map(|a| a.as_str()).unwrap_or("?");
                    let mut r = format!(
                        "sent to agent {agent} (attempt {}), waiting for it to start",
                        t.attempt
                    );
                    if let Some(d) = t.deadline_ms {
                        r.push_str(&format!("; times out in {} ms", d.saturating_sub(now_ms)));
                    }
                    reasons.push(r);
                }
                TaskState::Running => {
                    let agent = t.agent.as_ref().map(|a| a.as_str()).unwrap_or("?");
                    let since = t.started_ms.map(|s| now_ms.saturating_sub(s)).unwrap_or(0);
                    let mut r = format!(
                        "running on agent {agent} for {since} ms (attempt {})",
                        t.attempt
                    );
                    if let Some(p) = t.progress {
                        r.push_str(&format!("; {:.0}% done", p * 100.0));
                    }
                    if let Some(m) = &t.progress_message {
                        r.push_str(&format!(" ({m})"));
                    }
                    if let Some(d) = t.deadline_ms {
                        r.push_str(&format!(
                            "; its lease ends in {} ms unless it reports",
                            d.saturating_sub(now_ms)
                        ));
                    }
                    reasons.push(r);
                }
                TaskState::Waiting => {
                    let since = t.started_ms.map(|s| now_ms.saturating_sub(s)).unwrap_or(0);
                    let what = t
                        .spec
                        .wait_for
                        .as_ref()
                        .map(|w| match &w.agent_id {
                            Some(a) => format!("a {} event from agent {a}", w.event_type),
                            None => format!("a {} event", w.event_type),
                        })
                        .unwrap_or_default();
                    let mut r = format!("waiting for {what} for {since} ms");
                    if let Some(d) = t.deadline_ms {
                        r.push_str(&format!("; times out in {} ms", d.saturating_sub(now_ms)));
                    }
                    reasons.push(r);
                }
                done => {
                    let mut r = format!("finished: {}", done.as_str());
                    if let Some(e) = &t.error {
                        r.push_str(&format!(" ({e})"));
                    }
                    reasons.push(r);
                }
            }
            out.push(TaskExplanation {
                task_id: t.spec.id.clone(),
                state: t.state,
                reasons,
            });
        }
        (out, placement)
    }
}
