//! A flow actor's placements: the tasks out with the allocator, and those it
//! refused, held back until capacity may have freed up.
//!
//! Without the holding back, a task no agent can take goes straight back to
//! the allocator: a wide flow with nowhere to run kept both cores busy asking.
//! Capacity frees when a release, a new agent or a changed capacity is seen,
//! which the replica counts (its *freed* count); a refusal made before the
//! count last moved is stale and retried at once, and every task held back is
//! let go when it moves. Otherwise a task waits out a back-off that doubles
//! with each refusal, since releases by other replicas are not counted.

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};

use common::TaskId;

/// First wait after a refusal, doubled on each further one ...
const FIRST_MS: u64 = 10;
/// ... up to this.
pub(super) const MAX_MS: u64 = 5_000;

#[derive(Debug, Default)]
pub struct Placing {
    /// Out with the allocator (derefs to this).
    out: HashSet<TaskId>,
    /// Refused: not asked again before the time given, and the refusals so far.
    held: HashMap<TaskId, (u64, u32)>,
    /// The freed count the held tasks were refused at.
    freed: u64,
    /// When the wake-up already scheduled fires.
    wake_ms: Option<u64>,
}

impl Deref for Placing {
    type Target = HashSet<TaskId>;
    fn deref(&self) -> &HashSet<TaskId> {
        &self.out
    }
}

impl DerefMut for Placing {
    fn deref_mut(&mut self) -> &mut HashSet<TaskId> {
        &mut self.out
    }
}

impl Placing {
    /// The allocator refused `task`; `asked_at` is the freed count read when
    /// it was asked, `freed` the count now.
    pub fn refused(&mut self, task: TaskId, asked_at: u64, freed: u64, now: u64) {
        self.out.remove(&task);
        if asked_at != freed {
            return;
        }
        self.refresh(freed);
        let (until, refusals) = self.held.entry(task).or_insert((0, 0));
        *refusals = refusals.saturating_add(1);
        let wait = FIRST_MS.saturating_mul(1 << (*refusals - 1).min(20));
        *until = now.saturating_add(wait.min(MAX_MS));
    }

    /// Lets every held task go if capacity freed since they were refused.
    pub fn refresh(&mut self, freed: u64) {
        if self.freed != freed {
            self.held.clear();
            self.freed = freed;
        }
    }

    /// Whether `task` waits out a refusal at `now`.
    pub fn held_back(&self, task: &TaskId, now: u64) -> bool {
        self.held.get(task).is_some_and(|(until, _)| *until > now)
    }

    /// The task was placed after all.
    pub fn placed(&mut self, task: &TaskId) {
        self.out.remove(task);
        self.held.remove(task);
    }

    /// How long until the first held task may be asked again, when no
    /// wake-up is scheduled by then already; the caller schedules one.
    pub fn wake_in(&mut self, now: u64) -> Option<u64> {
        let first = self
            .held
            .values()
            .map(|(until, _)| *until)
            .filter(|until| *until > now)
            .min()?;
        if self.wake_ms.is_some_and(|w| w > now && w <= first) {
            return None;
        }
        self.wake_ms = Some(first);
        Some(first - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(s: &str) -> TaskId {
        TaskId::new(s).expect("valid id")
    }

    #[test]
    fn a_refusal_holds_a_task_back_longer_each_time_up_to_the_cap() {
        let mut p = Placing::default();
        let t = task("a");
        let mut waits = Vec::new();
        for _ in 0..12 {
            p.insert(t.clone());
            p.refused(t.clone(), 0, 0, 1_000);
            assert!(!p.contains(&t), "no longer out");
            let until = p.held[&t].0;
            assert!(p.held_back(&t, until - 1));
            assert!(!p.held_back(&t, until));
            waits.push(until - 1_000);
        }
        assert_eq!(&waits[..4], &[10, 20, 40, 80]);
        assert_eq!(*waits.last().expect("waits"), MAX_MS);
    }

    #[test]
    fn capacity_freed_since_the_request_lets_tasks_go_at_once() {
        let mut p = Placing::default();
        let (a, b) = (task("a"), task("b"));
        // Asked before a release: the refusal is stale.
        p.refused(a.clone(), 0, 1, 0);
        assert!(!p.held_back(&a, 0));
        p.refused(a.clone(), 1, 1, 0);
        p.refused(b.clone(), 1, 1, 0);
        assert!(p.held_back(&a, 5) && p.held_back(&b, 5));
        p.refresh(2);
        assert!(!p.held_back(&a, 5) && !p.held_back(&b, 5));
        // And the back-off starts over.
        p.refused(a.clone(), 2, 2, 100);
        assert_eq!(p.held[&a].0, 110);
    }

    #[test]
    fn one_wake_up_is_scheduled_for_the_first_task_due() {
        let mut p = Placing::default();
        assert_eq!(p.wake_in(0), None, "nothing held");
        p.refused(task("a"), 0, 0, 0);
        assert_eq!(p.wake_in(0), Some(10));
        assert_eq!(p.wake_in(3), None, "already scheduled for 10");
        p.refused(task("b"), 0, 0, 0);
        p.refused(task("b"), 0, 0, 0);
        assert_eq!(p.wake_in(4), None, "b is due after a");
        assert_eq!(p.wake_in(10), Some(10), "a is due: b's wake-up");
        p.placed(&task("b"));
        assert_eq!(p.wake_in(12), None, "nothing held back any more");
    }
}
