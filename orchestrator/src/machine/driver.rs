//! What a flow's actor decides around the machine's steps, and an
//! [`Executor`] that carries it out.
//!
//! A step ([`Flow::apply`]) says what follows from one command. Around the
//! steps, the actor keeps a little memory of its own (the [`Driver`]): the
//! tasks out with the allocator or held back after a refusal ([`Placing`]),
//! the wake-up set for the next timer ([`Alarm`]), and when each assignment
//! was last published again. From it and the flow it decides which tasks to
//! ask the allocator for, when to wake the flow, what to do with a grant a
//! step refused and which assignments to publish again; it does none of it.
//!
//! The service's actor carries the decisions out with tokio and NATS; the
//! simulation (`tests/simulation.rs`) with a simulated clock, allocator and
//! agents. Both run this code, so what the simulation checks (timers within
//! 5 ms of due, no attempt on an allocation the allocator does not hold, a
//! flow that ends with nothing held across replica restarts) is checked of
//! the decisions the service makes. A replica that restarts starts a fresh
//! driver: everything here may be lost, the flow in the store is the truth.

use std::collections::HashMap;

use common::msg::{Assignment, CancelNotice, EventKind, TaskState};
use common::{AgentId, AllocationId, FlowId, TaskId};

use super::{Alarm, Effect, Flow, HandOn, Placement, Placing};

/// An assignment not started this long after it was recorded is sent again,
/// and again as often until it starts or its lease times it out: the
/// message is not stored, so the flow's record is what delivers it at least
/// once (the agent reconnecting, the replica that recorded it dead before
/// sending it). Agents ignore a repeat of an attempt they hold.
pub const REDELIVER_AFTER_MS: u64 = 2_000;

/// Why the flow's actor is to be woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A timer of the flow is due: a deadline or the end of a back-off.
    Timer,
    /// Tasks held back after a refusal may be asked for again.
    Placing,
}

/// Carries out what a flow's actor decided: the world outside the flow.
pub trait Executor {
    /// Asks the allocator to place a task; the grant comes back to the flow's
    /// actor as a `Placed` step (then [`Driver::granted`] or
    /// [`Driver::grant_unused`]), a refusal as [`Driver::refused`].
    fn place(&mut self, flow: &FlowId, placement: Placement);
    /// Sends an assignment to its agent; `again` for a redelivery.
    fn assign(&mut self, flow: &Flow, assignment: Assignment, again: bool);
    /// Gives an allocation back to the allocator, or keeps it to hand on
    /// when `hand_on` says how.
    fn release(&mut self, agent: AgentId, allocation: AllocationId, hand_on: Option<HandOn>);
    /// Gives a concurrency slot back.
    fn free_slot(&mut self, key: String, holder: String);
    /// Tells an agent to stop an attempt.
    fn cancel(&mut self, agent: AgentId, notice: CancelNotice);
    /// Wakes the flow's actor `after_ms` from now.
    fn wake(&mut self, flow: &FlowId, after_ms: u64, why: Wake);
    /// Whether a concurrency key is known to have no free slot at `now_ms`.
    fn known_full(&self, key: &str, now_ms: u64) -> bool;
    /// How many allocations and slots this replica has given back so far
    /// (see [`Placing`]): capacity may have freed when it moves.
    fn freed(&self) -> u64;
    /// Tells a replica, as tasks' `readied_by` name it, that is known to be
    /// gone (see [`Placing`]); none: every other is taken to be up. Where
    /// there is one replica, nobody is named and this is never asked.
    fn gone_replicas(&self) -> Option<super::Gone> {
        None
    }
}

/// A flow actor's memory between steps.
#[derive(Debug, Default)]
pub struct Driver {
    placing: Placing,
    alarm: Alarm,
    /// When each assignment (task, attempt) was last published again.
    resent: HashMap<(TaskId, u32), u64>,
    /// The sweep's interval: an attempt's lease says how often the
    /// deadlines are checked.
    tick_ms: u64,
    /// This replica, as its steps name it in a task's `readied_by`; none
    /// where there is only ever one (the simulation).
    me: Option<u32>,
}

impl Driver {
    pub fn new(tick_ms: u64) -> Driver {
        Driver {
            tick_ms,
            ..Driver::default()
        }
    }

    /// The driver of replica `me` (see [`Placing`] on several replicas).
    pub fn for_replica(tick_ms: u64, me: u32) -> Driver {
        Driver {
            me: Some(me),
            ..Driver::new(tick_ms)
        }
    }

    /// The tasks out with the allocator or held back.
    pub fn placing(&self) -> &Placing {
        &self.placing
    }

    /// Carries out a step's effects on `flow` as just written at `now_ms`;
    /// returns its events, which the caller stores and publishes in order.
    pub fn carry_out(
        &mut self,
        x: &mut impl Executor,
        flow: Option<&Flow>,
        now_ms: u64,
        effects: Vec<Effect>,
    ) -> Vec<EventKind> {
        let mut events = Vec::new();
        for effect in effects {
            match effect {
                Effect::Event(kind) => events.push(kind),
                Effect::Assign {
                    task,
                    attempt,
                    agent,
                    allocation,
                } => {
                    let sent = flow.and_then(|f| {
                        let a =
                            assignment(f, &task, attempt, agent, allocation, now_ms, self.tick_ms)?;
                        Some((f, a))
                    });
                    if let Some((f, a)) = sent {
                        x.assign(f, a, false);
                    }
                }
                Effect::Release {
                    agent,
                    allocation,
                    after,
                } => {
                    let hand_on = after.and_then(|t| flow.and_then(|f| f.hand_on(&t)));
                    x.release(agent, allocation, hand_on)
                }
                Effect::FreeSlot { key, holder } => x.free_slot(key, holder),
                Effect::Cancel { agent, notice } => x.cancel(agent, notice),
            }
        }
        events
    }

    /// A grant was recorded: the task is no longer out with the allocator.
    pub fn granted(&mut self, task: &TaskId) {
        self.placing.placed(task);
    }

    /// A step refused a grant (the task moved on meanwhile): the allocation
    /// and its slot go back.
    pub fn grant_unused(
        &mut self,
        x: &mut impl Executor,
        task: &TaskId,
        agent: AgentId,
        allocation: AllocationId,
        slot: Option<(String, String)>,
    ) {
        self.placing.remove(task);
        x.release(agent, allocation, None);
        if let Some((key, holder)) = slot {
            x.free_slot(key, holder);
        }
    }

    /// The allocator refused `task` when the freed count was `asked_at`: it
    /// is held back (see [`Placing`]).
    pub fn refused(&mut self, x: &impl Executor, task: TaskId, asked_at: u64, now_ms: u64) {
        self.placing.refused(task, asked_at, x.freed(), now_ms);
    }

    /// A step that was to record `task`'s grant was not written: whether the
    /// grant holds is for the executor to find out; the task may be asked
    /// for again.
    pub fn abandoned(&mut self, task: &TaskId) {
        self.placing.remove(task);
    }

    /// After a step: asks the allocator for every task due and not out
    /// already, and sets a wake-up for the tasks held back.
    pub fn dispatch(&mut self, x: &mut impl Executor, flow: &mut Flow, now_ms: u64) {
        self.placing.refresh(x.freed());
        self.placing.drive(self.me, x.gone_replicas());
        let placements = flow.placements(now_ms, &self.placing, |key| x.known_full(key, now_ms));
        for placement in placements {
            self.placing.asking(placement.task.clone(), now_ms);
            x.place(&flow.id, placement);
        }
        if let Some(wait) = self.placing.wake_in(now_ms) {
            x.wake(&flow.id, wait, Wake::Placing);
        }
    }

    /// Sets a wake-up for the flow's next timer, unless one is set for then
    /// or sooner (see [`Alarm`]).
    pub fn set_alarm(&mut self, x: &mut impl Executor, flow: &mut Flow, now_ms: u64) {
        if let Some(due) = self.alarm.set(flow.next_wakeup_after(now_ms), now_ms) {
            x.wake(&flow.id, due.saturating_sub(now_ms), Wake::Timer);
        }
    }

    /// On the sweep's tick: sends again the assignments still not started
    /// [`REDELIVER_AFTER_MS`] after they were recorded, at most that often
    /// each.
    pub fn redeliver(&mut self, x: &mut impl Executor, flow: &Flow, now_ms: u64) {
        self.resent.retain(|(task, attempt), _| {
            flow.tasks
                .get(task)
                .is_some_and(|t| t.state == TaskState::Assigned && t.attempt == *attempt)
        });
        for t in flow
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Assigned)
        {
            let Some(assigned) = t.assigned_ms else {
                continue;
            };
            let age = now_ms.saturating_sub(assigned);
            if age < REDELIVER_AFTER_MS {
                continue;
            }
            let key = (t.spec.id.clone(), t.attempt);
            if self
                .resent
                .get(&key)
                .is_some_and(|last| now_ms.saturating_sub(*last) < REDELIVER_AFTER_MS)
            {
                continue;
            }
            let (Some(agent), Some(allocation)) = (t.agent.clone(), t.allocation.clone()) else {
                continue;
            };
            let Some(a) = assignment(
                flow,
                &t.spec.id,
                t.attempt,
                agent,
                allocation,
                assigned,
                self.tick_ms,
            ) else {
                continue;
            };
            self.resent.insert(key, now_ms);
            x.assign(flow, a, true);
        }
    }
}

/// The assignment a grant sends, worked out on `probe` (a copy of the flow)
/// ahead of the step that records it: the same attempt as that step gives
/// it, so a new flow's first assignments can go out before their record.
pub fn assignment_ahead(
    probe: &mut Flow,
    task: &TaskId,
    agent: &AgentId,
    allocation: &AllocationId,
    now_ms: u64,
    tick_ms: u64,
) -> Result<Assignment, super::Rejection> {
    probe.assign(task, agent, allocation, now_ms)?;
    // The attempt the step made current.
    let attempt = probe.tasks.get(task).map_or(0, |t| t.attempt);
    assignment(
        probe,
        task,
        attempt,
        agent.clone(),
        allocation.clone(),
        now_ms,
        tick_ms,
    )
    .ok_or_else(|| super::Rejection::UnknownTask(task.clone()))
}

/// The message that sends `task`'s attempt to its agent.
fn assignment(
    flow: &Flow,
    task: &TaskId,
    attempt: u32,
    agent: AgentId,
    allocation: AllocationId,
    assigned_at_ms: u64,
    tick_ms: u64,
) -> Option<Assignment> {
    let t = flow.tasks.get(task)?;
    Some(Assignment {
        flow_id: flow.id.clone(),
        task_id: task.clone(),
        attempt,
        agent_id: agent,
        kind: t.spec.kind.clone(),
        input: t.spec.input.clone(),
        allocation_id: allocation,
        resources: t.spec.requirements.resources.clone(),
        assigned_at_ms,
        lease: t.lease(assigned_at_ms, tick_ms),
    })
}
