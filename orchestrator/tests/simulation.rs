//! A deterministic simulation of a flow's run: the flow's actor — the
//! machine's steps and the decisions around them (`machine::Driver`: what to
//! place, when to wake, what to publish again) — run by a simulated
//! executor with a simulated clock, allocator, agents and replica, seeded
//! and reproducible. The service's actor runs the same driver through
//! tokio and NATS; what differs is only the executor (`machine::Executor`)
//! and the store, whose every write lands here.
//!
//! Faults: agents that hang (no report), fail, die (declared lost a few
//! seconds later, back later) and report late for attempts long fenced; the
//! replica restarts, losing its driver, its wake-ups, grants in flight
//! and (sometimes) the effects of the step it had just written, which the
//! sweep's repairs and the allocator's reconciliation must make good.
//!
//! Checked: a task succeeds once; no attempt is sent on an allocation the
//! allocator does not hold, nor runs on one it gave back; every timer fires
//! within 5 ms of its due time while a replica runs the flow; the flow ends
//! with every task final and every allocation given back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};

use common::msg::{
    AgentReport, Assignment, CancelNotice, EventKind, FlowSpec, FlowState, ReportKind, RetryPolicy,
    TaskSpec, TaskState,
};
use common::{AgentId, AllocationId, FlowId, TaskId};
use orchestrator::machine::{
    Alarm, Command, Driver, Executor, Flow, Placement, Placing, Wake, FREED_ALL,
};
use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};

/// How often the sweep ticks a flow.
const SWEEP_MS: u64 = 1_000;
/// An agent silent this long is declared lost.
const LOST_AFTER_MS: u64 = 3_000;
/// The allocator takes back allocations no task holds after this grace.
const RECONCILE_GRACE_MS: u64 = 2_000;

enum Ev {
    /// A grant (or refusal) coming back to replica `epoch`.
    Granted {
        epoch: u64,
        task: TaskId,
        agent: usize,
        allocation: AllocationId,
    },
    Refused {
        epoch: u64,
        task: TaskId,
        /// The replica's freed count when it asked.
        asked_at: u64,
    },
    /// A wake-up set by replica `epoch`.
    Wake {
        epoch: u64,
        why: Wake,
    },
    Sweep,
    Report(AgentReport),
    AgentDies(usize),
    AgentLost(usize),
    AgentBack(usize),
    /// The replica is to die right after its next write.
    Crash,
    Reconcile,
}

struct Agent {
    id: AgentId,
    slots: usize,
    /// Allocations the allocator holds on it.
    used: usize,
    alive: bool,
    /// Attempts it was sent, so a message sent again does not run twice.
    seen: HashSet<(TaskId, u32)>,
}

/// Everything outside the flow's actor: the clock, the event queue, the
/// allocator's book and the agents. It is the actor's [`Executor`].
struct World {
    now: u64,
    rng: TestRng,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, Ev>,
    seq: u64,
    /// The replica running the flow (a new one after each restart): what
    /// comes back to an earlier one is lost with it.
    epoch: u64,
    agents: Vec<Agent>,
    /// The allocator's book: allocation → agent, and when it was granted.
    held: BTreeMap<AllocationId, (usize, u64)>,
    next_allocation: u64,
    /// Allocations given back by the replica (its freed count).
    freed: u64,
}

struct Sim {
    world: World,
    /// The flow as last written (every write lands; what a restart loses
    /// is the replica's own state).
    flow: Flow,
    revision: u64,
    driver: Driver,
    /// Set after a restart, until the sweep brings the flow back to an actor.
    down: bool,
    /// When the replica last took the flow up again.
    up_since: u64,
    crash_pending: bool,
    succeeded: HashMap<TaskId, u32>,
    latest_timer_ms: u64,
    timers_fired: usize,
    steps: usize,
    /// Events taken off the queue.
    handled: usize,
    /// Whether the actor is to dispatch once this millisecond's events are in.
    to_drive: bool,
}

impl World {
    fn below(&mut self, n: u64) -> u64 {
        self.rng.next_u64() % n.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn at(&mut self, when: u64, ev: Ev) {
        self.seq += 1;
        self.events.insert(self.seq, ev);
        self.queue.push(Reverse((when, self.seq)));
    }

    fn after(&mut self, wait: u64, ev: Ev) {
        self.at(self.now + wait, ev);
    }

    fn give_back(&mut self, allocation: &AllocationId) {
        if let Some((agent, _)) = self.held.remove(allocation) {
            self.agents[agent].used -= 1;
        }
    }

    /// An assignment reaches its agent, which runs it: it completes, fails,
    /// hangs, or dies with it.
    fn deliver(&mut self, a: Assignment) {
        let i: usize = a.agent_id.as_str()[1..].parse().unwrap();
        if !self.agents[i].alive || !self.agents[i].seen.insert((a.task_id.clone(), a.attempt)) {
            return;
        }
        let report = |kind| AgentReport {
            flow_id: a.flow_id.clone(),
            task_id: a.task_id.clone(),
            attempt: a.attempt,
            agent_id: a.agent_id.clone(),
            kind,
            at_ms: 0,
        };
        let roll = self.below(100);
        let start = 1 + self.below(5);
        let run = 5 + self.below(50);
        if roll < 2 {
            self.after(start, Ev::AgentDies(i));
            return;
        }
        if roll < 6 {
            return; // hangs: the attempt's deadline ends it
        }
        self.after(start, Ev::Report(report(ReportKind::Started)));
        let end = if roll < 12 {
            ReportKind::Failed {
                error: "boom".into(),
                retryable: true,
            }
        } else {
            ReportKind::Completed {
                output: serde_json::json!(a.attempt),
            }
        };
        let late = if self.chance(3) { 60_000 } else { 0 };
        self.after(start + run + late, Ev::Report(report(end)));
    }
}

impl Executor for World {
    /// The allocator: the first live agent with a free slot, granted (or
    /// refused) a millisecond or two later.
    fn place(&mut self, _flow: &FlowId, placement: Placement) {
        let latency = 1 + self.below(2);
        let epoch = self.epoch;
        let task = placement.task;
        let agent = (0..self.agents.len())
            .find(|a| self.agents[*a].alive && self.agents[*a].used < self.agents[*a].slots);
        let Some(agent) = agent else {
            let asked_at = self.freed;
            self.after(
                latency,
                Ev::Refused {
                    epoch,
                    task,
                    asked_at,
                },
            );
            return;
        };
        self.next_allocation += 1;
        let allocation = AllocationId::new(format!("al{}", self.next_allocation)).unwrap();
        self.held.insert(allocation.clone(), (agent, self.now));
        self.agents[agent].used += 1;
        let granted = Ev::Granted {
            epoch,
            task,
            agent,
            allocation,
        };
        self.after(latency, granted);
    }

    fn assign(&mut self, _flow: &Flow, a: Assignment, again: bool) {
        assert!(
            again || self.held.contains_key(&a.allocation_id),
            "{} attempt {} sent on allocation {} the allocator does not hold",
            a.task_id,
            a.attempt,
            a.allocation_id
        );
        self.deliver(a);
    }

    fn release(
        &mut self,
        _agent: AgentId,
        allocation: AllocationId,
        _hand_on: Option<orchestrator::machine::HandOn>,
    ) {
        self.freed += 1;
        self.give_back(&allocation);
    }

    fn free_slot(&mut self, _key: String, _holder: String) {}

    fn cancel(&mut self, _agent: AgentId, _notice: CancelNotice) {}

    fn wake(&mut self, _flow: &FlowId, after_ms: u64, why: Wake) {
        let epoch = self.epoch;
        self.after(after_ms, Ev::Wake { epoch, why });
    }

    fn known_full(&self, _key: &str, _now_ms: u64) -> bool {
        false
    }

    fn freed(&self) -> u64 {
        self.freed
    }
}

impl Sim {
    fn new(seed: u64, flow: Flow, agents: usize, slots: usize) -> Sim {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        let agents = (0..agents)
            .map(|i| Agent {
                id: AgentId::new(format!("a{i}")).unwrap(),
                slots,
                used: 0,
                alive: true,
                seen: HashSet::new(),
            })
            .collect();
        let world = World {
            now: 0,
            rng: TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            seq: 0,
            epoch: 0,
            agents,
            held: BTreeMap::new(),
            next_allocation: 0,
            freed: 0,
        };
        let mut sim = Sim {
            world,
            flow,
            revision: 1,
            driver: Driver::new(SWEEP_MS),
            down: false,
            up_since: 0,
            crash_pending: false,
            succeeded: HashMap::new(),
            latest_timer_ms: 0,
            timers_fired: 0,
            steps: 0,
            handled: 0,
            to_drive: false,
        };
        let w = &mut sim.world;
        w.at(0, Ev::Sweep);
        w.at(RECONCILE_GRACE_MS, Ev::Reconcile);
        let first = 2_000 + w.below(6_000);
        w.at(first, Ev::Crash);
        sim
    }

    /// Runs until the flow ends and the allocator's book is empty, or the
    /// simulated time runs out.
    fn run(&mut self, until_ms: u64) {
        while let Some(Reverse((when, seq))) = self.world.queue.pop() {
            let ev = self.world.events.remove(&seq).expect("queued");
            if when > until_ms {
                break;
            }
            self.world.now = when;
            self.handled += 1;
            self.handle(ev);
            // As the actor takes every command waiting before it dispatches,
            // everything due this millisecond is handled first.
            let next = self.world.queue.peek().map(|Reverse((at, _))| *at);
            if next != Some(when) && std::mem::take(&mut self.to_drive) {
                self.drive();
            }
            if self.flow.state.is_terminal() && self.world.held.is_empty() && !self.down {
                break;
            }
        }
    }

    /// Whether something sent to replica `epoch` reaches a running replica.
    fn reaches(&self, epoch: u64) -> bool {
        epoch == self.world.epoch && !self.down
    }

    fn handle(&mut self, ev: Ev) {
        let now = self.world.now;
        match ev {
            Ev::Granted {
                epoch,
                task,
                agent,
                allocation,
            } => {
                if !self.reaches(epoch) {
                    // Lost with the replica: the allocator takes it back.
                    return;
                }
                let agent = self.world.agents[agent].id.clone();
                let cmd = Command::Placed {
                    task: &task,
                    agent: &agent,
                    allocation: &allocation,
                    granted_ms: now,
                };
                if self.step(cmd) {
                    self.driver.granted(&task);
                } else {
                    self.driver
                        .grant_unused(&mut self.world, &task, agent, allocation, None);
                }
                self.to_drive = true;
            }
            Ev::Refused {
                epoch,
                task,
                asked_at,
            } => {
                if self.reaches(epoch) {
                    self.driver.refused(&self.world, task, asked_at, now);
                    self.to_drive = true;
                }
            }
            Ev::Wake { epoch, why } => {
                if !self.reaches(epoch) {
                    return;
                }
                if why == Wake::Timer {
                    self.time_timers();
                    self.step(Command::Due);
                }
                self.to_drive = true;
            }
            Ev::Sweep => {
                self.world.after(SWEEP_MS, Ev::Sweep);
                if self.down {
                    self.down = false;
                    self.up_since = now;
                } else {
                    self.time_timers();
                }
                self.step(Command::Tick);
                if !self.down {
                    self.driver.redeliver(&mut self.world, &self.flow, now);
                }
                self.check_holdings();
                self.to_drive = true;
            }
            Ev::Report(report) => {
                if self.down {
                    // Stays in the stream until a replica takes it.
                    self.world.after(SWEEP_MS, Ev::Report(report));
                    return;
                }
                self.step(Command::Report(&report));
                self.to_drive = true;
            }
            Ev::AgentDies(i) => {
                if self.world.agents[i].alive {
                    self.world.agents[i].alive = false;
                    self.world.after(LOST_AFTER_MS, Ev::AgentLost(i));
                }
            }
            Ev::AgentLost(i) => {
                if self.down {
                    // The allocator's event waits in its stream.
                    self.world.after(SWEEP_MS, Ev::AgentLost(i));
                    return;
                }
                let gone: Vec<AllocationId> = self
                    .world
                    .held
                    .iter()
                    .filter(|(_, (a, _))| *a == i)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in gone {
                    self.world.give_back(&id);
                }
                let agent = self.world.agents[i].id.clone();
                self.step(Command::AgentGone {
                    agent: &agent,
                    left: false,
                });
                self.to_drive = true;
                let back = 1_000 + self.world.below(5_000);
                self.world.after(back, Ev::AgentBack(i));
            }
            Ev::AgentBack(i) => {
                self.world.agents[i].alive = true;
                self.world.agents[i].seen.clear();
                // Registered again: capacity added, as the allocator says.
                self.world.freed += FREED_ALL;
            }
            Ev::Crash => {
                self.crash_pending = true;
                let next = 2_000 + self.world.below(6_000);
                self.world.after(next, Ev::Crash);
            }
            Ev::Reconcile => {
                self.world.after(RECONCILE_GRACE_MS, Ev::Reconcile);
                let in_use: HashSet<&AllocationId> = self
                    .flow
                    .tasks
                    .values()
                    .filter(|t| t.state.is_active())
                    .filter_map(|t| t.allocation.as_ref())
                    .collect();
                let unheld: Vec<AllocationId> = self
                    .world
                    .held
                    .iter()
                    .filter(|(id, (_, granted))| {
                        !in_use.contains(id) && now.saturating_sub(*granted) >= RECONCILE_GRACE_MS
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in unheld {
                    self.world.give_back(&id);
                }
            }
        }
    }

    /// How late the deadlines a timer step is about to end are, counting
    /// those that came due while a replica had the flow.
    fn time_timers(&mut self) {
        let now = self.world.now;
        for id in self.flow.tasks.due_by(now) {
            let t = &self.flow.tasks[&id];
            let Some(deadline) = t.deadline_ms.filter(|_| t.state.is_active()) else {
                continue;
            };
            if deadline >= self.up_since {
                self.latest_timer_ms = self.latest_timer_ms.max(now - deadline);
                self.timers_fired += 1;
            }
        }
    }

    /// One step: the command applied, the flow written, the effects carried
    /// out by the driver, unless the replica dies right after the write
    /// (every 2 to 8 s). Returns whether the command was applied.
    fn step(&mut self, cmd: Command<'_>) -> bool {
        self.steps += 1;
        let now = self.world.now;
        let Ok(effects) = self.flow.apply(cmd, self.revision, now) else {
            return false;
        };
        self.revision += 1;
        // The store takes the notes of what changed with every write.
        let _ = self.flow.tasks.take_touched();
        if std::mem::take(&mut self.crash_pending) {
            self.restart();
            return true;
        }
        let events = self
            .driver
            .carry_out(&mut self.world, Some(&self.flow), now, effects);
        for e in events {
            if let EventKind::TaskTransition {
                task_id,
                to: TaskState::Succeeded,
                ..
            } = e
            {
                let n = self.succeeded.entry(task_id.clone()).or_default();
                *n += 1;
                assert_eq!(*n, 1, "{task_id} succeeded twice");
            }
        }
        true
    }

    /// The replica dies: its driver (placing book, wake-up, redeliveries)
    /// and grants in flight go with it; the flow is read again from the
    /// store (a round trip that also builds its indexes afresh) when the
    /// sweep brings it back.
    fn restart(&mut self) {
        self.world.epoch += 1;
        self.flow = serde_json::from_slice(&serde_json::to_vec(&self.flow).unwrap()).unwrap();
        self.driver = Driver::new(SWEEP_MS);
        self.down = true;
    }

    /// What an actor does after its steps: ask for placements, set the
    /// wake-ups.
    fn drive(&mut self) {
        if self.down {
            return;
        }
        let now = self.world.now;
        self.driver.dispatch(&mut self.world, &mut self.flow, now);
        self.driver.set_alarm(&mut self.world, &mut self.flow, now);
    }

    /// Every attempt in progress runs on an allocation the allocator holds.
    fn check_holdings(&self) {
        for t in self.flow.tasks.values().filter(|t| t.state.is_active()) {
            let allocation = t.allocation.as_ref().expect("an active task holds one");
            let i = t
                .agent
                .as_ref()
                .map(|a| a.as_str()[1..].parse::<usize>().unwrap());
            let agent_lost = i.is_some_and(|i| !self.world.agents[i].alive);
            assert!(
                agent_lost || self.world.held.contains_key(allocation),
                "{} runs on {allocation}, which the allocator gave back",
                t.spec.id
            );
        }
    }
}

fn random_dag(seed: u64, n: usize) -> FlowSpec {
    let mut rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed as u8; 32]);
    let id = |i: usize| TaskId::new(format!("t{i}")).unwrap();
    let tasks = (0..n)
        .map(|i| {
            let mut t = TaskSpec::new(id(i));
            for _ in 0..rng.next_u64() % 3 {
                if i > 0 {
                    let back = 1 + (rng.next_u64() as usize % 50).min(i - 1);
                    let dep = id(i - back);
                    if !t.depends_on.contains(&dep) {
                        t.depends_on.push(dep);
                    }
                }
            }
            t.retry = RetryPolicy {
                max_attempts: 20,
                backoff_base_ms: 50,
                backoff_factor: 2.0,
                backoff_max_ms: 2_000,
                ..RetryPolicy::default()
            };
            t.timeouts.schedule_to_start_ms = Some(200 + rng.next_u64() % 300);
            t.timeouts.start_to_close_ms = Some(500 + rng.next_u64() % 500);
            t
        })
        .collect();
    FlowSpec::new("sim", tasks)
}

#[test]
fn a_10k_task_dag_survives_agent_deaths_hangs_and_replica_restarts() {
    for seed in [1, 2] {
        let (flow, _) = Flow::new(FlowId::new("sim").unwrap(), random_dag(seed, 10_000), 0);
        let mut sim = Sim::new(seed, flow, 100, 10);
        sim.run(3_600_000);
        eprintln!(
            "seed {seed}: {} events, {} steps, {} simulated s, {} restarts, {} timers, latest {} ms",
            sim.handled,
            sim.steps,
            sim.world.now / 1_000,
            sim.world.epoch,
            sim.timers_fired,
            sim.latest_timer_ms
        );
        if let Some(t) = sim
            .flow
            .tasks
            .values()
            .find(|t| t.state != TaskState::Succeeded)
        {
            panic!(
                "seed {seed}: {} ended {:?}: {:#?}",
                t.spec.id, t.state, t.history
            );
        }
        assert_eq!(sim.flow.state, FlowState::Succeeded, "seed {seed}");
        assert!(
            sim.flow
                .tasks
                .values()
                .all(|t| t.state == TaskState::Succeeded),
            "seed {seed}"
        );
        assert!(
            sim.world.held.is_empty(),
            "seed {seed}: {:?} still held",
            sim.world.held
        );
        assert!(
            sim.world.epoch > 0,
            "seed {seed}: no replica restart happened"
        );
        assert!(
            sim.timers_fired > 100,
            "seed {seed}: {} timers",
            sim.timers_fired
        );
        assert!(
            sim.latest_timer_ms <= 5,
            "seed {seed}: a timer fired {} ms late",
            sim.latest_timer_ms
        );
    }
}

/// The interplay of timeouts, back-off and a re-run, each timer fired by the
/// wake-up set for it: an attempt that never starts times out at its due
/// time, backs off, times out again for good (the flow fails); a re-run
/// renews the budget, a report of the first attempt arriving then is fenced,
/// and the next timeout and back-off fire when due.
#[test]
fn timeouts_back_off_and_a_rerun_fire_when_due() {
    let id = |s: &str| TaskId::new(s).unwrap();
    let mut a = TaskSpec::new(id("a"));
    a.timeouts.schedule_to_start_ms = Some(100);
    a.retry = RetryPolicy {
        max_attempts: 2,
        backoff_base_ms: 1_000,
        backoff_factor: 2.0,
        backoff_max_ms: 10_000,
        ..RetryPolicy::default()
    };
    let mut b = TaskSpec::new(id("b"));
    b.depends_on = vec![id("a")];
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), FlowSpec::new("f", vec![a, b]), 0);
    let agent = AgentId::new("w").unwrap();
    let mut alarm = Alarm::default();
    let mut placed = 0;
    let mut place = |flow: &mut Flow, now: u64| {
        let due = flow.placements(now, &Placing::default(), |_| false);
        assert_eq!(due.len(), 1, "at {now}: {due:?}");
        placed += 1;
        let allocation = AllocationId::new(format!("al{placed}")).unwrap();
        let cmd = Command::Placed {
            task: &due[0].task,
            agent: &agent,
            allocation: &allocation,
            granted_ms: now,
        };
        flow.apply(cmd, 1, now).unwrap();
    };
    let a_state = |flow: &Flow| flow.tasks[&id("a")].state;

    place(&mut flow, 0);
    assert_eq!(alarm.set(flow.next_wakeup_after(0), 0), Some(100));
    flow.apply(Command::Due, 1, 100).unwrap();
    assert_eq!(
        a_state(&flow),
        TaskState::Ready,
        "timed out at 100, backing off"
    );
    let backoff_end = flow.tasks[&id("a")].not_before_ms;
    assert!(backoff_end > 100);
    assert!(flow
        .placements(backoff_end - 1, &Placing::default(), |_| false)
        .is_empty());
    assert_eq!(
        alarm.set(flow.next_wakeup_after(100), 100),
        Some(backoff_end)
    );

    flow.apply(Command::Due, 1, backoff_end).unwrap();
    place(&mut flow, backoff_end);
    let second_due = backoff_end + 100;
    let next = flow.next_wakeup_after(backoff_end);
    assert_eq!(alarm.set(next, backoff_end), Some(second_due));
    flow.apply(Command::Due, 1, second_due).unwrap();
    assert_eq!(a_state(&flow), TaskState::TimedOut, "no attempts left");
    assert_eq!(flow.state, FlowState::Failed);
    assert_eq!(
        alarm.set(flow.next_wakeup_after(second_due), second_due),
        None
    );

    let rerun_at = second_due + 50;
    flow.apply(Command::Rerun(&id("a")), 1, rerun_at).unwrap();
    assert_eq!(flow.state, FlowState::Running);
    place(&mut flow, rerun_at);
    let late = AgentReport {
        flow_id: flow.id.clone(),
        task_id: id("a"),
        attempt: 1,
        agent_id: agent.clone(),
        kind: ReportKind::Completed {
            output: serde_json::Value::Null,
        },
        at_ms: rerun_at + 10,
    };
    assert!(
        flow.apply(Command::Report(&late), 1, rerun_at + 10)
            .is_err(),
        "the first attempt's report is fenced"
    );
    let third_due = rerun_at + 100;
    let next = flow.next_wakeup_after(rerun_at + 10);
    assert_eq!(alarm.set(next, rerun_at + 10), Some(third_due));
    flow.apply(Command::Due, 1, third_due).unwrap();
    assert_eq!(
        a_state(&flow),
        TaskState::Ready,
        "the renewed budget retries it"
    );
    let backoff_end = flow.tasks[&id("a")].not_before_ms;
    let next = flow.next_wakeup_after(third_due);
    assert_eq!(alarm.set(next, third_due), Some(backoff_end));
    place(&mut flow, backoff_end);
    let attempt = flow.tasks[&id("a")].attempt;
    assert_eq!(attempt, 4);
    for kind in [
        ReportKind::Started,
        ReportKind::Completed {
            output: serde_json::Value::Null,
        },
    ] {
        let r = AgentReport {
            attempt,
            kind,
            ..late.clone()
        };
        flow.apply(Command::Report(&r), 1, backoff_end + 5).unwrap();
    }
    assert_eq!(a_state(&flow), TaskState::Succeeded);
    assert_eq!(flow.tasks[&id("b")].state, TaskState::Ready);
}
