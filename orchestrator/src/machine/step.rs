//! One step of a flow: a command in, the effects to carry out (or why it
//! changed nothing) out. The adapter keeps what a command arrived with (the
//! message to acknowledge, the caller to answer) and hands in only its data.

use common::msg::{AgentEvent, AgentReport, FlowChanges};
use common::{AgentId, AllocationId, TaskId};
use serde_json::Value;

use super::{AgentEventRef, Effect, Flow, Rejection};

/// How old a grant may be when its step applies it. Longer, and the
/// allocator's reconciliation (which asks after a grace of 30 s by default)
/// might already have found the allocation unheld and taken it back.
pub const GRANT_MAX_AGE_MS: u64 = 10_000;

/// What a step is asked to apply.
#[derive(Debug, Clone, Copy)]
pub enum Command<'a> {
    /// An agent's report on an attempt.
    Report(&'a AgentReport),
    /// A placement the allocator granted at `granted_ms`: record the attempt
    /// and send it to the agent.
    Placed {
        task: &'a TaskId,
        agent: &'a AgentId,
        allocation: &'a AllocationId,
        granted_ms: u64,
    },
    /// The assignment message of `attempt` could not be sent.
    Unassign {
        task: &'a TaskId,
        attempt: u32,
    },
    /// Time passed: deadlines and back-offs, and blocked tasks whose
    /// dependencies all succeeded made ready (a pass over every task).
    Tick,
    /// A timer is due: deadlines only, without the pass of `Tick`.
    Due,
    /// The agent was lost (`left: false`) or left (`true`) holding attempts.
    AgentGone {
        agent: &'a AgentId,
        left: bool,
    },
    /// The allocator took an allocation back.
    Preempted {
        task: &'a TaskId,
        allocation: &'a AllocationId,
        reason: &'a str,
    },
    /// The allocation an attempt was sent on was not handed on to it.
    NotHandedOn {
        task: &'a TaskId,
        allocation: &'a AllocationId,
        reason: &'a str,
    },
    /// A stored agent event that may be what a waiting task waits for.
    Event {
        task: &'a TaskId,
        event: &'a AgentEvent,
        stored_ms: u64,
    },
    Pause,
    Resume,
    Cancel,
    /// A modification made from the flow at `changes.expected_revision`.
    Modify(&'a FlowChanges),
    /// Run the task and everything downstream of it again.
    Rerun(&'a TaskId),
    /// Nothing to apply; the step only looks again at what to place.
    Nothing,
}

impl Flow {
    /// Applies one command to the flow stored at `revision`.
    pub fn apply(
        &mut self,
        cmd: Command<'_>,
        revision: u64,
        now_ms: u64,
    ) -> Result<Vec<Effect>, Rejection> {
        match cmd {
            Command::Report(report) => self.report(report, now_ms),
            Command::Placed {
                task,
                agent,
                allocation,
                granted_ms,
            } => {
                let age_ms = now_ms.saturating_sub(granted_ms);
                if age_ms > GRANT_MAX_AGE_MS {
                    return Err(Rejection::LateGrant { age_ms });
                }
                self.assign(task, agent, allocation, now_ms)
            }
            Command::Unassign { task, attempt } => self.unassign(task, attempt, now_ms),
            Command::Tick => Ok(self.tick(now_ms)),
            Command::Due => Ok(self.expire(now_ms)),
            Command::AgentGone { agent, left } => Ok(self.agent_gone(agent, left, now_ms)),
            Command::Preempted {
                task,
                allocation,
                reason,
            } => Ok(self.preempted(task, allocation, reason, now_ms)),
            Command::NotHandedOn {
                task,
                allocation,
                reason,
            } => Ok(self.not_handed_on(task, allocation, reason, now_ms)),
            Command::Event {
                task,
                event,
                stored_ms,
            } => {
                let whole = serde_json::to_value(event).unwrap_or(Value::Null);
                let seen = AgentEventRef {
                    event_type: &event.event_type,
                    agent_id: &event.agent_id,
                    data: &event.data,
                    whole: &whole,
                };
                self.event_arrived(task, &seen, stored_ms, now_ms)
            }
            Command::Pause => self.pause(),
            Command::Resume => self.resume(now_ms),
            Command::Cancel => self.cancel(now_ms),
            Command::Modify(changes) => {
                if changes.expected_revision != revision {
                    return Err(Rejection::Stale {
                        expected: changes.expected_revision,
                        current: revision,
                    });
                }
                self.modify(changes, now_ms).map_err(Rejection::Invalid)
            }
            Command::Rerun(task) => self.rerun(task, now_ms).map_err(Rejection::Invalid),
            Command::Nothing => Ok(Vec::new()),
        }
    }
}
