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
//!
//! Each allocation is also kept shared, with its encoding once made: every
//! compare-and-set on an agent copies its record and encodes all of it, and
//! an agent holding thousands of allocations made each booking a deep copy
//! and a fresh encoding of all of them (the record's copy, encoding and
//! drop were half of a busy allocator's CPU, measured). Now a copy shares
//! the allocations, and an encoding writes the ones unchanged since their
//! last as the bytes they were.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use common::msg::Allocation;
use common::AllocationId;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Amounts that are non-negative whole multiples of this (halves, quarters,
/// whole units and a power of two's fractions down to 2^-20 all are), with
/// every sum below [`EXACT_BELOW`], add up without rounding whatever the
/// order: each partial sum is a whole number of grains well below 2^53.
const GRAIN: f64 = 1.0 / (1u64 << 20) as f64;
const EXACT_BELOW: f64 = (1u64 << 30) as f64;

fn exact(amount: f64) -> bool {
    (0.0..EXACT_BELOW).contains(&amount) && (amount / GRAIN).fract() == 0.0
}

/// One allocation, shared between copies of its record, with its encoding
/// once made (`None` inside: it did not encode, and is encoded each time).
#[derive(Debug)]
pub struct Held {
    allocation: Allocation,
    encoded: OnceLock<Option<Box<RawValue>>>,
}

impl Held {
    fn new(allocation: Allocation) -> Arc<Held> {
        Arc::new(Held {
            allocation,
            encoded: OnceLock::new(),
        })
    }

    fn into_allocation(held: Arc<Held>) -> Allocation {
        Arc::try_unwrap(held).map_or_else(|h| h.allocation.clone(), |h| h.allocation)
    }

    fn encoded(&self) -> Option<&RawValue> {
        self.encoded
            .get_or_init(|| serde_json::value::to_raw_value(&self.allocation).ok())
            .as_deref()
    }
}

/// Allocations by id, stored as the plain map they are on the wire.
#[derive(Debug, Clone, Default)]
pub struct Allocations {
    map: BTreeMap<AllocationId, Arc<Held>>,
    /// What the allocations not drawn from a reservation use, by resource,
    /// and whether every amount summed was exact (so the sum may follow
    /// changes instead of being made again).
    general: OnceLock<(BTreeMap<String, f64>, bool)>,
}

impl Allocations {
    pub fn insert(&mut self, id: AllocationId, a: Allocation) -> Option<Allocation> {
        self.follow(&a, 1.0);
        let old = self.map.insert(id, Held::new(a)).map(Held::into_allocation);
        if let Some(old) = &old {
            self.follow(old, -1.0);
        }
        old
    }

    pub fn remove(&mut self, id: &AllocationId) -> Option<Allocation> {
        let old = self.map.remove(id).map(Held::into_allocation);
        if let Some(old) = &old {
            self.follow(old, -1.0);
        }
        old
    }

    /// The allocation to change: made this record's own, its encoding
    /// dropped.
    pub fn get_mut(&mut self, id: &AllocationId) -> Option<&mut Allocation> {
        self.general.take();
        let held = self.map.get_mut(id)?;
        if Arc::get_mut(held).is_none() {
            *held = Held::new(held.allocation.clone());
        }
        let held = Arc::get_mut(held)?;
        held.encoded = OnceLock::new();
        Some(&mut held.allocation)
    }

    pub fn get(&self, id: &AllocationId) -> Option<&Allocation> {
        self.map.get(id).map(|h| &h.allocation)
    }

    pub fn contains_key(&self, id: &AllocationId) -> bool {
        self.map.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn keys(&self) -> impl Iterator<Item = &AllocationId> {
        self.map.keys()
    }

    pub fn values(&self) -> impl Iterator<Item = &Allocation> {
        self.map.values().map(|h| &h.allocation)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&AllocationId, &Allocation)> {
        self.map.iter().map(|(id, h)| (id, &h.allocation))
    }

    pub fn into_values(self) -> impl Iterator<Item = Allocation> {
        self.map.into_values().map(Held::into_allocation)
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
                for a in self.values().filter(|a| a.reservation_id.is_none()) {
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

impl PartialEq for Allocations {
    fn eq(&self, other: &Self) -> bool {
        self.map.len() == other.map.len() && self.iter().eq(other.iter())
    }
}

impl From<BTreeMap<AllocationId, Allocation>> for Allocations {
    fn from(map: BTreeMap<AllocationId, Allocation>) -> Self {
        let map = map.into_iter().map(|(id, a)| (id, Held::new(a))).collect();
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

type Unshared = fn((AllocationId, Arc<Held>)) -> (AllocationId, Allocation);

impl IntoIterator for Allocations {
    type Item = (AllocationId, Allocation);
    type IntoIter =
        std::iter::Map<std::collections::btree_map::IntoIter<AllocationId, Arc<Held>>, Unshared>;

    fn into_iter(self) -> Self::IntoIter {
        self.map
            .into_iter()
            .map((|(id, h)| (id, Held::into_allocation(h))) as Unshared)
    }
}

impl Serialize for Allocations {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.map.len()))?;
        for (id, held) in &self.map {
            match held.encoded() {
                Some(raw) => m.serialize_entry(id, raw)?,
                None => m.serialize_entry(id, &held.allocation)?,
            }
        }
        m.end()
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

    #[test]
    fn a_copy_shares_its_allocations_and_encodes_each_change() {
        let id = |s: &str| AllocationId::new(s).unwrap();
        let mut held = Allocations::default();
        held.insert(id("a"), alloc("a", 1.0, false));
        held.insert(id("b"), alloc("b", 2.0, false));
        let plain = |h: &Allocations| {
            let map: BTreeMap<_, _> = h.iter().collect();
            serde_json::to_string(&map).unwrap()
        };
        // Encoded once, then written as those bytes.
        assert_eq!(serde_json::to_string(&held).unwrap(), plain(&held));
        let mut copy = held.clone();
        copy.get_mut(&id("a")).unwrap().priority = 7;
        copy.insert(id("c"), alloc("c", 0.5, false));
        assert_eq!(serde_json::to_string(&copy).unwrap(), plain(&copy));
        assert!(serde_json::to_string(&copy)
            .unwrap()
            .contains("\"priority\":7"));
        // The original is as it was, its encoding too.
        assert_eq!(held.get(&id("a")).unwrap().priority, 0);
        assert_eq!(serde_json::to_string(&held).unwrap(), plain(&held));
        assert_eq!(held.len(), 2);
        let back: Allocations =
            serde_json::from_str(&serde_json::to_string(&copy).unwrap()).unwrap();
        assert_eq!(back, copy);
        assert_ne!(back, held);
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
                let fresh: Allocations = held.iter().map(|(k, a)| (k.clone(), a.clone())).collect();
                proptest::prop_assert_eq!(
                    held.general_used("cpu").to_bits(),
                    fresh.general_used("cpu").to_bits()
                );
            }
        }
    }
}
