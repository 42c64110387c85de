//! A task's life after its first attempt: retries and back-off, deadlines,
//! pause, resume, cancel, fail-fast and the parallelism cap.

use super::*;

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
    let mut ready = due(&mut flow, 20);
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
    assert_eq!(due(&mut flow, 0).len(), 2);
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
