//! Changes to a running flow (modify, re-run), explanations, concurrency
//! slots, timeouts, progress, and what agents hear.

use super::*;

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
    assert_eq!(
        due(&mut flow, 10)[0],
        "b",
        "the new priority orders dispatch"
    );
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
    assert_eq!(due(&mut flow, 10), ["b"]);
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
