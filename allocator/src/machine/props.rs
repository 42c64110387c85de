//! Property tests of the ledger: no sequence of operations over-allocates,
//! release is the inverse of allocate, and placement never picks an agent the
//! requirements do not fit on (nor gives up while one fits).

use std::collections::BTreeMap;

use common::msg::{Policy, RegisterAgent, Requirements, Reservation};
use common::{AgentId, AllocationId, ReservationId};
use proptest::prelude::*;

use super::*;

const RESOURCES: [&str; 2] = ["cpu", "mem"];

fn agents_strategy() -> impl Strategy<Value = Vec<AgentRecord>> {
    prop::collection::vec((0u32..8, 0u32..16, any::<bool>()), 1..6).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (cpu, mem, gpu))| {
                AgentRecord::register(
                    &RegisterAgent {
                        agent_id: AgentId::new(format!("a{i}")).unwrap(),
                        capabilities: if gpu { vec!["gpu".into()] } else { vec![] },
                        labels: BTreeMap::new(),
                        capacity: [
                            ("cpu".to_string(), cpu as f64),
                            ("mem".to_string(), mem as f64),
                        ]
                        .into(),
                        heartbeat_interval_ms: 1000,
                    },
                    None,
                    0,
                )
            })
            .collect()
    })
}

fn req_strategy() -> impl Strategy<Value = Requirements> {
    (
        0u32..5,
        0u32..8,
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0u8..2),
    )
        .prop_map(|(cpu, mem, gpu, spread, group)| Requirements {
            resources: [
                (RESOURCES[0].to_string(), cpu as f64 * 0.5),
                (RESOURCES[1].to_string(), mem as f64),
            ]
            .into(),
            capabilities: if gpu { vec!["gpu".into()] } else { vec![] },
            policy: if spread {
                Policy::Spread
            } else {
                Policy::BestFit
            },
            anti_affinity: group.map(|g| format!("g{g}")),
            ..Default::default()
        })
}

#[derive(Debug, Clone)]
enum Op {
    Allocate(Requirements, u8),
    Release(usize),
    Reserve(Requirements, u8, u64, u64),
    Tick(u64),
    Shrink(usize, u32),
    Gang(Vec<Requirements>),
    Lose(usize),
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (req_strategy(), 0u8..3).prop_map(|(r, o)| Op::Allocate(r, o)),
        3 => any::<usize>().prop_map(Op::Release),
        2 => (req_strategy(), 0u8..3, 0u64..50, 1u64..50).prop_map(|(r, o, s, d)| Op::Reserve(r, o, s, d)),
        2 => (1u64..20).prop_map(Op::Tick),
        1 => (any::<usize>(), 0u32..8).prop_map(|(i, c)| Op::Shrink(i, c)),
        1 => prop::collection::vec(req_strategy(), 1..4).prop_map(Op::Gang),
        1 => any::<usize>().prop_map(Op::Lose),
    ]
}

fn owner(o: u8) -> String {
    format!("team{o}/task")
}

fn check(agents: &[AgentRecord], now: u64) -> Result<(), TestCaseError> {
    for a in agents {
        if let Some(problem) = a.overcommitted(now) {
            return Err(TestCaseError::fail(problem));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn no_sequence_of_operations_over_allocates(
        mut agents in agents_strategy(),
        ops in prop::collection::vec(op_strategy(), 1..40),
    ) {
        let mut now = 0u64;
        let mut next = 0u32;
        let mut fresh = |prefix: &str| {
            next += 1;
            format!("{prefix}{next}")
        };
        for op in ops {
            match op {
                Op::Allocate(req, o) => {
                    let owner = owner(o);
                    if let Ok(c) = place(&agents, &req, Some(&owner), now) {
                        prop_assert!(c.agent.fit(&req, Some(&owner), now).is_ok());
                        let id = c.agent.agent_id.clone();
                        let draw = c.draw.clone();
                        let x = new_allocation(AllocationId::new(fresh("x")).unwrap(), &id, &owner, &req, o as i32, draw, now, None);
                        let a = agents.iter_mut().find(|a| a.agent_id == id).unwrap();
                        a.allocations.insert(x.allocation_id.clone(), x);
                    } else {
                        prop_assert!(agents.iter().all(|a| a.fit(&req, Some(&owner), now).is_err()));
                    }
                }
                Op::Release(i) => {
                    let all: Vec<(usize, AllocationId)> = agents.iter().enumerate()
                        .flat_map(|(ai, a)| a.allocations.keys().map(move |k| (ai, k.clone()))).collect();
                    if !all.is_empty() {
                        let (ai, id) = &all[i % all.len()];
                        agents[*ai].allocations.remove(id);
                    }
                }
                Op::Reserve(req, o, start, len) => {
                    let (start, end) = (now + start, now + start + len);
                    if let Ok(a) = place_reservation(&agents, &req, start, end, now) {
                        let id = a.agent_id.clone();
                        let r = Reservation {
                            reservation_id: ReservationId::new(fresh("r")).unwrap(),
                            agent_id: id.clone(),
                            owner: format!("team{o}"),
                            resources: req.resources.clone(),
                            start_ms: start,
                            end_ms: end,
                            created_at_ms: now,
                        };
                        let a = agents.iter_mut().find(|a| a.agent_id == id).unwrap();
                        a.reservations.insert(r.reservation_id.clone(), r);
                    }
                }
                Op::Tick(dt) => {
                    now += dt;
                    for a in &mut agents {
                        let said = a.has_expired(now, 10);
                        prop_assert_eq!(said, !a.expire(now, 10).is_empty());
                    }
                }
                Op::Shrink(i, cpu) => {
                    let n = agents.len();
                    let a = &mut agents[i % n];
                    *a = shrink_to_fit(&a.with_capacity(&[("cpu".to_string(), cpu as f64)].into()), now).record;
                }
                Op::Gang(members) => {
                    let ids: Vec<AllocationId> = members.iter().map(|_| AllocationId::new(fresh("g")).unwrap()).collect();
                    let before = agents.clone();
                    match place_gang(&agents, &members, "gang", 0, &ids, "gid", now) {
                        Ok(allocs) => {
                            prop_assert_eq!(allocs.len(), members.len());
                            for x in allocs {
                                let a = agents.iter_mut().find(|a| a.agent_id == x.agent_id).unwrap();
                                a.allocations.insert(x.allocation_id.clone(), x);
                            }
                        }
                        Err(_) => prop_assert_eq!(&agents, &before),
                    }
                }
                Op::Lose(i) => {
                    let n = agents.len();
                    agents[i % n].mark_lost();
                }
            }
            check(&agents, now)?;
        }
    }

    #[test]
    fn release_is_the_inverse_of_allocate(
        agents in agents_strategy(),
        req in req_strategy(),
    ) {
        if let Ok(c) = place(&agents, &req, None, 0) {
            let before = c.agent.clone();
            let mut after = before.clone();
            let x = new_allocation(AllocationId::new("x").unwrap(), &before.agent_id, "o", &req, 0, c.draw.clone(), 0, None);
            after.allocations.insert(x.allocation_id.clone(), x);
            prop_assert!(after.overcommitted(0).is_none());
            after.allocations.remove(&AllocationId::new("x").unwrap());
            prop_assert_eq!(after, before);
        }
    }

    #[test]
    fn best_fit_never_picks_an_agent_that_does_not_fit(
        agents in agents_strategy(),
        req in req_strategy(),
    ) {
        match place(&agents, &req, None, 0) {
            Ok(c) => {
                prop_assert!(c.agent.fit(&req, None, 0).is_ok());
                if req.policy == Policy::BestFit {
                    // No fitting agent is strictly tighter.
                    let best = c.agent.leftover(&req, 0);
                    for a in agents.iter().filter(|a| a.fit(&req, None, 0).is_ok()) {
                        prop_assert!(a.leftover(&req, 0) >= best);
                    }
                }
            }
            Err(nofit) => {
                prop_assert!(agents.iter().all(|a| a.fit(&req, None, 0).is_err()));
                prop_assert_eq!(nofit.agents_considered, agents.len());
            }
        }
    }
}
