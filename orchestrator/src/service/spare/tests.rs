//! The pure parts of handing on: which allocations are kept, taken and
//! given back, and when one taken is bound to its new holder.

use super::*;

#[test]
fn a_key_leaves_out_the_flow_and_task_of_the_owner() {
    let r = Requirements::default();
    assert_eq!(spare_key("f1/t1", &r, 0), spare_key("f2/t9", &r, 0));
    assert_eq!(spare_key("x/f1/t1", &r, 0), spare_key("x/f2/t2", &r, 0));
    assert_ne!(spare_key("x/f1/t1", &r, 0), spare_key("y/f1/t1", &r, 0));
    assert_ne!(spare_key("f1/t1", &r, 0), spare_key("f1/t1", &r, 1));
    let mut more = Requirements::default();
    more.resources.insert("gpu".into(), 1.0);
    assert_ne!(spare_key("f1/t1", &r, 0), spare_key("f1/t1", &more, 0));
}

#[test]
fn the_last_kept_in_its_time_is_taken_first() {
    let spares = Spares::default();
    let kept = |a: &str, until_ms| Kept {
        agent: AgentId::new(a).unwrap(),
        allocation: AllocationId::new(format!("al-{a}")).unwrap(),
        until_ms,
    };
    spares.keep("k".into(), kept("w1", 100), 0);
    spares.keep("k".into(), kept("w2", 50), 0);
    let taken = spares.take("k", 60).map(|(a, _)| a.to_string());
    assert_eq!(taken.as_deref(), Some("w1"));
    assert!(spares.take("k", 60).is_none(), "w2 is out of its time");
    assert!(spares.remove("k", &AllocationId::new("al-w2").unwrap(), 60));
    assert!(spares.drain().is_empty());
}

#[test]
fn an_earlier_keeps_timer_leaves_the_allocation_kept_again_since() {
    let spares = Spares::default();
    let id = AllocationId::new("al-w1").unwrap();
    let kept = |until_ms| Kept {
        agent: AgentId::new("w1").unwrap(),
        allocation: id.clone(),
        until_ms,
    };
    // Kept at 0 until 50, taken, its next holder ended at 40: kept until 90.
    spares.keep("k".into(), kept(50), 0);
    assert!(spares.take("k", 10).is_some());
    spares.keep("k".into(), kept(90), 40);
    // The first keep's timer, at 50, gives nothing back.
    assert!(!spares.remove("k", &id, 50));
    assert!(spares.take("k", 60).is_some(), "still kept");
    spares.keep("k".into(), kept(120), 70);
    // The last keep's own timer does.
    assert!(spares.remove("k", &id, 120));
    assert!(spares.take("k", 120).is_none());
}

#[test]
fn a_refused_kind_takes_out_what_is_kept_for_the_others_only() {
    let spares = Spares::default();
    let kept = |a: &str| Kept {
        agent: AgentId::new(a).unwrap(),
        allocation: AllocationId::new(format!("al-{a}")).unwrap(),
        until_ms: u64::MAX,
    };
    spares.keep("mine".into(), kept("w1"), 0);
    spares.keep("other".into(), kept("w2"), 0);
    spares.keep("third".into(), kept("w3"), 0);
    let mut taken: Vec<String> = spares
        .take_kept_but(Some("mine"))
        .into_iter()
        .map(|(a, _)| a.to_string())
        .collect();
    taken.sort();
    assert_eq!(taken, ["w2", "w3"]);
    assert!(spares.take("other", 1).is_none());
    assert!(spares.take("mine", 1).is_some(), "its own kind's stays");
}

fn bind_for(id: &str, task: &str) -> AllocateRequest {
    AllocateRequest {
        owner: format!("f/{task}"),
        requirements: Requirements::default(),
        priority: 0,
        allocation_id: Some(AllocationId::new(id).unwrap()),
        deadline_ms: None,
        task: Some(common::msg::TaskRef {
            flow_id: FlowId::new("f").unwrap(),
            task_id: TaskId::new(task).unwrap(),
        }),
        ttl_ms: None,
    }
}

#[test]
fn a_short_holder_is_never_bound_and_a_long_one_is() {
    let spares = Spares::default();
    let id = AllocationId::new("al-1").unwrap();
    let kept = || Kept {
        agent: AgentId::new("w1").unwrap(),
        allocation: id.clone(),
        until_ms: u64::MAX,
    };
    // t0 succeeded at 1000; t1 takes it and ends before its binding is due.
    spares.keep("k".into(), kept(), 1_000);
    assert!(spares.take("k", 1_001).is_some());
    let Bind::After(first) = spares.taken(bind_for("al-1", "t1"), 1_001) else {
        panic!("bound at once");
    };
    spares.keep("k".into(), kept(), 1_005);
    assert!(
        spares.due(&id, first).is_none(),
        "t1 ended: nothing to bind"
    );
    // t2 takes it and is still running when its binding is due.
    assert!(spares.take("k", 1_006).is_some());
    let Bind::After(second) = spares.taken(bind_for("al-1", "t2"), 1_006) else {
        panic!("bound at once");
    };
    let (bind, _) = spares.due(&id, second).expect("t2 still holds it");
    assert_eq!(
        bind.task.map(|t| t.task_id.to_string()).as_deref(),
        Some("t2")
    );
    // t2 ends; t3 takes it long after: bound at once, as t2 vouches only so long.
    spares.keep("k".into(), kept(), 2_000);
    assert!(spares.take("k", 2_000 + BIND_FLOOR_MS).is_some());
    let now = spares.taken(bind_for("al-1", "t3"), 2_000 + BIND_FLOOR_MS);
    assert!(matches!(now, Bind::Now(..)));
    spares.forget(&id);
    assert!(matches!(
        spares.taken(bind_for("al-1", "t4"), 3_000),
        Bind::Never
    ));
}
