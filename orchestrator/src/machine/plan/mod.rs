//! `flow.optimize`: how the remaining work would run on the agents there are
//! now, and the order that finishes it soonest.
//!
//! A list schedule is simulated twice over the capacity the allocator reports
//! for this flow: once with today's priorities and once with priorities from
//! the critical path (upward rank over the work left, observed durations
//! preferred to estimates). The proposal is kept only if it finishes sooner.
//! Placement inside the simulation is best fit, the allocator's default, so
//! the plan is an estimate of what dispatch will do, not a promise.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};

use common::msg::{
    FlowBottleneck, FlowPlan, PlannedTask, PriorityChange, ResourceLoad, TaskExplanation, TaskState,
};
use common::{AgentId, TaskId};

use super::{Flow, Task};

/// What the agents offer the flow, as the adapter learnt it from the allocator.
#[derive(Debug, Clone, Default)]
pub struct PlanInput {
    /// Per agent, what the flow can use of each resource: free now plus what
    /// the flow's own running tasks hold there.
    pub capacity: BTreeMap<AgentId, BTreeMap<String, f64>>,
    /// Per task not started, the agents that could ever run it.
    pub eligible: HashMap<TaskId, Vec<AgentId>>,
}

/// One simulated run of the remaining tasks.
struct Schedule {
    makespan_ms: u64,
    placements: Vec<PlannedTask>,
    /// Tasks the simulation could not start.
    stuck: BTreeSet<TaskId>,
}

impl Flow {
    /// The plan for the tasks left at `revision`, as of `now_ms`.
    pub fn plan(&self, revision: u64, input: &PlanInput, now_ms: u64) -> FlowPlan {
        let left = self.remaining_ms(now_ms);
        let (ranks, critical_path) = self.remaining_ranks(now_ms);
        let critical_path_ms = ranks.values().max().copied().unwrap_or(0);

        let current = self.simulate(input, &left, now_ms, |t| {
            (i64::from(t.spec.priority), t.rank)
        });
        let proposed = proposed_priorities(self, &ranks);
        let changed = self.simulate(input, &left, now_ms, |t| {
            let p = proposed.get(&t.spec.id).copied().unwrap_or(t.spec.priority);
            (i64::from(p), t.rank)
        });
        let better =
            changed.makespan_ms < current.makespan_ms && changed.stuck.len() <= current.stuck.len();
        let priority_changes: Vec<PriorityChange> = if better {
            proposed
                .iter()
                .filter_map(|(id, to)| {
                    let from = self.tasks.get(id)?.spec.priority;
                    (from != *to).then(|| PriorityChange {
                        task_id: id.clone(),
                        from,
                        to: *to,
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        let makespan_ms = current.makespan_ms;
        let chosen = if better { changed } else { current };

        let resources = self.loads(input, &left, &chosen.stuck);
        let work: u64 = left
            .iter()
            .filter(|(id, _)| !chosen.stuck.contains(**id))
            .fold(0u64, |sum, (_, ms)| sum.saturating_add(*ms));
        let mut bottleneck = FlowBottleneck {
            kind: "critical_path".into(),
            resource: None,
            bound_ms: critical_path_ms,
            message: format!("the longest chain of dependent tasks takes {critical_path_ms} ms"),
        };
        for (r, load) in &resources {
            if load.bound_ms > bottleneck.bound_ms {
                bottleneck = FlowBottleneck {
                    kind: "resource".into(),
                    resource: Some(r.clone()),
                    bound_ms: load.bound_ms,
                    message: format!(
                        "{r}: the remaining tasks need {:.0} {r}·ms and the agents have {} {r} for this flow, at least {} ms",
                        load.demand, load.capacity, load.bound_ms
                    ),
                };
            }
        }
        if let Some(max) = self.max_parallelism.filter(|m| *m > 0) {
            let bound = work / u64::from(max);
            if bound > bottleneck.bound_ms {
                bottleneck = FlowBottleneck {
                    kind: "parallelism".into(),
                    resource: None,
                    bound_ms: bound,
                    message: format!(
                        "max_parallelism {max}: {work} ms of work at most {max} at a time takes at least {bound} ms"
                    ),
                };
            }
        }
        if !left.is_empty() && chosen.placements.is_empty() {
            // No bound means anything when no task can start at all.
            bottleneck = FlowBottleneck {
                kind: "unplaceable".into(),
                resource: None,
                bound_ms: 0,
                message: format!(
                    "nothing can be placed: none of the {} remaining tasks fits on any registered agent",
                    left.len()
                ),
            };
        }
        if left.is_empty() {
            bottleneck = FlowBottleneck {
                kind: "none".into(),
                resource: None,
                bound_ms: 0,
                message: "nothing is left to run".into(),
            };
        }
        FlowPlan {
            flow_id: self.id.clone(),
            revision,
            critical_path,
            critical_path_ms,
            makespan_ms,
            optimized_makespan_ms: chosen.makespan_ms,
            lower_bound_ms: bottleneck.bound_ms,
            unplaceable: self.unplaceable(input, &chosen.stuck),
            bottleneck,
            resources,
            placements: chosen.placements,
            priority_changes,
            applied: false,
            status: None,
        }
    }

    /// A list schedule of the remaining tasks: whenever an agent frees up, the
    /// first ready task by `key` (higher first) that fits goes to the agent it
    /// fits best.
    fn simulate(
        &self,
        input: &PlanInput,
        left: &HashMap<&TaskId, u64>,
        now_ms: u64,
        key: impl Fn(&Task) -> (i64, u64),
    ) -> Schedule {
        let mut free = input.capacity.clone();
        let mut events: BinaryHeap<Reverse<(u64, TaskId)>> = BinaryHeap::new();
        let mut on_agent: HashMap<TaskId, AgentId> = HashMap::new();
        let mut placements = Vec::new();
        let mut makespan = 0;
        let mut running = 0usize;
        // Dependencies still open, per task not started.
        let mut waiting: HashMap<&TaskId, usize> = HashMap::new();
        let mut ready: BTreeSet<(Reverse<(i64, u64)>, &TaskId)> = BTreeSet::new();
        let mut earliest: HashMap<&TaskId, u64> = HashMap::new();
        for (id, ms) in left {
            let Some(t) = self.tasks.get(*id) else {
                continue;
            };
            if t.state.is_active() {
                if let Some(agent) = &t.agent {
                    shift(&mut free, agent, &t.spec.requirements.resources, 1.0);
                    on_agent.insert(t.spec.id.clone(), agent.clone());
                }
                events.push(Reverse((*ms, t.spec.id.clone())));
                running += 1;
                continue;
            }
            let open = t
                .spec
                .depends_on
                .iter()
                .filter(|d| left.contains_key(d))
                .count();
            if open == 0 {
                ready.insert((Reverse(key(t)), *id));
                if t.state == TaskState::Ready && t.not_before_ms > now_ms {
                    earliest.insert(*id, t.not_before_ms - now_ms);
                }
            } else {
                waiting.insert(*id, open);
            }
        }
        // Tasks with the same needs and agents fit or not alike.
        let mut classes: HashMap<String, usize> = HashMap::new();
        let class_of: HashMap<&TaskId, usize> = left
            .keys()
            .map(|id| {
                let need = self.tasks.get(*id).map(|t| &t.spec.requirements.resources);
                let key = format!("{need:?}|{:?}", input.eligible.get(*id));
                let n = classes.len();
                (*id, *classes.entry(key).or_insert(n))
            })
            .collect();
        let limit = self
            .max_parallelism
            .map_or(usize::MAX, |m| (m as usize).max(1));
        let mut now = 0u64;
        loop {
            // Start what fits, in order; a requirement that did not fit is not
            // tried again for an identical one until something ends.
            let mut no_room: HashSet<usize> = HashSet::new();
            let mut started = Vec::new();
            for (k, id) in &ready {
                if running >= limit {
                    break;
                }
                if earliest.get(id).is_some_and(|e| *e > now) {
                    continue;
                }
                let Some(t) = self.tasks.get(*id) else {
                    continue;
                };
                let agents = input.eligible.get(*id).map_or(&[][..], Vec::as_slice);
                let class = class_of.get(id).copied().unwrap_or(usize::MAX);
                if no_room.contains(&class) {
                    continue;
                }
                let need = &t.spec.requirements.resources;
                let Some(agent) = best_fit(&free, agents, need) else {
                    no_room.insert(class);
                    continue;
                };
                shift(&mut free, &agent, need, 1.0);
                let end = now.saturating_add(left.get(id).copied().unwrap_or(0));
                events.push(Reverse((end, t.spec.id.clone())));
                placements.push(PlannedTask {
                    task_id: t.spec.id.clone(),
                    agent_id: agent.clone(),
                    start_ms: now,
                    end_ms: end,
                });
                on_agent.insert(t.spec.id.clone(), agent);
                started.push((*k, *id));
                running += 1;
            }
            for s in &started {
                ready.remove(s);
            }
            // Jump to the next task ending or back-off running out.
            let next_end = events.peek().map(|Reverse((at, _))| *at);
            let next_due = ready
                .iter()
                .filter_map(|(_, id)| earliest.get(id).copied())
                .filter(|e| *e > now)
                .min();
            let Some(next) = [next_end, next_due].into_iter().flatten().min() else {
                break;
            };
            now = next.max(now);
            while let Some(Reverse((at, id))) = events.peek().cloned() {
                if at > now {
                    break;
                }
                events.pop();
                running = running.saturating_sub(1);
                makespan = makespan.max(at);
                let Some(t) = self.tasks.get(&id) else {
                    continue;
                };
                if let Some(agent) = on_agent.remove(&id) {
                    shift(&mut free, &agent, &t.spec.requirements.resources, -1.0);
                }
                for d in &t.dependents {
                    if let Some(n) = waiting.get_mut(d) {
                        *n -= 1;
                        if *n == 0 {
                            waiting.remove(d);
                            if let Some((dep_id, dt)) = self.tasks.get_key_value(d) {
                                ready.insert((Reverse(key(dt)), dep_id));
                            }
                        }
                    }
                }
            }
        }
        let stuck = ready
            .iter()
            .map(|(_, id)| (*id).clone())
            .chain(waiting.keys().map(|id| (*id).clone()))
            .collect();
        Schedule {
            makespan_ms: makespan,
            placements,
            stuck,
        }
    }

    /// Demand of the tasks that can run against what the agents offer, per resource.
    fn loads(
        &self,
        input: &PlanInput,
        left: &HashMap<&TaskId, u64>,
        stuck: &BTreeSet<TaskId>,
    ) -> BTreeMap<String, ResourceLoad> {
        let mut demand: BTreeMap<String, f64> = BTreeMap::new();
        for (id, ms) in left.iter().filter(|(id, _)| !stuck.contains(**id)) {
            if let Some(t) = self.tasks.get(*id) {
                for (r, amount) in &t.spec.requirements.resources {
                    *demand.entry(r.clone()).or_default() += amount * *ms as f64;
                }
            }
        }
        // Only agents that could run some task needing `r` count towards its
        // capacity: a big agent without the capability shortens no queue. A
        // task with no eligibility list (one already running) may use any.
        let mut usable: BTreeMap<&str, Option<BTreeSet<&AgentId>>> = BTreeMap::new();
        for id in left.keys().filter(|id| !stuck.contains(**id)) {
            let Some(t) = self.tasks.get(*id) else {
                continue;
            };
            for r in t.spec.requirements.resources.keys() {
                let entry = usable
                    .entry(r.as_str())
                    .or_insert_with(|| Some(BTreeSet::new()));
                match (entry.as_mut(), input.eligible.get(*id)) {
                    (Some(set), Some(agents)) => set.extend(agents),
                    _ => *entry = None,
                }
            }
        }
        demand
            .into_iter()
            .map(|(r, demand)| {
                let only = usable.get(r.as_str()).and_then(Option::as_ref);
                let capacity: f64 = input
                    .capacity
                    .iter()
                    .filter(|(a, _)| only.is_none_or(|set| set.contains(a)))
                    .filter_map(|(_, c)| c.get(&r))
                    .filter(|v| **v > 0.0)
                    .sum();
                let bound_ms = if capacity > 0.0 {
                    (demand / capacity).ceil() as u64
                } else {
                    0
                };
                (
                    r,
                    ResourceLoad {
                        demand,
                        capacity,
                        bound_ms,
                    },
                )
            })
            .collect()
    }

    /// Why each task the simulation could not start is stuck.
    fn unplaceable(&self, input: &PlanInput, stuck: &BTreeSet<TaskId>) -> Vec<TaskExplanation> {
        stuck
            .iter()
            .filter_map(|id| self.tasks.get(id))
            .map(|t| {
                let eligible = input.eligible.get(&t.spec.id).map_or(0, Vec::len);
                let blockers: Vec<&str> = t
                    .spec
                    .depends_on
                    .iter()
                    .filter(|d| stuck.contains(*d))
                    .map(|d| d.as_str())
                    .collect();
                let reason = if !blockers.is_empty() {
                    format!("waits on tasks that cannot run: {}", blockers.join(", "))
                } else if eligible == 0 {
                    "no registered agent has the capabilities, labels and capacity it needs"
                        .to_owned()
                } else {
                    format!("its {eligible} eligible agent(s) do not have enough free for it now")
                };
                TaskExplanation {
                    task_id: t.spec.id.clone(),
                    state: t.state,
                    reasons: vec![reason],
                }
            })
            .collect()
    }
}

/// Priorities that make dispatch follow the critical path: the task with the
/// most work below it first. Only tasks that have not started are given one.
fn proposed_priorities(flow: &Flow, ranks: &HashMap<&TaskId, u64>) -> BTreeMap<TaskId, i32> {
    let levels: BTreeSet<u64> = ranks.values().copied().collect();
    let level: HashMap<u64, i32> = levels
        .iter()
        .enumerate()
        .map(|(i, r)| (*r, i32::try_from(i).unwrap_or(i32::MAX)))
        .collect();
    ranks
        .iter()
        .filter(|(id, _)| {
            flow.tasks
                .get(**id)
                .is_some_and(|t| matches!(t.state, TaskState::Blocked | TaskState::Ready))
        })
        .map(|(id, r)| ((*id).clone(), level.get(r).copied().unwrap_or(0)))
        .collect()
}

/// The eligible agent with room for `need` that it leaves least spare on,
/// relative to each resource's size there (ties to the agent id).
fn best_fit(
    free: &BTreeMap<AgentId, BTreeMap<String, f64>>,
    agents: &[AgentId],
    need: &BTreeMap<String, f64>,
) -> Option<AgentId> {
    let mut best: Option<(f64, &AgentId)> = None;
    for a in agents {
        let Some(have) = free.get(a) else {
            continue;
        };
        let mut spare = 0.0;
        let mut fits = true;
        for (r, amount) in need {
            let left = have.get(r).copied().unwrap_or(0.0) - amount;
            if left < -1e-9 {
                fits = false;
                break;
            }
            spare += left;
        }
        if fits && best.is_none_or(|(s, b)| spare < s || (spare == s && a < b)) {
            best = Some((spare, a));
        }
    }
    best.map(|(_, a)| a.clone())
}

/// Books (`sign` 1) or gives back (`sign` -1) `need` on `agent`'s free capacity.
fn shift(
    free: &mut BTreeMap<AgentId, BTreeMap<String, f64>>,
    agent: &AgentId,
    need: &BTreeMap<String, f64>,
    sign: f64,
) {
    if let Some(have) = free.get_mut(agent) {
        for (r, amount) in need {
            *have.entry(r.clone()).or_default() -= sign * amount;
        }
    }
}

#[cfg(test)]
mod tests;
