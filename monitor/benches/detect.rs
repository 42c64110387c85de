//! The monitor's core per message and per tick: what bounds how much traffic
//! one monitor replica can watch (`coord-bench monitor` measures it end to
//! end over NATS).
//!
//! `cargo bench -p monitor --bench detect`

// A measurement tool: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use common::msg::{Event, EventKind, TaskState};
use common::{AgentId, FlowId, TaskId};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use monitor::machine::{Monitor, Settings};

fn transition(n: u64, to: TaskState, at_ms: u64) -> Vec<u8> {
    let ev = Event {
        event_id: format!("e{n}-{to:?}"),
        at_ms,
        source: "bench".into(),
        kind: EventKind::TaskTransition {
            flow_id: FlowId::new(format!("f{}", n / 100)).unwrap(),
            task_id: TaskId::new(format!("t{n}")).unwrap(),
            from: TaskState::Ready,
            to,
            attempt: 1,
            agent_id: Some(AgentId::new(format!("w{}", n % 100)).unwrap()),
            reason: None,
            timeout_ms: None,
            task_kind: Some("work".into()),
        },
    };
    serde_json::to_vec(&ev).unwrap()
}

/// A monitor that has seen `tasks` tasks run on `agents` agents over a minute,
/// so its windows, histograms and detectors all hold data.
fn warmed(tasks: u64, agents: u64) -> Monitor {
    let mut m = Monitor::new(0, "bench", Settings::default());
    let subject = "coord.events.task.running";
    for n in 0..tasks {
        let at = n * 60_000 / tasks.max(1);
        m.observe(subject, &transition(n, TaskState::Running, at), at);
        m.observe(
            "coord.events.task.succeeded",
            &transition(n, TaskState::Succeeded, at + 5),
            at + 5,
        );
        let agent = n % agents;
        m.observe(
            &format!("coord.agents.w{agent}.heartbeat"),
            format!(r#"{{"agent_id":"w{agent}"}}"#).as_bytes(),
            at,
        );
        if n % 1_000 == 0 {
            m.tick(at);
        }
    }
    m
}

fn observe(c: &mut Criterion) {
    let mut g = c.benchmark_group("observe");
    let running = transition(7, TaskState::Running, 60_000);
    let beat = br#"{"agent_id":"w7"}"#.to_vec();
    g.bench_function("task_transition", |b| {
        let mut m = warmed(10_000, 100);
        let mut at = 60_000;
        b.iter(|| {
            at += 1;
            m.observe("coord.events.task.running", &running, at);
        })
    });
    g.bench_function("heartbeat", |b| {
        let mut m = warmed(10_000, 100);
        let mut at = 60_000;
        b.iter(|| {
            at += 1;
            m.observe("coord.agents.w7.heartbeat", &beat, at);
        })
    });
    g.finish();
}

/// One detector update over every series the monitor keeps.
fn tick(c: &mut Criterion) {
    let mut g = c.benchmark_group("tick");
    for agents in [100u64, 1_000] {
        g.bench_with_input(
            BenchmarkId::from_parameter(agents),
            &agents,
            |b, &agents| {
                b.iter_batched(
                    || warmed(20_000, agents),
                    |mut m| {
                        m.tick(61_000);
                        m
                    },
                    BatchSize::LargeInput,
                )
            },
        );
    }
    g.finish();
}

criterion_group!(benches, observe, tick);
criterion_main!(benches);
