//! What to place next: the ready tasks due now, in dispatch order, within
//! the flow's parallelism budget, its concurrency keys and the placements
//! already out with the allocator.

use std::collections::HashMap;

use common::msg::{AllocateRequest, ConcurrencyLimit, EventKind, TaskRef, TaskState};
use common::TaskId;

use super::{slot_holder, Flow, Placing};

/// Placements one flow has waiting at once (beside the replica's own limit
/// on requests in flight): a wide flow's ready tasks are taken a batch at a
/// time, as grants come back, rather than all 100,000 queueing at once.
pub const MAX_PLACING_PER_FLOW: usize = 1_024;

/// Ready tasks another replica is to place (see [`Placing`]) that one
/// dispatch walks past before it stops. Without a bound, a replica applying
/// the reports of a 100,000-task flow another replica created walked every
/// ready task on each step. Its own tasks further on wait for these to be
/// placed, as they would wait in dispatch order for the budget.
pub(super) const MAX_OTHERS_PASSED: usize = MAX_PLACING_PER_FLOW;

/// A task to ask the allocator for.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    pub task: TaskId,
    /// The concurrency slot its next attempt must hold first, and the
    /// holder's name for it.
    pub slot: Option<(ConcurrencyLimit, String)>,
    /// The request, without an allocation id: the adapter names it.
    pub request: AllocateRequest,
}

impl Flow {
    /// Names replica `me` as the one that readied what a step about to be
    /// written made ready (its `events`); a resume readies every ready task
    /// (see [`Placing`]).
    pub fn claim_ready<'a>(&mut self, me: u32, events: impl IntoIterator<Item = &'a EventKind>) {
        let mut ids = Vec::new();
        for e in events {
            match e {
                EventKind::TaskTransition {
                    task_id,
                    to: TaskState::Ready,
                    ..
                } => ids.push(task_id.clone()),
                EventKind::FlowResumed { .. } => {
                    ids = self
                        .tasks
                        .ready_in_order()
                        .iter()
                        .map(|(_, id)| id.clone())
                        .collect();
                }
                _ => {}
            }
        }
        for id in ids {
            if let Some(t) = self
                .tasks
                .get_mut(&id)
                .filter(|t| t.state == TaskState::Ready)
            {
                t.readied_by = Some(me);
            }
        }
    }

    /// Whether a ready task is replica `r`'s to place: no other replica
    /// places it while `r` answers (see [`Placing`]).
    pub fn readied_any_by(&self, r: u32) -> bool {
        self.tasks
            .values()
            .any(|t| t.state == TaskState::Ready && t.readied_by == Some(r))
    }

    /// The tasks to ask the allocator for now, `placing` being out already or
    /// held back; `known_full` tells a concurrency key known to have no free
    /// slot. A wide flow refills its placements in batches, once half of
    /// them have come back, rather than after every grant.
    pub fn placements(
        &mut self,
        now_ms: u64,
        placing: &Placing,
        known_full: impl Fn(&str) -> bool,
    ) -> Vec<Placement> {
        self.tasks.settle();
        let this = &*self;
        this.placements_settled(now_ms, placing, known_full)
    }

    fn placements_settled(
        &self,
        now_ms: u64,
        placing: &Placing,
        known_full: impl Fn(&str) -> bool,
    ) -> Vec<Placement> {
        if placing.len() > MAX_PLACING_PER_FLOW / 2 {
            return Vec::new();
        }
        let budget = self
            .room(placing.len())
            .min(MAX_PLACING_PER_FLOW.saturating_sub(placing.len()));
        if budget == 0 {
            return Vec::new();
        }
        // Per concurrency key: slots this flow is taking already.
        let mut taking: HashMap<&str, usize> = HashMap::new();
        for t in placing.iter().filter_map(|t| self.tasks.get(t)) {
            if let Some(c) = &t.spec.concurrency {
                *taking.entry(c.key.as_str()).or_default() += 1;
            }
        }
        let mut due = Vec::new();
        // Held-back tasks keep their place in the budget (a flow with nowhere
        // to run would otherwise go on to try every task it has); tasks
        // skipped for a full concurrency key do not hide the others.
        let mut held = 0;
        // Held-back tasks that may go anyway, first in dispatch order.
        let mut credit = placing.credit();
        let mut owners = placing.owners();
        let mut passed = 0;
        self.visit_dispatchable(now_ms, |t| {
            let id = &t.spec.id;
            if placing.contains(id) {
                return true;
            }
            if !owners.ours(t) {
                passed += 1;
                return passed < MAX_OTHERS_PASSED;
            }
            let waits = placing.held_back(id, now_ms) && {
                let spent = credit == 0;
                credit = credit.saturating_sub(1);
                spent
            };
            if waits {
                held += 1;
            } else if let Some(c) = &t.spec.concurrency {
                let n = taking.entry(c.key.as_str()).or_default();
                if *n < c.limit as usize && !known_full(&c.key) {
                    *n += 1;
                    due.push(t);
                }
            } else {
                due.push(t);
            }
            due.len() + held < budget
        });
        due.into_iter()
            .map(|t| {
                let task = t.spec.id.clone();
                Placement {
                    slot: t.spec.concurrency.clone().map(|c| {
                        let holder = slot_holder(&self.id, &task, t.attempt + 1);
                        (c, holder)
                    }),
                    request: AllocateRequest {
                        owner: self.allocation_owner(&task),
                        requirements: t.spec.requirements.clone(),
                        priority: t.spec.priority,
                        allocation_id: t.asked.clone(),
                        deadline_ms: None,
                        task: Some(TaskRef {
                            flow_id: self.id.clone(),
                            task_id: task.clone(),
                        }),
                        ttl_ms: None,
                    },
                    task,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use common::msg::{FlowSpec, TaskSpec};
    use common::{FlowId, TaskId};

    use super::*;

    fn tid(s: &str) -> TaskId {
        TaskId::new(s).unwrap()
    }

    fn flow(specs: Vec<TaskSpec>, max_parallelism: Option<u32>) -> Flow {
        let mut spec = FlowSpec::new("f", specs);
        spec.max_parallelism = max_parallelism;
        Flow::new(FlowId::new("f").unwrap(), spec, 0).0
    }

    #[test]
    fn placements_keep_to_the_budget_less_what_is_out_already() {
        let specs = (0..5)
            .map(|i| TaskSpec::new(tid(&format!("t{i}"))))
            .collect();
        let mut f = flow(specs, Some(3));
        let mut placing = Placing::default();
        assert_eq!(f.placements(1, &placing, |_| false).len(), 3);
        placing.insert(tid("t0"));
        let next: Vec<TaskId> = f
            .placements(1, &placing, |_| false)
            .into_iter()
            .map(|p| p.task)
            .collect();
        assert_eq!(next.len(), 2);
        assert!(
            !next.contains(&tid("t0")),
            "a task out already is not asked again"
        );
    }

    #[test]
    fn a_held_back_task_keeps_its_place_and_a_full_key_hides_only_its_tasks() {
        let mut keyed = TaskSpec::new(tid("k"));
        keyed.priority = 5;
        keyed.concurrency = Some(ConcurrencyLimit {
            key: "gpu".into(),
            limit: 1,
        });
        let mut f = flow(vec![keyed, TaskSpec::new(tid("plain"))], None);
        let placing = Placing::default();
        let all = f.placements(1, &placing, |_| false);
        assert_eq!(all[0].task, tid("k"));
        assert_eq!(
            all[0].slot.as_ref().map(|(_, h)| h.as_str()),
            Some("f.k.1"),
            "the slot is held by the next attempt"
        );
        let without_full: Vec<TaskId> = f
            .placements(1, &placing, |key| key == "gpu")
            .into_iter()
            .map(|p| p.task)
            .collect();
        assert_eq!(without_full, [tid("plain")]);

        let mut placing = Placing::default();
        placing.refused(tid("k"), 0, 0, 1);
        let mut f1 = flow(
            vec![
                {
                    let mut t = TaskSpec::new(tid("k"));
                    t.priority = 5;
                    t
                },
                TaskSpec::new(tid("plain")),
            ],
            Some(1),
        );
        assert!(
            f1.placements(2, &placing, |_| false).is_empty(),
            "the held-back task takes the one place in the budget"
        );
    }

    #[test]
    fn capacity_freed_lets_held_tasks_go_in_dispatch_order() {
        let specs = (0..4)
            .map(|i| {
                let mut t = TaskSpec::new(tid(&format!("t{i}")));
                t.priority = i;
                t
            })
            .collect();
        let mut f = flow(specs, None);
        let mut placing = Placing::default();
        for i in 0..4 {
            placing.refused(tid(&format!("t{i}")), 0, 0, 1);
        }
        assert!(f.placements(2, &placing, |_| false).is_empty(), "all held");
        placing.refresh(2);
        let next: Vec<TaskId> = f
            .placements(2, &placing, |_| false)
            .into_iter()
            .map(|p| p.task)
            .collect();
        assert_eq!(next, [tid("t3"), tid("t2")], "two freed: the first two");
    }
}
