//! An agent's live allocations, with what they use in all kept beside them.
//! A fit check needs the sum per resource; computed from the allocations
//! each time, it made every check on an agent holding thousands a pass over
//! all of them (a quarter of a busy allocator's CPU, measured). The sum is
//! made on the first read after it was dropped and then follows inserts and
//! removals, as long as it stays exact: every amount so far a whole multiple
//! of [`GRAIN`] and small enough that no sum of them rounds. Then any order
//! of additions and subtractions gives the very sum a pass over the map
//! would, so a booking is judged the same here and on a fresh read. Any
//! other change (an inexact amount, `get_mut`) drops it. The map is reached
//! mutably only through the methods here.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::OnceLock;

use common::msg::Allocation;
use common::AllocationId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Amounts that are non-negative whole multiples of this (halves, quarters,
/// whole units and a power of two's fractions down to 2^-20 all are), with
/// every sum below [`EXACT_BELOW`], add up without rounding whatever the
/// order: each partial sum is a whole number of grains well below 2^53.
const GRAIN: f64 = 1.0 / (1u64 << 20) as f64;
const EXACT_BELOW: f64 = (1u64 << 30) as f64;

fn exact(amount: f64) -> bool {
    (0.0..EXACT_BELOW).contains(&amount) && (amount / GRAIN).fract() == 0.0
}

/// Allocations by id, stored as the plain map they are on the wire.
#[derive(Debug, Clone, Default)]
pub struct Allocations {
    map: BTreeMap<AllocationId, Allocation>,
    /// What the allocations not drawn from a reservation use, by resource,
    /// and whether every amount summed was exact (so the sum may follow
    /// changes instead of being made again).
    general: OnceLock<(BTreeMap<String, f64>, bool)>,
}

impl Allocations {
    pub fn insert(&mut self, id: AllocationId, a: Allocation) -> Option<Allocation> {
        self.follow(&a, 1.0);
        let old = self.map.insert(id, a);
        if let Some(old) = &old {
            self.follow(old, -1.0);
        }
        old
    }

    pub fn remove(&mut self, id: &AllocationId) -> Option<Allocation> {
        let old = self.map.remove(id);
        if let Some(old) = &old {
            self.follow(old, -1.0);
        }
        old
    }

    pub fn get_mut(&mut self, id: &AllocationId) -> Option<&mut Allocation> {
        self.general.take();
        self.map.get_mut(id)
    }

    pub fn into_values(self) -> std::collections::btree_map::IntoValues<AllocationId, Allocation> {
        self.map.into_values()
    }

    /// Moves the kept sum by `sign` times `a`'s use, or drops it when the
    /// result might not be exactly what a pass over the map gives.
    fn follow(&mut self, a: &Allocation, sign: f64) {
        if a.reservation_id.is_some() {
            return;
        }
        let Some((sums, true)) = self.general.get_mut() else {
            self.general.take();
            return;
        };
        let mut all = true;
        for (r, amount) in &a.resources {
            let sum = sums.get(r.as_str()).copied().unwrap_or(0.0);
            let next = sum + sign * amount;
            if !exact(*amount) || !exact(next) {
                all = false;
                break;
            }
            sums.insert(r.clone(), next);
        }
        if !all {
            self.general.take();
        }
    }

    /// What the allocations not drawn from a reservation use of `resource`.
    pub fn general_used(&self, resource: &str) -> f64 {
        self.general
            .get_or_init(|| {
                // Summed in the map's order, as a pass over it would.
                let mut used = BTreeMap::<String, f64>::new();
                let mut all = true;
                for a in self.map.values().filter(|a| a.reservation_id.is_none()) {
                    for (r, amount) in &a.resources {
                        all &= exact(*amount);
                        match used.get_mut(r.as_str()) {
                            Some(sum) => *sum += amount,
                            None => {
                                used.insert(r.clone(), 0.0 + amount);
                            }
                        }
                    }
                }
                all &= used.values().all(|s| exact(*s));
                (used, all)
            })
            .0
            .get(resource)
            .copied()
            .unwrap_or(0.0)
    }
}

impl Deref for Allocations {
    type Target = BTreeMap<AllocationId, Allocation>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl PartialEq for Allocations {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl From<BTreeMap<AllocationId, Allocation>> for Allocations {
    fn from(map: BTreeMap<AllocationId, Allocation>) -> Self {
        Allocations {
            map,
            general: OnceLock::new(),
        }
    }
}

impl FromIterator<(AllocationId, Allocation)> for Allocations {
    fn from_iter<I: IntoIterator<Item = (AllocationId, Allocation)>>(iter: I) -> Self {
        BTreeMap::from_iter(iter).into()
    }
}

impl IntoIterator for Allocations {
    type Item = (AllocationId, Allocation);
    type IntoIter = std::collections::btree_map::IntoIter<AllocationId, Allocation>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.into_iter()
    }
}

impl Serialize for Allocations {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.map.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Allocations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(d).map(Allocations::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(id: &str, cpu: f64, reserved: bool) -> Allocation {
        let mut a: Allocation = serde_json::from_value(serde_json::json!({
            "allocation_id": id, "agent_id": "w1", "owner": "o", "resources": {"cpu": cpu}
        }))
        .unwrap();
        if reserved {
            a.reservation_id = Some(common::ReservationId::new("r1").unwrap());
        }
        a
    }

    #[test]
    fn the_sum_follows_every_change() {
        let id = |s: &str| AllocationId::new(s).unwrap();
        let mut held = Allocations::default();
        assert_eq!(held.general_used("cpu"), 0.0);
        held.insert(id("a"), alloc("a", 1.5, false));
        held.insert(id("b"), alloc("b", 2.0, true));
        assert_eq!(
            held.general_used("cpu"),
            1.5,
            "a reservation's draw is apart"
        );
        held.insert(id("c"), alloc("c", 0.5, false));
        assert_eq!(held.general_used("cpu"), 2.0);
        held.get_mut(&id("c"))
            .unwrap()
            .resources
            .insert("cpu".into(), 3.0);
        assert_eq!(held.general_used("cpu"), 4.5);
        held.remove(&id("a"));
        assert_eq!(held.general_used("cpu"), 3.0);
        assert_eq!(held.general_used("gpu"), 0.0);
        let back: Allocations =
            serde_json::from_str(&serde_json::to_string(&held).unwrap()).unwrap();
        assert_eq!(back, held);
        assert_eq!(back.general_used("cpu"), 3.0);
    }

    proptest::proptest! {
        /// Whatever the amounts and the order of changes, the sum kept
        /// beside the map is bit for bit the one a pass over it makes.
        #[test]
        fn the_kept_sum_is_always_a_fresh_pass(
            ops in proptest::collection::vec(
                (0u8..6, proptest::sample::select(vec![0.0, 0.1, 0.25, 1.0, 1.5, 3.0, 1e-7, 4096.0, 2e9]), proptest::bool::ANY),
                1..80,
            )
        ) {
            let id = |n: u8| AllocationId::new(format!("a{n}")).unwrap();
            let mut held = Allocations::default();
            for (n, cpu, reserved) in ops {
                if cpu == 0.0 {
                    held.remove(&id(n));
                } else {
                    held.insert(id(n), alloc(&format!("a{n}"), cpu, reserved));
                }
                let fresh = Allocations::from(held.map.clone());
                proptest::prop_assert_eq!(
                    held.general_used("cpu").to_bits(),
                    fresh.general_used("cpu").to_bits()
                );
            }
        }
    }
}
