//! The flow machine: validation reports every problem, tasks become ready only
//! when their dependencies succeeded, and fencing refuses stale or foreign reports.

use common::msg::{
    AgentReport, EventKind, FailureKind, FailureMode, FlowSpec, FlowState, ReportKind, RetryPolicy,
    TaskSpec, TaskState,
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
fn due(flow: &Flow, now: u64) -> Vec<String> {
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
    let (flow, effects) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Ready);
    assert_eq!(flow.tasks[&tid("d")].state, TaskState::Blocked);
    assert_eq!(due(&flow, 0), ["a"]);
    assert!(matches!(
        effects[0],
        Effect::Event(EventKind::FlowCreated { tasks: 4, .. })
    ));
}

#[test]
fn dependants_become_ready_only_when_all_dependencies_succeeded() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    let e = run(&mut flow, "a");
    let mut ready = due(&flow, 0);
    ready.sort();
    assert_eq!(ready, ["b", "c"]);
    assert!(e.contains(&Effect::Release {
        agent: agent(),
        allocation: AllocationId::new("al-a").unwrap()
    }));
    run(&mut flow, "b");
    assert_eq!(due(&flow, 0), ["c"], "d still waits for c");
    run(&mut flow, "c");
    assert_eq!(due(&flow, 0), ["d"]);
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
    let (flow, _) = Flow::new(FlowId::new("f").unwrap(), s, 0);
    assert_eq!(due(&flow, 0), ["hi", "long", "short"]);
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
    let transitions: Vec<(TaskState, TaskState)> = all
        .iter()
        .filter_map(|e| match e {
            Effect::Event(EventKind::TaskTransition { from, to, .. }) => Some((*from, *to)),
            _ => None,
        })
        .collect();
    assert_eq!(
        transitions,
        [
            (TaskState::Blocked, TaskState::Ready),
            (TaskState::Ready, TaskState::Assigned),
            (TaskState::Assigned, TaskState::Running),
            (TaskState::Running, TaskState::Succeeded)
        ]
    );
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

#[test]
fn a_retryable_failure_backs_off_then_runs_again() {
    let mut flow = flow_of(vec![retrying("a", 3)]);
    let attempt = assign(&mut flow, "a", "w1", 10);
    let e = flow
        .report(
            &report(
                "a",
                attempt,
                ReportKind::Failed {
                    error: "flaky".into(),
                    retryable: true,
                },
            ),
            20,
        )
        .unwrap();
    let t = &flow.tasks[&tid("a")];
    assert_eq!(
        (t.state, t.not_before_ms, t.failures),
        (TaskState::Ready, 120, 1)
    );
    assert!(e.iter().any(|e| matches!(e, Effect::Release { .. })));
    assert!(flow.dispatchable(119).is_empty(), "still backing off");
    assert_eq!(flow.dispatchable(120), [tid("a")]);
    assert_eq!(
        flow.assign_attempt(&tid("a"), &agent(), &AllocationId::new("x").unwrap(), 50),
        Err(Rejection::NotDue(120))
    );
    let second = assign(&mut flow, "a", "w1", 130);
    assert_eq!(second, 2);
    // The first attempt's late report is fenced off.
    assert_eq!(
        flow.report(
            &report("a", 1, ReportKind::Completed { output: json!(1) }),
            140
        ),
        Err(Rejection::StaleAttempt { got: 1, current: 2 })
    );
    let e = flow
        .report(
            &report(
                "a",
                2,
                ReportKind::Failed {
                    error: "flaky".into(),
                    retryable: true,
                },
            ),
            150,
        )
        .unwrap();
    assert_eq!(
        flow.tasks[&tid("a")].not_before_ms,
        350,
        "second back-off doubles"
    );
    assert!(!e.is_empty());
    let third = assign(&mut flow, "a", "w1", 400);
    flow.report(
        &report(
            "a",
            third,
            ReportKind::Completed {
                output: json!("ok"),
            },
        ),
        410,
    )
    .unwrap();
    assert_eq!(flow.state, FlowState::Succeeded);
    assert_eq!(flow.tasks[&tid("a")].history.len(), 3);
}

#[test]
fn non_retryable_errors_and_exhausted_attempts_fail_for_good() {
    let mut flow = flow_of(vec![retrying("a", 3), retrying("b", 1)]);
    let a = assign(&mut flow, "a", "w1", 0);
    flow.report(
        &report(
            "a",
            a,
            ReportKind::Failed {
                error: "bad input".into(),
                retryable: false,
            },
        ),
        1,
    )
    .unwrap();
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Failed);
    let b = assign(&mut flow, "b", "w1", 0);
    flow.report(
        &report(
            "b",
            b,
            ReportKind::Failed {
                error: "x".into(),
                retryable: true,
            },
        ),
        1,
    )
    .unwrap();
    assert_eq!(flow.tasks[&tid("b")].state, TaskState::Failed);
    assert_eq!(flow.state, FlowState::Failed);
}

#[test]
fn retry_on_limits_which_failures_retry() {
    let mut t = retrying("a", 3);
    t.retry.retry_on = vec![FailureKind::Timeout];
    let mut flow = flow_of(vec![t]);
    let a = assign(&mut flow, "a", "w1", 0);
    flow.report(
        &report(
            "a",
            a,
            ReportKind::Failed {
                error: "e".into(),
                retryable: true,
            },
        ),
        1,
    )
    .unwrap();
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Failed);
}

#[test]
fn deadlines_expire_attempts_and_tell_the_agent() {
    let mut t = retrying("a", 2);
    t.timeouts.schedule_to_start_ms = Some(50);
    t.timeouts.start_to_close_ms = Some(1_000);
    t.timeouts.heartbeat_ms = Some(200);
    let mut flow = flow_of(vec![t]);
    let first = assign(&mut flow, "a", "w1", 0);
    assert_eq!(flow.tasks[&tid("a")].deadline_ms, Some(50));
    assert_eq!(flow.next_wakeup(), Some(50));
    assert!(flow.tick(49).is_empty());
    let e = flow.tick(50);
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Cancel { notice, .. } if notice.attempt == first)));
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Ready);

    let second = assign(&mut flow, "a", "w2", 200);
    let w2 = |kind| AgentReport {
        agent_id: AgentId::new("w2").unwrap(),
        ..report("a", second, kind)
    };
    flow.report(&w2(ReportKind::Started), 210).unwrap();
    assert_eq!(
        flow.tasks[&tid("a")].deadline_ms,
        Some(410),
        "heartbeat comes first"
    );
    flow.report(
        &w2(ReportKind::Progress {
            progress: Some(0.5),
            message: None,
        }),
        400,
    )
    .unwrap();
    assert_eq!(
        flow.tasks[&tid("a")].deadline_ms,
        Some(600),
        "progress renews the lease"
    );
    assert!(flow.tick(599).is_empty());
    flow.tick(600);
    let t = &flow.tasks[&tid("a")];
    assert_eq!(t.state, TaskState::TimedOut, "no attempts left");
    assert_eq!(flow.state, FlowState::Failed);
}

#[test]
fn pause_stops_dispatch_and_resume_continues() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    run(&mut flow, "a");
    flow.pause().unwrap();
    assert_eq!(flow.state, FlowState::Paused);
    assert!(flow.dispatchable(10).is_empty());
    assert_eq!(
        flow.assign_attempt(&tid("b"), &agent(), &AllocationId::new("x").unwrap(), 10),
        Err(Rejection::FlowPaused)
    );
    assert!(
        flow.pause().unwrap().is_empty(),
        "pausing twice is harmless"
    );
    flow.resume(20).unwrap();
    let mut ready = due(&flow, 20);
    ready.sort();
    assert_eq!(ready, ["b", "c"]);
}

#[test]
fn work_finishing_while_paused_completes_the_flow_on_resume() {
    let mut flow = flow_of(vec![task("a", &[])]);
    let a = assign(&mut flow, "a", "w1", 0);
    flow.pause().unwrap();
    flow.report(
        &report("a", a, ReportKind::Completed { output: json!(1) }),
        5,
    )
    .unwrap();
    assert_eq!(
        flow.state,
        FlowState::Paused,
        "running tasks finish and are recorded"
    );
    flow.resume(6).unwrap();
    assert_eq!(flow.state, FlowState::Succeeded);
}

#[test]
fn cancel_stops_everything_and_releases() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    let a = assign(&mut flow, "a", "w1", 0);
    let e = flow.cancel(5).unwrap();
    assert_eq!(flow.state, FlowState::Cancelled);
    assert!(flow.tasks.values().all(|t| t.state == TaskState::Cancelled));
    assert!(e.iter().any(|e| matches!(e, Effect::Release { .. })));
    assert!(e
        .iter()
        .any(|e| matches!(e, Effect::Cancel { notice, .. } if notice.attempt == a)));
    assert_eq!(
        flow.report(&report("a", a, ReportKind::Started), 6),
        Err(Rejection::FlowFinished)
    );
    assert!(flow.cancel(7).is_err());
}

/// Messages name states as the wire does (`running`), not as Rust's Debug does.
#[test]
fn messages_name_states_by_their_wire_names() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    let a = assign(&mut flow, "a", "w1", 0);
    flow.report(&report("a", a, ReportKind::Started), 1)
        .unwrap();
    let mut c = changes();
    c.remove = vec![tid("a")];
    let problems = flow.modify(&c, 2).unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.message.starts_with("task a is running;")),
        "{problems:?}"
    );
    flow.cancel(3).unwrap();
    assert_eq!(
        flow.pause().unwrap_err().to_string(),
        "flow is cancelled, cannot pause"
    );
    let problems = flow.modify(&c, 4).unwrap_err();
    assert_eq!(problems[0].message, "flow is cancelled");
}

#[test]
fn fail_fast_cancels_running_and_skips_the_rest() {
    let mut s = spec(vec![task("a", &[]), task("b", &[]), task("c", &["a"])]);
    s.failure_mode = FailureMode::FailFast;
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), s, 0);
    let a = assign(&mut flow, "a", "w1", 0);
    assign(&mut flow, "b", "w1", 0);
    let e = flow
        .report(
            &report(
                "a",
                a,
                ReportKind::Failed {
                    error: "x".into(),
                    retryable: false,
                },
            ),
            1,
        )
        .unwrap();
    assert_eq!(flow.tasks[&tid("b")].state, TaskState::Cancelled);
    assert_eq!(flow.tasks[&tid("c")].state, TaskState::Skipped);
    assert_eq!(flow.state, FlowState::Failed);
    assert!(e.iter().any(|e| matches!(e, Effect::Cancel { .. })));
}

#[test]
fn max_parallelism_caps_what_is_dispatched() {
    let mut s = spec(vec![task("a", &[]), task("b", &[]), task("c", &[])]);
    s.max_parallelism = Some(2);
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), s, 0);
    assert_eq!(due(&flow, 0).len(), 2);
    assign(&mut flow, "a", "w1", 0);
    assign(&mut flow, "b", "w1", 0);
    assert!(flow.dispatchable(1).is_empty());
    assert_eq!(
        flow.assign_attempt(&tid("c"), &agent(), &AllocationId::new("x").unwrap(), 1),
        Err(Rejection::ParallelismLimit(2))
    );
}

#[test]
fn tick_repairs_a_blocked_task_whose_dependencies_succeeded() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    run(&mut flow, "a");
    // As if the step that readied b had been lost.
    flow.tasks.get_mut(&tid("b")).unwrap().state = TaskState::Blocked;
    flow.tick(10);
    assert_eq!(flow.tasks[&tid("b")].state, TaskState::Ready);
}

#[test]
fn status_reports_who_runs_what_and_the_critical_path() {
    let mut long = task("long", &[]);
    long.estimated_duration_ms = Some(5_000);
    let mut after = task("after", &["long"]);
    after.estimated_duration_ms = Some(2_000);
    let mut flow = flow_of(vec![long, after, task("short", &[])]);
    assign(&mut flow, "long", "w1", 0);
    let s = flow.status(3, 0);
    assert_eq!(
        s.running_by_agent[&AgentId::new("w1").unwrap()],
        [tid("long")]
    );
    assert_eq!(s.critical_path_remaining_ms, 7_000);
    assert_eq!(s.eta_ms, Some(7_000));
    assert_eq!(s.attempts, 1);
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

#[test]
fn modify_adds_a_task_after_a_finished_one_and_removes_a_pending_one() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    run(&mut flow, "a");
    let mut c = changes();
    c.add = vec![task("e", &["a"])];
    c.remove = vec![tid("d")];
    c.priorities.insert(tid("b"), 9);
    flow.modify(&c, 10).unwrap();
    assert_eq!(
        flow.tasks[&tid("e")].state,
        TaskState::Ready,
        "its dependency already succeeded"
    );
    assert!(!flow.tasks.contains_key(&tid("d")));
    assert!(flow.tasks[&tid("a")].dependents.contains(&tid("e")));
    assert_eq!(flow.tasks[&tid("b")].spec.priority, 9);
    assert_eq!(due(&flow, 10)[0], "b", "the new priority orders dispatch");
}

#[test]
fn modify_refuses_with_every_problem_and_changes_nothing() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    let a = assign(&mut flow, "a", "w1", 0);
    flow.report(&report("a", a, ReportKind::Started), 1)
        .unwrap();
    let before = flow.clone();
    let mut c = changes();
    c.remove = vec![tid("a"), tid("b")];
    c.add = vec![task("x", &["y"]), task("y", &["x"])];
    c.inputs.insert(tid("a"), json!(1));
    let problems = flow.modify(&c, 2).unwrap_err();
    let codes: Vec<&str> = problems.iter().map(|p| p.code.as_str()).collect();
    assert!(codes.contains(&"task_started"), "{codes:?}");
    assert!(
        codes.contains(&"dependency_removed"),
        "d still depends on b: {codes:?}"
    );
    assert!(codes.contains(&"cycle"), "{codes:?}");
    assert_eq!(flow, before);
}

#[test]
fn a_new_dependency_sends_a_ready_task_back_to_blocked() {
    let mut flow = flow_of(vec![task("a", &[]), task("b", &[])]);
    let mut c = changes();
    c.add_dependencies = vec![common::msg::Dependency {
        task_id: tid("b"),
        depends_on: tid("a"),
    }];
    flow.modify(&c, 1).unwrap();
    assert_eq!(flow.tasks[&tid("b")].state, TaskState::Blocked);
    assert_eq!(flow.dispatchable(1), [tid("a")]);
}

#[test]
fn rerun_resets_a_task_and_everything_downstream() {
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), diamond(), 0);
    for t in ["a", "b", "c", "d"] {
        run(&mut flow, t);
    }
    assert_eq!(flow.state, FlowState::Succeeded);
    flow.rerun(&tid("b"), 10).unwrap();
    assert_eq!(flow.state, FlowState::Running);
    assert_eq!(flow.tasks[&tid("b")].state, TaskState::Ready);
    assert_eq!(flow.tasks[&tid("d")].state, TaskState::Blocked);
    assert_eq!(
        flow.tasks[&tid("a")].state,
        TaskState::Succeeded,
        "upstream is kept"
    );
    assert_eq!(
        flow.tasks[&tid("c")].state,
        TaskState::Succeeded,
        "siblings are kept"
    );
    assert_eq!(due(&flow, 10), ["b"]);
    let next = assign(&mut flow, "b", "w1", 11);
    assert_eq!(
        next, 2,
        "attempts keep counting, so old reports stay fenced"
    );
    assert_eq!(flow.tasks[&tid("b")].history.len(), 1);
    assert!(
        flow.rerun(&tid("b"), 12).is_err(),
        "only a finished task can be re-run"
    );
}

#[test]
fn explain_gives_every_reason() {
    let mut t = retrying("r", 3);
    t.timeouts.start_to_close_ms = Some(1_000);
    let mut flow = flow_of(vec![t, task("dep", &["r"]), task("free", &[])]);
    let r = assign(&mut flow, "r", "w1", 0);
    flow.report(
        &report(
            "r",
            r,
            ReportKind::Failed {
                error: "flaky".into(),
                retryable: true,
            },
        ),
        10,
    )
    .unwrap();
    let (tasks, placement) = flow.explain(None, 20);
    let reasons = |id: &str| {
        tasks
            .iter()
            .find(|t| t.task_id == tid(id))
            .unwrap()
            .reasons
            .join(" | ")
    };
    assert!(
        reasons("r").contains("backing off for 90 ms more after failed: flaky (attempt 2 of 3)"),
        "{}",
        reasons("r")
    );
    assert!(
        reasons("dep").contains("waiting on dependency r (ready)"),
        "{}",
        reasons("dep")
    );
    assert_eq!(
        placement,
        [tid("free")],
        "only the allocator can say more about free"
    );
    flow.pause().unwrap();
    let (tasks, placement) = flow.explain(Some(&tid("free")), 20);
    assert_eq!(tasks[0].reasons, ["the flow is paused"]);
    assert!(placement.is_empty());
}

#[test]
fn an_attempt_with_a_concurrency_key_gives_its_slot_back_when_it_ends() {
    let mut a = task("a", &[]);
    a.concurrency = Some(common::msg::ConcurrencyLimit {
        key: "api".into(),
        limit: 1,
    });
    let (mut flow, _) = Flow::new(FlowId::new("f").unwrap(), spec(vec![a]), 0);
    let e = run(&mut flow, "a");
    assert!(e.contains(&Effect::FreeSlot {
        key: "api".into(),
        holder: "f.a.1".into()
    }));
    assert_eq!(
        parse_slot_holder("f.a.1"),
        Some((FlowId::new("f").unwrap(), tid("a"), 1))
    );
    assert_eq!(parse_slot_holder("f.a"), None);
    assert_eq!(parse_slot_holder("f.a.1.2"), None);
}

#[test]
fn a_timeout_names_the_timeout_that_fired() {
    let reason = |flow: &Flow| {
        flow.tasks[&tid("a")]
            .history
            .last()
            .map(|h| h.outcome.clone())
            .unwrap_or_default()
    };
    let mut t = retrying("a", 5);
    t.timeouts.schedule_to_start_ms = Some(100);
    t.timeouts.start_to_close_ms = Some(1_000);
    t.timeouts.heartbeat_ms = Some(400);
    let mut flow = flow_of(vec![t]);
    assign(&mut flow, "a", "w1", 0);
    flow.tick(100);
    assert!(
        reason(&flow).contains("schedule_to_start"),
        "{}",
        reason(&flow)
    );

    // Regular progress, but the whole attempt runs too long.
    let n = assign(&mut flow, "a", "w1", 10_000);
    flow.report(&report("a", n, ReportKind::Started), 10_000)
        .unwrap();
    for at in [10_300, 10_600, 10_900] {
        flow.report(
            &report(
                "a",
                n,
                ReportKind::Progress {
                    progress: Some(0.5),
                    message: None,
                },
            ),
            at,
        )
        .unwrap();
    }
    flow.tick(11_000);
    assert!(
        reason(&flow).contains("start_to_close"),
        "{}",
        reason(&flow)
    );

    // Started, then silence.
    let n = assign(&mut flow, "a", "w1", 30_000);
    flow.report(&report("a", n, ReportKind::Started), 30_000)
        .unwrap();
    flow.tick(30_400);
    assert!(reason(&flow).contains("heartbeat"), "{}", reason(&flow));
}

#[test]
fn progress_is_kept_until_the_next_attempt_and_checked() {
    let mut flow = flow_of(vec![retrying("a", 2)]);
    let n = assign(&mut flow, "a", "w1", 0);
    let progress = |p: f64, m: &str| {
        report(
            "a",
            n,
            ReportKind::Progress {
                progress: Some(p),
                message: Some(m.into()),
            },
        )
    };
    flow.report(&progress(0.25, "a quarter"), 10).unwrap();
    let status = flow.status(0, 20);
    assert_eq!(status.tasks[0].progress, Some(0.25));
    assert_eq!(
        status.tasks[0].progress_message.as_deref(),
        Some("a quarter")
    );
    let (explained, _) = flow.explain(Some(&tid("a")), 20);
    assert!(
        explained[0].reasons[0].contains("25% done (a quarter)"),
        "{:?}",
        explained[0].reasons
    );

    for bad in [7.5, -0.1, f64::NAN] {
        let e = flow.report(&progress(bad, "x"), 30).unwrap_err();
        assert_eq!(
            e.verdict(),
            (
                common::ErrorCode::BadRequest,
                RejectReason::ProgressOutOfRange
            )
        );
    }
    let long = "x".repeat(MAX_PROGRESS_MESSAGE + 1);
    assert!(flow.report(&progress(0.5, &long), 30).is_err());
    assert_eq!(
        flow.tasks[&tid("a")].progress,
        Some(0.25),
        "refused: unchanged"
    );

    flow.report(
        &report(
            "a",
            n,
            ReportKind::Failed {
                error: "x".into(),
                retryable: true,
            },
        ),
        40,
    )
    .unwrap();
    assign(&mut flow, "a", "w1", 5_000);
    assert_eq!(
        flow.tasks[&tid("a")].progress,
        None,
        "a new attempt starts at none"
    );
}

#[test]
fn refused_reports_map_to_the_codes_agents_hear() {
    let mut flow = flow_of(vec![retrying("a", 2)]);
    let n = assign(&mut flow, "a", "w1", 0);
    let stale = flow
        .report(&report("a", n + 1, ReportKind::Started), 1)
        .unwrap_err();
    assert_eq!(
        stale.verdict(),
        (common::ErrorCode::Fenced, RejectReason::StaleAttempt)
    );
    let unknown = flow
        .report(&report("zz", n, ReportKind::Started), 1)
        .unwrap_err();
    assert_eq!(
        unknown.verdict(),
        (common::ErrorCode::NotFound, RejectReason::UnknownTask)
    );
    let other = AgentReport {
        agent_id: AgentId::new("w9").unwrap(),
        ..report("a", n, ReportKind::Started)
    };
    assert_eq!(
        flow.report(&other, 1).unwrap_err().verdict(),
        (common::ErrorCode::Fenced, RejectReason::WrongAgent)
    );
}

#[test]
fn the_lease_tells_the_agent_every_timeout_and_deadline() {
    let mut t = retrying("a", 1);
    t.timeouts.start_to_close_ms = Some(2_000);
    t.timeouts.heartbeat_ms = Some(500);
    let flow = flow_of(vec![t]);
    let lease = flow.tasks[&tid("a")].lease(1_000, 200);
    assert_eq!(lease.schedule_to_start_ms, DEFAULT_SCHEDULE_TO_START_MS);
    assert_eq!(lease.start_by_ms, 1_000 + DEFAULT_SCHEDULE_TO_START_MS);
    assert_eq!(lease.start_to_close_ms, Some(2_000));
    assert_eq!(lease.heartbeat_ms, Some(500));
    assert_eq!(
        lease.deadline_ms,
        Some(1_000 + DEFAULT_SCHEDULE_TO_START_MS + 2_000)
    );
    assert_eq!(lease.tick_ms, 200);
}

#[test]
fn a_rerun_renews_the_retry_budget_and_says_so() {
    let mut flow = flow_of(vec![retrying("a", 1), task("b", &["a"])]);
    let first = assign(&mut flow, "a", "w1", 0);
    flow.report(
        &report(
            "a",
            first,
            ReportKind::Failed {
                error: "x".into(),
                retryable: true,
            },
        ),
        10,
    )
    .unwrap();
    assert_eq!(flow.state, FlowState::Failed);
    let e = flow.rerun(&tid("a"), 20).unwrap();
    assert!(
        e.iter().any(|e| matches!(
            e,
            Effect::Event(EventKind::FlowRerun {
                reset: 2,
                was_finished: true,
                ..
            })
        )),
        "{e:?}"
    );
    assert!(
        e.iter().all(|e| !matches!(e, Effect::Event(ev) if ev.subject() == common::subject::event::TASK_SKIPPED)),
        "a reset is not a skip: {e:?}"
    );
    assert!(e.iter().any(
        |e| matches!(e, Effect::Event(ev) if ev.subject() == common::subject::event::TASK_RESET)
    ));
    // One attempt allowed, and the re-run gets its own: a retryable failure
    // now fails for good at attempt 2, but attempt 2 did run.
    let second = assign(&mut flow, "a", "w1", 30);
    assert_eq!(second, first + 1);
    flow.report(
        &report(
            "a",
            second,
            ReportKind::Failed {
                error: "y".into(),
                retryable: true,
            },
        ),
        40,
    )
    .unwrap();
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Failed);
}

#[test]
fn a_rerun_of_a_task_at_max_attempts_gets_all_its_attempts_again() {
    let mut flow = flow_of(vec![retrying("a", 2)]);
    for now in [0, 1_000] {
        let n = assign(&mut flow, "a", "w1", now);
        flow.report(
            &report(
                "a",
                n,
                ReportKind::Failed {
                    error: "x".into(),
                    retryable: true,
                },
            ),
            now + 10,
        )
        .unwrap();
    }
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Failed);
    flow.rerun(&tid("a"), 2_000).unwrap();
    let n = assign(&mut flow, "a", "w1", 2_000);
    flow.report(
        &report(
            "a",
            n,
            ReportKind::Failed {
                error: "x".into(),
                retryable: true,
            },
        ),
        2_010,
    )
    .unwrap();
    assert_eq!(
        flow.tasks[&tid("a")].state,
        TaskState::Ready,
        "the first of two renewed attempts failed: retried"
    );
}

mod agents;
mod wait;
