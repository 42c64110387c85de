//! The capacity ledger and the placement policy.
//!
//! Pure and deterministic: the adapter hands in agent records (as read from KV),
//! the current time and fresh ids, and gets back a decision; it then writes the
//! chosen agent's record with a compare-and-set, so a decision made on stale data
//! can never over-allocate — it just loses the race and is made again.
//!
//! # The ledger invariant
//!
//! Allocations are open-ended (they last until released), reservations are
//! bounded windows. For every resource of every agent, and every instant `t`
//! from now on:
//!
//! ```text
//! Σ allocations outside reservations + Σ reservations whose window holds t  <=  capacity
//! ```
//!
//! and the allocations drawing from a reservation never exceed it. An open-ended
//! allocation must therefore leave room for the *peak* of reservations still
//! ahead (it may still be running then), while a reservation only needs room
//! inside its own window. An allocation drawn from a reservation ends with it.

mod adjust;
mod held;
mod optimize;
mod place;
mod quota;

use std::collections::BTreeMap;

pub use adjust::{shrink_to_fit, Expired, RenewRefused, Shrink};
use common::msg::{
    AgentInfo, AgentStatus, Allocation, RegisterAgent, Requirements, Reservation, ResourceCapacity,
};
pub use common::msg::{NoFit, Unfit};
use common::{AgentId, AllocationId, ReservationId};
pub use held::Allocations;
pub use optimize::{plan, utilisation};
pub use place::{
    candidates, capacity_status, place, place_gang, place_reservation, rank, sample, why_not,
    Candidate,
};
pub use quota::{Admission, Quota, QuotaBook};
use serde::{Deserialize, Serialize};

/// Slack for floating-point sums of resource amounts.
pub const EPS: f64 = 1e-9;

/// An agent is lost after this many heartbeat intervals without one.
pub const MISSED_HEARTBEATS: u64 = 3;

/// One agent as stored in KV: what it offers, what is allocated and reserved on
/// it. Allocations and reservations live inside the agent's record so that one
/// compare-and-set covers the check and the booking.
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
    pub allocations: Allocations,
    #[serde(default)]
    pub registered_at_ms: u64,
    #[serde(default)]
    pub heartbeat_interval_ms: u64,
    #[serde(default)]
    pub status: AgentStatus,
    /// Last (re-)registration. It counts as a heartbeat, so an agent is not
    /// declared lost before its first beat had a chance to arrive.
    #[serde(default)]
    pub seen_ms: u64,
    #[serde(default)]
    pub reservations: BTreeMap<ReservationId, Reservation>,
    /// When `status` last changed.
    #[serde(default)]
    pub status_since_ms: u64,
}

/// Where an allocation draws its resources from on the chosen agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Draw {
    /// One of the owner's reservations, active now.
    Reservation(ReservationId),
    /// The agent's capacity outside reservations.
    General,
}

/// Whether a reservation or quota held by `holder` serves `owner`: the same
/// owner, or one below it (`flow-1` serves `flow-1/task-a`).
pub fn owner_covers(holder: &str, owner: &str) -> bool {
    owner == holder
        || owner
            .strip_prefix(holder)
            .is_some_and(|rest| rest.starts_with('/'))
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

fn active(r: &Reservation, now_ms: u64) -> bool {
    r.start_ms <= now_ms && now_ms < r.end_ms
}

impl AgentRecord {
    /// The record after a (re-)registration. Registering again revives a lost or
    /// draining agent and keeps its allocations and reservations; if the new
    /// capacity no longer holds them, the caller preempts with [`shrink_to_fit`].
    pub fn register(
        req: &RegisterAgent,
        previous: Option<AgentRecord>,
        now_ms: u64,
    ) -> AgentRecord {
        let (allocations, reservations, registered_at_ms) = match previous {
            Some(p) => (p.allocations, p.reservations, p.registered_at_ms),
            None => (Allocations::default(), BTreeMap::new(), now_ms),
        };
        AgentRecord {
            agent_id: req.agent_id.clone(),
            capabilities: req.capabilities.clone(),
            labels: req.labels.clone(),
            capacity: req.capacity.clone(),
            allocations,
            registered_at_ms,
            heartbeat_interval_ms: req.heartbeat_interval_ms,
            status: AgentStatus::Active,
            seen_ms: now_ms,
            reservations,
            status_since_ms: now_ms,
        }
    }

    pub fn accepts_placements(&self) -> bool {
        self.status == AgentStatus::Active
    }

    /// Held per resource by allocations outside reservations.
    pub fn allocated(&self) -> BTreeMap<String, f64> {
        let mut sum = BTreeMap::new();
        for a in self.allocations.values() {
            if a.reservation_id.is_none() {
                for (r, v) in &a.resources {
                    *sum.entry(r.clone()).or_insert(0.0) += v;
                }
            }
        }
        sum
    }

    /// Held by allocations outside reservations, for one resource.
    pub fn general_used(&self, resource: &str) -> f64 {
        self.allocations.general_used(resource)
    }

    /// Sum of `resource` over reservations whose window holds `t`.
    fn reserved_at(&self, resource: &str, t: u64) -> f64 {
        total(
            self.reservations
                .values()
                .filter(|r| active(r, t))
                .filter_map(|r| r.resources.get(resource)),
        )
    }

    /// The instants in `[from, to)` where the reserved sum can peak: `from` and
    /// every reservation start after it.
    fn breakpoints(&self, from: u64, to: u64) -> Vec<u64> {
        let mut ts: Vec<u64> = std::iter::once(from)
            .chain(
                self.reservations
                    .values()
                    .map(|r| r.start_ms)
                    .filter(|s| *s > from && *s < to),
            )
            .collect();
        ts.sort_unstable();
        ts.dedup();
        ts
    }

    /// The most of `resource` reserved at any instant of `[from, to)`.
    pub fn reserved_peak_within(&self, resource: &str, from: u64, to: u64) -> f64 {
        if self.reservations.is_empty() || from >= to {
            return 0.0;
        }
        self.breakpoints(from, to)
            .into_iter()
            .map(|t| self.reserved_at(resource, t))
            .fold(0.0, f64::max)
    }

    /// The most of `resource` reserved at any instant from `now_ms` on: what an
    /// open-ended allocation has to leave room for.
    pub fn reserved_peak(&self, resource: &str, now_ms: u64) -> f64 {
        self.reserved_peak_within(resource, now_ms, u64::MAX)
    }

    /// What an owner without a reservation here can take of `resource`.
    pub fn free(&self, resource: &str, now_ms: u64) -> f64 {
        let cap = self.capacity.get(resource).copied().unwrap_or(0.0);
        cap - self.general_used(resource) - self.reserved_peak(resource, now_ms)
    }

    /// Allocations drawing from reservation `id`, summed for `resource`.
    pub fn drawn(&self, id: &ReservationId, resource: &str) -> f64 {
        total(
            self.allocations
                .values()
                .filter(|a| a.reservation_id.as_ref() == Some(id))
                .filter_map(|a| a.resources.get(resource)),
        )
    }

    /// Whether `req` could go here once this agent is idle: it takes
    /// placements, qualifies (anti-affinity aside: that changes as work ends)
    /// and has enough of every resource in all.
    pub fn could_take(&self, req: &Requirements) -> bool {
        let timeless = Requirements {
            anti_affinity: None,
            ..req.clone()
        };
        self.accepts_placements()
            && self.qualifies(&timeless).is_ok()
            && req
                .resources
                .iter()
                .all(|(r, need)| self.capacity.get(r).copied().unwrap_or(0.0) + EPS >= *need)
    }

    /// Capabilities, labels and anti-affinity: the checks that do not depend on amounts.
    fn qualifies(&self, req: &Requirements) -> Result<(), Unfit> {
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
        if let Some(group) = &req.anti_affinity {
            if self
                .allocations
                .values()
                .any(|a| a.anti_affinity.as_ref() == Some(group))
            {
                return Err(Unfit::AntiAffinity {
                    group: group.clone(),
                });
            }
        }
        Ok(())
    }

    /// The owner's reservation active now that has room for `req`, if any
    /// (the one with the least room left, so big ones stay whole).
    fn reservation_for(
        &self,
        req: &Requirements,
        owner: &str,
        now_ms: u64,
    ) -> Option<ReservationId> {
        self.reservations
            .values()
            .filter(|r| active(r, now_ms) && owner_covers(&r.owner, owner))
            .filter_map(|r| {
                let mut slack = f64::INFINITY;
                for (res, need) in &req.resources {
                    if *need <= EPS {
                        continue;
                    }
                    let room = r.resources.get(res).copied().unwrap_or(0.0)
                        - self.drawn(&r.reservation_id, res);
                    if need - room > EPS {
                        return None;
                    }
                    slack = slack.min(room - need);
                }
                Some((slack, r.reservation_id.clone()))
            })
            .min_by(|(a, x), (b, y)| a.total_cmp(b).then_with(|| x.cmp(y)))
            .map(|(_, id)| id)
    }

    /// Whether `req` fits now for `owner` (who may draw from its reservations),
    /// and from where; the first reason it does not otherwise.
    pub fn fit(&self, req: &Requirements, owner: Option<&str>, now_ms: u64) -> Result<Draw, Unfit> {
        if !self.accepts_placements() {
            return Err(Unfit::NotAccepting {
                status: self.status,
            });
        }
        self.qualifies(req)?;
        if let Some(owner) = owner {
            if let Some(id) = self.reservation_for(req, owner, now_ms) {
                return Ok(Draw::Reservation(id));
            }
        }
        let mut worst: Option<Unfit> = None;
        let mut worst_gap = 0.0;
        for (r, needed) in &req.resources {
            if *needed <= EPS {
                continue;
            }
            let free = self.free(r, now_ms);
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
        worst.map_or(Ok(Draw::General), Err)
    }

    /// Whether a reservation of `req` over `[start_ms, end_ms)` fits beside
    /// everything already here.
    pub fn fit_reservation(
        &self,
        req: &Requirements,
        start_ms: u64,
        end_ms: u64,
        now_ms: u64,
    ) -> Result<(), Unfit> {
        if !self.accepts_placements() {
            return Err(Unfit::NotAccepting {
                status: self.status,
            });
        }
        self.qualifies(&Requirements {
            anti_affinity: None,
            ..req.clone()
        })?;
        let from = start_ms.max(now_ms);
        for (r, needed) in &req.resources {
            if *needed <= EPS {
                continue;
            }
            let cap = self.capacity.get(r).copied().unwrap_or(0.0);
            let free = cap - self.general_used(r) - self.reserved_peak_within(r, from, end_ms);
            if needed - free > EPS {
                return Err(Unfit::Short {
                    resource: r.clone(),
                    needed: *needed,
                    free,
                });
            }
        }
        Ok(())
    }

    /// Best-fit score: the smallest share of capacity left on any requested
    /// resource after placing. Lower is a tighter fit, which keeps big holes
    /// free for big requests.
    fn leftover(&self, req: &Requirements, now_ms: u64) -> f64 {
        req.resources
            .iter()
            .map(|(r, needed)| {
                let cap = self.capacity.get(r).copied().unwrap_or(0.0);
                if cap <= EPS {
                    0.0
                } else {
                    (self.free(r, now_ms) - needed) / cap
                }
            })
            .fold(f64::INFINITY, f64::min)
    }

    /// The first way this record breaks the ledger invariant, if any: what a
    /// checker over stored history asserts at every revision.
    pub fn overcommitted(&self, now_ms: u64) -> Option<String> {
        let mut resources: Vec<&String> = self.capacity.keys().collect();
        for a in self.allocations.values() {
            resources.extend(a.resources.keys());
        }
        for r in self.reservations.values() {
            resources.extend(r.resources.keys());
        }
        resources.sort();
        resources.dedup();
        for r in resources {
            let free = self.free(r, now_ms);
            if free < -EPS * 1e3 {
                return Some(format!("{}: {r} over capacity by {}", self.agent_id, -free));
            }
            for res in self.reservations.values() {
                let over = self.drawn(&res.reservation_id, r)
                    - res.resources.get(r).copied().unwrap_or(0.0);
                if over > EPS * 1e3 {
                    return Some(format!(
                        "{}: reservation {} overdrawn on {r} by {over}",
                        self.agent_id, res.reservation_id
                    ));
                }
            }
        }
        None
    }

    /// Whether the agent has missed its heartbeats at `now_ms`, given the last
    /// beat recorded (0 if none): returns when it was last seen.
    pub fn lost_at(&self, last_beat_ms: u64, now_ms: u64) -> Option<u64> {
        if matches!(self.status, AgentStatus::Lost | AgentStatus::Left) {
            return None;
        }
        let seen = self.seen_ms.max(last_beat_ms);
        let interval = self.heartbeat_interval_ms.max(1);
        (now_ms > seen.saturating_add(MISSED_HEARTBEATS.saturating_mul(interval))).then_some(seen)
    }

    /// Marks the agent lost and releases everything it held. Its reservations
    /// stay (they are promises about this agent, kept for when it comes back).
    pub fn mark_lost(&mut self) -> Vec<Allocation> {
        self.status = AgentStatus::Lost;
        std::mem::take(&mut self.allocations)
            .into_values()
            .collect()
    }

    /// The agent left on purpose: what it held is released (and handed back
    /// by the orchestrator); it takes nothing until it registers again.
    pub fn leave(&mut self, now_ms: u64) -> Vec<Allocation> {
        if self.status != AgentStatus::Left {
            self.status = AgentStatus::Left;
            self.status_since_ms = now_ms;
        }
        std::mem::take(&mut self.allocations)
            .into_values()
            .collect()
    }

    /// Whether a lost or left agent has been so for `retention_ms` at
    /// `now_ms` and holds nothing still promised (a reservation): it is then
    /// removed from the listing.
    pub fn retire_at(&self, retention_ms: u64, now_ms: u64) -> bool {
        matches!(self.status, AgentStatus::Lost | AgentStatus::Left)
            && self.allocations.is_empty()
            && self.reservations.is_empty()
            && now_ms
                >= self
                    .status_since_ms
                    .max(self.seen_ms)
                    .saturating_add(retention_ms)
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
            status: self.status,
            status_since_ms: self.status_since_ms.max(self.seen_ms),
        }
    }

    /// Capacity, allocated, reserved and free per resource.
    pub fn usage(&self, now_ms: u64) -> BTreeMap<String, ResourceCapacity> {
        let mut names: Vec<String> = self.capacity.keys().cloned().collect();
        names.extend(self.allocated().into_keys());
        for r in self.reservations.values() {
            names.extend(r.resources.keys().cloned());
        }
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|r| {
                let capacity = self.capacity.get(&r).copied().unwrap_or(0.0);
                let allocated = self.general_used(&r);
                let reserved = self.reserved_peak(&r, now_ms);
                let free = capacity - allocated - reserved;
                (
                    r,
                    ResourceCapacity {
                        capacity,
                        allocated,
                        reserved,
                        free,
                    },
                )
            })
            .collect()
    }
}

/// Adds amounts up from +0.0: `Iterator::sum` starts from -0.0, so nothing
/// held would reach the wire as `"allocated": -0.0`.
fn total<'a>(amounts: impl Iterator<Item = &'a f64>) -> f64 {
    amounts.fold(0.0, |sum, v| sum + v)
}

/// A new allocation of `req` for `owner`, drawing as `draw` says.
#[allow(clippy::too_many_arguments)]
pub fn new_allocation(
    id: AllocationId,
    agent: &AgentId,
    owner: &str,
    req: &Requirements,
    priority: i32,
    draw: Draw,
    now_ms: u64,
    gang_id: Option<&str>,
) -> Allocation {
    Allocation {
        allocation_id: id,
        agent_id: agent.clone(),
        owner: owner.to_owned(),
        resources: req.resources.clone(),
        priority,
        created_at_ms: now_ms,
        reservation_id: match draw {
            Draw::Reservation(id) => Some(id),
            Draw::General => None,
        },
        anti_affinity: req.anti_affinity.clone(),
        movable: req.movable,
        capabilities: req.capabilities.clone(),
        labels: req.labels.clone(),
        gang_id: gang_id.map(str::to_owned),
        pending: gang_id.is_some(),
        task: None,
        ttl_ms: None,
        expires_at_ms: None,
        bound_at_ms: None,
    }
}

/// The requirements an allocation was made for (for moving it elsewhere).
pub fn requirements_of(a: &Allocation) -> Requirements {
    Requirements {
        resources: a.resources.clone(),
        capabilities: a.capabilities.clone(),
        labels: a.labels.clone(),
        policy: Default::default(),
        anti_affinity: a.anti_affinity.clone(),
        movable: a.movable,
    }
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
