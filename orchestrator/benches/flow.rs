//! Micro-benchmarks of the pure flow machine: what creating a flow costs
//! (validation, building the state), what choosing the next tasks costs, and what
//! one agent report costs the way the adapter applies it (clone, step, compare,
//! serialise the whole flow for the KV compare-and-set).
//!
//! At 100k tasks the pure functions are measured alone; the same flow created
//! and run over the wire is `coord-bench curves --curve-flow-sizes 100000`.
//!
//! Run: `cargo bench -p orchestrator --bench flow`.

use std::hint::black_box;

use common::msg::{AgentReport, FlowSpec, ReportKind, TaskSpec};
use common::{AgentId, AllocationId, FlowId, TaskId};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use orchestrator::machine::{validate, Flow};

/// A fixed-seed xorshift, so every run measures the same DAGs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn task_id(i: usize) -> TaskId {
    // Ids are checked tokens; these are valid by construction.
    TaskId::new(format!("task-{i:06}")).unwrap_or_else(|_| unreachable!())
}

/// `n` tasks, each depending on 0–3 distinct earlier tasks (a quarter are roots),
/// with random priorities and estimates so the ordering has work to do.
fn random_dag(n: usize, seed: u64) -> FlowSpec {
    let mut rng = Rng(seed | 1);
    let tasks = (0..n)
        .map(|i| {
            let mut t = TaskSpec::new(task_id(i));
            t.kind = "noop".into();
            t.priority = rng.below(3) as i32;
            t.estimated_duration_ms = Some(100 + rng.below(900));
            if i > 0 {
                let mut deps: Vec<usize> = (0..rng.below(4))
                    .map(|_| rng.below(i as u64) as usize)
                    .collect();
                deps.sort_unstable();
                deps.dedup();
                t.depends_on = deps.into_iter().map(task_id).collect();
            }
            t
        })
        .collect();
    FlowSpec::new("bench", tasks)
}

fn flow_id() -> FlowId {
    FlowId::new("bench-flow").unwrap_or_else(|_| unreachable!())
}

fn create(c: &mut Criterion) {
    let mut g = c.benchmark_group("create");
    for n in [1_000usize, 10_000, 100_000] {
        let spec = random_dag(n, 42);
        if n >= 100_000 {
            g.sample_size(10);
        }
        g.bench_with_input(BenchmarkId::new("validate", n), &spec, |b, spec| {
            b.iter(|| black_box(validate(black_box(spec)).is_ok()))
        });
        g.bench_with_input(BenchmarkId::new("flow_new", n), &spec, |b, spec| {
            b.iter_batched(
                || spec.clone(),
                |spec| black_box(Flow::new(flow_id(), spec, 0)),
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn dispatch_order(c: &mut Criterion) {
    let mut g = c.benchmark_group("dispatchable");
    for n in [1_000usize, 10_000] {
        let (mut flow, _) = Flow::new(flow_id(), random_dag(n, 7), 0);
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(flow.dispatchable(black_box(1))))
        });
    }
    g.finish();
}

/// A 10k-task flow with one task running on an agent, and that task's completion.
fn running_flow() -> (Flow, AgentReport) {
    let (mut flow, _) = Flow::new(flow_id(), random_dag(10_000, 11), 0);
    let agent = AgentId::new("agent-1").unwrap_or_else(|_| unreachable!());
    let allocation = AllocationId::new("alloc-1").unwrap_or_else(|_| unreachable!());
    let task = flow
        .dispatchable(1)
        .into_iter()
        .next()
        .unwrap_or_else(|| unreachable!("a random DAG has roots"));
    flow.assign(&task, &agent, &allocation, 1)
        .unwrap_or_else(|_| unreachable!("a ready task can be assigned"));
    let attempt = flow.tasks[&task].attempt;
    let started = AgentReport {
        flow_id: flow.id.clone(),
        task_id: task.clone(),
        attempt,
        agent_id: agent.clone(),
        kind: ReportKind::Started,
        at_ms: 2,
    };
    let _ = flow.report(&started, 2);
    let completed = AgentReport {
        kind: ReportKind::Completed {
            output: serde_json::json!({"ok": true}),
        },
        at_ms: 3,
        ..started
    };
    (flow, completed)
}

fn report_step(c: &mut Criterion) {
    let mut g = c.benchmark_group("report_10k");
    let (flow, completed) = running_flow();
    let stored = serde_json::to_vec(&flow).unwrap_or_default();
    println!("stored 10k-task flow: {} bytes of JSON", stored.len());

    g.bench_function("report_only", |b| {
        b.iter_batched(
            || flow.clone(),
            |mut f| black_box(f.report(&completed, 3).is_ok()),
            BatchSize::LargeInput,
        )
    });
    // What the adapter does per step when its cached copy is current: keep a copy
    // to detect "no change", apply, compare, serialise for the compare-and-set,
    // then pick the next tasks to place.
    g.bench_function("adapter_step_cached", |b| {
        b.iter_batched(
            || flow.clone(),
            |mut f| {
                let before = f.clone();
                let ok = f.report(&completed, 3).is_ok();
                let changed = f != before;
                let body = serde_json::to_vec(&f).unwrap_or_default();
                let next = f.dispatchable(3);
                black_box((ok, changed, body.len(), next.len()))
            },
            BatchSize::LargeInput,
        )
    });
    // A cache miss (another replica wrote, or a fresh actor) also reads and parses it.
    g.bench_function("serde_round_trip", |b| {
        b.iter(|| {
            let f: Flow = serde_json::from_slice(black_box(&stored))
                .unwrap_or_else(|_| unreachable!("the flow was just serialised"));
            black_box(serde_json::to_vec(&f).unwrap_or_default().len())
        })
    });
    g.finish();
}

criterion_group!(benches, create, dispatch_order, report_step);
criterion_main!(benches);
