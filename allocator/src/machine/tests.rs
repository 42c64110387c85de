//! Placement never picks an agent the requirements do not fit on, prefers the
//! tightest fit, and says what is short when nothing fits.

use std::collections::BTreeMap;

use common::msg::{Allocation, RegisterAgent, Requirements};
use common::{AgentId, AllocationId};

use super::*;

fn agent(id: &str, cpu: f64, caps: &[&str]) -> AgentRecord {
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

fn cpu(n: f64) -> Requirements {
    Requirements {
        resources: [("cpu".to_string(), n)].into(),
        ..Default::default()
    }
}

fn book(a: &mut AgentRecord, id: &str, n: f64) {
    let alloc = Allocation {
        allocation_id: AllocationId::new(id).unwrap(),
        agent_id: a.agent_id.clone(),
        owner: "o".into(),
        resources: [("cpu".to_string(), n)].into(),
        priority: 0,
        created_at_ms: 0,
    };
    a.allocations.insert(alloc.allocation_id.clone(), alloc);
}

#[test]
fn best_fit_picks_the_tightest_agent() {
    let big = agent("big", 8.0, &[]);
    let small = agent("small", 2.0, &[]);
    let agents = [big, small];
    assert_eq!(
        place(&agents, &cpu(2.0)).unwrap().agent_id.as_str(),
        "small"
    );
    assert_eq!(place(&agents, &cpu(3.0)).unwrap().agent_id.as_str(), "big");
}

#[test]
fn allocations_use_up_capacity() {
    let mut a = agent("a", 2.0, &[]);
    book(&mut a, "x", 1.5);
    assert_eq!(a.free("cpu"), 0.5);
    assert!(a.fits(&cpu(0.5)).is_ok());
    assert_eq!(
        a.fits(&cpu(1.0)),
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
    assert_eq!(place(&agents, &req).unwrap().agent_id.as_str(), "gpu");
    req.labels.insert("zone".into(), "us".into());
    let err = place(&agents, &req).unwrap_err();
    assert_eq!(err.best_candidate, None);
    assert!(err.message.contains("capabilities"), "{}", err.message);
}

#[test]
fn no_fit_names_the_short_resource_and_best_candidate() {
    let mut a = agent("a", 4.0, &[]);
    book(&mut a, "x", 3.0);
    let b = agent("b", 2.0, &[]);
    let err = place(&[a, b], &cpu(3.5)).unwrap_err();
    assert_eq!(err.best_candidate.as_ref().unwrap().as_str(), "b");
    assert!(matches!(err.short, Some(Unfit::Short { ref resource, .. }) if resource == "cpu"));
    let none = place(&[], &cpu(1.0)).unwrap_err();
    assert_eq!(none.message, "no agent is registered");
}

#[test]
fn capacity_status_sums_the_pool() {
    let mut a = agent("a", 4.0, &[]);
    book(&mut a, "x", 1.0);
    let b = agent("b", 2.0, &[]);
    let s = capacity_status(&[a, b], Some(&cpu(3.0)));
    assert_eq!(s.pool["cpu"].capacity, 6.0);
    assert_eq!(s.pool["cpu"].allocated, 1.0);
    assert_eq!(s.pool["cpu"].free, 5.0);
    assert_eq!(s.fits, Some(true));
    assert_eq!(s.candidates.len(), 1);
}

#[test]
fn re_registering_keeps_allocations() {
    let mut a = agent("a", 2.0, &[]);
    book(&mut a, "x", 1.0);
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
    assert_eq!(again.free("cpu"), 3.0);
}

#[test]
fn bad_amounts_are_refused() {
    assert!(check_amounts(&[("cpu".to_string(), -1.0)].into()).is_err());
    assert!(check_amounts(&[("cpu".to_string(), f64::NAN)].into()).is_err());
    assert!(check_amounts(&[("cpu".to_string(), 1.0)].into()).is_ok());
}
