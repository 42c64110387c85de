//! `coordctl`: the coordkit command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use common::msg::{CapacityRequest, FlowListRequest, FlowSpec, FlowState, StatePut};
use common::{subject, AgentId, Client, FlowId};
use coordkit::demo;
use futures::StreamExt;

/// coordctl: drive a coordkit system from the command line.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    nats: common::config::NatsConfig,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the demo: a demo agent, the flow a -> b, a -> c with live progress, state and metrics.
    Demo {
        /// Exit once the demo flow has completed instead of serving until Ctrl-C.
        #[arg(long)]
        exit: bool,
        /// How long each demo task works, in milliseconds.
        #[arg(long, default_value_t = 700)]
        work_ms: u64,
    },
    /// Run a demo agent that echoes each task's input.
    Agent {
        #[arg(long, default_value = demo::DEMO_AGENT)]
        id: String,
        #[arg(long, default_value_t = 100)]
        work_ms: u64,
    },
    /// Task flows.
    #[command(subcommand)]
    Flow(FlowCmd),
    /// Agent state documents.
    #[command(subcommand)]
    State(StateCmd),
    /// Pool capacity per resource and per agent.
    Capacity,
    /// Traffic metrics from the monitor.
    Metrics,
    /// The services answering $SRV.PING, with their endpoints.
    Services {
        /// How long to collect answers, in milliseconds.
        #[arg(long, default_value_t = 500)]
        wait_ms: u64,
    },
}

#[derive(Subcommand, Debug)]
enum FlowCmd {
    /// Submit a flow spec (JSON file, or - for stdin).
    Submit {
        file: PathBuf,
        /// Wait until the flow finishes, printing progress.
        #[arg(long)]
        wait: bool,
    },
    /// A flow's status.
    Status { flow_id: String },
    /// All flows.
    List,
}

#[derive(Subcommand, Debug)]
enum StateCmd {
    /// An agent's state document and its revision.
    Get { agent_id: String },
    /// Store a document (JSON text) made from `--revision` (0 to create).
    Put {
        agent_id: String,
        #[arg(long)]
        revision: u64,
        doc: String,
    },
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        match e.downcast_ref::<common::Error>() {
            Some(api) => eprintln!("error [{}]: {}", api.code, api.message),
            None => eprintln!("error: {e:#}"),
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        std::mem::forget(common::telemetry::init("coordctl"));
    }
    let nats = common::nats::connect(&cli.nats, "coordctl").await?;
    let client = Client::new(nats.clone()).with_timeout(cli.nats.request_timeout());
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Demo { exit, work_ms } => run_demo(nats.clone(), client, exit, work_ms).await?,
        Command::Agent { id, work_ms } => {
            let _ = AgentId::new(&id)?;
            println!("agent {id} running; Ctrl-C to stop");
            demo::run_demo_agent(
                nats.clone(),
                Duration::from_millis(work_ms),
                common::shutdown::signal(),
            )
            .await?;
        }
        Command::Flow(FlowCmd::Submit { file, wait }) => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?
            };
            let spec: FlowSpec =
                serde_json::from_str(&text).context("the flow spec is not valid")?;
            let mut status = client.create_flow(&spec).await?;
            if wait {
                while status.state == FlowState::Running {
                    if !json {
                        println!("{}", demo::progress_line(&status));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    status = client.flow_status(&status.flow_id).await?;
                }
            }
            print(json, &status, || {
                format!(
                    "{} {:?} {}",
                    status.flow_id,
                    status.state,
                    demo::progress_line(&status)
                )
            })?;
        }
        Command::Flow(FlowCmd::Status { flow_id }) => {
            let status = client.flow_status(&FlowId::new(flow_id)?).await?;
            print(json, &status, || {
                format!(
                    "{} {:?} {}",
                    status.flow_id,
                    status.state,
                    demo::progress_line(&status)
                )
            })?;
        }
        Command::Flow(FlowCmd::List) => {
            let list = client.list_flows(&FlowListRequest::default()).await?;
            print(json, &list, || {
                list.flows
                    .iter()
                    .map(|f| {
                        format!(
                            "{}  {:?}  {} tasks  {:.0}%  {}",
                            f.flow_id,
                            f.state,
                            f.tasks,
                            f.progress * 100.0,
                            f.name
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
        Command::State(StateCmd::Get { agent_id }) => {
            let doc = client.state_get(&AgentId::new(agent_id)?).await?;
            print(json, &doc, || {
                format!("revision {}: {}", doc.revision, doc.doc)
            })?;
        }
        Command::State(StateCmd::Put {
            agent_id,
            revision,
            doc,
        }) => {
            let doc = serde_json::from_str(&doc).context("the document is not valid JSON")?;
            let put = StatePut {
                agent_id: AgentId::new(agent_id)?,
                expected_revision: revision,
                doc,
                scope: Default::default(),
                clock: None,
            };
            let stored = client.state_put(&put).await?;
            print(json, &stored, || {
                format!("stored at revision {}", stored.revision)
            })?;
        }
        Command::Capacity => {
            let cap = client.capacity(&CapacityRequest::default()).await?;
            print(json, &cap, || {
                cap.pool
                    .iter()
                    .map(|(r, c)| {
                        format!(
                            "{r}: {} capacity, {} allocated, {} free",
                            c.capacity, c.allocated, c.free
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
        Command::Metrics => {
            let m = client.metrics().await?;
            print(json, &m, || {
                serde_json::to_string_pretty(&m).unwrap_or_default()
            })?;
        }
        Command::Services { wait_ms } => {
            let infos = discover(&nats, subject::SRV_INFO, Duration::from_millis(wait_ms)).await?;
            print(json, &infos, || {
                infos
                    .iter()
                    .map(|i| {
                        let endpoints: Vec<&str> = i["endpoints"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|e| e["subject"].as_str()).collect())
                            .unwrap_or_default();
                        format!(
                            "{} {} ({}): {}",
                            i["name"].as_str().unwrap_or("?"),
                            i["version"].as_str().unwrap_or("?"),
                            i["id"].as_str().unwrap_or("?"),
                            endpoints.join(", ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
    }
    nats.drain().await.ok();
    Ok(())
}

fn print<T: serde::Serialize>(
    json: bool,
    value: &T,
    text: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        println!("{}", text());
    }
    Ok(())
}

/// Every answer to a discovery request within `wait` (services answer once per instance).
async fn discover(
    nats: &async_nats::Client,
    subject: &str,
    wait: Duration,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let inbox = nats.new_inbox();
    let mut replies = nats.subscribe(inbox.clone()).await?;
    nats.publish_with_reply(subject.to_owned(), inbox, "".into())
        .await?;
    nats.flush().await?;
    let mut out = Vec::new();
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => break,
            msg = replies.next() => match msg {
                Some(m) => out.extend(serde_json::from_slice(&m.payload).ok()),
                None => break,
            },
        }
    }
    Ok(out)
}

async fn run_demo(
    nats: async_nats::Client,
    client: Client,
    exit: bool,
    work_ms: u64,
) -> anyhow::Result<()> {
    let (stop_agent, agent_stopped) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(demo::run_demo_agent(
        nats.clone(),
        Duration::from_millis(work_ms),
        async {
            let _ = agent_stopped.await;
        },
    ));
    println!(
        "demo agent {} started (cpu: 2, capability: demo)",
        demo::DEMO_AGENT
    );
    let status = demo::run_demo_flow(&client, Duration::from_secs(60)).await?;
    println!("flow {} finished: {:?}", status.flow_id, status.state);
    for t in &status.tasks {
        println!(
            "  {:<3} {:?} attempt {} on {}: {}",
            t.task_id,
            t.state,
            t.attempt,
            t.agent_id.as_ref().map(|a| a.as_str()).unwrap_or("-"),
            t.output
        );
    }
    demo::show_state(&client).await?;
    // Give the monitor a moment to see the last events.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = client.metrics().await?;
    println!(
        "monitor: {} messages, {} flows completed, {} tasks completed",
        m.messages_total, m.flows_completed, m.tasks_completed
    );
    let services = discover(&nats, subject::SRV_PING, Duration::from_millis(300)).await?;
    let mut names: Vec<&str> = services.iter().filter_map(|s| s["name"].as_str()).collect();
    names.sort();
    names.dedup();
    println!("services answering $SRV.PING: {}", names.join(", "));
    if status.state != FlowState::Succeeded {
        anyhow::bail!("the demo flow ended {:?}", status.state);
    }
    if !exit {
        println!("the system is up; the demo agent keeps serving. Ctrl-C to stop.");
        common::shutdown::signal().await;
    }
    let _ = stop_agent.send(());
    agent.await??;
    Ok(())
}
