//! Placement decisions per second in the pure core, over 10,000 agents with
//! mixed capacities and existing allocations (no NATS, no IO).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use allocator::machine::{self, AgentRecord, Draw};
use common::msg::{Policy, RegisterAgent, Requirements};
use common::{AgentId, AllocationId};
use criterion::{criterion_group, criterion_main, Criterion};

fn pool(n: usize) -> Vec<AgentRecord> {
    (0..n)
        .map(|i| {
            let mut rec = AgentRecord::register(
                &RegisterAgent {
                    agent_id: AgentId::new(format!("agent-{i}")).unwrap(),
                    capabilities: if i % 10 == 0 {
                        vec!["gpu".into()]
                    } else {
                        vec![]
                    },
                    labels: [("zone".to_string(), format!("z{}", i % 4))].into(),
                    capacity: [
                        ("cpu".to_string(), 4.0 + (i % 13) as f64),
                        ("mem_mb".to_string(), 8192.0 + 1024.0 * (i % 7) as f64),
                    ]
                    .into(),
                    heartbeat_interval_ms: 5000,
                },
                None,
                0,
            );
            for k in 0..(i % 4) {
                let req = Requirements {
                    resources: [("cpu".to_string(), 1.0), ("mem_mb".to_string(), 1024.0)].into(),
                    ..Default::default()
                };
                let a = machine::new_allocation(
                    AllocationId::new(format!("a{i}-{k}")).unwrap(),
                    &rec.agent_id,
                    "owner",
                    &req,
                    0,
                    Draw::General,
                    0,
                    None,
                );
                rec.allocations.insert(a.allocation_id.clone(), a);
            }
            rec
        })
        .collect()
}

fn placement(c: &mut Criterion) {
    let agents = pool(10_000);
    let req = |policy| Requirements {
        resources: [("cpu".to_string(), 2.0), ("mem_mb".to_string(), 2048.0)].into(),
        labels: BTreeMap::new(),
        policy,
        ..Default::default()
    };
    let best_fit = req(Policy::BestFit);
    let spread = req(Policy::Spread);
    let gpu = Requirements {
        capabilities: vec!["gpu".into()],
        ..req(Policy::BestFit)
    };
    let mut g = c.benchmark_group("place_10k_agents");
    g.bench_function("best_fit", |b| {
        b.iter(|| machine::place(&agents, &best_fit, Some("owner"), 1).unwrap())
    });
    g.bench_function("spread", |b| {
        b.iter(|| machine::place(&agents, &spread, Some("owner"), 1).unwrap())
    });
    g.bench_function("best_fit_gpu_filter", |b| {
        b.iter(|| machine::place(&agents, &gpu, Some("owner"), 1).unwrap())
    });
    g.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
