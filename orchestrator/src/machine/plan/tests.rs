//! The plan on small flows: critical path, bottleneck, priorities, what
//! cannot be placed.

use common::msg::{FlowSpec, Requirements, TaskSpec};
use common::FlowId;

use super::*;

fn tid(s: &str) -> TaskId {
    TaskId::new(s).unwrap()
}

fn agent(s: &str) -> AgentId {
    AgentId::new(s).unwrap()
}

fn task(id: &str, deps: &[&str], ms: u64, priority: i32) -> TaskSpec {
    let mut t = TaskSpec::new(tid(id));
    t.depends_on = deps.iter().map(|d| tid(d)).collect();
    t.estimated_duration_ms = Some(ms);
    t.priority = priority;
    t.requirements = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    t
}

/// A flow of `tasks` and one agent `w` with `cpu` free that every task may use.
fn setup(tasks: Vec<TaskSpec>, cpu: f64) -> (Flow, PlanInput) {
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id.clone()).collect();
    let (flow, _) = Flow::new(FlowId::new("f").unwrap(), FlowSpec::new("f", tasks), 0);
    let input = PlanInput {
        capacity: [(agent("w"), [("cpu".to_string(), cpu)].into())].into(),
        eligible: ids.into_iter().map(|id| (id, vec![agent("w")])).collect(),
    };
    (flow, input)
}

#[test]
fn a_chain_is_the_critical_path_and_bounds_the_makespan() {
    let (flow, input) = setup(
        vec![
            task("a", &[], 100, 0),
            task("b", &["a"], 100, 0),
            task("c", &["b"], 100, 0),
            task("d", &[], 50, 0),
        ],
        2.0,
    );
    let plan = flow.plan(7, &input, 0);
    assert_eq!(plan.revision, 7);
    assert_eq!(plan.critical_path, vec![tid("a"), tid("b"), tid("c")]);
    assert_eq!(plan.critical_path_ms, 300);
    assert_eq!(plan.makespan_ms, 300);
    assert_eq!(plan.bottleneck.kind, "critical_path");
    assert_eq!(plan.lower_bound_ms, 300);
    assert!(plan.priority_changes.is_empty());
    assert_eq!(plan.placements.len(), 4);
    assert!(plan.unplaceable.is_empty());
}

#[test]
fn priorities_that_starve_the_critical_path_are_changed() {
    // Two slots; three short high-priority tasks would go before the chain.
    let (flow, input) = setup(
        vec![
            task("s1", &[], 100, 5),
            task("s2", &[], 100, 5),
            task("s3", &[], 100, 5),
            task("c1", &[], 100, 0),
            task("c2", &["c1"], 100, 0),
            task("c3", &["c2"], 100, 0),
        ],
        2.0,
    );
    let plan = flow.plan(1, &input, 0);
    assert_eq!(plan.makespan_ms, 400);
    assert_eq!(plan.optimized_makespan_ms, 300);
    let to: BTreeMap<&str, i32> = plan
        .priority_changes
        .iter()
        .map(|c| (c.task_id.as_str(), c.to))
        .collect();
    assert!(to["c1"] > to["s1"] && to.get("c2").copied().unwrap_or(0) > to["s1"]);
    // The placements follow the proposal: c1 starts at once.
    let c1 = plan.placements.iter().find(|p| p.task_id.as_str() == "c1");
    assert_eq!(c1.map(|p| p.start_ms), Some(0));
}

#[test]
fn a_scarce_resource_is_the_bottleneck() {
    let tasks = (0..10)
        .map(|i| task(&format!("t{i}"), &[], 100, 0))
        .collect();
    let (flow, input) = setup(tasks, 2.0);
    let plan = flow.plan(1, &input, 0);
    assert_eq!(plan.makespan_ms, 500);
    assert_eq!(plan.bottleneck.kind, "resource");
    assert_eq!(plan.bottleneck.resource.as_deref(), Some("cpu"));
    assert_eq!(plan.lower_bound_ms, 500);
    assert_eq!(plan.resources["cpu"].capacity, 2.0);
}

#[test]
fn max_parallelism_can_be_the_bottleneck() {
    let tasks = (0..4)
        .map(|i| task(&format!("t{i}"), &[], 100, 0))
        .collect();
    let (mut flow, input) = setup(tasks, 8.0);
    flow.max_parallelism = Some(1);
    let plan = flow.plan(1, &input, 0);
    assert_eq!(plan.makespan_ms, 400);
    assert_eq!(plan.bottleneck.kind, "parallelism");
}

#[test]
fn tasks_no_agent_can_run_are_listed_with_their_dependants() {
    let (flow, mut input) = setup(
        vec![
            task("a", &[], 100, 0),
            task("b", &["a"], 100, 0),
            task("c", &[], 100, 0),
        ],
        2.0,
    );
    input.eligible.insert(tid("a"), Vec::new());
    let plan = flow.plan(1, &input, 0);
    let stuck: Vec<&str> = plan
        .unplaceable
        .iter()
        .map(|u| u.task_id.as_str())
        .collect();
    assert_eq!(stuck, vec!["a", "b"]);
    assert!(plan.unplaceable[0].reasons[0].contains("no registered agent"));
    assert!(plan.unplaceable[1].reasons[0].contains("waits on tasks that cannot run: a"));
    assert_eq!(plan.makespan_ms, 100);
}

#[test]
fn capacity_on_agents_no_task_may_use_does_not_lower_the_bound() {
    let tasks = (0..4)
        .map(|i| task(&format!("t{i}"), &[], 100, 0))
        .collect();
    // "w" (1 cpu) may run every task; "big" (100 cpu) lacks their capability.
    let (flow, mut input) = setup(tasks, 1.0);
    input
        .capacity
        .insert(agent("big"), [("cpu".to_string(), 100.0)].into());
    let plan = flow.plan(1, &input, 0);
    assert_eq!(plan.makespan_ms, 400);
    assert_eq!(plan.resources["cpu"].capacity, 1.0);
    assert_eq!(plan.lower_bound_ms, 400);
    assert_eq!(plan.bottleneck.resource.as_deref(), Some("cpu"));
}

#[test]
fn a_flow_nothing_of_which_can_be_placed_says_so() {
    let (flow, mut input) = setup(
        vec![task("a", &[], 1000, 0), task("b", &["a"], 1000, 0)],
        1.0,
    );
    input.eligible.insert(tid("a"), Vec::new());
    let plan = flow.plan(1, &input, 0);
    assert!(plan.placements.is_empty());
    assert_eq!(plan.bottleneck.kind, "unplaceable");
    assert_eq!(plan.lower_bound_ms, 0);
    assert!(
        plan.bottleneck.message.starts_with("nothing can be placed"),
        "{}",
        plan.bottleneck.message
    );
}

#[test]
fn a_finished_flow_has_nothing_to_plan() {
    let (mut flow, input) = setup(vec![task("a", &[], 100, 0)], 1.0);
    for t in flow.tasks.values_mut() {
        t.state = TaskState::Succeeded;
    }
    let plan = flow.plan(1, &input, 0);
    assert_eq!(plan.bottleneck.kind, "none");
    assert_eq!(plan.makespan_ms, 0);
    assert!(plan.placements.is_empty() && plan.critical_path.is_empty());
}
