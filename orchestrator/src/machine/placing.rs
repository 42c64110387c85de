//! A flow actor's placements: the tasks out with the allocator, and those it
//! refused, held back until capacity may have freed up.
//!
//! Without the holding back, a task no agent can take goes straight back to
//! the allocator: a wide flow with nowhere to run kept both cores busy asking.
//! Capacity frees when a release, a new agent or a changed capacity is seen,
//! which the replica counts (its *freed* count: about one per allocation or
//! slot given back, [`FREED_ALL`] for an agent registered or a capacity
//! changed).
//! As the count moves, as many held tasks as it moved by may be asked for
//! again (in the flow's dispatch order, see `Flow::placements`); a refusal
//! made before the count last moved is stale and counts among those. Other
//! held tasks wait out a back-off that doubles with each refusal, since
//! releases by other replicas are not counted.
//!
//! Letting every held task go on any release instead had a wide flow on full
//! agents ask again for all of them about once per allocator round trip
//! (the simulation: 3–4 million refusals for 10,000 tasks on 1,000 slots).
//!
//! With several orchestrator replicas, each may step a flow (a report goes
//! to whichever takes it, and every replica's sweep ticks every flow), and
//! each knows only its own placements: both would ask for the same ready
//! task, and the grant recorded second be given back (two replicas made
//! 15,635 bookings for 8,010 tasks). So a ready task is placed by the
//! replica whose written step made it ready (the task's `readied_by`); the
//! others leave it alone while that replica answers the service's ping, and
//! take it up once it has not for a while (it is gone, or frozen). Whether a
//! replica is placing cannot be told from the flow: one whose requests wait
//! their turn behind other flows' writes nothing for seconds (a rule of "no
//! write for 2 s" took such replicas for gone, 1.1–1.2 bookings per task).

use std::collections::{HashMap, HashSet};
use std::ops::{Deref, DerefMut};

use common::TaskId;

/// First wait after a refusal, doubled on each further one ...
const FIRST_MS: u64 = 10;
/// ... up to this.
pub(super) const MAX_MS: u64 = 5_000;
/// What an event that may free any amount of capacity moves the freed
/// count by: every held task may go.
pub const FREED_ALL: u64 = 1 << 32;

#[derive(Debug, Default)]
pub struct Placing {
    /// Out with the allocator (derefs to this).
    out: HashSet<TaskId>,
    /// Refused: not asked again before the time given, and the refusals so far.
    held: HashMap<TaskId, (u64, u32)>,
    /// The freed count last seen.
    freed: u64,
    /// How many held tasks may be asked for again before their back-off
    /// ends: what the freed count moved by, at most the tasks held.
    credit: u64,
    /// When the wake-up already scheduled fires.
    wake_ms: Option<u64>,
    /// This replica, as named in a task's `readied_by`.
    me: Option<u32>,
    /// Tells a replica known to be gone (the tasks it readied are taken
    /// up); none: every other replica is taken to be up.
    gone: Option<Gone>,
}

/// Whether the replica a task's `readied_by` names is known to be gone.
pub struct Gone(pub Box<dyn Fn(u32) -> bool + Send + Sync>);

impl std::fmt::Debug for Gone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Gone")
    }
}

/// One dispatch's view of which tasks are this replica's. Whether another
/// replica is gone is asked once per replica, not once per task: a walk over
/// a wide flow meets thousands of tasks readied by one or two replicas, and
/// asking reads the replicas' shared state and the clock.
pub struct Owners<'a> {
    placing: &'a Placing,
    /// The verdicts asked so far: replica, gone.
    seen: Vec<(u32, bool)>,
}

impl Owners<'_> {
    /// Whether this replica is the one to place `task`: it readied it, or
    /// the replica that did is known to be gone, or nobody is named.
    pub fn ours(&mut self, task: &super::Task) -> bool {
        let p = self.placing;
        match task.readied_by {
            None => true,
            Some(r) if Some(r) == p.me => true,
            Some(r) => {
                if let Some(&(_, gone)) = self.seen.iter().find(|(s, _)| *s == r) {
                    return gone;
                }
                let gone = p.gone.as_ref().is_some_and(|gone| (gone.0)(r));
                self.seen.push((r, gone));
                gone
            }
        }
    }
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
    /// it was asked, `freed` the count now. A stale refusal is held back
    /// like the others and shares the credit the count's move gave.
    pub fn refused(&mut self, task: TaskId, asked_at: u64, freed: u64, now: u64) {
        self.out.remove(&task);
        let (until, refusals) = self.held.entry(task).or_insert((0, 0));
        *refusals = refusals.saturating_add(1);
        let wait = FIRST_MS.saturating_mul(1 << (*refusals - 1).min(20));
        *until = now.saturating_add(wait.min(MAX_MS));
        if asked_at != freed && self.freed == freed {
            // Counted already, while the task was out: its share is now.
            self.credit = self.credit.saturating_add(1);
        }
        self.refresh(freed);
    }

    /// Takes in a move of the freed count: as many held tasks as it moved
    /// by may go.
    pub fn refresh(&mut self, freed: u64) {
        let moved = freed.wrapping_sub(self.freed);
        self.freed = freed;
        let credit = self.credit.saturating_add(moved);
        self.credit = credit.min(self.held.len() as u64);
    }

    /// How many held tasks may be asked for now, their back-off not over.
    pub fn credit(&self) -> u64 {
        self.credit
    }

    /// `task` is asked for: out with the allocator; if it was held back,
    /// one credit is spent on it.
    pub fn asking(&mut self, task: TaskId, now: u64) {
        if self.held_back(&task, now) {
            self.credit = self.credit.saturating_sub(1);
        }
        self.out.insert(task);
    }

    /// Names this replica, and how to tell another that is gone (see the
    /// module's doc).
    pub fn drive(&mut self, me: Option<u32>, gone: Option<Gone>) {
        self.me = me;
        self.gone = gone;
    }

    /// Tells which tasks this replica is to place, for one dispatch.
    pub fn owners(&self) -> Owners<'_> {
        Owners {
            placing: self,
            seen: Vec::new(),
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
        // A refusal long past is forgotten (the task was placed, or left
        // the ready tasks, or will start its back-off over).
        self.held
            .retain(|_, (until, _)| until.saturating_add(MAX_MS) > now);
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
    fn capacity_freed_lets_as_many_held_tasks_go_as_it_freed() {
        let mut p = Placing::default();
        let (a, b, c) = (task("a"), task("b"), task("c"));
        // Asked before a release: the refusal is stale, and its task may go.
        p.refused(a.clone(), 0, 1, 0);
        assert!(p.held_back(&a, 0));
        assert_eq!(p.credit(), 1);
        p.asking(a.clone(), 0);
        assert_eq!(p.credit(), 0, "spent on a");
        p.refused(a.clone(), 1, 1, 0);
        p.refused(b.clone(), 1, 1, 0);
        p.refused(c.clone(), 1, 1, 0);
        assert_eq!(p.credit(), 0, "nothing freed since they were asked");
        p.refresh(2);
        assert_eq!(p.credit(), 1, "one release: one of the three");
        p.asking(b.clone(), 0);
        p.asking(c.clone(), 0);
        assert_eq!(p.credit(), 0, "never below nothing");
        // A release counted while the task was out: a stale refusal still
        // gets its share.
        p.refresh(3);
        p.refused(b.clone(), 2, 3, 0);
        assert!(p.credit() >= 1);
        // A new agent: every held task may go, but no more.
        p.refresh(3 + FREED_ALL);
        assert_eq!(p.credit(), 3);
        // A back-off doubles still for a task let go and refused again.
        assert_eq!(p.held[&a].0, 20);
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
