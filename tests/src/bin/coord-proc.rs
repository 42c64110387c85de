//! `coord-proc`: one agent or one service replica as an OS process of its own,
//! for tests that must signal it (`SIGSTOP`/`SIGCONT`) rather than stop it
//! from inside. A frozen process keeps its sockets open and its state in
//! memory, and wakes with every timer expired: what an in-process pause can
//! only imitate.
//!
//! ```sh
//! coord-proc --nats-url nats://127.0.0.1:4222 agent --id a1 --work-ms 2000
//! coord-proc --nats-url nats://127.0.0.1:4222 allocator
//! ```
//!
//! A service replica runs the service's own `run`, named in its traces as the
//! service's binary is (`coord-allocator`, …), so it also stands in for the
//! binaries where a test needs a service in a process of its own.

use std::time::Duration;

use clap::{Parser, Subcommand};
use common::config::NatsConfig;
use common::AgentId;
use coordkit::agent::{self, AgentOptions};
use serde_json::json;

#[derive(Parser)]
#[command(name = "coord-proc")]
struct Args {
    #[command(flatten)]
    nats: NatsConfig,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// An agent of the coordkit runtime whose tasks wait `--work-ms`, then
    /// complete with `{"by": <id>}`.
    Agent {
        #[arg(long)]
        id: String,
        #[arg(long, default_value_t = 1.0)]
        cpu: f64,
        #[arg(long, default_value_t = 300)]
        heartbeat_ms: u64,
        #[arg(long, default_value_t = 1_000)]
        work_ms: u64,
    },
    /// An allocator replica.
    Allocator {
        #[arg(long, default_value_t = 500)]
        sweep_ms: u64,
        /// See `allocator::Config::reconcile_grace_ms`.
        #[arg(long, default_value_t = 30_000)]
        reconcile_grace_ms: u64,
    },
    /// An orchestrator replica.
    Orchestrator {
        #[arg(long, default_value_t = 200)]
        sweep_ms: u64,
    },
    /// A synchronizer replica.
    Synchronizer,
    /// A monitor replica, its HTTP endpoints on any free port.
    Monitor,
}

impl What {
    /// The name this process's spans carry: the service binary's, or the agent's.
    fn service_name(&self) -> String {
        match self {
            What::Agent { id, .. } => format!("coord-agent-{id}"),
            What::Allocator { .. } => "coord-allocator".into(),
            What::Orchestrator { .. } => "coord-orchestrator".into(),
            What::Synchronizer => "coord-synchronizer".into(),
            What::Monitor => "coord-monitor".into(),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = common::telemetry::init(&args.what.service_name());
    match args.what {
        What::Agent {
            id,
            cpu,
            heartbeat_ms,
            work_ms,
        } => {
            let nats = common::nats::connect(&args.nats, &format!("agent-{id}")).await?;
            let mut opts = AgentOptions::new(AgentId::new(&id)?).capacity("cpu", cpu);
            opts.heartbeat_interval = Duration::from_millis(heartbeat_ms);
            opts.concurrency = 1;
            let work = Duration::from_millis(work_ms);
            agent::run(
                nats,
                opts,
                move |_| {
                    let id = id.clone();
                    async move {
                        tokio::time::sleep(work).await;
                        Ok(json!({ "by": id }))
                    }
                },
                common::shutdown::signal(),
            )
            .await?;
        }
        What::Allocator {
            sweep_ms,
            reconcile_grace_ms,
        } => {
            let mut cfg = allocator::Config::new(args.nats);
            cfg.sweep_ms = sweep_ms;
            cfg.reconcile_grace_ms = reconcile_grace_ms;
            allocator::run(cfg, common::shutdown::signal()).await?;
        }
        What::Orchestrator { sweep_ms } => {
            let mut cfg = orchestrator::Config::new(args.nats);
            cfg.sweep_ms = sweep_ms;
            orchestrator::run(cfg, common::shutdown::signal()).await?;
        }
        What::Synchronizer => {
            let cfg = synchronizer::Config::new(args.nats);
            synchronizer::run(cfg, common::shutdown::signal()).await?;
        }
        What::Monitor => {
            let mut cfg = monitor::Config::new(args.nats);
            cfg.http_addr = "127.0.0.1:0".into();
            monitor::run(cfg, common::shutdown::signal()).await?;
        }
    }
    Ok(())
}
