//! A flow's tasks by id, remembering which ones a step may have changed.

use std::cmp::Reverse;
use std::collections::{btree_map, BTreeMap, BTreeSet, HashMap};
use std::ops::Deref;
use std::sync::Mutex;

use common::msg::TaskState;
use common::TaskId;
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use super::Task;

/// The tasks of a flow. Reading goes through `Deref` to the map; every way to
/// change it is a method here that notes the task it hands out, so the store
/// can write only the pages holding tasks a step touched (a large flow would
/// otherwise be encoded whole after every step), and the ready tasks and
/// the timers can be kept in order without a pass over every task: reading
/// either takes `&mut self` and brings the order up to date first.
///
/// Each task's encoding is kept once made, and dropped when the task is
/// handed out for change: a step of a flow in one entry encodes the flow
/// whole, and made every task's encoding anew for the few it changed.
#[derive(Debug, Default)]
pub struct Tasks {
    map: BTreeMap<TaskId, Task>,
    touched: Touched,
    index: Ready,
    encoded: Encodings,
}

/// Most tasks whose encodings are kept: a flow in one entry (larger ones are
/// written by pages, each encoded again only when a task on it changed), so
/// a flow of a million tasks does not hold a second copy of them all.
const ENCODINGS_KEPT: usize = 1_000;

/// The tasks' encodings as last made, by id (a task missing here, or whose
/// encoding failed, is encoded when written).
#[derive(Debug, Default)]
struct Encodings(Mutex<HashMap<TaskId, Box<RawValue>>>);

impl Encodings {
    fn forget(&mut self, id: &TaskId) {
        if let Ok(m) = self.0.get_mut() {
            m.remove(id);
        }
    }

    fn clear(&mut self) {
        if let Ok(m) = self.0.get_mut() {
            m.clear();
        }
    }
}

/// Where a ready task stands in dispatch order: priority, then upward rank,
/// both highest first, then id.
type Rank = (Reverse<i32>, Reverse<u64>);

/// The ready tasks in dispatch order, and every task's next timer, kept up
/// to date from the noted tasks.
#[derive(Debug, Default)]
struct Ready {
    /// `None` until built (after every task may have changed).
    order: Option<BTreeSet<(Rank, TaskId)>>,
    /// The rank each task in `order` is filed under.
    filed: HashMap<TaskId, Rank>,
    /// The tasks with a timer by when it is due (built with `order`).
    timers: BTreeMap<u64, BTreeSet<TaskId>>,
    /// The time each task in `timers` is filed under.
    timed: HashMap<TaskId, u64>,
    /// How many of the noted tasks `order` has taken in.
    seen: usize,
}

fn rank_of(t: &Task) -> Rank {
    (Reverse(t.spec.priority), Reverse(t.rank))
}

/// When something is due for `t`: its back-off ending, the deadline of its
/// attempt, or the first moment past its wait's deadline (an event stored
/// at the deadline still counts).
pub fn due_of(t: &Task) -> Option<u64> {
    match t.state {
        TaskState::Ready if t.not_before_ms > 0 => Some(t.not_before_ms),
        TaskState::Assigned | TaskState::Running => t.deadline_ms,
        TaskState::Waiting => t.deadline_ms.map(|d| d.saturating_add(1)),
        _ => None,
    }
}

impl Ready {
    fn refile(&mut self, map: &BTreeMap<TaskId, Task>, id: &TaskId) {
        let Some(order) = &mut self.order else {
            return;
        };
        if let Some(rank) = self.filed.remove(id) {
            order.remove(&(rank, id.clone()));
        }
        if let Some(due) = self.timed.remove(id) {
            if let btree_map::Entry::Occupied(mut at) = self.timers.entry(due) {
                at.get_mut().remove(id);
                if at.get().is_empty() {
                    at.remove();
                }
            }
        }
        let Some(t) = map.get(id) else {
            return;
        };
        if t.state == TaskState::Ready {
            let rank = rank_of(t);
            order.insert((rank, id.clone()));
            self.filed.insert(id.clone(), rank);
        }
        if let Some(due) = due_of(t) {
            self.timers.entry(due).or_default().insert(id.clone());
            self.timed.insert(id.clone(), due);
        }
    }

    /// Takes in what was noted since the last time.
    fn catch_up(&mut self, map: &BTreeMap<TaskId, Task>, touched: &Touched) {
        match touched {
            Touched::All => self.seen = usize::MAX,
            Touched::Some(ids) => {
                for id in ids.get(self.seen..).unwrap_or_default() {
                    self.refile(map, id);
                }
                self.seen = ids.len();
            }
            Touched::None => {}
        }
    }

    fn build(&mut self, map: &BTreeMap<TaskId, Task>) {
        let ready = map.values().filter(|t| t.state == TaskState::Ready);
        self.filed = ready
            .clone()
            .map(|t| (t.spec.id.clone(), rank_of(t)))
            .collect();
        self.order = Some(ready.map(|t| (rank_of(t), t.spec.id.clone())).collect());
        self.timed = map
            .values()
            .filter_map(|t| Some((t.spec.id.clone(), due_of(t)?)))
            .collect();
        self.timers = BTreeMap::new();
        for (id, due) in &self.timed {
            self.timers.entry(*due).or_default().insert(id.clone());
        }
    }
}

impl Clone for Tasks {
    fn clone(&self) -> Self {
        Tasks {
            map: self.map.clone(),
            touched: self.touched.clone(),
            index: Ready::default(),
            encoded: Encodings::default(),
        }
    }
}

/// Tasks handed out for change since the store last asked (an id may be
/// listed more than once: noting is on the hot path, hashing is not needed).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum Touched {
    #[default]
    None,
    Some(Vec<TaskId>),
    /// Every task may have changed.
    All,
}

/// Past this many notes, "all" is cheaper to act on.
const MAX_NOTED: usize = 1 << 16;

impl Touched {
    fn note(&mut self, id: &TaskId) {
        match self {
            Touched::None => *self = Touched::Some(vec![id.clone()]),
            Touched::Some(ids) if ids.len() < MAX_NOTED => ids.push(id.clone()),
            Touched::Some(_) => *self = Touched::All,
            Touched::All => {}
        }
    }
}

impl Tasks {
    pub fn get_mut(&mut self, id: &TaskId) -> Option<&mut Task> {
        let task = self.map.get_mut(id)?;
        self.touched.note(id);
        self.encoded.forget(id);
        Some(task)
    }

    pub fn insert(&mut self, id: TaskId, task: Task) -> Option<Task> {
        self.touched.note(&id);
        self.encoded.forget(&id);
        self.map.insert(id, task)
    }

    pub fn remove(&mut self, id: &TaskId) -> Option<Task> {
        self.touched.note(id);
        self.encoded.forget(id);
        self.map.remove(id)
    }

    pub fn iter_mut(&mut self) -> btree_map::IterMut<'_, TaskId, Task> {
        self.touched = Touched::All;
        self.encoded.clear();
        self.map.iter_mut()
    }

    pub fn values_mut(&mut self) -> btree_map::ValuesMut<'_, TaskId, Task> {
        self.touched = Touched::All;
        self.encoded.clear();
        self.map.values_mut()
    }

    /// What was handed out for change since the last call.
    pub fn take_touched(&mut self) -> Touched {
        match &self.touched {
            Touched::All => self.index.order = None,
            other => self.index.catch_up(&self.map, other),
        }
        self.index.seen = 0;
        std::mem::take(&mut self.touched)
    }

    /// The ready tasks in dispatch order (see [`Rank`]), as of now.
    pub fn ready_in_order(&mut self) -> &BTreeSet<(Rank, TaskId)> {
        self.settle();
        self.ready_order()
    }

    /// The earliest time a task's timer is due (see [`due_of`]), without a
    /// pass over every task.
    pub fn next_due(&mut self) -> Option<u64> {
        self.settle();
        self.index.timers.keys().next().copied()
    }

    /// The first time a task's timer is due after `now_ms` (a back-off that
    /// ended while its task waits to be placed is due still, and in the past).
    pub fn next_due_after(&mut self, now_ms: u64) -> Option<u64> {
        self.settle();
        let after = self.index.timers.range(now_ms.saturating_add(1)..).next();
        after.map(|(due, _)| *due)
    }

    /// The tasks whose timer is due by `now_ms`, earliest first.
    pub fn due_by(&mut self, now_ms: u64) -> Vec<TaskId> {
        self.settle();
        let due = self.index.timers.range(..=now_ms).flat_map(|(_, ids)| ids);
        due.cloned().collect()
    }

    /// Brings the order and timers up to date with the tasks noted since.
    pub fn settle(&mut self) {
        self.index.catch_up(&self.map, &self.touched);
        // While every task may have changed, built afresh on every call.
        if matches!(self.touched, Touched::All) || self.index.order.is_none() {
            self.index.build(&self.map);
        }
    }

    /// The ready order as of the last [`Tasks::settle`], for a reader that
    /// settled it and holds the tasks shared meanwhile.
    pub(super) fn ready_order(&self) -> &BTreeSet<(Rank, TaskId)> {
        static EMPTY: BTreeSet<(Rank, TaskId)> = BTreeSet::new();
        self.index.order.as_ref().unwrap_or(&EMPTY)
    }
}

impl Deref for Tasks {
    type Target = BTreeMap<TaskId, Task>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl PartialEq for Tasks {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl FromIterator<(TaskId, Task)> for Tasks {
    fn from_iter<I: IntoIterator<Item = (TaskId, Task)>>(iter: I) -> Self {
        Tasks {
            map: iter.into_iter().collect(),
            touched: Touched::All,
            index: Ready::default(),
            encoded: Encodings::default(),
        }
    }
}

impl Extend<(TaskId, Task)> for Tasks {
    fn extend<I: IntoIterator<Item = (TaskId, Task)>>(&mut self, iter: I) {
        self.touched = Touched::All;
        self.encoded.clear();
        self.map.extend(iter);
    }
}

impl<'a> IntoIterator for &'a Tasks {
    type Item = (&'a TaskId, &'a Task);
    type IntoIter = btree_map::Iter<'a, TaskId, Task>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

impl Serialize for Tasks {
    /// The map of tasks by id, each unchanged task written as the bytes of
    /// its last encoding.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Ok(mut encoded) = self.encoded.0.lock() else {
            return self.map.serialize(s);
        };
        if self.map.len() > ENCODINGS_KEPT {
            encoded.clear();
            return self.map.serialize(s);
        }
        let mut m = s.serialize_map(Some(self.map.len()))?;
        for (id, task) in &self.map {
            if !encoded.contains_key(id) {
                match serde_json::value::to_raw_value(task) {
                    Ok(raw) => {
                        encoded.insert(id.clone(), raw);
                    }
                    Err(_) => {
                        m.serialize_entry(id, task)?;
                        continue;
                    }
                }
            }
            match encoded.get(id) {
                Some(raw) => m.serialize_entry(id, raw)?,
                None => m.serialize_entry(id, task)?,
            }
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Tasks {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Tasks {
            map: BTreeMap::deserialize(d)?,
            touched: Touched::None,
            index: Ready::default(),
            encoded: Encodings::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(n: usize) -> Tasks {
        super::super::Flow::independent(n).tasks
    }

    #[test]
    fn a_task_handed_out_for_change_is_encoded_anew() {
        let plain = |t: &Tasks| serde_json::to_string(&t.map).unwrap();
        let mut t = tasks(3);
        assert_eq!(serde_json::to_string(&t).unwrap(), plain(&t));
        let id = |s: &str| TaskId::new(s).unwrap();
        t.get_mut(&id("t0")).unwrap().attempt = 7;
        assert_eq!(serde_json::to_string(&t).unwrap(), plain(&t));
        let moved = t.remove(&id("t1")).unwrap();
        t.insert(id("t5"), moved);
        assert_eq!(serde_json::to_string(&t).unwrap(), plain(&t));
        t.values_mut().for_each(|task| task.attempt = 3);
        assert_eq!(serde_json::to_string(&t).unwrap(), plain(&t));
        t.iter_mut().for_each(|(_, task)| task.attempt = 4);
        let copy = t.clone();
        assert_eq!(serde_json::to_string(&copy).unwrap(), plain(&t));
        let back: Tasks = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn every_way_to_change_a_task_is_noted() {
        let mut t = tasks(3);
        assert_eq!(t.take_touched(), Touched::All, "new tasks are all new");
        assert_eq!(t.take_touched(), Touched::None);
        let id = |s: &str| TaskId::new(s).unwrap();
        let _ = t.get(&id("t0"));
        assert_eq!(t.take_touched(), Touched::None, "reading changes nothing");
        t.get_mut(&id("t0")).unwrap().attempt = 2;
        let gone = t.remove(&id("t1")).unwrap();
        t.insert(id("t9"), gone);
        assert!(t.get_mut(&id("nope")).is_none());
        assert_eq!(
            t.take_touched(),
            Touched::Some(vec![id("t0"), id("t1"), id("t9")])
        );
        t.values_mut().for_each(|_| {});
        assert_eq!(t.take_touched(), Touched::All);
    }
}
