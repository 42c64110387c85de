//! The capacity ledger and the placement policy.
//!
//! Pure and deterministic: the adapter hands in agent records (as read from KV)
//! and gets back a decision; it then writes the chosen agent's record with a
//! compare-and-set, so a decision made on stale data can never over-allocate —
//! it just loses the race and is made again.

use std::collections::BTreeMap;

use common::msg::{
    AgentInfo, Allocation, CapacityStatus, RegisterAgent, Requirements, ResourceCapacity,
};
use common::{AgentId, AllocationId};
use serde::{Deserialize, Serialize};

/// Slack for floating-point sums of resource amounts.
const EPS: f64 = 1e-9;

/// One agent as stored in KV: what it offers and what is allocated on it.
/// Allocations live inside the agent's record so that one compare-and-set covers
/// the check and the booking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub agent_id: AgentId,
    #[serde(default)]
    pub capabilities: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub capacity: BTreeMap<String, f64>,
    #[serde(default)]
    pub allocations: BTreeMap<AllocationId, Allocation>,
    #[serde(default)]
    pub registered_at_ms: u64,
    #[serde(default)]
    pub heartbeat_interval_ms: u64,
}

/// Why requirements do not fit on one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Unfit {
    MissingCapability {
        capability: String,
    },
    LabelMismatch {
        label: String,
        want: String,
        have: Option<String>,
    },
    /// `resource` is short by `needed - free`.
    Short {
        resource: String,
        needed: f64,
        free: f64,
    },
}

/// No agent can take the requirements now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoFit {
    pub message: String,
    /// The agent closest to fitting (short on the least), if any agent has the
    /// right capabilities and labels.
    pub best_candidate: Option<AgentId>,
    /// What that candidate lacks.
    pub short: Option<Unfit>,
    pub agents_considered: usize,
}

/// Checks amounts a person or program sent: finite and not negative.
pub fn check_amounts(amounts: &BTreeMap<String, f64>) -> Result<(), String> {
    for (resource, amount) in amounts {
        if resource.is_empty() {
            return Err("resource names must not be empty".into());
        }
        if !amount.is_finite() || *amount < 0.0 {
            return Err(format!(
                "{resource} = {amount}: amounts must be finite and >= 0"
            ));
        }
    }
    Ok(())
}

impl AgentRecord {
    pub fn register(
        req: &RegisterAgent,
        previous: Option<AgentRecord>,
        now_ms: u64,
    ) -> AgentRecord {
        let (allocations, registered_at_ms) = match previous {
            Some(p) => (p.allocations, p.registered_at_ms),
            None => (BTreeMap::new(), now_ms),
        };
        AgentRecord {
            agent_id: req.agent_id.clone(),
            capabilities: req.capabilities.clone(),
            labels: req.labels.clone(),
            capacity: req.capacity.clone(),
            allocations,
            registered_at_ms,
            heartbeat_interval_ms: req.heartbeat_interval_ms,
        }
    }

    /// Sum of live allocations per resource.
    pub fn allocated(&self) -> BTreeMap<String, f64> {
        let mut sum = BTreeMap::new();
        for a in self.allocations.values() {
            for (r, v) in &a.resources {
                *sum.entry(r.clone()).or_insert(0.0) += v;
            }
        }
        sum
    }

    pub fn free(&self, resource: &str) -> f64 {
        let cap = self.capacity.get(resource).copied().unwrap_or(0.0);
        let used: f64 = self
            .allocations
            .values()
            .filter_map(|a| a.resources.get(resource))
            .sum();
        cap - used
    }

    /// Whether `req` fits now; the first reason it does not otherwise.
    pub fn fits(&self, req: &Requirements) -> Result<(), Unfit> {
        if let Some(c) = req
            .capabilities
            .iter()
            .find(|c| !self.capabilities.contains(c))
        {
            return Err(Unfit::MissingCapability {
                capability: c.clone(),
            });
        }
        for (k, v) in &req.labels {
            if self.labels.get(k) != Some(v) {
                return Err(Unfit::LabelMismatch {
                    label: k.clone(),
                    want: v.clone(),
                    have: self.labels.get(k).cloned(),
                });
            }
        }
        let mut worst: Option<Unfit> = None;
        let mut worst_gap = 0.0;
        for (r, needed) in &req.resources {
            let free = self.free(r);
            let gap = needed - free;
            if gap > EPS && gap > worst_gap {
                worst_gap = gap;
                worst = Some(Unfit::Short {
                    resource: r.clone(),
                    needed: *needed,
                    free,
                });
            }
        }
        worst.map_or(Ok(()), Err)
    }

    /// Best-fit score: the smallest share of capacity left on any requested
    /// resource after placing. Lower is a tighter fit, which keeps big holes
    /// free for big requests.
    fn leftover(&self, req: &Requirements) -> f64 {
        req.resources
            .iter()
            .map(|(r, needed)| {
                let cap = self.capacity.get(r).copied().unwrap_or(0.0);
                if cap <= EPS {
                    0.0
                } else {
                    (self.free(r) - needed) / cap
                }
            })
            .fold(f64::INFINITY, f64::min)
    }

    pub fn info(&self, last_heartbeat_ms: u64) -> AgentInfo {
        AgentInfo {
            agent_id: self.agent_id.clone(),
            capabilities: self.capabilities.clone(),
            labels: self.labels.clone(),
            capacity: self.capacity.clone(),
            allocated: self.allocated(),
            allocations: self.allocations.len(),
            registered_at_ms: self.registered_at_ms,
            last_heartbeat_ms,
            assign_subject: common::subject::assign(&self.agent_id),
        }
    }

    fn usage(&self) -> BTreeMap<String, ResourceCapacity> {
        let allocated = self.allocated();
        let mut out = BTreeMap::new();
        for (r, cap) in &self.capacity {
            let used = allocated.get(r).copied().unwrap_or(0.0);
            out.insert(
                r.clone(),
                ResourceCapacity {
                    capacity: *cap,
                    allocated: used,
                    free: cap - used,
                },
            );
        }
        for (r, used) in allocated {
            out.entry(r).or_insert(ResourceCapacity {
                capacity: 0.0,
                allocated: used,
                free: -used,
            });
        }
        out
    }
}

/// Agents `req` fits on now, tightest fit first (ties by id, so the choice is
/// deterministic).
pub fn candidates<'a>(
    agents: impl IntoIterator<Item = &'a AgentRecord>,
    req: &Requirements,
) -> Vec<&'a AgentRecord> {
    let mut fit: Vec<(&AgentRecord, f64)> = agents
        .into_iter()
        .filter(|a| a.fits(req).is_ok())
        .map(|a| (a, a.leftover(req)))
        .collect();
    fit.sort_by(|(a, x), (b, y)| x.total_cmp(y).then_with(|| a.agent_id.cmp(&b.agent_id)));
    fit.into_iter().map(|(a, _)| a).collect()
}

/// Chooses where `req` goes (best fit), or says why it cannot go anywhere.
pub fn place<'a>(
    agents: impl IntoIterator<Item = &'a AgentRecord> + Clone,
    req: &Requirements,
) -> Result<&'a AgentRecord, Box<NoFit>> {
    if let Some(best) = candidates(agents.clone(), req).into_iter().next() {
        return Ok(best);
    }
    let all: Vec<&AgentRecord> = agents.into_iter().collect();
    // Among agents that qualify by capabilities and labels, the one short by the least.
    let closest = all
        .iter()
        .filter_map(|a| match a.fits(req) {
            Err(u @ Unfit::Short { .. }) => Some((*a, u)),
            _ => None,
        })
        .min_by(|(a, x), (b, y)| {
            let gap = |u: &Unfit| match u {
                Unfit::Short { needed, free, .. } => needed - free,
                _ => f64::INFINITY,
            };
            gap(x)
                .total_cmp(&gap(y))
                .then_with(|| a.agent_id.cmp(&b.agent_id))
        });
    let message = match (&closest, all.is_empty()) {
        (_, true) => "no agent is registered".to_owned(),
        (
            Some((
                a,
                Unfit::Short {
                    resource,
                    needed,
                    free,
                },
            )),
            _,
        ) => {
            format!(
                "{resource} is short: needs {needed}, best candidate {} has {free} free",
                a.agent_id
            )
        }
        _ => {
            let why = all.first().and_then(|a| a.fits(req).err());
            format!("no agent has the required capabilities and labels ({why:?})")
        }
    };
    Err(Box::new(NoFit {
        message,
        best_candidate: closest.as_ref().map(|(a, _)| a.agent_id.clone()),
        short: closest.map(|(_, u)| u),
        agents_considered: all.len(),
    }))
}

/// The capacity report over a set of agents, with where `req` would fit.
pub fn capacity_status<'a>(
    agents: impl IntoIterator<Item = &'a AgentRecord> + Clone,
    req: Option<&Requirements>,
) -> CapacityStatus {
    let mut status = CapacityStatus::default();
    for a in agents.clone() {
        let usage = a.usage();
        for (r, u) in &usage {
            let p = status.pool.entry(r.clone()).or_default();
            p.capacity += u.capacity;
            p.allocated += u.allocated;
            p.free += u.free;
        }
        status.agents.insert(a.agent_id.clone(), usage);
    }
    if let Some(req) = req {
        status.candidates = candidates(agents, req)
            .into_iter()
            .map(|a| a.agent_id.clone())
            .collect();
        status.fits = Some(!status.candidates.is_empty());
    }
    status
}

#[cfg(test)]
mod tests;
