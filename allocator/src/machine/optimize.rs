//! Rebalancing: a plan of moves for movable allocations that lowers hot spots,
//! with utilisation figures before and after.
//!
//! The objective is the sum of squared agent utilisations: it falls whenever
//! load moves from a busier agent to a less busy one, so greedy moves from the
//! hottest agent flatten peaks without ever making the hottest agent hotter.
//! Fragmentation is reported alongside so an operator sees the trade-off.

use common::msg::{Allocation, Move, Utilisation};

use super::{requirements_of, AgentRecord, Draw, EPS};

/// An agent's utilisation: its busiest resource's share of capacity.
fn agent_utilisation(a: &AgentRecord, now_ms: u64) -> f64 {
    a.capacity
        .iter()
        .filter(|(_, cap)| **cap > EPS)
        .map(|(r, cap)| (cap - a.free(r, now_ms)) / cap)
        .fold(0.0, f64::max)
}

/// Utilisation figures over the agents that take placements.
pub fn utilisation<'a>(
    agents: impl IntoIterator<Item = &'a AgentRecord>,
    now_ms: u64,
) -> Utilisation {
    let live: Vec<&AgentRecord> = agents
        .into_iter()
        .filter(|a| a.accepts_placements())
        .collect();
    let per_agent: std::collections::BTreeMap<_, _> = live
        .iter()
        .map(|a| (a.agent_id.clone(), agent_utilisation(a, now_ms)))
        .collect();
    let n = per_agent.len().max(1) as f64;
    let mean = per_agent.values().sum::<f64>() / n;
    let var = per_agent.values().map(|u| (u - mean).powi(2)).sum::<f64>() / n;
    let max = per_agent.values().copied().fold(0.0, f64::max);
    // Per resource: 1 - largest free block / total free.
    let mut resources: Vec<&String> = live.iter().flat_map(|a| a.capacity.keys()).collect();
    resources.sort();
    resources.dedup();
    let frags: Vec<f64> = resources
        .iter()
        .filter_map(|r| {
            let blocks: Vec<f64> = live.iter().map(|a| a.free(r, now_ms).max(0.0)).collect();
            let total: f64 = blocks.iter().sum();
            (total > EPS).then(|| 1.0 - blocks.iter().copied().fold(0.0, f64::max) / total)
        })
        .collect();
    let fragmentation = if frags.is_empty() {
        0.0
    } else {
        frags.iter().sum::<f64>() / frags.len() as f64
    };
    Utilisation {
        max,
        mean,
        stddev: var.sqrt(),
        fragmentation,
        per_agent,
    }
}

fn movable(a: &Allocation) -> bool {
    a.movable && !a.pending && a.reservation_id.is_none()
}

/// Plans up to `max_moves` moves of movable allocations, each lowering the sum
/// of squared utilisations. Returns the moves and the figures before and after.
pub fn plan(
    agents: &[AgentRecord],
    max_moves: usize,
    now_ms: u64,
) -> (Vec<Move>, Utilisation, Utilisation) {
    let before = utilisation(agents, now_ms);
    let mut work: Vec<AgentRecord> = agents.to_vec();
    let mut moves = Vec::new();
    while moves.len() < max_moves {
        let utils: Vec<f64> = work.iter().map(|a| agent_utilisation(a, now_ms)).collect();
        // Hottest agents first; the first one with an improving move wins.
        let mut order: Vec<usize> = (0..work.len())
            .filter(|i| work[*i].accepts_placements())
            .collect();
        order.sort_by(|a, b| utils[*b].total_cmp(&utils[*a]).then(a.cmp(b)));
        let mut best: Option<(f64, usize, usize, Allocation)> = None;
        for &src in &order {
            for alloc in work[src].allocations.values().filter(|a| movable(a)) {
                let mut without = work[src].clone();
                without.allocations.remove(&alloc.allocation_id);
                let src_after = agent_utilisation(&without, now_ms);
                let req = requirements_of(alloc);
                for (dst, agent) in work.iter().enumerate() {
                    if dst == src || agent.fit(&req, None, now_ms) != Ok(Draw::General) {
                        continue;
                    }
                    let mut with = agent.clone();
                    with.allocations
                        .insert(alloc.allocation_id.clone(), alloc.clone());
                    let dst_after = agent_utilisation(&with, now_ms);
                    let delta = src_after.powi(2) + dst_after.powi(2)
                        - utils[src].powi(2)
                        - utils[dst].powi(2);
                    if delta < -1e-6 && best.as_ref().is_none_or(|(d, ..)| delta < *d) {
                        best = Some((delta, src, dst, alloc.clone()));
                    }
                }
            }
            if best.is_some() {
                break;
            }
        }
        let Some((_, src, dst, alloc)) = best else {
            break;
        };
        let mut moved = alloc.clone();
        moved.agent_id = work[dst].agent_id.clone();
        work[src].allocations.remove(&alloc.allocation_id);
        work[dst]
            .allocations
            .insert(alloc.allocation_id.clone(), moved);
        moves.push(Move {
            allocation_id: alloc.allocation_id.clone(),
            owner: alloc.owner.clone(),
            from: work[src].agent_id.clone(),
            to: work[dst].agent_id.clone(),
            resources: alloc.resources.clone(),
        });
    }
    let after = utilisation(&work, now_ms);
    (moves, before, after)
}
