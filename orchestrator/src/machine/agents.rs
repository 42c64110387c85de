//! Attempts taken away from under a flow: an agent lost or gone, or an
//! allocation preempted by the allocator.

use common::msg::{CancelCode, CancelNotice, FailureKind};
use common::{AgentId, AllocationId, TaskId};

use super::{Effect, Flow};

impl Flow {
    /// Every attempt held by `agent` failed with it.
    pub fn agent_lost(&mut self, agent: &AgentId, now_ms: u64) -> Vec<Effect> {
        self.agent_gone(agent, false, now_ms)
    }

    /// Every attempt held by `agent` is taken away and the agent told, in
    /// case it still works on them. A lost agent's attempts fail (as
    /// `agent_lost`, under the retry policy); a left agent handed them back:
    /// they run again at once, not counted against `max_attempts`.
    pub fn agent_gone(&mut self, agent: &AgentId, left: bool, now_ms: u64) -> Vec<Effect> {
        let mut effects = Vec::new();
        if self.state.is_terminal() {
            return effects;
        }
        let held: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| t.state.is_active() && t.agent.as_ref() == Some(agent))
            .map(|t| t.spec.id.clone())
            .collect();
        if left {
            for id in held {
                self.hand_back(&id, agent, now_ms, &mut effects);
            }
            return effects;
        }
        let (error, code) = ("agent lost", CancelCode::AgentLost);
        for id in held {
            self.fail_attempt(
                &id,
                FailureKind::AgentLost,
                true,
                error,
                Some(code),
                now_ms,
                &mut effects,
            );
        }
        effects
    }

    /// The allocation an attempt was sent on, kept from an earlier task, was
    /// not handed on to it (gone, or quotas forbid it): not the task's
    /// failure, so the attempt is taken back uncounted and the task placed
    /// again at once, whatever its retry policy.
    pub fn not_handed_on(
        &mut self,
        task: &TaskId,
        allocation: &AllocationId,
        reason: &str,
        now_ms: u64,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Some((agent, cancel)) = self.preemption(task, allocation, reason) {
            let closing = format!("not handed on: {reason}");
            self.take_back(
                task,
                &agent,
                cancel,
                &closing,
                &closing,
                now_ms,
                &mut effects,
            );
        }
        effects
    }

    /// The agent running `task`'s attempt on `allocation`, and the notice
    /// that takes that attempt from it, while both run.
    fn preemption(
        &self,
        task: &TaskId,
        allocation: &AllocationId,
        reason: &str,
    ) -> Option<(AgentId, CancelNotice)> {
        let t = self.tasks.get(task)?;
        let holds = t.state.is_active() && t.allocation.as_ref() == Some(allocation);
        let agent = t
            .agent
            .clone()
            .filter(|_| holds && !self.state.is_terminal())?;
        let notice = CancelNotice {
            flow_id: self.id.clone(),
            task_id: task.clone(),
            attempt: t.attempt,
            code: CancelCode::Preempted,
            reason: format!("resources preempted: {reason}"),
        };
        Some((agent, notice))
    }

    /// The allocator took back the allocation an attempt runs on (capacity
    /// reduced, reservation ended): the attempt fails like one whose agent was
    /// lost, and is retried under the task's policy.
    pub fn preempted(
        &mut self,
        task: &TaskId,
        allocation: &AllocationId,
        reason: &str,
        now_ms: u64,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        let holds = self
            .tasks
            .get(task)
            .is_some_and(|t| t.state.is_active() && t.allocation.as_ref() == Some(allocation));
        if holds && !self.state.is_terminal() {
            if let Some((agent, notice)) = self.preemption(task, allocation, reason) {
                effects.push(Effect::Cancel { agent, notice });
            }
            let error = format!("preempted: {reason}");
            self.fail_attempt(
                task,
                FailureKind::AgentLost,
                true,
                &error,
                None,
                now_ms,
                &mut effects,
            );
        }
        effects
    }
}
