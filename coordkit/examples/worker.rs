//! A complete coordkit agent in Rust: the runtime registers, heartbeats, takes
//! assignments with bounded concurrency, reports every attempt, honours cancel
//! notices and drains on Ctrl-C; this file only says what a task does.
//!
//! ```sh
//! NATS_URL=nats://127.0.0.1:4222 cargo run -p coordkit --example worker -- --id worker-1
//! ```
//!
//! Tasks of kind `sleep` wait `input.ms` milliseconds; `fail` fails with
//! `input.error` (not retryable); anything else echoes its input. After each task
//! the agent publishes how many it has done as its state document.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use coordkit::agent::{self, AgentOptions, TaskFailure};
use coordkit::msg::StatePut;
use coordkit::{AgentId, Client, Error, ErrorCode};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    nats: common::config::NatsConfig,
    #[arg(long, default_value = "worker-1")]
    id: String,
    /// Capability to offer (repeatable).
    #[arg(long = "capability")]
    capabilities: Vec<String>,
    #[arg(long, default_value_t = 4.0)]
    cpu: f64,
    /// Tasks run at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let nats = common::nats::connect(&args.nats, "worker-example").await?;
    let mut opts = AgentOptions::new(AgentId::new(&args.id)?).capacity("cpu", args.cpu);
    for c in &args.capabilities {
        opts = opts.capability(c);
    }
    opts.concurrency = args.concurrency;
    let me = opts.agent_id.clone();
    let client = Client::new(nats.clone());
    let done = Arc::new(AtomicU64::new(0));
    println!("agent {me} running; Ctrl-C drains and stops");

    agent::run(
        nats,
        opts,
        move |task| {
            let (client, me, done) = (client.clone(), me.clone(), done.clone());
            async move {
                let output = match task.kind.as_str() {
                    "sleep" => {
                        let ms = task.input["ms"].as_u64().unwrap_or(100);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        json!({ "slept_ms": ms })
                    }
                    "fail" => {
                        return Err(TaskFailure {
                            error: task.input["error"].as_str().unwrap_or("failed").to_owned(),
                            retryable: false,
                        })
                    }
                    _ => json!({ "echo": task.input }),
                };
                let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                publish_progress(&client, &me, n).await?;
                Ok(output)
            }
        },
        common::shutdown::signal(),
    )
    .await
}

/// Stores `{"tasks_done": n}` as the agent's state, re-reading the revision on a
/// conflict (another writer got in between).
async fn publish_progress(client: &Client, me: &AgentId, n: u64) -> Result<(), Error> {
    loop {
        let expected_revision = match client.state_get(me).await {
            Ok(doc) => doc.revision,
            Err(e) if e.code == ErrorCode::NotFound => 0,
            Err(e) => return Err(e),
        };
        let put = StatePut {
            agent_id: me.clone(),
            expected_revision,
            doc: json!({ "tasks_done": n }),
            scope: Default::default(),
            clock: None,
        };
        match client.state_put(&put).await {
            Err(e) if e.code == ErrorCode::Conflict => continue,
            other => return other.map(|_| ()),
        }
    }
}
