//! Wait tasks: they wait once their dependencies are done, succeed with a
//! matching event stored in time, and time out for good without one.

use super::*;

fn approval(id: &str, deps: &[&str], timeout_ms: Option<u64>) -> TaskSpec {
    let mut t = TaskSpec::new(tid(id));
    t.depends_on = deps.iter().map(|d| tid(d)).collect();
    t.wait_for = Some(common::msg::WaitFor {
        event_type: "approval".into(),
        agent_id: None,
        field: Some(common::msg::FieldMatch {
            path: "/approved".into(),
            equals: json!(true),
        }),
        timeout_ms,
    });
    t
}

fn event_of<'a>(
    kind: &'a str,
    agent: &'a AgentId,
    data: &'a Value,
    whole: &'a Value,
) -> AgentEventRef<'a> {
    AgentEventRef {
        event_type: kind,
        agent_id: agent,
        data,
        whole,
    }
}

#[test]
fn a_wait_task_waits_once_its_dependencies_are_done_and_succeeds_with_its_event() {
    let (mut flow, _) = Flow::new(
        FlowId::new("f").unwrap(),
        spec(vec![
            task("a", &[]),
            approval("w", &["a"], Some(1_000)),
            task("b", &["w"]),
        ]),
        0,
    );
    assert_eq!(flow.tasks.get(&tid("w")).unwrap().state, TaskState::Blocked);
    run(&mut flow, "a");
    let w = flow.tasks.get(&tid("w")).unwrap();
    assert_eq!(w.state, TaskState::Waiting);
    assert_eq!(w.deadline_ms, Some(1_003));
    assert!(
        due(&mut flow, 10).iter().all(|t| t != "w"),
        "a wait task is never placed"
    );
    let agent = agent();
    let (no, yes) = (json!({"approved": false}), json!({"approved": true}));
    let whole = json!({"event_id": "e1", "data": {"approved": true}});
    // Wrong value, wrong type, stored before the wait began: no match.
    assert_eq!(
        flow.event_arrived(
            &tid("w"),
            &event_of("approval", &agent, &no, &whole),
            20,
            20
        ),
        Err(Rejection::NoMatch)
    );
    assert_eq!(
        flow.event_arrived(&tid("w"), &event_of("other", &agent, &yes, &whole), 20, 20),
        Err(Rejection::NoMatch)
    );
    assert_eq!(
        flow.event_arrived(
            &tid("w"),
            &event_of("approval", &agent, &yes, &whole),
            2,
            20
        ),
        Err(Rejection::NoMatch)
    );
    flow.event_arrived(
        &tid("w"),
        &event_of("approval", &agent, &yes, &whole),
        30,
        30,
    )
    .unwrap();
    let w = flow.tasks.get(&tid("w")).unwrap();
    assert_eq!(w.state, TaskState::Succeeded);
    assert_eq!(w.output, whole);
    assert_eq!(due(&mut flow, 30), vec!["b"]);
    // A second delivery is refused, not applied twice.
    assert_eq!(
        flow.event_arrived(
            &tid("w"),
            &event_of("approval", &agent, &yes, &whole),
            40,
            40
        ),
        Err(Rejection::NotWaiting(TaskState::Succeeded))
    );
}

#[test]
fn a_wait_task_times_out_without_retry_and_skips_its_dependants() {
    let (mut flow, _) = Flow::new(
        FlowId::new("f").unwrap(),
        spec(vec![approval("w", &[], Some(100)), task("b", &["w"])]),
        0,
    );
    assert_eq!(flow.tasks.get(&tid("w")).unwrap().state, TaskState::Waiting);
    assert!(
        flow.tick(100).is_empty(),
        "the deadline itself still counts"
    );
    flow.tick(101);
    let w = flow.tasks.get(&tid("w")).unwrap();
    assert_eq!(w.state, TaskState::TimedOut);
    assert!(
        w.error.as_deref().unwrap().starts_with("wait_timed_out:"),
        "{:?}",
        w.error
    );
    assert_eq!(flow.tasks.get(&tid("b")).unwrap().state, TaskState::Skipped);
    assert_eq!(flow.state, FlowState::Failed);
}

#[test]
fn a_bad_wait_for_is_a_validation_problem() {
    let mut bad = approval("w", &[], Some(0));
    let mut pointer = approval("p", &[], None);
    pointer
        .wait_for
        .as_mut()
        .unwrap()
        .field
        .as_mut()
        .unwrap()
        .path = "approved".into();
    let mut typed = approval("t", &[], None);
    typed.wait_for.as_mut().unwrap().event_type = "Bad.Type".into();
    let mut retried = approval("r", &[], None);
    retried.retry.max_attempts = 3;
    bad.kind = "x".into();
    let problems = validate(&spec(vec![bad, pointer, typed, retried])).unwrap_err();
    let codes: Vec<(&str, &str)> = problems
        .iter()
        .map(|p| (p.code.as_str(), p.task_id.as_ref().unwrap().as_str()))
        .collect();
    assert_eq!(
        codes,
        vec![
            ("invalid_wait_for", "w"),
            ("invalid_wait_for", "p"),
            ("invalid_wait_for", "t"),
            ("invalid_wait_for", "r")
        ]
    );
}
