//! Cross-service consistency: what the allocator holds (the `coord_agents`
//! records) against what the orchestrator runs (the `coord_flows` records).
//!
//! Records are read as plain JSON so the monitor is not tied to either
//! service's internal types; a record that cannot be read is itself a violation.

use std::collections::BTreeMap;

use common::msg::{FlowState, SystemViolation, TaskState};
use serde_json::Value;

/// Allowed lag between a reservation's end and the allocator dropping it.
pub const RESERVATION_GRACE_MS: u64 = 60_000;

fn v(rule: &str, subject: impl Into<String>, message: impl Into<String>) -> SystemViolation {
    SystemViolation {
        rule: rule.to_owned(),
        subject: subject.into(),
        message: message.into(),
    }
}

fn is_active(state: &str) -> bool {
    state.parse().is_ok_and(TaskState::is_active)
}

struct Alloc<'a> {
    agent: &'a str,
    owner: &'a str,
}

/// The flow and task an allocation owner names: `{flow}/{task}`, or
/// `{owner}/{flow}/{task}` for a flow with an owner.
fn flow_task(owner: &str) -> Option<(&str, &str)> {
    let mut parts = owner.rsplitn(3, '/');
    let task = parts.next()?;
    let flow = parts.next()?;
    Some((flow, task))
}

/// Every violation found, sorted; `agents` and `flows` are `(key, record)` pairs.
pub fn validate(
    agents: &[(String, Value)],
    flows: &[(String, Value)],
    now_ms: u64,
) -> Vec<SystemViolation> {
    let mut out = Vec::new();
    let mut allocs: BTreeMap<&str, Alloc<'_>> = BTreeMap::new();
    let mut status: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, rec) in agents {
        let Some(obj) = rec.as_object() else {
            out.push(v(
                "unreadable_record",
                key.clone(),
                "agent record is not a JSON object",
            ));
            continue;
        };
        let st = obj
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("active");
        status.insert(key.as_str(), st);
        for (id, a) in obj
            .get("allocations")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let owner = a.get("owner").and_then(Value::as_str).unwrap_or("");
            allocs.insert(
                id.as_str(),
                Alloc {
                    agent: key.as_str(),
                    owner,
                },
            );
            if st == "lost" {
                out.push(v(
                    "allocation_on_lost_agent",
                    id.clone(),
                    format!("allocation {id} ({owner}) is still held on lost agent {key}"),
                ));
            }
        }
    }

    let mut flow_tasks: BTreeMap<&str, (&str, &serde_json::Map<String, Value>)> = BTreeMap::new();
    for (key, rec) in flows {
        let tasks = rec.get("tasks").and_then(Value::as_object);
        let state = rec.get("state").and_then(Value::as_str).unwrap_or("");
        match tasks {
            Some(t) => {
                flow_tasks.insert(key.as_str(), (state, t));
            }
            None => out.push(v(
                "unreadable_record",
                key.clone(),
                "flow record has no tasks",
            )),
        }
    }

    // A task that succeeded just now vouches for its allocation: its replica
    // may have handed it on to another task, which the allocator learns late
    // (the orchestrator's `spare`).
    let handed_on = |owner: &str, id: &str| {
        let Some((flow, task)) = flow_task(owner) else {
            return false;
        };
        let Some(t) = flow_tasks.get(flow).and_then(|(_, tasks)| tasks.get(task)) else {
            return false;
        };
        let ended = t
            .get("history")
            .and_then(Value::as_array)
            .and_then(|h| h.last())
            .and_then(|h| h.get("ended_ms"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        t.get("state").and_then(Value::as_str) == Some("succeeded")
            && t.get("last_allocation").and_then(Value::as_str) == Some(id)
            && now_ms < ended.saturating_add(common::msg::HAND_ON_VOUCH_MS)
    };

    for (flow, (_, tasks)) in &flow_tasks {
        for (task, t) in tasks.iter() {
            let state = t.get("state").and_then(Value::as_str).unwrap_or("");
            if !is_active(state) {
                continue;
            }
            let subject = format!("{flow}/{task}");
            let agent = t.get("agent").and_then(Value::as_str);
            if let Some(agent) = agent {
                if status.get(agent) == Some(&"lost") {
                    out.push(v(
                        "task_on_lost_agent",
                        subject.clone(),
                        format!("task is {state} on agent {agent}, which is lost"),
                    ));
                }
            }
            let Some(id) = t.get("allocation").and_then(Value::as_str) else {
                continue;
            };
            match allocs.get(id) {
                None => out.push(v(
                    "task_without_allocation",
                    subject,
                    format!(
                        "task is {state} on allocation {id}, which the allocator does not hold"
                    ),
                )),
                Some(a) => {
                    let owned = flow_task(a.owner) == Some((*flow, task.as_str()))
                        || handed_on(a.owner, id);
                    if !owned || agent.is_some_and(|g| g != a.agent) {
                        out.push(v(
                            "allocation_mismatch",
                            subject.clone(),
                            format!(
                                "task ({state} on {}) holds allocation {id}, which belongs to {} on {}",
                                agent.unwrap_or("no agent"),
                                a.owner,
                                a.agent
                            ),
                        ));
                    }
                }
            }
        }
    }

    for (id, a) in &allocs {
        let Some((flow, task)) = flow_task(a.owner) else {
            continue;
        };
        // Owners that are not a stored flow belong to other clients; not judged.
        let Some((flow_state, tasks)) = flow_tasks.get(flow) else {
            continue;
        };
        let holds = tasks.get(task).is_some_and(|t| {
            t.get("state")
                .and_then(Value::as_str)
                .is_some_and(is_active)
                && t.get("allocation").and_then(Value::as_str) == Some(*id)
        });
        if !holds && !handed_on(a.owner, id) {
            out.push(v(
                "allocation_without_task",
                id.to_string(),
                format!(
                    "allocation {id} on {} is held for {} but that task (flow {flow_state}) is not running on it",
                    a.agent, a.owner
                ),
            ));
        }
    }

    for (key, rec) in agents {
        let st = status.get(key.as_str()).copied().unwrap_or("active");
        for (id, r) in rec
            .get("reservations")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let owner = r.get("owner").and_then(Value::as_str).unwrap_or("");
            let end = r.get("end_ms").and_then(Value::as_u64).unwrap_or(u64::MAX);
            let flow = owner.split('/').next().unwrap_or("");
            let finished_flow = flow_tasks
                .get(flow)
                .is_some_and(|(s, _)| s.parse().is_ok_and(FlowState::is_terminal));
            let why = if st == "lost" {
                Some(format!("agent {key} is lost"))
            } else if end.saturating_add(RESERVATION_GRACE_MS) < now_ms {
                Some(format!("it ended at {end} and was never dropped"))
            } else if finished_flow {
                Some(format!("its owner flow {flow} has finished"))
            } else {
                None
            };
            if let Some(why) = why {
                out.push(v(
                    "orphaned_reservation",
                    id.clone(),
                    format!("reservation {id} for {owner} on {key}: {why}"),
                ));
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(id: &str, status: &str, allocs: Value, reservations: Value) -> (String, Value) {
        (
            id.to_owned(),
            json!({"agent_id": id, "status": status, "allocations": allocs, "reservations": reservations}),
        )
    }

    #[test]
    fn a_consistent_system_has_no_violations() {
        let agents = vec![agent(
            "w1",
            "active",
            json!({"al-1": {"owner": "f1/a", "agent_id": "w1"}, "al-x": {"owner": "someone"}}),
            json!({}),
        )];
        let flows = vec![(
            "f1".to_owned(),
            json!({"state": "running", "tasks": {
                "a": {"state": "running", "agent": "w1", "allocation": "al-1"},
                "b": {"state": "succeeded"}
            }}),
        )];
        assert_eq!(validate(&agents, &flows, 0), vec![]);
    }

    #[test]
    fn an_allocation_handed_on_is_vouched_for_by_the_task_that_succeeded_with_it() {
        // al-1 is bound at the allocator to f1/a, which succeeded with it at
        // 1,000; f2/b runs on it now.
        let agents = vec![agent(
            "w1",
            "active",
            json!({"al-1": {"owner": "f1/a", "agent_id": "w1"}}),
            json!({}),
        )];
        let flows = vec![
            (
                "f1".to_owned(),
                json!({"state": "succeeded", "tasks": {
                    "a": {"state": "succeeded", "last_allocation": "al-1", "history": [{"ended_ms": 1_000}]}
                }}),
            ),
            (
                "f2".to_owned(),
                json!({"state": "running", "tasks": {
                    "b": {"state": "running", "agent": "w1", "allocation": "al-1"}
                }}),
            ),
        ];
        assert_eq!(validate(&agents, &flows, 2_000), vec![]);
        let later = 1_000 + common::msg::HAND_ON_VOUCH_MS;
        let rules: Vec<String> = validate(&agents, &flows, later)
            .into_iter()
            .map(|v| v.rule)
            .collect();
        assert_eq!(rules, ["allocation_mismatch", "allocation_without_task"]);
    }

    #[test]
    fn every_kind_of_violation_is_listed() {
        let agents = vec![
            agent(
                "w1",
                "active",
                json!({"al-1": {"owner": "f1/b"}, "al-2": {"owner": "f1/c"}}),
                json!({"r-old": {"owner": "x", "end_ms": 1_000}, "r-done": {"owner": "f2", "end_ms": 10_000_000}}),
            ),
            agent(
                "w2",
                "lost",
                json!({"al-3": {"owner": "zz"}}),
                json!({"r-lost": {"owner": "y", "end_ms": 10_000_000}}),
            ),
            ("bad".to_owned(), json!(3)),
        ];
        let flows = vec![
            (
                "f1".to_owned(),
                json!({"state": "running", "tasks": {
                    "a": {"state": "running", "agent": "w1", "allocation": "al-1"},
                    "b": {"state": "succeeded"},
                    "d": {"state": "assigned", "agent": "w2", "allocation": "al-9"}
                }}),
            ),
            ("f2".to_owned(), json!({"state": "succeeded", "tasks": {}})),
            ("f3".to_owned(), json!({"nope": 1})),
        ];
        let rules: Vec<(String, String)> = validate(&agents, &flows, 200_000)
            .into_iter()
            .map(|v| (v.rule, v.subject))
            .collect();
        let want = [
            ("allocation_mismatch", "f1/a"),
            ("allocation_on_lost_agent", "al-3"),
            ("allocation_without_task", "al-1"),
            ("allocation_without_task", "al-2"),
            ("orphaned_reservation", "r-done"),
            ("orphaned_reservation", "r-lost"),
            ("orphaned_reservation", "r-old"),
            ("task_on_lost_agent", "f1/d"),
            ("task_without_allocation", "f1/d"),
            ("unreadable_record", "bad"),
            ("unreadable_record", "f3"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(rules, want);
    }
}
