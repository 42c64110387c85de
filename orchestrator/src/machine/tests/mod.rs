//! The flow machine: validation reports every problem, tasks become ready only
//! when their dependencies succeeded, and fencing refuses stale or foreign reports.

use common::msg::{
    AgentReport, CancelCode, EventKind, FailureKind, FailureMode, FlowSpec, FlowState, ReportKind,
    RetryPolicy, TaskSpec, TaskState,
};
use common::{AgentId, AllocationId, FlowId, TaskId};
use serde_json::json;

use super::*;

fn tid(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

fn task(id: &str, deps: &[&str]) -> TaskSpec {
    let mut t = TaskSpec::new(tid(id));
    t.kind = "k".into();
    t.depends_on = deps.iter().map(|d| tid(d)).collect();
    t
}

fn spec(tasks: Vec<TaskSpec>) -> FlowSpec {
    FlowSpec::new("t", tasks)
}

fn diamond() -> FlowSpec {
    spec(vec![
        task("a", &[]),
        task("b", &["a"]),
        task("c", &["a"]),
        task("d", &["b", "c"]),
    ])
}

fn agent() -> AgentId {
    AgentId::new("w1").unwrap()
}

fn report(t: &str, attempt: u32, kind: ReportKind) -> AgentReport {
    AgentReport {
        flow_id: FlowId::new("f").unwrap(),
        task_id: tid(t),
        attempt,
        agent_id: agent(),
        kind,
        at_ms: 0,
    }
}

/// What the adapter would place next, as of `now`.
fn due(flow: &mut Flow, now: u64) -> Vec<String> {
    flow.dispatchable(now)
        .into_iter()
        .map(|t| t.to_string())
        .collect()
}

/// Assigns `t` to w1 and reports it completed; returns the completion's effects.
fn run(flow: &mut Flow, t: &str) -> Vec<Effect> {
    let (attempt, _) = flow
        .assign_attempt(
            &tid(t),
            &agent(),
            &AllocationId::new(format!("al-{t}")).unwrap(),
            1,
        )
        .unwrap();
    flow.report(&report(t, attempt, ReportKind::Started), 2)
        .unwrap();
    flow.report(
        &report(t, attempt, ReportKind::Completed { output: json!(t) }),
        3,
    )
    .unwrap()
}

#[test]
fn a_valid_diamond_passes() {
    assert_eq!(validate(&diamond()), Ok(()));
}

#[test]
fn validation_reports_every_problem_at_once() {
    let bad = spec(vec![
        task("a", &["ghost"]),
        task("a", &[]),
        task("s", &["s"]),
        task("x", &["z"]),
        task("y", &["x"]),
        task("z", &["y"]),
    ]);
    let problems = validate(&bad).unwrap_err();
    let codes: Vec<&str> = problems.iter().map(|p| p.code.as_str()).collect();
    assert!(codes.contains(&"duplicate_task"), "{codes:?}");
    assert!(codes.contains(&"unknown_dependency"), "{codes:?}");
    assert!(codes.contains(&"self_dependency"), "{codes:?}");
    let cycle = problems.iter().find(|p| p.code == "cycle").unwrap();
    let path: Vec<&str> = cycle.path.iter().map(TaskId::as_str).collect();
    assert_eq!(path, ["x", "y", "z", "x"]);
    assert!(
        cycle.message.contains("x -> y -> z -> x"),
        "{}",
        cycle.message
    );
}

#[test]
fn empty_flows_and_negative_resources_are_refused() {
    assert_eq!(validate(&spec(vec![])).unwrap_err()[0].code, "empty_flow");
    let mut t = task("a", &[]);
    t.requirements.resources.insert("cpu".into(), -1.0);
    assert_eq!(
        validate(&spec(vec![t])).unwrap_err()[0].code,
        "invalid_requirement"
    );
}

#[test]
fn roots_are_ready_and_dispatched_on_creation() {
    let (mut flow, effects) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Ready);
    assert_eq!(flow.tasks[&tid("d")].state, TaskState::Blocked);
    assert_eq!(due(&mut flow, 0), ["a"]);
    assert!(matches!(
        effects[0],
        Effect::Event(EventKind::FlowCreated { tasks: 4, .. })
    ));
}

#[test]
fn a_succeeded_task_vouches_for_its_allocation_while_it_may_be_handed_on() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    let held = AllocationId::new("al-a").unwrap();
    assert_eq!(
        flow.holds(&tid("a"), &held, 0).ok(),
        None,
        "not assigned yet"
    );
    run(&mut flow, "a");
    // Ended at 3 (see `run`).
    assert_eq!(flow.holds(&tid("a"), &held, 3).ok(), Some(()));
    let over = 3 + crate::machine::HAND_ON_VOUCH_MS;
    assert!(flow.holds(&tid("a"), &held, over).is_err());
    let other = AllocationId::new("al-x").unwrap();
    assert!(flow.holds(&tid("a"), &other, 3).is_err());
}

#[test]
fn dependants_become_ready_only_when_all_dependencies_succeeded() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    let e = run(&mut flow, "a");
    let mut ready = due(&mut flow, 0);
    ready.sort();
    assert_eq!(ready, ["b", "c"]);
    assert!(e.contains(&Effect::Release {
        agent: agent(),
        allocation: AllocationId::new("al-a").unwrap(),
        after: Some(TaskId::new("a").unwrap()),
    }));
    let a = &flow.tasks[&TaskId::new("a").unwrap()];
    assert_eq!(a.last_allocation, Some(AllocationId::new("al-a").unwrap()));
    run(&mut flow, "b");
    assert_eq!(due(&mut flow, 0), ["c"], "d still waits for c");
    run(&mut flow, "c");
    assert_eq!(due(&mut flow, 0), ["d"]);
    let e = run(&mut flow, "d");
    assert_eq!(flow.state, FlowState::Succeeded);
    assert!(e.contains(&Effect::Event(EventKind::FlowCompleted {
        flow_id: FlowId::new("f").unwrap(),
        state: FlowState::Succeeded
    })));
    assert_eq!(flow.status(1, 10).progress, 1.0);
}

#[test]
fn higher_priority_then_longer_chain_goes_first() {
    let mut hi = task("hi", &[]);
    hi.priority = 5;
    let s = spec(vec![
        task("short", &[]),
        task("long", &[]),
        task("after", &["long"]),
        hi,
    ]);
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), s, 0);
    assert_eq!(due(&mut flow, 0), ["hi", "long", "short"]);
    assert_eq!(flow.tasks[&tid("long")].rank, 2 * DEFAULT_ESTIMATE_MS);
}

#[test]
fn stale_foreign_and_duplicate_reports_are_fenced() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    let (attempt, _) = flow
        .assign_attempt(&tid("a"), &agent(), &AllocationId::new("al").unwrap(), 1)
        .unwrap();
    assert_eq!(attempt, 1);
    assert_eq!(
        flow.report(&report("a", 7, ReportKind::Started), 2),
        Err(Rejection::StaleAttempt { got: 7, current: 1 })
    );
    let mut foreign = report("a", 1, ReportKind::Started);
    foreign.agent_id = AgentId::new("intruder").unwrap();
    assert!(matches!(
        flow.report(&foreign, 2),
        Err(Rejection::WrongAgent { .. })
    ));
    assert!(matches!(
        flow.report(&report("b", 0, ReportKind::Started), 2),
        Err(Rejection::WrongAgent { .. })
    ));
    let done = ReportKind::Completed { output: json!(1) };
    flow.report(&report("a", 1, done.clone()), 3).unwrap();
    // The same completion again is a second delivery of it: no verdict.
    assert_eq!(
        flow.report(&report("a", 1, done), 4),
        Err(Rejection::AlreadyApplied)
    );
    let failed = ReportKind::Failed {
        error: "late".into(),
        retryable: false,
    };
    assert_eq!(
        flow.report(&report("a", 1, failed), 4),
        Err(Rejection::NotActive(TaskState::Succeeded))
    );
    assert_eq!(
        flow.assign_attempt(&tid("a"), &agent(), &AllocationId::new("al2").unwrap(), 5),
        Err(Rejection::NotReady(TaskState::Succeeded))
    );
}

#[test]
fn a_failure_skips_everything_downstream_and_fails_the_flow() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    run(&mut flow, "a");
    let (attempt, _) = flow
        .assign_attempt(&tid("b"), &agent(), &AllocationId::new("al").unwrap(), 1)
        .unwrap();
    flow.report(
        &report(
            "b",
            attempt,
            ReportKind::Failed {
                error: "boom".into(),
                retryable: false,
            },
        ),
        2,
    )
    .unwrap();
    assert_eq!(flow.tasks[&tid("d")].state, TaskState::Skipped);
    assert_eq!(flow.state, FlowState::Running, "c is still pending");
    run(&mut flow, "c");
    assert_eq!(flow.state, FlowState::Failed);
    assert_eq!(flow.tasks[&tid("b")].error.as_deref(), Some("failed: boom"));
}

#[test]
fn unassign_puts_the_task_back_and_releases() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    let (attempt, _) = flow
        .assign_attempt(&tid("a"), &agent(), &AllocationId::new("al").unwrap(), 1)
        .unwrap();
    let e = flow.unassign(&tid("a"), attempt, 2).unwrap();
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Ready);
    assert!(matches!(e[0], Effect::Release { .. }));
    let (next, _) = flow
        .assign_attempt(&tid("a"), &agent(), &AllocationId::new("al2").unwrap(), 3)
        .unwrap();
    assert_eq!(next, 2, "a new attempt fences off the old one");
}

#[test]
fn every_transition_is_one_event() {
    let (mut flow, mut all) = Flow::new(FlowId::new("f").unwrap(), spec(vec![task("a", &[])]), 0);
    let (attempt, e) = flow
        .assign_attempt(&tid("a"), &agent(), &AllocationId::new("al").unwrap(), 1)
        .unwrap();
    all.extend(e);
    all.extend(
        flow.report(&report("a", attempt, ReportKind::Started), 2)
            .unwrap(),
    );
    all.extend(
        flow.report(
            &report("a", attempt, ReportKind::Completed { output: json!(1) }),
            3,
        )
        .unwrap(),
    );
    assert_eq!(
        transitions(&all),
        [
            (TaskState::Blocked, TaskState::Ready),
            (TaskState::Ready, TaskState::Assigned),
            (TaskState::Assigned, TaskState::Running),
            (TaskState::Running, TaskState::Succeeded)
        ]
    );
}

#[test]
fn a_final_report_without_started_passes_through_running() {
    for (kind, end) in [
        (
            ReportKind::Completed { output: json!(1) },
            TaskState::Succeeded,
        ),
        (
            ReportKind::Failed {
                error: "no".into(),
                retryable: false,
            },
            TaskState::Failed,
        ),
    ] {
        let mut flow = flow_of(vec![task("a", &[])]);
        let attempt = assign(&mut flow, "a", "w1", 1);
        let e = flow.report(&report("a", attempt, kind), 7).unwrap();
        assert_eq!(
            transitions(&e),
            [
                (TaskState::Assigned, TaskState::Running),
                (TaskState::Running, end)
            ]
        );
        assert_eq!(flow.tasks[&tid("a")].started_ms, Some(7));
    }
}

#[test]
fn a_report_on_an_attempt_sent_ahead_of_its_record_records_it() {
    let mut flow = flow_of(vec![task("a", &[]), task("b", &[])]);
    let asked = AllocationId::new("al-asked").unwrap();
    for t in ["a", "b"] {
        flow.tasks.get_mut(&tid(t)).unwrap().asked = Some(asked.clone());
    }
    let done = ReportKind::Completed { output: json!(1) };
    // Another attempt than the one sent ahead changes nothing.
    let before = flow.clone();
    assert!(flow.report(&report("b", 2, done.clone()), 5).is_err());
    assert_eq!(flow, before, "a refused report leaves the flow as it was");

    let e = flow.report(&report("a", 1, done), 7).unwrap();
    assert_eq!(
        transitions(&e),
        [
            (TaskState::Ready, TaskState::Assigned),
            (TaskState::Assigned, TaskState::Running),
            (TaskState::Running, TaskState::Succeeded)
        ]
    );
    assert!(
        !e.iter().any(|e| matches!(e, Effect::Assign { .. })),
        "the agent has the assignment already: {e:?}"
    );
    assert!(e.iter().any(|e| matches!(e,
        Effect::Release { agent, allocation, .. } if agent.as_str() == "w1" && allocation == &asked)));
    let a = &flow.tasks[&tid("a")];
    assert_eq!(
        (a.attempt, a.agent.as_ref().map(|x| x.as_str())),
        (1, Some("w1"))
    );
    assert_eq!(a.asked, None);
}

/// The task transitions among `effects`, as (from, to).
fn transitions(effects: &[Effect]) -> Vec<(TaskState, TaskState)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Event(EventKind::TaskTransition { from, to, .. }) => Some((*from, *to)),
            _ => None,
        })
        .collect()
}

fn flow_of(tasks: Vec<TaskSpec>) -> Flow {
    Flow::new(FlowId::new("f").unwrap(), spec(tasks), 0).0
}

fn assign(flow: &mut Flow, t: &str, agent_name: &str, now: u64) -> u32 {
    let agent = AgentId::new(agent_name).unwrap();
    let alloc = AllocationId::new(format!("al-{t}-{now}")).unwrap();
    flow.assign_attempt(&tid(t), &agent, &alloc, now).unwrap().0
}

fn retrying(id: &str, attempts: u32) -> TaskSpec {
    let mut t = task(id, &[]);
    t.retry = RetryPolicy {
        max_attempts: attempts,
        backoff_base_ms: 100,
        backoff_factor: 2.0,
        ..Default::default()
    };
    t
}

fn changes() -> common::msg::FlowChanges {
    common::msg::FlowChanges {
        flow_id: FlowId::new("f").unwrap(),
        expected_revision: 1,
        add: vec![],
        add_dependencies: vec![],
        remove: vec![],
        priorities: Default::default(),
        inputs: Default::default(),
    }
}

mod agents;
mod changing;
mod lifecycle;
mod wait;

/// The events among a step's effects.
fn events_in(effects: &[Effect]) -> impl Iterator<Item = &EventKind> {
    effects.iter().filter_map(|e| match e {
        Effect::Event(kind) => Some(kind),
        _ => None,
    })
}

#[test]
fn a_replica_places_what_it_readied_and_what_another_did_once_that_one_is_gone() {
    let (mut flow, created) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    flow.claim_ready(1, events_in(&created));
    // Replica `me`, with the replicas in `gone` known to be gone.
    let placing = |me: u32, gone: &'static [u32]| {
        let mut p = Placing::default();
        p.drive(Some(me), Some(Gone(Box::new(|r| gone.contains(&r)))));
        p
    };
    let both: &[u32] = &[];
    let placed = |flow: &mut Flow, now: u64, p: Placing| {
        let mut names: Vec<String> = flow
            .placements(now, &p, |_| false)
            .into_iter()
            .map(|p| p.task.to_string())
            .collect();
        names.sort();
        names
    };
    assert_eq!(placed(&mut flow, 1, placing(1, both)), ["a"], "its own");
    assert!(
        placed(&mut flow, 1, placing(2, both)).is_empty(),
        "another's, while that one is up"
    );
    let mut unknown = Placing::default();
    unknown.drive(Some(2), None);
    assert!(
        placed(&mut flow, 1, unknown).is_empty(),
        "another's, while it is not known who is gone"
    );
    assert_eq!(placed(&mut flow, 1, placing(2, &[1])), ["a"], "gone");
    // Replica 2 applies a's completion: what it readied is its own.
    let done = run(&mut flow, "a");
    flow.claim_ready(2, events_in(&done));
    assert_eq!(placed(&mut flow, 4, placing(2, both)), ["b", "c"]);
    assert!(placed(&mut flow, 4, placing(1, both)).is_empty());
    // A flow stored before replicas named themselves: anyone places.
    for t in ["b", "c"] {
        flow.tasks.get_mut(&tid(t)).unwrap().readied_by = None;
    }
    assert_eq!(placed(&mut flow, 4, placing(1, both)), ["b", "c"]);
}

#[test]
fn a_dispatch_asks_once_per_other_replica_and_walks_past_a_bounded_number_of_its_tasks() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let n = super::place::MAX_OTHERS_PASSED + 500;
    let names: Vec<String> = (0..n).map(|i| format!("t{i:05}")).collect();
    let tasks = names.iter().map(|id| task(id, &[])).collect();
    let (mut flow, created) = Flow::new(FlowId::new("f").unwrap(), spec(tasks), 0);
    flow.claim_ready(1, events_in(&created));
    // The last task in dispatch order is replica 2's, behind replica 1's.
    let last = tid(names.last().unwrap());
    flow.tasks.get_mut(&last).unwrap().readied_by = Some(2);
    let asked = Arc::new(AtomicUsize::new(0));
    let placing = |gone: bool| {
        let asked = Arc::clone(&asked);
        let mut p = Placing::default();
        p.drive(
            Some(2),
            Some(Gone(Box::new(move |_| {
                asked.fetch_add(1, Ordering::Relaxed);
                gone
            }))),
        );
        p
    };
    assert!(
        flow.placements(1, &placing(false), |_| false).is_empty(),
        "its own task is further on than the walk goes past replica 1's"
    );
    assert_eq!(asked.load(Ordering::Relaxed), 1, "one verdict per replica");
    // Once replica 1 has placed most of its tasks, the walk reaches it.
    for id in &names[..n - 10] {
        run(&mut flow, id);
    }
    let placed = flow.placements(4, &placing(false), |_| false);
    assert_eq!(placed.len(), 1);
    assert_eq!(placed[0].task, last);
    // Replica 1 gone: everything ready is replica 2's to place.
    asked.store(0, Ordering::Relaxed);
    assert_eq!(flow.placements(4, &placing(true), |_| false).len(), 10);
    assert_eq!(asked.load(Ordering::Relaxed), 1);
}
