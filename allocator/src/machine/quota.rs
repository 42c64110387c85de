//! Quotas per owner: how much an owner (with every owner below it) may hold
//! across the pool, and the allocations counted against it.
//!
//! The agent records cannot enforce a limit that spans agents, since each is
//! its own compare-and-set. So the pool keeps one more document, the
//! [`QuotaBook`]: the limits, plus every allocation counted against a quota (a
//! *hold*). An allocation under a quota is booked on its agent first, then
//! counted here by a compare-and-set on the book (which refuses it if the
//! limit would be passed), and only then confirmed. Every hold therefore
//! stands for an allocation that was booked before it, which is what lets the
//! sweep drop holds whose allocation is gone without racing a booking.

use std::collections::{BTreeMap, BTreeSet};

use common::msg::{Allocation, QuotaExceeded, QuotaStatus};
use common::AllocationId;
use serde::{Deserialize, Serialize};

use super::{owner_covers, EPS};

/// The quota document, as stored in KV.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuotaBook {
    /// By the owner the quota is set for.
    #[serde(default)]
    pub quotas: BTreeMap<String, Quota>,
    /// Allocations counted against at least one quota, as they were booked.
    #[serde(default)]
    pub holds: BTreeMap<AllocationId, Allocation>,
}

/// One owner's quota.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    /// Most the owner may hold per resource; resources not named are not capped.
    #[serde(default)]
    pub limits: BTreeMap<String, f64>,
    /// Whether the allocations that existed when the quota was created have
    /// been counted. Until then nothing is admitted against it: what is in
    /// use is not known yet.
    #[serde(default)]
    pub counted: bool,
}

/// What counting a request against the quotas decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// No quota covers the owner: nothing to count.
    Ungoverned,
    /// Counted (the book changed).
    Admitted,
    /// A quota covering the owner is still being counted: try again shortly.
    Counting,
    /// It would pass a limit.
    Over(QuotaExceeded),
}

impl QuotaBook {
    /// The quotas that cover `owner`: its own and those of owners above it.
    pub fn covering<'a>(&'a self, owner: &'a str) -> impl Iterator<Item = (&'a String, &'a Quota)> {
        self.quotas
            .iter()
            .filter(move |(holder, _)| owner_covers(holder, owner))
    }

    pub fn governs(&self, owner: &str) -> bool {
        self.covering(owner).next().is_some()
    }

    /// Held per resource against `holder`'s quota, leaving out `except`.
    fn used_except(&self, holder: &str, except: &BTreeSet<&AllocationId>) -> BTreeMap<String, f64> {
        let mut used = BTreeMap::new();
        for (id, a) in &self.holds {
            if except.contains(id) || !owner_covers(holder, &a.owner) {
                continue;
            }
            for (r, v) in &a.resources {
                *used.entry(r.clone()).or_insert(0.0) += v;
            }
        }
        used
    }

    /// The quota set for `holder` with what is counted against it.
    pub fn status(&self, holder: &str) -> Option<QuotaStatus> {
        let quota = self.quotas.get(holder)?;
        Some(QuotaStatus {
            limits: quota.limits.clone(),
            used: self.used_except(holder, &BTreeSet::new()),
            allocations: self
                .holds
                .values()
                .filter(|a| owner_covers(holder, &a.owner))
                .count(),
        })
    }

    /// Every quota covering `owner` (every quota when `None`), with its usage.
    pub fn report(&self, owner: Option<&str>) -> BTreeMap<String, QuotaStatus> {
        self.quotas
            .keys()
            .filter(|holder| owner.is_none_or(|o| owner_covers(holder, o)))
            .filter_map(|holder| Some((holder.clone(), self.status(holder)?)))
            .collect()
    }

    /// Counts `allocs` (one request: a single allocation or a whole gang, of
    /// one owner) against every quota covering their owner, all or none.
    /// Counting an allocation that is held already replaces its hold, so a
    /// retried booking is not counted twice.
    pub fn admit(&mut self, allocs: &[Allocation]) -> Admission {
        let Some(owner) = allocs.first().map(|a| a.owner.clone()) else {
            return Admission::Ungoverned;
        };
        if !self.governs(&owner) {
            return Admission::Ungoverned;
        }
        if self.covering(&owner).any(|(_, q)| !q.counted) {
            return Admission::Counting;
        }
        let ids: BTreeSet<&AllocationId> = allocs.iter().map(|a| &a.allocation_id).collect();
        let mut requested: BTreeMap<&str, f64> = BTreeMap::new();
        for a in allocs {
            for (r, v) in &a.resources {
                *requested.entry(r.as_str()).or_insert(0.0) += v;
            }
        }
        for (holder, quota) in self.covering(&owner) {
            let used = self.used_except(holder, &ids);
            for (r, limit) in &quota.limits {
                let asked = requested.get(r.as_str()).copied().unwrap_or(0.0);
                let in_use = used.get(r).copied().unwrap_or(0.0);
                if asked > EPS && in_use + asked - limit > EPS {
                    return Admission::Over(QuotaExceeded {
                        owner: owner.clone(),
                        quota_owner: holder.clone(),
                        resource: r.clone(),
                        limit: *limit,
                        in_use,
                        requested: asked,
                    });
                }
            }
        }
        for a in allocs {
            let mut held = a.clone();
            held.pending = false;
            self.holds.insert(held.allocation_id.clone(), held);
        }
        Admission::Admitted
    }

    /// Stops counting allocations `ids` (released, preempted, rolled back).
    /// Returns whether anything was held.
    pub fn forget<'a>(&mut self, ids: impl IntoIterator<Item = &'a AllocationId>) -> bool {
        let mut changed = false;
        for id in ids {
            changed |= self.holds.remove(id).is_some();
        }
        changed
    }

    /// The holds that would have to go for `holder` to be within `limits`:
    /// lowest priority first, newest first among equals (so the longest-running
    /// work survives), only allocations that hold an over-limit resource, and
    /// none that the limits could keep once the others have gone.
    pub fn over_limits(&self, holder: &str, limits: &BTreeMap<String, f64>) -> Vec<Allocation> {
        let mut gone: BTreeSet<&AllocationId> = BTreeSet::new();
        let mut out: Vec<&Allocation> = Vec::new();
        for (r, limit) in limits {
            loop {
                let used = self
                    .used_except(holder, &gone)
                    .get(r)
                    .copied()
                    .unwrap_or(0.0);
                if used - limit <= EPS {
                    break;
                }
                let victim = self
                    .holds
                    .values()
                    .filter(|a| owner_covers(holder, &a.owner) && !gone.contains(&a.allocation_id))
                    .filter(|a| a.resources.get(r).copied().unwrap_or(0.0) > EPS)
                    .min_by(|a, b| {
                        a.priority
                            .cmp(&b.priority)
                            .then(b.created_at_ms.cmp(&a.created_at_ms))
                            .then_with(|| b.allocation_id.cmp(&a.allocation_id))
                    });
                let Some(v) = victim else { break };
                gone.insert(&v.allocation_id);
                out.push(v);
            }
        }
        // Taking in order can take too much (a small victim, then a large one
        // that alone suffices): keep back, the last to be preempted first,
        // every victim the limits allow.
        let within = |gone: &BTreeSet<&AllocationId>| {
            let used = self.used_except(holder, gone);
            limits
                .iter()
                .all(|(r, limit)| used.get(r).copied().unwrap_or(0.0) - limit <= EPS)
        };
        for i in (0..out.len()).rev() {
            let id = &out[i].allocation_id;
            gone.remove(id);
            if within(&gone) {
                out.remove(i);
            } else {
                gone.insert(id);
            }
        }
        out.into_iter().cloned().collect()
    }

    /// Whether every counted quota is within its limits (what a checker of
    /// the stored history asserts at every revision).
    pub fn within_limits(&self) -> Result<(), String> {
        for (holder, quota) in &self.quotas {
            if !quota.counted {
                continue;
            }
            let used = self.used_except(holder, &BTreeSet::new());
            for (r, limit) in &quota.limits {
                let u = used.get(r).copied().unwrap_or(0.0);
                if u - limit > EPS * 1e3 {
                    return Err(format!("{holder}: {r} {u} held of a {limit} quota"));
                }
            }
        }
        Ok(())
    }

    /// Brings the holds in line with `live`, every allocation on every agent
    /// at one instant: holds of allocations no longer there go, and live
    /// allocations under a quota that are not held are counted (confirmed
    /// ones always; pending ones too while a quota is first counted, since
    /// their booking may have looked before the quota existed). Marks every
    /// quota counted. Returns whether the book changed.
    ///
    /// Sound only because a hold is written after its allocation is booked:
    /// a hold whose allocation is missing from a view taken after the book
    /// was read belongs to an allocation that is gone for good.
    pub fn reconcile(&mut self, live: &BTreeMap<AllocationId, Allocation>) -> bool {
        let before = self.clone();
        self.holds.retain(|id, _| live.contains_key(id));
        let counting = self.quotas.values().any(|q| !q.counted);
        for (id, a) in live {
            if self.holds.contains_key(id) || !self.governs(&a.owner) {
                continue;
            }
            let first_count = self.covering(&a.owner).any(|(_, q)| !q.counted);
            if !a.pending || (counting && first_count) {
                let mut held = a.clone();
                held.pending = false;
                self.holds.insert(id.clone(), held);
            }
        }
        // Moves keep the id; keep each hold's copy current.
        for (id, held) in self.holds.iter_mut() {
            if let Some(a) = live.get(id) {
                held.agent_id = a.agent_id.clone();
            }
        }
        for q in self.quotas.values_mut() {
            q.counted = true;
        }
        // Holds no quota covers any more are not needed.
        let quotas = self.quotas.clone();
        self.holds
            .retain(|_, a| quotas.keys().any(|h| owner_covers(h, &a.owner)));
        *self != before
    }

    /// Removes `holder`'s quota, and the holds no other quota needs.
    pub fn clear(&mut self, holder: &str) -> bool {
        if self.quotas.remove(holder).is_none() {
            return false;
        }
        let quotas = &self.quotas;
        self.holds
            .retain(|_, a| quotas.keys().any(|h| owner_covers(h, &a.owner)));
        true
    }
}

#[cfg(test)]
mod tests {
    //! Counting against quotas: limits across agents, nested owners, gangs,
    //! preemption order, and repair from a view of the agents.

    use common::AgentId;
    use proptest::prelude::*;

    use super::*;

    fn alloc(id: &str, owner: &str, cpu: f64, priority: i32, at: u64) -> Allocation {
        Allocation {
            allocation_id: AllocationId::new(id).unwrap(),
            agent_id: AgentId::new(format!("w{}", at % 3)).unwrap(),
            owner: owner.into(),
            resources: [("cpu".to_string(), cpu)].into(),
            priority,
            created_at_ms: at,
            reservation_id: None,
            anti_affinity: None,
            movable: false,
            capabilities: vec![],
            labels: BTreeMap::new(),
            gang_id: None,
            pending: false,
            task: None,
            ttl_ms: None,
            expires_at_ms: None,
            bound_at_ms: None,
        }
    }

    fn book(holder: &str, cpu: f64) -> QuotaBook {
        let mut b = QuotaBook::default();
        b.quotas.insert(
            holder.into(),
            Quota {
                limits: [("cpu".to_string(), cpu)].into(),
                counted: true,
            },
        );
        b
    }

    #[test]
    fn a_quota_covers_the_owner_and_owners_below_it_across_agents() {
        let mut b = book("team", 3.0);
        assert_eq!(
            b.admit(&[alloc("a", "team/f1", 2.0, 0, 0)]),
            Admission::Admitted
        );
        assert_eq!(
            b.admit(&[alloc("b", "team", 1.0, 0, 1)]),
            Admission::Admitted
        );
        let Admission::Over(over) = b.admit(&[alloc("c", "team/f2", 0.5, 0, 2)]) else {
            panic!("admitted beyond the quota")
        };
        assert_eq!(
            (
                over.quota_owner.as_str(),
                over.limit,
                over.in_use,
                over.requested
            ),
            ("team", 3.0, 3.0, 0.5)
        );
        assert_eq!(
            b.admit(&[alloc("d", "teammate", 9.0, 0, 3)]),
            Admission::Ungoverned
        );
        assert_eq!(b.status("team").unwrap().used["cpu"], 3.0);
        // Counting the same allocation again replaces it.
        assert_eq!(
            b.admit(&[alloc("b", "team", 1.0, 0, 1)]),
            Admission::Admitted
        );
        assert_eq!(b.status("team").unwrap().allocations, 2);
        assert!(b.forget([&AllocationId::new("a").unwrap()]));
        assert!(!b.forget([&AllocationId::new("a").unwrap()]));
        assert_eq!(
            b.admit(&[alloc("c", "team/f2", 2.0, 0, 2)]),
            Admission::Admitted
        );
    }

    #[test]
    fn a_gang_counts_every_member_or_none() {
        let mut b = book("o", 4.0);
        let gang = [alloc("g1", "o", 2.0, 0, 0), alloc("g2", "o", 2.5, 0, 0)];
        assert!(matches!(b.admit(&gang), Admission::Over(x) if x.requested == 4.5));
        assert!(b.holds.is_empty());
        assert_eq!(b.admit(&gang[..1]), Admission::Admitted);
    }

    #[test]
    fn nothing_is_admitted_while_a_quota_is_being_counted() {
        let mut b = book("o", 4.0);
        b.quotas.insert("o/x".into(), Quota::default());
        assert_eq!(
            b.admit(&[alloc("a", "o/x/y", 1.0, 0, 0)]),
            Admission::Counting
        );
        assert_eq!(
            b.admit(&[alloc("a", "o/z", 1.0, 0, 0)]),
            Admission::Admitted
        );
    }

    #[test]
    fn lowering_takes_the_lowest_priority_then_the_newest_first() {
        let mut b = book("o", 10.0);
        for (id, prio, at) in [
            ("p5", 5, 0),
            ("p0-old", 0, 1),
            ("p0-new", 0, 2),
            ("p1", 1, 3),
        ] {
            assert_eq!(
                b.admit(&[alloc(id, "o", 2.0, prio, at)]),
                Admission::Admitted
            );
        }
        let gone: Vec<String> = b
            .over_limits("o", &[("cpu".to_string(), 3.0)].into())
            .iter()
            .map(|a| a.allocation_id.to_string())
            .collect();
        assert_eq!(gone, ["p0-new", "p0-old", "p1"]);
        assert!(b
            .over_limits("o", &[("cpu".to_string(), 8.0)].into())
            .is_empty());
    }

    #[test]
    fn lowering_releases_only_what_it_must() {
        let mut b = book("o", 10.0);
        // The small one comes first in preemption order, but the big one alone suffices.
        for (id, cpu, prio) in [("big", 1.5, 1), ("small", 0.5, 0)] {
            assert_eq!(
                b.admit(&[alloc(id, "o", cpu, prio, 0)]),
                Admission::Admitted
            );
        }
        let gone: Vec<String> = b
            .over_limits("o", &[("cpu".to_string(), 1.0)].into())
            .iter()
            .map(|a| a.allocation_id.to_string())
            .collect();
        assert_eq!(gone, ["big"]);
    }

    #[test]
    fn reconcile_drops_holds_of_gone_allocations_and_counts_the_unheld() {
        let mut b = book("o", 10.0);
        b.admit(&[alloc("gone", "o", 1.0, 0, 0)]);
        b.quotas.insert("p".into(), Quota::default());
        let mut pending = alloc("pend", "p", 1.0, 0, 0);
        pending.pending = true;
        let live: BTreeMap<_, _> = [alloc("kept", "o/x", 2.0, 0, 0), pending.clone()]
            .into_iter()
            .map(|a| (a.allocation_id.clone(), a))
            .collect();
        assert!(b.reconcile(&live));
        let held: Vec<String> = b.holds.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            held,
            ["kept", "pend"],
            "pending ones count while a quota is new"
        );
        assert!(b.quotas.values().all(|q| q.counted));
        assert!(!b.reconcile(&live), "a second pass changes nothing");
        // Once counted, a pending booking counts itself.
        let mut later = live.clone();
        let mut p2 = alloc("pend2", "p", 1.0, 0, 0);
        p2.pending = true;
        later.insert(p2.allocation_id.clone(), p2);
        assert!(!b.reconcile(&later));
        assert!(b.clear("p"));
        assert_eq!(b.holds.len(), 1);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Admit(u8, Vec<(u8, u8)>, i8),
        Forget(usize),
        Lower(u8, u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, prop::collection::vec((0u8..3, 0u8..5), 1..3), any::<i8>())
                .prop_map(|(o, m, p)| Op::Admit(o, m, p)),
            2 => any::<usize>().prop_map(Op::Forget),
            1 => (0u8..2, 0u8..12).prop_map(|(h, l)| Op::Lower(h, l)),
        ]
    }

    const OWNERS: [&str; 4] = ["t", "t/a", "t/a/b", "u"];

    proptest! {
        /// No sequence of admissions, releases and preempting reductions
        /// leaves a counted quota over its limit, and forgetting what was
        /// admitted gives the book back as it was.
        #[test]
        fn quotas_are_never_exceeded(ops in prop::collection::vec(op(), 1..60)) {
            let mut b = book("t", 8.0);
            b.quotas.insert("t/a".into(), Quota { limits: [("cpu".to_string(), 5.0)].into(), counted: true });
            let mut n = 0u32;
            for op in ops {
                match op {
                    Op::Admit(o, members, prio) => {
                        let before = b.clone();
                        let allocs: Vec<Allocation> = members.iter().map(|(_, cpu)| {
                            n += 1;
                            alloc(&format!("a{n}"), OWNERS[o as usize], *cpu as f64 * 0.5, prio as i32, n as u64)
                        }).collect();
                        match b.admit(&allocs) {
                            Admission::Admitted => {
                                let mut undone = b.clone();
                                undone.forget(allocs.iter().map(|a| &a.allocation_id));
                                prop_assert_eq!(&undone, &before);
                            }
                            Admission::Over(_) | Admission::Ungoverned => prop_assert_eq!(&b, &before),
                            Admission::Counting => prop_assert!(false, "every quota is counted"),
                        }
                    }
                    Op::Forget(i) => {
                        if let Some(id) = b.holds.keys().nth(i % b.holds.len().max(1)).cloned() {
                            prop_assert!(b.forget([&id]));
                        }
                    }
                    Op::Lower(h, limit) => {
                        let holder = ["t", "t/a"][h as usize];
                        let limits: BTreeMap<String, f64> = [("cpu".to_string(), limit as f64 * 0.5)].into();
                        let victims = b.over_limits(holder, &limits);
                        b.forget(victims.iter().map(|a| &a.allocation_id));
                        b.quotas.get_mut(holder).unwrap().limits = limits;
                    }
                }
                prop_assert_eq!(b.within_limits(), Ok(()));
            }
        }
    }
}
