//! Attempts taken away: a lost, left or preempted attempt is cancelled with
//! its code and retried (a left agent's without using the retry budget).

use super::*;

#[test]
fn a_lost_agent_fails_its_attempts() {
    let mut flow = flow_of(vec![retrying("a", 2), retrying("b", 1)]);
    assign(&mut flow, "a", "w1", 0);
    assign(&mut flow, "b", "w2", 0);
    let e = flow.agent_lost(&AgentId::new("w1").unwrap(), 10);
    assert!(e.iter().any(|e| matches!(e, Effect::Release { .. })));
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Ready);
    assert_eq!(
        flow.tasks[&tid("b")].state,
        TaskState::Assigned,
        "other agents are not touched"
    );
}

#[test]
fn a_preempted_attempt_is_retried_and_only_its_own_allocation_counts() {
    let mut flow = flow_of(vec![retrying("a", 2)]);
    assign(&mut flow, "a", "w1", 0);
    let current = flow.tasks[&tid("a")].allocation.clone().unwrap();
    assert!(flow
        .preempted(&tid("a"), &AllocationId::new("other").unwrap(), "x", 1)
        .is_empty());
    let e = flow.preempted(&tid("a"), &current, "capacity_reduced", 1);
    assert!(e.iter().any(|e| matches!(e, Effect::Cancel { .. })));
    let t = &flow.tasks[&tid("a")];
    assert_eq!(t.state, TaskState::Ready);
    assert!(t.error.as_deref().unwrap().contains("capacity_reduced"));
}

#[test]
fn an_attempt_whose_allocation_was_not_handed_on_is_placed_again_uncounted() {
    // One attempt and no retries: a preemption would fail it for good. A
    // kept allocation the allocator would not hand on is no failure of the
    // task's, and the task is placed again whatever its policy.
    let mut flow = flow_of(vec![retrying("a", 1)]);
    let first = assign(&mut flow, "a", "w1", 0);
    let kept = flow.tasks[&tid("a")].allocation.clone().unwrap();
    let other = AllocationId::new("other").unwrap();
    assert!(flow.not_handed_on(&tid("a"), &other, "x", 1).is_empty());
    let e = flow.not_handed_on(&tid("a"), &kept, "allocation gone", 1);
    assert_eq!(cancels(&e), vec![(CancelCode::Preempted, first)]);
    let t = &flow.tasks[&tid("a")];
    assert_eq!(t.state, TaskState::Ready);
    assert_eq!((t.allocation.as_ref(), t.agent.as_ref()), (None, None));
    assert_eq!(t.not_before_ms, 0, "placed again at once");
    assert_eq!(t.error, None, "not a failure");
    let second = assign(&mut flow, "a", "w1", 2);
    assert_eq!(second, first + 1);
    // Its one counted attempt is the second: failing it fails the task.
    let lost = flow.preempted(
        &tid("a"),
        &flow.tasks[&tid("a")].allocation.clone().unwrap(),
        "capacity_reduced",
        3,
    );
    assert_eq!(cancels(&lost), vec![(CancelCode::Preempted, second)]);
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Failed);
}

/// The cancel notices among effects, as (code, attempt).
fn cancels(effects: &[Effect]) -> Vec<(CancelCode, u32)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Cancel { notice, .. } => Some((notice.code, notice.attempt)),
            _ => None,
        })
        .collect()
}

#[test]
fn every_taken_away_attempt_is_cancelled_with_its_code() {
    let mut flow = flow_of(vec![retrying("a", 3), retrying("b", 3)]);
    let a1 = assign(&mut flow, "a", "w1", 0);
    assign(&mut flow, "b", "w2", 0);
    assert_eq!(
        cancels(&flow.agent_lost(&agent(), 10)),
        vec![(CancelCode::AgentLost, a1)],
        "a lost agent may still be working: it is told"
    );
    let a2 = assign(&mut flow, "a", "w1", 5_000);
    assert_eq!(
        cancels(&flow.agent_gone(&agent(), true, 5_010)),
        vec![(CancelCode::AgentLeft, a2)]
    );
    let b = flow.tasks[&tid("b")].attempt;
    let alloc = flow.tasks[&tid("b")].allocation.clone().unwrap();
    assert_eq!(
        cancels(&flow.preempted(&tid("b"), &alloc, "capacity_reduced", 5_020)),
        vec![(CancelCode::Preempted, b)]
    );
    let a3 = assign(&mut flow, "a", "w1", 20_000);
    assert_eq!(
        cancels(&flow.cancel(20_010).unwrap()),
        vec![(CancelCode::FlowCancelled, a3)]
    );
}

#[test]
fn an_attempt_handed_back_on_leaving_runs_again_without_using_the_budget() {
    let mut flow = flow_of(vec![retrying("a", 1)]);
    let first = assign(&mut flow, "a", "w1", 0);
    let e = flow.agent_gone(&agent(), true, 10);
    assert_eq!(cancels(&e), vec![(CancelCode::AgentLeft, first)]);
    assert!(e.iter().any(|e| matches!(e, Effect::Release { .. })));
    let t = &flow.tasks[&tid("a")];
    assert_eq!((t.state, t.not_before_ms), (TaskState::Ready, 0), "at once");
    let second = assign(&mut flow, "a", "w2", 11);
    assert_eq!(
        second,
        first + 1,
        "a new attempt number: the old one is fenced"
    );
    // A real failure of the only counted attempt still ends the task.
    let w2 = AgentReport {
        agent_id: AgentId::new("w2").unwrap(),
        ..report(
            "a",
            second,
            ReportKind::Failed {
                error: "x".into(),
                retryable: true,
            },
        )
    };
    flow.report(&w2, 20).unwrap();
    assert_eq!(flow.tasks[&tid("a")].state, TaskState::Failed);
}
