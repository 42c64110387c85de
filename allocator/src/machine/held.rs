//! An agent's live allocations, with what they use in all kept beside them.
//! A fit check needs the sum per resource; computed from the allocations
//! each time, it made every check on an agent holding thousands a pass over
//! all of them (a quarter of a busy allocator's CPU, measured). The sum is
//! made on the first read after a change, and every change drops it: the
//! map is reached mutably only through the methods here.

use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::OnceLock;

use common::msg::Allocation;
use common::AllocationId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Allocations by id, stored as the plain map they are on the wire.
#[derive(Debug, Clone, Default)]
pub struct Allocations {
    map: BTreeMap<AllocationId, Allocation>,
    /// What the allocations not drawn from a reservation use, by resource.
    general: OnceLock<BTreeMap<String, f64>>,
}

impl Allocations {
    pub fn insert(&mut self, id: AllocationId, a: Allocation) -> Option<Allocation> {
        self.general.take();
        self.map.insert(id, a)
    }

    pub fn remove(&mut self, id: &AllocationId) -> Option<Allocation> {
        self.general.take();
        self.map.remove(id)
    }

    pub fn get_mut(&mut self, id: &AllocationId) -> Option<&mut Allocation> {
        self.general.take();
        self.map.get_mut(id)
    }

    pub fn into_values(self) -> std::collections::btree_map::IntoValues<AllocationId, Allocation> {
        self.map.into_values()
    }

    /// What the allocations not drawn from a reservation use of `resource`.
    pub fn general_used(&self, resource: &str) -> f64 {
        self.general
            .get_or_init(|| {
                // Summed in the map's order, as a pass over it would.
                let mut used = BTreeMap::<String, f64>::new();
                for a in self.map.values().filter(|a| a.reservation_id.is_none()) {
                    for (r, amount) in &a.resources {
                        match used.get_mut(r.as_str()) {
                            Some(sum) => *sum += amount,
                            None => {
                                used.insert(r.clone(), 0.0 + amount);
                            }
                        }
                    }
                }
                used
            })
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
}
