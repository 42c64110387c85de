//! Taking capacity back: shrinking an agent (preemption by priority), ending
//! expired reservations, and rolling back gang members never confirmed.

use std::collections::BTreeMap;

use common::msg::{Allocation, Reservation};

use super::{AgentRecord, EPS};

/// An agent record brought back within the ledger invariant.
#[derive(Debug, Clone, PartialEq)]
pub struct Shrink {
    pub record: AgentRecord,
    /// Allocations that had to go, in the order they were chosen.
    pub evicted: Vec<Allocation>,
    /// Reservations that had to go (their allocations are in `evicted`).
    pub dropped: Vec<Reservation>,
}

/// Brings `rec` within its capacity by releasing the lowest-priority
/// allocations first (newest first among equals, so the longest-running work
/// survives). Only allocations that hold the overcommitted resource are
/// candidates. If allocations alone cannot make room, the newest reservations
/// holding the resource go too, with whatever drew from them.
pub fn shrink_to_fit(rec: &AgentRecord, now_ms: u64) -> Shrink {
    let mut record = rec.clone();
    let mut evicted = Vec::new();
    let mut dropped = Vec::new();
    let resources: Vec<String> = {
        let mut names: Vec<String> = record.capacity.keys().cloned().collect();
        for a in record.allocations.values() {
            names.extend(a.resources.keys().cloned());
        }
        for r in record.reservations.values() {
            names.extend(r.resources.keys().cloned());
        }
        names.sort();
        names.dedup();
        names
    };
    for r in &resources {
        while record.free(r, now_ms) < -EPS {
            let victim = record
                .allocations
                .values()
                .filter(|a| a.reservation_id.is_none())
                .filter(|a| a.resources.get(r).copied().unwrap_or(0.0) > EPS)
                .min_by(|a, b| {
                    a.priority
                        .cmp(&b.priority)
                        .then(b.created_at_ms.cmp(&a.created_at_ms))
                        .then_with(|| b.allocation_id.cmp(&a.allocation_id))
                })
                .map(|a| a.allocation_id.clone());
            if let Some(id) = victim {
                if let Some(a) = record.allocations.remove(&id) {
                    evicted.push(a);
                }
                continue;
            }
            let reservation = record
                .reservations
                .values()
                .filter(|x| x.end_ms > now_ms)
                .filter(|x| x.resources.get(r).copied().unwrap_or(0.0) > EPS)
                .max_by(|a, b| {
                    a.created_at_ms
                        .cmp(&b.created_at_ms)
                        .then_with(|| a.reservation_id.cmp(&b.reservation_id))
                })
                .map(|x| x.reservation_id.clone());
            let Some(id) = reservation else { break };
            if let Some(x) = record.reservations.remove(&id) {
                evicted.extend(take_drawn(&mut record, &x));
                dropped.push(x);
            }
        }
    }
    Shrink {
        record,
        evicted,
        dropped,
    }
}

/// Removes the allocations that draw from `res`.
fn take_drawn(record: &mut AgentRecord, res: &Reservation) -> Vec<Allocation> {
    let ids: Vec<_> = record
        .allocations
        .values()
        .filter(|a| a.reservation_id.as_ref() == Some(&res.reservation_id))
        .map(|a| a.allocation_id.clone())
        .collect();
    ids.iter()
        .filter_map(|id| record.allocations.remove(id))
        .collect()
}

/// Why [`AgentRecord::renew`] did nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewRefused {
    /// The allocation is not on this agent (any more).
    NotHere,
    /// It has no lease and the request named none.
    NoLease,
}

/// What [`AgentRecord::expire`] took out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expired {
    pub reservations: Vec<Reservation>,
    /// Allocations that drew from the expired reservations.
    pub drawn: Vec<Allocation>,
    /// Gang members booked but not confirmed within the deadline.
    pub unconfirmed: Vec<Allocation>,
    /// Allocations whose lease (`ttl_ms`) ran out unrenewed.
    pub unrenewed: Vec<Allocation>,
}

impl Expired {
    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
            && self.drawn.is_empty()
            && self.unconfirmed.is_empty()
            && self.unrenewed.is_empty()
    }
}

impl AgentRecord {
    /// Whether [`Self::expire`] at `now_ms` would take anything. The sweep
    /// asks it of every agent each tick and copies a record only to expire
    /// it, not ten thousand copies per tick for nothing.
    pub fn has_expired(&self, now_ms: u64, pending_deadline_ms: u64) -> bool {
        self.reservations.values().any(|r| r.end_ms <= now_ms)
            || self.allocations.values().any(|a| {
                if a.pending {
                    a.created_at_ms.saturating_add(pending_deadline_ms) <= now_ms
                } else {
                    a.expires_at_ms.is_some_and(|end| end <= now_ms)
                }
            })
    }

    /// Ends reservations whose window is over (with what drew from them) and
    /// rolls back gang members still pending `pending_deadline_ms` after booking.
    pub fn expire(&mut self, now_ms: u64, pending_deadline_ms: u64) -> Expired {
        let over: Vec<Reservation> = self
            .reservations
            .values()
            .filter(|r| r.end_ms <= now_ms)
            .cloned()
            .collect();
        let mut out = Expired::default();
        for r in over {
            self.reservations.remove(&r.reservation_id);
            out.drawn.extend(take_drawn(self, &r));
            out.reservations.push(r);
        }
        let stale: Vec<_> = self
            .allocations
            .values()
            .filter(|a| a.pending && a.created_at_ms.saturating_add(pending_deadline_ms) <= now_ms)
            .map(|a| a.allocation_id.clone())
            .collect();
        out.unconfirmed = stale
            .iter()
            .filter_map(|id| self.allocations.remove(id))
            .collect();
        let unrenewed: Vec<_> = self
            .allocations
            .values()
            .filter(|a| !a.pending && a.expires_at_ms.is_some_and(|end| end <= now_ms))
            .map(|a| a.allocation_id.clone())
            .collect();
        out.unrenewed = unrenewed
            .iter()
            .filter_map(|id| self.allocations.remove(id))
            .collect();
        out
    }

    /// Allocations booked for a flow task at least `grace_ms` ago: the ones
    /// reconciliation asks the orchestrator about. Younger ones may still be
    /// on their way into the flow's record.
    pub fn vouched_by_tasks(
        &self,
        grace_ms: u64,
        now_ms: u64,
    ) -> impl Iterator<Item = &Allocation> + '_ {
        self.allocations.values().filter(move |a| {
            let bound = a.bound_at_ms.unwrap_or(a.created_at_ms);
            a.task.is_some() && !a.pending && bound.saturating_add(grace_ms) <= now_ms
        })
    }

    /// Extends allocation `id`'s lease to `ttl_ms` (or its own `ttl_ms`) from
    /// now; the renewed allocation, or why not.
    pub fn renew(
        &mut self,
        id: &common::AllocationId,
        ttl_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Allocation, RenewRefused> {
        let a = self.allocations.get_mut(id).ok_or(RenewRefused::NotHere)?;
        let ttl = ttl_ms.or(a.ttl_ms).ok_or(RenewRefused::NoLease)?;
        a.ttl_ms = Some(ttl);
        a.expires_at_ms = Some(now_ms.saturating_add(ttl));
        Ok(a.clone())
    }

    /// Cancels reservation `id`; returns it and what drew from it.
    pub fn cancel_reservation(
        &mut self,
        id: &common::ReservationId,
    ) -> Option<(Reservation, Vec<Allocation>)> {
        let r = self.reservations.remove(id)?;
        let drawn = take_drawn(self, &r);
        Some((r, drawn))
    }

    /// The record with `changes` applied to its capacity.
    pub fn with_capacity(&self, changes: &BTreeMap<String, f64>) -> AgentRecord {
        let mut next = self.clone();
        for (r, v) in changes {
            next.capacity.insert(r.clone(), *v);
        }
        next
    }
}
