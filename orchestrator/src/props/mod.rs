//! Property tests of the flow machine: for random DAGs and random interleavings of
//! assignments, reports (current, stale, foreign, duplicated), ticks, lost agents,
//! preemption and pause / resume / cancel, the machine keeps its invariants.
//!
//! Checked after every step: no task is assigned, running or succeeded before all
//! of its dependencies succeeded; a task succeeds at most once, and only on a
//! report for its current attempt from the agent that holds it; a report that is
//! stale, foreign or for an inactive task is refused; attempts never decrease;
//! every allocation handed out is released exactly once, and the allocations held
//! are exactly those of the active tasks; the flow parallelism limit holds; the
//! flow is final exactly when it should be. Each case then drives the flow to its
//! end and checks that nothing is left held.
//!
//! The same steps check the store's side too: with the flow spread over
//! pages, encoding only the pages a step touched gives what encoding every
//! page would. That is why these tests sit beside the machine, not in it.

use std::collections::{BTreeMap, BTreeSet};

use common::msg::{AgentReport, EventKind, FlowState, ReportKind, TaskState};
use common::{AgentId, AllocationId, FlowId, TaskId};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use crate::machine::{self, Effect, Flow, Task};
use crate::store::{Kept, Pages};
use generate::{gen_flow, gen_op, spec_of, Op};

const AGENTS: usize = 3;

fn tid(i: usize) -> TaskId {
    TaskId::new(format!("t{i}")).unwrap()
}

fn aid(i: usize) -> AgentId {
    AgentId::new(format!("a{}", i % AGENTS)).unwrap()
}

/// What the test knows independently of the machine.
struct Model {
    now: u64,
    next_allocation: u64,
    /// Allocations handed out by an accepted assignment and not yet released.
    held: BTreeSet<AllocationId>,
    /// Accepted completions per task.
    succeeded: BTreeMap<TaskId, u32>,
    attempts: BTreeMap<TaskId, u32>,
    sent: Vec<AgentReport>,
}

impl Model {
    fn new(flow: &Flow) -> Model {
        Model {
            now: 1_000,
            next_allocation: 0,
            held: BTreeSet::new(),
            succeeded: BTreeMap::new(),
            attempts: flow.tasks.keys().map(|k| (k.clone(), 0)).collect(),
            sent: Vec::new(),
        }
    }

    fn allocation(&mut self) -> AllocationId {
        self.next_allocation += 1;
        AllocationId::new(format!("al-{}", self.next_allocation)).unwrap()
    }

    /// Books the effects of a step. `completion_ok` says whether a task may reach
    /// `succeeded` in this step (only an accepted report from the holder may).
    fn effects(&mut self, effects: &[Effect], completion_ok: bool) -> Result<(), TestCaseError> {
        for e in effects {
            match e {
                Effect::Assign { allocation, .. } => {
                    prop_assert!(
                        self.held.contains(allocation),
                        "assignment sent on allocation {allocation} never handed out"
                    );
                }
                Effect::Release { allocation, .. } => {
                    prop_assert!(
                        self.held.remove(allocation),
                        "allocation {allocation} released twice or never handed out"
                    );
                }
                Effect::Event(EventKind::TaskTransition {
                    task_id,
                    to: TaskState::Succeeded,
                    ..
                }) => {
                    prop_assert!(completion_ok, "{task_id} succeeded without a completion");
                    let n = self.succeeded.entry(task_id.clone()).or_default();
                    *n += 1;
                    prop_assert!(*n == 1, "{task_id} accepted {n} completions");
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn deps_succeeded(flow: &Flow, t: &Task) -> bool {
    t.spec.depends_on.iter().all(|d| {
        flow.tasks
            .get(d)
            .is_some_and(|dt| dt.state == TaskState::Succeeded)
    })
}

/// The invariants that hold between any two steps.
fn check(flow: &Flow, model: &mut Model) -> Result<(), TestCaseError> {
    let mut held = BTreeSet::new();
    for (id, t) in &flow.tasks {
        if t.state.is_active() || t.state == TaskState::Succeeded {
            prop_assert!(
                deps_succeeded(flow, t),
                "{id} is {:?} before its dependencies succeeded",
                t.state
            );
        }
        if t.state.is_active() {
            prop_assert!(t.agent.is_some(), "{id} is active without an agent");
            prop_assert!(t.allocation.is_some(), "{id} is active without allocation");
        }
        if let Some(a) = &t.allocation {
            prop_assert!(t.state.is_active(), "{id} holds {a} while {:?}", t.state);
            prop_assert!(held.insert(a.clone()), "{a} held by two tasks");
        }
        let last = model.attempts.entry(id.clone()).or_default();
        prop_assert!(
            t.attempt >= *last,
            "{id} attempt went from {last} to {}",
            t.attempt
        );
        *last = t.attempt;
        if t.state == TaskState::Succeeded {
            prop_assert_eq!(model.succeeded.get(id).copied(), Some(1));
        }
    }
    prop_assert_eq!(&held, &model.held, "allocations held vs handed out");
    if let Some(max) = flow.max_parallelism {
        prop_assert!(flow.active() <= max as usize, "parallelism limit exceeded");
    }
    let all_final = flow.tasks.values().all(|t| t.state.is_terminal());
    if flow.state.is_terminal() {
        prop_assert!(all_final, "flow {:?} with unfinished tasks", flow.state);
    }
    // A flow paused when its last task finished completes on resume.
    if all_final && flow.state != FlowState::Paused {
        prop_assert!(
            flow.state.is_terminal(),
            "all tasks final, flow {:?}",
            flow.state
        );
    }
    if flow.state == FlowState::Succeeded {
        prop_assert!(flow.tasks.values().all(|t| t.state == TaskState::Succeeded));
    }
    Ok(())
}

fn nth_task(flow: &Flow, i: usize) -> TaskId {
    let n = flow.tasks.len();
    tid(i % n)
}

fn assign(
    flow: &mut Flow,
    model: &mut Model,
    task: &TaskId,
    agent: &AgentId,
) -> Result<bool, TestCaseError> {
    let Some(pre) = flow.tasks.get(task).cloned() else {
        return Ok(false);
    };
    let deps_ok = deps_succeeded(flow, &pre);
    let allocation = model.allocation();
    match flow.assign_attempt(task, agent, &allocation, model.now) {
        Ok((attempt, effects)) => {
            prop_assert_eq!(pre.state, TaskState::Ready, "assigned from {:?}", pre.state);
            prop_assert!(deps_ok, "{task} assigned before its dependencies succeeded");
            prop_assert_eq!(attempt, pre.attempt + 1);
            model.held.insert(allocation);
            model.effects(&effects, false)?;
            Ok(true)
        }
        Err(_) => Ok(false),
    }
}

fn report(flow: &mut Flow, model: &mut Model, r: AgentReport) -> Result<(), TestCaseError> {
    let pre = flow.tasks.get(&r.task_id).cloned();
    let pre_flow = flow.state;
    let result = flow.report(&r, model.now);
    model.sent.push(r.clone());
    let Some(pre) = pre else {
        prop_assert!(result.is_err());
        return Ok(());
    };
    let fenced_in = r.attempt == pre.attempt
        && pre.agent.as_ref() == Some(&r.agent_id)
        && pre.state.is_active()
        && !pre_flow.is_terminal();
    match result {
        Ok(effects) => {
            prop_assert!(
                fenced_in,
                "accepted {:?} for attempt {} from {} while task is {:?} attempt {} held by {:?}",
                r.kind,
                r.attempt,
                r.agent_id,
                pre.state,
                pre.attempt,
                pre.agent
            );
            model.effects(&effects, true)?;
        }
        Err(_) => {
            prop_assert!(
                !fenced_in || matches!(r.kind, ReportKind::Unknown),
                "refused {:?} from the holder of the current attempt",
                r.kind
            );
        }
    }
    Ok(())
}

fn step(flow: &mut Flow, model: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    match op {
        Op::AssignReady { pick, agent } => {
            let ready = flow.dispatchable(model.now);
            if !ready.is_empty() {
                let task = ready[pick % ready.len()].clone();
                let ok = assign(flow, model, &task, &aid(*agent))?;
                prop_assert!(ok, "a dispatchable task was refused");
            }
        }
        Op::AssignAny { task, agent } => {
            let task = nth_task(flow, *task);
            assign(flow, model, &task, &aid(*agent))?;
        }
        Op::Report {
            task,
            attempt_offset,
            from_holder,
            agent,
            kind,
            retryable,
        } => {
            let task_id = nth_task(flow, *task);
            let Some(t) = flow.tasks.get(&task_id) else {
                return Ok(());
            };
            let attempt = t.attempt.saturating_add_signed(i32::from(*attempt_offset));
            let agent_id = match (&t.agent, from_holder) {
                (Some(holder), true) => holder.clone(),
                _ => aid(*agent),
            };
            let kind = match kind {
                0 => ReportKind::Started,
                1 => ReportKind::Progress {
                    progress: Some(0.5),
                    message: None,
                },
                2 | 3 => ReportKind::Completed {
                    output: serde_json::json!(attempt),
                },
                _ => ReportKind::Failed {
                    error: "boom".into(),
                    retryable: *retryable,
                },
            };
            let r = AgentReport {
                flow_id: flow.id.clone(),
                task_id,
                attempt,
                agent_id,
                kind,
                at_ms: model.now,
            };
            report(flow, model, r)?;
        }
        Op::Replay { pick } => {
            if !model.sent.is_empty() {
                let r = model.sent[pick % model.sent.len()].clone();
                report(flow, model, r)?;
            }
        }
        Op::Tick { advance_ms } => {
            model.now += advance_ms;
            let effects = flow.tick(model.now);
            model.effects(&effects, false)?;
        }
        Op::AgentLost { agent } => {
            let effects = flow.agent_lost(&aid(*agent), model.now);
            model.effects(&effects, false)?;
        }
        Op::Preempt { task, own } => {
            let task = nth_task(flow, *task);
            let allocation = match flow.tasks.get(&task).and_then(|t| t.allocation.clone()) {
                Some(a) if *own => a,
                _ => AllocationId::new("al-foreign").unwrap(),
            };
            let effects = flow.preempted(&task, &allocation, "capacity reduced", model.now);
            model.effects(&effects, false)?;
        }
        Op::Unassign {
            task,
            attempt_offset,
        } => {
            let task = nth_task(flow, *task);
            let Some(t) = flow.tasks.get(&task) else {
                return Ok(());
            };
            let attempt = t.attempt.saturating_add_signed(i32::from(*attempt_offset));
            if let Ok(effects) = flow.unassign(&task, attempt, model.now) {
                model.effects(&effects, false)?;
            }
        }
        Op::Pause => {
            if let Ok(effects) = flow.pause() {
                model.effects(&effects, false)?;
            }
        }
        Op::Resume => {
            if let Ok(effects) = flow.resume(model.now) {
                model.effects(&effects, false)?;
            }
        }
        Op::Cancel => {
            let terminal = flow.state.is_terminal();
            match flow.cancel(model.now) {
                Ok(effects) => {
                    prop_assert!(!terminal);
                    model.effects(&effects, false)?;
                    prop_assert!(model.held.is_empty(), "cancel left {:?} held", model.held);
                }
                Err(_) => prop_assert!(terminal, "cancel refused on a live flow"),
            }
        }
    }
    check(flow, model)
}

/// Runs everything to the end with well-behaved agents: every active attempt and
/// every dispatchable task completes, time jumps past every back-off and deadline.
fn drain(flow: &mut Flow, model: &mut Model) -> Result<(), TestCaseError> {
    if let Ok(effects) = flow.resume(model.now) {
        model.effects(&effects, false)?;
    }
    let bound = flow.tasks.len() * 8 + 8;
    for _ in 0..bound {
        if flow.state.is_terminal() {
            break;
        }
        let active: Vec<(TaskId, u32, AgentId)> = flow
            .tasks
            .values()
            .filter(|t| t.state.is_active())
            .filter_map(|t| Some((t.spec.id.clone(), t.attempt, t.agent.clone()?)))
            .collect();
        for (task_id, attempt, agent_id) in active {
            let r = AgentReport {
                flow_id: flow.id.clone(),
                task_id,
                attempt,
                agent_id,
                kind: ReportKind::Completed {
                    output: serde_json::Value::Null,
                },
                at_ms: model.now,
            };
            let effects = flow.report(&r, model.now);
            prop_assert!(effects.is_ok(), "holder's completion refused: {effects:?}");
            if let Ok(effects) = effects {
                model.effects(&effects, true)?;
            }
            check(flow, model)?;
        }
        for task in flow.dispatchable(model.now) {
            prop_assert!(assign(flow, model, &task, &aid(0))?);
            check(flow, model)?;
        }
        model.now += 10_000;
        let effects = flow.tick(model.now);
        model.effects(&effects, false)?;
        check(flow, model)?;
    }
    prop_assert!(
        flow.state.is_terminal(),
        "flow still {:?} after draining",
        flow.state
    );
    prop_assert!(
        model.held.is_empty(),
        "allocations never released: {:?}",
        model.held
    );
    Ok(())
}

fn wakeup_by_scan(flow: &Flow) -> Option<u64> {
    if flow.state.is_terminal() {
        return None;
    }
    flow.tasks.values().filter_map(machine::due_of).min()
}

fn ready_by_sorting(flow: &Flow) -> Vec<TaskId> {
    let mut ready: Vec<&Task> = flow
        .tasks
        .values()
        .filter(|t| t.state == TaskState::Ready)
        .collect();
    ready.sort_by(|a, b| {
        b.spec
            .priority
            .cmp(&a.spec.priority)
            .then(b.rank.cmp(&a.rank))
            .then(a.spec.id.cmp(&b.spec.id))
    });
    ready.into_iter().map(|t| t.spec.id.clone()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn machine_keeps_its_invariants(
        g in gen_flow(),
        ops in prop::collection::vec(gen_op(), 0..120),
    ) {
        let spec = spec_of(&g);
        prop_assert!(machine::validate(&spec).is_ok());
        let (mut flow, effects) = Flow::new(FlowId::new("f").unwrap(), spec, 1_000);
        let mut model = Model::new(&flow);
        model.effects(&effects, false)?;
        check(&flow, &mut model)?;
        // Spread over pages, as a large flow is: after every step the pages
        // the store encodes again (those holding touched tasks) must give
        // what encoding every page would.
        let keys: Vec<TaskId> = flow.tasks.keys().cloned().collect();
        let bounds: Vec<TaskId> =
            (1..3).filter_map(|k| keys.get(k * keys.len() / 3).cloned()).collect();
        let count = bounds.len() + 1;
        let kept = Kept {
            writer: None,
            pages: Some(Pages { count: count as u32, step: 0, steps: vec![0; count], bounds }),
            outbox: Vec::new(),
        };
        let (mut stored, _) = crate::store::encode(&mut flow, kept, None).unwrap();
        for op in &ops {
            step(&mut flow, &mut model, op)?;
            // The ready order kept up from the noted tasks, before and
            // after the store takes the notes, is the order sorted afresh.
            prop_assert_eq!(flow.ready_in_order(), ready_by_sorting(&flow), "after {:?}", op);
            prop_assert_eq!(flow.next_wakeup(), wakeup_by_scan(&flow), "after {:?}", op);
            let kept = stored.kept.clone();
            let (incremental, _) = crate::store::encode(&mut flow, kept, Some(&stored)).unwrap();
            prop_assert_eq!(flow.ready_in_order(), ready_by_sorting(&flow), "after {:?}", op);
            let kept = incremental.kept.clone();
            let (whole, _) = crate::store::encode(&mut flow.clone(), kept, None).unwrap();
            prop_assert_eq!(&incremental.pages, &whole.pages, "after {:?}", op);
            stored = incremental;
        }
        drain(&mut flow, &mut model)?;
    }
}

mod generate;
mod regressions;
