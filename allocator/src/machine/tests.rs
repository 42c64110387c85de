//! Placement never picks an agent the requirements do not fit on, prefers the
//! tightest fit (or the loosest when spreading), honours anti-affinity and
//! reservation windows, preempts lowest priority first, and says what is short
//! when nothing fits.

use std::collections::BTreeMap;

use common::msg::{AgentStatus, Allocation, Policy, RegisterAgent, Requirements, Reservation};
use common::{AgentId, AllocationId, ReservationId};

use super::*;

pub(super) fn agent(id: &str, cpu: f64, caps: &[&str]) -> AgentRecord {
    AgentRecord::register(
        &RegisterAgent {
            agent_id: AgentId::new(id).unwrap(),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            labels: BTreeMap::new(),
            capacity: [("cpu".to_string(), cpu)].into(),
            heartbeat_interval_ms: 1000,
        },
        None,
        0,
    )
}

pub(super) fn cpu(n: f64) -> Requirements {
    Requirements {
        resources: [("cpu".to_string(), n)].into(),
        ..Default::default()
    }
}

fn alloc(a: &AgentRecord, id: &str, owner: &str, n: f64, priority: i32, at: u64) -> Allocation {
    let mut x = new_allocation(
        AllocationId::new(id).unwrap(),
        &a.agent_id,
        owner,
        &cpu(n),
        priority,
        Draw::General,
        at,
        None,
    );
    x.priority = priority;
    x
}

fn book(a: &mut AgentRecord, id: &str, n: f64) {
    let x = alloc(a, id, "o", n, 0, 0);
    a.allocations.insert(x.allocation_id.clone(), x);
}

fn reservation(a: &mut AgentRecord, id: &str, owner: &str, n: f64, start: u64, end: u64) {
    let r = Reservation {
        reservation_id: ReservationId::new(id).unwrap(),
        agent_id: a.agent_id.clone(),
        owner: owner.into(),
        resources: [("cpu".to_string(), n)].into(),
        start_ms: start,
        end_ms: end,
        created_at_ms: 0,
    };
    a.reservations.insert(r.reservation_id.clone(), r);
}

fn placed<'a>(agents: &'a [AgentRecord], req: &Requirements) -> &'a str {
    place(agents, req, None, 0).unwrap().agent.agent_id.as_str()
}

#[test]
fn best_fit_picks_the_tightest_agent_and_spread_the_loosest() {
    let agents = [agent("big", 8.0, &[]), agent("small", 2.0, &[])];
    assert_eq!(placed(&agents, &cpu(2.0)), "small");
    assert_eq!(placed(&agents, &cpu(3.0)), "big");
    let spread = Requirements {
        policy: Policy::Spread,
        ..cpu(1.0)
    };
    assert_eq!(placed(&agents, &spread), "big");
}

#[test]
fn allocations_use_up_capacity() {
    let mut a = agent("a", 2.0, &[]);
    book(&mut a, "x", 1.5);
    assert_eq!(a.free("cpu", 0), 0.5);
    assert!(a.fit(&cpu(0.5), None, 0).is_ok());
    assert_eq!(
        a.fit(&cpu(1.0), None, 0),
        Err(Unfit::Short {
            resource: "cpu".into(),
            needed: 1.0,
            free: 0.5
        })
    );
}

#[test]
fn capabilities_and_labels_filter() {
    let mut gpu = agent("gpu", 1.0, &["cuda"]);
    gpu.labels.insert("zone".into(), "eu".into());
    let plain = agent("plain", 4.0, &[]);
    let agents = [gpu, plain];
    let mut req = cpu(1.0);
    req.capabilities.push("cuda".into());
    assert_eq!(placed(&agents, &req), "gpu");
    req.labels.insert("zone".into(), "us".into());
    let err = place(&agents, &req, None, 0).unwrap_err();
    assert_eq!(err.best_candidate, None);
    assert!(
        err.message.contains("1 has label zone=eu, not us"),
        "{}",
        err.message
    );
}

#[test]
fn anti_affinity_keeps_a_group_apart() {
    let mut a = agent("a", 4.0, &[]);
    let b = agent("b", 8.0, &[]);
    let req = Requirements {
        anti_affinity: Some("db".into()),
        ..cpu(1.0)
    };
    let first = place([&a, &b], &req, None, 0).unwrap();
    assert_eq!(first.agent.agent_id.as_str(), "a");
    let x = new_allocation(
        AllocationId::new("x").unwrap(),
        &a.agent_id,
        "o",
        &req,
        0,
        Draw::General,
        0,
        None,
    );
    a.allocations.insert(x.allocation_id.clone(), x);
    assert_eq!(
        place([&a, &b], &req, None, 0)
            .unwrap()
            .agent
            .agent_id
            .as_str(),
        "b"
    );
    assert!(matches!(
        a.fit(&req, None, 0),
        Err(Unfit::AntiAffinity { .. })
    ));
}

#[test]
fn no_fit_names_the_short_resource_and_best_candidate() {
    let mut a = agent("a", 4.0, &[]);
    book(&mut a, "x", 3.0);
    let b = agent("b", 2.0, &[]);
    let err = place(&[a, b], &cpu(3.5), None, 0).unwrap_err();
    assert_eq!(err.best_candidate.as_ref().unwrap().as_str(), "b");
    assert!(matches!(err.short, Some(Unfit::Short { ref resource, .. }) if resource == "cpu"));
    let none = place(&[], &cpu(1.0), None, 0).unwrap_err();
    assert_eq!(none.message, "no agent is registered");
}

#[test]
fn no_fit_gives_each_reason_and_the_closest_as_short() {
    let req = Requirements {
        anti_affinity: Some("g".into()),
        capabilities: vec!["db".into()],
        ..cpu(1.0)
    };
    let mut held = agent("held", 4.0, &["db"]);
    let x = new_allocation(
        AllocationId::new("x").unwrap(),
        &held.agent_id,
        "o",
        &req,
        0,
        Draw::General,
        0,
        None,
    );
    held.allocations.insert(x.allocation_id.clone(), x);
    let mut draining = agent("draining", 4.0, &["db"]);
    draining.status = AgentStatus::Draining;
    let plain = agent("plain", 4.0, &[]);

    let err = place([&plain, &draining, &held], &req, None, 0).unwrap_err();
    assert_eq!(
        err.message,
        "no agent takes these requirements: 1 lacks capability db; 1 is draining; \
         1 already holds anti-affinity group g"
    );
    assert_eq!(err.short, Some(Unfit::AntiAffinity { group: "g".into() }));

    // Draining is said in the wire name, and is not a missing capability.
    let err = place([&plain, &draining], &req, None, 0).unwrap_err();
    assert_eq!(
        err.short,
        Some(Unfit::NotAccepting {
            status: AgentStatus::Draining
        })
    );
    assert!(err.message.ends_with("1 is draining"), "{}", err.message);
}

#[test]
fn a_resource_no_agent_has_is_named_not_short() {
    let req = Requirements {
        resources: [("gpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    let err = place(&[agent("a", 4.0, &[])], &req, None, 0).unwrap_err();
    assert_eq!(err.message, "no agent has resource gpu (needs 1)");
}

#[test]
fn draining_and_lost_agents_take_nothing_new() {
    let mut a = agent("a", 4.0, &[]);
    a.status = AgentStatus::Draining;
    let err = place([&a], &cpu(1.0), None, 0).unwrap_err();
    assert_eq!(
        err.short,
        Some(Unfit::NotAccepting {
            status: AgentStatus::Draining
        })
    );
}

/// Nothing held is 0, not -0 (what an empty `f64` sum gives), in every figure.
#[test]
fn idle_figures_are_positive_zero() {
    let a = agent("a", 4.0, &[]);
    let s = capacity_status(&[a], None, None, 0);
    let json = serde_json::to_string(&s).unwrap();
    assert!(!json.contains("-0.0"), "{json}");
    let usage = &s.agents[&AgentId::new("a").unwrap()]["cpu"];
    assert!(usage.allocated.is_sign_positive(), "{usage:?}");
    assert!(usage.reserved.is_sign_positive(), "{usage:?}");
}

#[test]
fn capacity_status_sums_the_pool_per_label() {
    let mut a = agent("a", 4.0, &[]);
    a.labels.insert("zone".into(), "eu".into());
    book(&mut a, "x", 1.0);
    reservation(&mut a, "r", "team", 1.0, 10, 20);
    let b = agent("b", 2.0, &[]);
    let s = capacity_status(&[a, b], Some(&cpu(3.0)), None, 0);
    assert_eq!(s.pool["cpu"].capacity, 6.0);
    assert_eq!(s.pool["cpu"].allocated, 1.0);
    assert_eq!(s.pool["cpu"].reserved, 1.0);
    assert_eq!(s.pool["cpu"].free, 4.0);
    assert_eq!(s.labels["zone=eu"]["cpu"].capacity, 4.0);
    assert_eq!(s.fits, Some(false));
    assert_eq!(s.no_fit.unwrap().best_candidate.unwrap().as_str(), "a");
}

#[test]
fn reservations_hold_capacity_for_their_owner_only_within_the_window() {
    let mut a = agent("a", 4.0, &[]);
    reservation(&mut a, "r", "team", 3.0, 100, 200);
    // Before: nobody draws from it, and open-ended allocations leave room for it.
    assert_eq!(a.free("cpu", 50), 1.0);
    assert!(a.fit(&cpu(2.0), Some("team"), 50).is_err());
    // During: the owner (and owners below it) draw from it; others see it used.
    assert_eq!(
        a.fit(&cpu(2.0), Some("team/task-1"), 150),
        Ok(Draw::Reservation(ReservationId::new("r").unwrap()))
    );
    assert!(a.fit(&cpu(2.0), Some("teamx"), 150).is_err());
    // After: it frees itself.
    assert_eq!(a.free("cpu", 200), 4.0);
    let expired = a.expire(200, u64::MAX);
    assert_eq!(expired.reservations.len(), 1);
    assert!(a.reservations.is_empty());
}

#[test]
fn overlapping_reservations_that_cannot_all_be_honoured_are_refused() {
    let mut a = agent("a", 4.0, &[]);
    reservation(&mut a, "r1", "x", 3.0, 100, 200);
    assert!(a.fit_reservation(&cpu(2.0), 150, 250, 0).is_err());
    // Back to back is fine: the windows do not overlap.
    assert!(a.fit_reservation(&cpu(4.0), 200, 300, 0).is_ok());
    assert!(a.fit_reservation(&cpu(1.0), 150, 250, 0).is_ok());
}

#[test]
fn shrinking_preempts_lowest_priority_then_newest_first() {
    let mut a = agent("a", 4.0, &[]);
    for (id, prio, at) in [
        ("hi", 5, 1),
        ("lo-old", 0, 1),
        ("lo-new", 0, 2),
        ("mid", 2, 1),
    ] {
        let x = alloc(&a, id, "o", 1.0, prio, at);
        a.allocations.insert(x.allocation_id.clone(), x);
    }
    let s = shrink_to_fit(&a.with_capacity(&[("cpu".to_string(), 2.0)].into()), 0);
    let gone: Vec<&str> = s.evicted.iter().map(|x| x.allocation_id.as_str()).collect();
    assert_eq!(gone, ["lo-new", "lo-old"]);
    assert!(s.record.overcommitted(0).is_none());
}

#[test]
fn gangs_are_placed_whole_or_not_at_all() {
    let agents = [agent("a", 2.0, &[]), agent("b", 2.0, &[])];
    let ids: Vec<AllocationId> = (0..3)
        .map(|i| AllocationId::new(format!("g{i}")).unwrap())
        .collect();
    let spread = Requirements {
        anti_affinity: Some("g".into()),
        ..cpu(1.0)
    };
    let ok = place_gang(
        &agents,
        &[spread.clone(), spread.clone()],
        "o",
        0,
        &ids[..2],
        "gang",
        0,
    )
    .unwrap();
    assert_ne!(ok[0].agent_id, ok[1].agent_id);
    assert!(ok.iter().all(|a| a.pending));
    let err = place_gang(
        &agents,
        &[spread.clone(), spread.clone(), spread],
        "o",
        0,
        &ids,
        "gang",
        0,
    )
    .unwrap_err();
    assert_eq!(err.member, Some(2));
}

#[test]
fn an_agent_is_lost_after_three_missed_heartbeats() {
    let mut a = agent("a", 2.0, &[]);
    book(&mut a, "x", 1.0);
    assert_eq!(a.lost_at(2_500, 5_000), None);
    assert_eq!(a.lost_at(1_000, 4_001), Some(1_000));
    let released = a.mark_lost();
    assert_eq!(released.len(), 1);
    assert_eq!(a.status, AgentStatus::Lost);
    assert_eq!(a.lost_at(0, 100_000), None, "lost once, not twice");
}

#[test]
fn rebalancing_moves_movable_load_off_the_hottest_agent() {
    let mut hot = agent("hot", 4.0, &[]);
    let cold = agent("cold", 4.0, &[]);
    for i in 0..4 {
        let mut x = alloc(&hot, &format!("m{i}"), "o", 1.0, 0, 0);
        x.movable = i < 2;
        hot.allocations.insert(x.allocation_id.clone(), x);
    }
    let (moves, before, after) = plan(&[hot, cold], 10, 0);
    assert_eq!(moves.len(), 2);
    assert!(moves.iter().all(|m| m.to.as_str() == "cold"));
    assert_eq!(before.max, 1.0);
    assert_eq!(after.max, 0.5);
}

#[test]
fn re_registering_keeps_allocations() {
    let mut a = agent("a", 2.0, &[]);
    book(&mut a, "x", 1.0);
    a.status = AgentStatus::Lost;
    let again = AgentRecord::register(
        &RegisterAgent {
            agent_id: a.agent_id.clone(),
            capabilities: vec![],
            labels: BTreeMap::new(),
            capacity: [("cpu".to_string(), 4.0)].into(),
            heartbeat_interval_ms: 1000,
        },
        Some(a),
        5,
    );
    assert_eq!(again.allocations.len(), 1);
    assert_eq!(again.free("cpu", 5), 3.0);
    assert_eq!(again.status, AgentStatus::Active);
}

#[test]
fn bad_amounts_are_refused() {
    assert!(check_amounts(&[("cpu".to_string(), -1.0)].into()).is_err());
    assert!(check_amounts(&[("cpu".to_string(), f64::NAN)].into()).is_err());
    assert!(check_amounts(&[("cpu".to_string(), 1.0)].into()).is_ok());
}

/// In a large pool a placement looks at a sample, spread by its start; in a
/// small one, or one holding a reservation (which outranks any general fit),
/// at every agent.
#[test]
fn a_large_pool_is_sampled_unless_it_holds_reservations() {
    let mut pool: Vec<AgentRecord> = (0..200)
        .map(|i| agent(&format!("a{i:03}"), 4.0, &[]))
        .collect();
    let refs: Vec<&AgentRecord> = pool.iter().collect();
    let first = sample(&refs, &cpu(1.0), None, 0, 0, 10);
    assert_eq!(first.len(), 10);
    let later = sample(&refs, &cpu(1.0), None, 0, 150, 10);
    assert_eq!(later[0].agent.agent_id.as_str(), "a150");
    assert_eq!(sample(&refs[..8], &cpu(1.0), None, 0, 3, 10).len(), 8);
    assert!(sample(&refs, &cpu(9.0), None, 0, 0, 10).is_empty());

    reservation(&mut pool[199], "r1", "o", 2.0, 0, 1_000);
    let refs: Vec<&AgentRecord> = pool.iter().collect();
    let all = sample(&refs, &cpu(1.0), Some("o"), 0, 0, 10);
    assert_eq!(all.len(), 200);
    let best = rank(all, Policy::BestFit);
    assert_eq!(best[0].agent.agent_id.as_str(), "a199");
    assert_eq!(
        best[0].draw,
        Draw::Reservation(ReservationId::new("r1").unwrap())
    );
}

#[test]
fn a_lease_ends_unrenewed_and_renewing_moves_its_end() {
    let mut a = agent("w1", 4.0, &[]);
    let mut leased = alloc(&a, "leased", "o", 1.0, 0, 0);
    leased.ttl_ms = Some(1_000);
    leased.expires_at_ms = Some(1_000);
    a.allocations.insert(leased.allocation_id.clone(), leased);
    book(&mut a, "held", 1.0);
    let id = AllocationId::new("leased").unwrap();
    let renewed = a.renew(&id, None, 800).unwrap();
    assert_eq!(renewed.expires_at_ms, Some(1_800));
    assert!(a.expire(1_500, u64::MAX).is_empty(), "renewed in time");
    let gone = a.expire(1_800, u64::MAX);
    assert_eq!(gone.unrenewed.len(), 1);
    assert_eq!(gone.unrenewed[0].allocation_id, id);
    assert!(a
        .allocations
        .contains_key(&AllocationId::new("held").unwrap()));
    assert_eq!(a.renew(&id, None, 1_900), Err(RenewRefused::NotHere));
    let held = AllocationId::new("held").unwrap();
    assert_eq!(a.renew(&held, None, 1_900), Err(RenewRefused::NoLease));
    assert!(
        a.renew(&held, Some(500), 1_900).is_ok(),
        "a lease can be started"
    );
}

#[test]
fn only_task_allocations_past_the_grace_are_asked_about() {
    let mut a = agent("w1", 4.0, &[]);
    let task = common::msg::TaskRef {
        flow_id: common::FlowId::new("f").unwrap(),
        task_id: common::TaskId::new("t").unwrap(),
    };
    for (id, at, for_task, pending) in [
        ("old", 0, true, false),
        ("young", 900, true, false),
        ("manual", 0, false, false),
        ("unconfirmed", 0, true, true),
    ] {
        let mut x = alloc(&a, id, "f/t", 1.0, 0, at);
        x.task = for_task.then(|| task.clone());
        x.pending = pending;
        a.allocations.insert(x.allocation_id.clone(), x);
    }
    let asked: Vec<&str> = a
        .vouched_by_tasks(500, 1_000)
        .map(|x| x.allocation_id.as_str())
        .collect();
    assert_eq!(asked, ["old"]);
}
