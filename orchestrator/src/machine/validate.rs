//! Flow validation: every problem at once, cycles with their path, and the
//! upward ranks used to order ready tasks.

use std::collections::{HashMap, HashSet};

use common::msg::{FlowSpec, TaskSpec, ValidationProblem};
use common::TaskId;
use petgraph::graph::{DiGraph, NodeIndex};

/// Most tasks one flow may hold (a flow is stored as one KV entry).
pub const MAX_TASKS: usize = 1_000_000;
/// The longest flow owner: with `/{flow}/{task}` it stays within the
/// allocator's 256-character owner.
const MAX_OWNER: usize = 120;

/// Checks a spec and returns *every* problem, not just the first.
pub fn validate(spec: &FlowSpec) -> Result<(), Vec<ValidationProblem>> {
    let mut problems = Vec::new();
    let problem = |code: &str, message: String, task_id: Option<&TaskId>| ValidationProblem {
        code: code.to_owned(),
        message,
        task_id: task_id.cloned(),
        path: Vec::new(),
    };
    if spec.tasks.is_empty() {
        problems.push(problem(
            "empty_flow",
            "a flow needs at least one task".into(),
            None,
        ));
    }
    if spec.tasks.len() > MAX_TASKS {
        problems.push(problem(
            "too_many_tasks",
            format!("{} tasks, at most {MAX_TASKS} per flow", spec.tasks.len()),
            None,
        ));
    }
    if let Some(owner) = &spec.owner {
        if owner.is_empty()
            || owner.len() > MAX_OWNER
            || owner.split('/').any(str::is_empty)
            || owner.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            problems.push(problem(
                "invalid_owner",
                format!(
                    "owner {owner:?} must be 1 to {MAX_OWNER} characters without spaces, in `/`-separated parts none of which is empty"
                ),
                None,
            ));
        }
    }
    if spec.max_parallelism == Some(0) {
        problems.push(problem(
            "invalid_parallelism",
            "max_parallelism must be at least 1".into(),
            None,
        ));
    }
    let mut ids = HashSet::new();
    for t in &spec.tasks {
        if !ids.insert(&t.id) {
            problems.push(problem(
                "duplicate_task",
                format!("task id {} is used more than once", t.id),
                Some(&t.id),
            ));
        }
        if let Some(c) = &t.concurrency {
            if c.limit == 0 || common::id::validate(&c.key).is_err() {
                problems.push(problem(
                    "invalid_concurrency",
                    format!(
                        "task {}: a concurrency key is 1 to 64 letters, digits, _ or - and its limit at least 1",
                        t.id
                    ),
                    Some(&t.id),
                ));
            }
        }
        if let Some(w) = &t.wait_for {
            let mut why = common::msg::event_filter_problem(&w.event_type, w.field.as_ref());
            if w.timeout_ms == Some(0) {
                why = why.or(Some("timeout_ms must be > 0".into()));
            }
            if t.retry.max_attempts > 1 {
                why = why.or(Some(
                    "a wait task is never retried (max_attempts must be 1)".into(),
                ));
            }
            if t.concurrency.is_some() || t.requirements != Default::default() {
                why = why.or(Some(
                    "a wait task runs on no agent: it takes no requirements or concurrency".into(),
                ));
            }
            if let Some(why) = why {
                problems.push(problem(
                    "invalid_wait_for",
                    format!("task {}: wait_for: {why}", t.id),
                    Some(&t.id),
                ));
            }
        }
        let r = &t.retry;
        if r.max_attempts == 0 || r.max_attempts > 100 {
            problems.push(problem(
                "invalid_retry",
                format!(
                    "task {}: max_attempts is {}, must be 1..=100",
                    t.id, r.max_attempts
                ),
                Some(&t.id),
            ));
        }
        if !r.backoff_factor.is_finite() || r.backoff_factor < 1.0 {
            problems.push(problem(
                "invalid_retry",
                format!("task {}: backoff_factor must be a finite number >= 1", t.id),
                Some(&t.id),
            ));
        }
        let timeouts = [
            t.timeouts.schedule_to_start_ms,
            t.timeouts.start_to_close_ms,
            t.timeouts.heartbeat_ms,
        ];
        if timeouts.iter().flatten().any(|ms| *ms == 0) {
            problems.push(problem(
                "invalid_timeout",
                format!("task {}: timeouts must be > 0 ms", t.id),
                Some(&t.id),
            ));
        }
        for (resource, amount) in &t.requirements.resources {
            if !amount.is_finite() || *amount < 0.0 {
                problems.push(problem(
                    "invalid_requirement",
                    format!(
                        "task {} asks for {amount} of {resource}; amounts must be finite and >= 0",
                        t.id
                    ),
                    Some(&t.id),
                ));
            }
        }
    }
    for t in &spec.tasks {
        for d in &t.depends_on {
            if d == &t.id {
                problems.push(problem(
                    "self_dependency",
                    format!("task {} depends on itself", t.id),
                    Some(&t.id),
                ));
            } else if !ids.contains(d) {
                problems.push(problem(
                    "unknown_dependency",
                    format!("task {} depends on {d}, which is not in the flow", t.id),
                    Some(&t.id),
                ));
            }
        }
    }
    problems.extend(cycles(spec));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// One problem per cycle (strongly connected component), each with a path through it.
fn cycles(spec: &FlowSpec) -> Vec<ValidationProblem> {
    let deps = Dependencies::of(spec);
    let mut out = Vec::new();
    for scc in petgraph::algo::tarjan_scc(&deps.graph) {
        if scc.len() < 2 {
            continue; // self-dependencies are reported on their own
        }
        let members: HashSet<NodeIndex> = scc.iter().copied().collect();
        let Some(start) = scc.iter().copied().min_by_key(|n| deps.name(*n)) else {
            continue;
        };
        let path: Vec<TaskId> = cycle_path(&deps.graph, &members, start)
            .into_iter()
            .filter_map(|n| TaskId::new(deps.name(n)).ok())
            .collect();
        let shown: Vec<&str> = path.iter().map(TaskId::as_str).collect();
        out.push(ValidationProblem {
            code: "cycle".into(),
            message: format!("dependency cycle: {}", shown.join(" -> ")),
            task_id: path.first().cloned(),
            path,
        });
    }
    out
}

/// The dependency graph with dense integer nodes: the graph algorithms then
/// never hash or compare task ids, which keeps large flows linear.
/// Edges run from a dependency to its dependant (the order tasks run in);
/// unknown dependencies and self-dependencies are left out (validation
/// reports them on their own).
pub(crate) struct Dependencies<'a> {
    names: Vec<&'a str>,
    pub(crate) graph: DiGraph<(), (), u32>,
}

impl<'a> Dependencies<'a> {
    pub(crate) fn of(spec: &'a FlowSpec) -> Self {
        let mut graph = DiGraph::with_capacity(spec.tasks.len(), spec.tasks.len());
        let mut names = Vec::with_capacity(spec.tasks.len());
        let mut index: HashMap<&str, NodeIndex> = HashMap::with_capacity(spec.tasks.len());
        for t in &spec.tasks {
            index.entry(t.id.as_str()).or_insert_with(|| {
                names.push(t.id.as_str());
                graph.add_node(())
            });
        }
        for t in &spec.tasks {
            let Some(&to) = index.get(t.id.as_str()) else {
                continue;
            };
            for d in t.depends_on.iter().filter(|d| *d != &t.id) {
                if let Some(&from) = index.get(d.as_str()) {
                    graph.update_edge(from, to, ());
                }
            }
        }
        Dependencies { names, graph }
    }

    pub(crate) fn name(&self, n: NodeIndex) -> &'a str {
        self.names.get(n.index()).copied().unwrap_or_default()
    }
}

/// Breadth-first search inside one strongly connected component from `start`
/// back to itself; the shortest such path is the clearest to report.
fn cycle_path(
    graph: &DiGraph<(), (), u32>,
    members: &HashSet<NodeIndex>,
    start: NodeIndex,
) -> Vec<NodeIndex> {
    let mut prev: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    let mut end = None;
    while let Some(n) = queue.pop_front() {
        for next in graph.neighbors(n) {
            if !members.contains(&next) {
                continue;
            }
            if next == start {
                end = Some(n);
                queue.clear();
                break;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(next) {
                e.insert(n);
                queue.push_back(next);
            }
        }
    }
    let mut path = vec![start];
    let mut cur = end;
    let mut back = Vec::new();
    while let Some(n) = cur {
        if n == start {
            break;
        }
        back.push(n);
        cur = prev.get(&n).copied();
    }
    back.reverse();
    path.extend(back);
    path.push(start);
    path
}

/// Upward rank: the longest chain of estimated durations from each task to a
/// sink, the task itself included. Ready tasks with a higher rank sit on the
/// critical path and go first.
pub(crate) fn upward_ranks(
    spec: &FlowSpec,
    duration: impl Fn(&TaskSpec) -> u64,
) -> HashMap<TaskId, u64> {
    let deps = Dependencies::of(spec);
    let mut own = vec![0u64; deps.names.len()];
    let mut seen = HashSet::with_capacity(spec.tasks.len());
    for t in &spec.tasks {
        if seen.insert(t.id.as_str()) {
            own[seen.len() - 1] = duration(t);
        }
    }
    let mut ranks = vec![0u64; deps.names.len()];
    let mut out = HashMap::with_capacity(deps.names.len());
    if let Ok(order) = petgraph::algo::toposort(&deps.graph, None) {
        for n in order.into_iter().rev() {
            let below = deps
                .graph
                .neighbors(n)
                .map(|m| ranks[m.index()])
                .max()
                .unwrap_or(0);
            ranks[n.index()] = below.saturating_add(own[n.index()]);
            if let Ok(id) = TaskId::new(deps.name(n)) {
                out.insert(id, ranks[n.index()]);
            }
        }
    }
    out
}
