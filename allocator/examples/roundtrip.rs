//! Allocate+release round trips per second over NATS: starts an allocator
//! in-process against `--nats-url`, registers agents, then runs `--ops`
//! allocate+release pairs from `--concurrency` concurrent callers.
//!
//! `cargo run --release -p allocator --example roundtrip -- --nats-url nats://127.0.0.1:4222`

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use common::msg::{AllocateRequest, RegisterAgent, ReleaseRequest, Requirements};
use common::{AgentId, Client};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Allocate+release pairs in total.
    #[arg(long, default_value_t = 5_000)]
    ops: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 20)]
    agents: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = common::config::NatsConfig::new(args.nats_url.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(allocator::run(allocator::Config::new(cfg), async move {
        let _ = stopped.await;
    }));
    let nats = async_nats::connect(&args.nats_url).await?;
    let client = Client::new(nats).with_timeout(Duration::from_secs(10));
    let run = format!("{:x}", common::now_ms());
    for i in 0..args.agents {
        let register = RegisterAgent {
            agent_id: AgentId::new(format!("bench-{run}-{i}"))?,
            capabilities: vec![format!("bench-{run}")],
            labels: Default::default(),
            capacity: [("cpu".to_string(), 1_000.0)].into(),
            heartbeat_interval_ms: 3_600_000,
        };
        loop {
            match client.register_agent(&register).await {
                Ok(_) => break,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
    let req = Arc::new(AllocateRequest {
        owner: "bench".into(),
        requirements: Requirements {
            resources: [("cpu".to_string(), 1.0)].into(),
            capabilities: vec![format!("bench-{run}")],
            ..Default::default()
        },
        priority: 0,
        allocation_id: None,
        deadline_ms: None,
        task: None,
        ttl_ms: None,
    });
    let per_task = args.ops / args.concurrency.max(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, req) = (client.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            for _ in 0..per_task {
                let Ok(a) = client.allocate(&req).await else {
                    continue;
                };
                let release = ReleaseRequest {
                    allocation_id: a.allocation_id,
                    agent_id: Some(a.agent_id),
                };
                if client.release(&release).await.is_ok() {
                    done += 1;
                }
            }
            done
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{done} allocate+release pairs in {secs:.2} s: {:.0} pairs/s ({} agents, concurrency {})",
        done as f64 / secs,
        args.agents,
        args.concurrency
    );
    let _ = stop.send(());
    service.await??;
    Ok(())
}
