//! `coordctl`: every service operation from the command line.
//!
//! Each command maps to one typed [`Client`] request, so the CLI can never speak a
//! different protocol than the SDK. Every command prints either a human summary or,
//! with `--output json`, the reply exactly as the service sent it, for scripts. A
//! failed request prints `error [code]: message` (with `--output json`, the error
//! body `{"error": …}` on stdout). The exit status follows [`EXIT_STATUSES`].

mod alloc;
mod conformance;
mod events;
mod flow;
mod monitor;
mod sync;
mod trigger;

use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use common::{subject, AgentId, Client, Error, ErrorCode};
use futures::StreamExt;
use serde::{de::DeserializeOwned, Serialize};

use crate::demo;

/// What each exit status means, the same for every command (shown by `--help`).
pub const EXIT_STATUSES: &str = "\
Exit status:
  0  done; the answer is yes
  1  the request failed: an error reply, printed as `error [code]: message`
     (with --output json the body {\"error\": {\"code\", \"message\", \"details\"}} goes to stdout)
  2  usage error
  3  the answer is no: validate finds violations, a sync point, synchronize round or
     rollback is not complete or not verified, a followed flow (flow watch, flow submit
     --wait) ended failed or cancelled, health is unhealthy, check-system finds
     violations, capacity check does not fit
  4  the system did not answer: no NATS connection, no service answering, a timeout
     (error codes unavailable, timeout)";

/// The request succeeded and its answer is no (exit status 3), e.g. a scope
/// that is invalid: scripts tell it apart from a request that failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Negative(pub(crate) String);

/// coordctl: drive a coordkit system from the command line.
#[derive(Parser, Debug)]
#[command(
    name = "coordctl",
    version,
    about = "coordctl: drive a coordkit system from the command line",
    propagate_version = true
)]
#[command(after_help = EXIT_STATUSES)]
pub struct Cli {
    #[command(flatten)]
    nats: common::config::NatsConfig,
    /// Output format: text for people, json (the service's reply as is) for scripts.
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
        /// Heartbeat interval in milliseconds; on a NATS cluster, above a
        /// node's failover time (5000), or the agent is declared lost meanwhile.
        #[arg(long, env = "COORD_HEARTBEAT_MS", default_value_t = 1_000)]
        heartbeat_ms: u64,
    },
    /// Task flows: submit, follow, pause, resume, cancel.
    #[command(subcommand)]
    Flow(flow::FlowCmd),
    /// Registered agents.
    #[command(subcommand)]
    Agents(alloc::AgentsCmd),
    /// Pool capacity: show, check a requirement, reserve, adjust an agent.
    #[command(subcommand)]
    Capacity(alloc::CapacityCmd),
    /// Allocations: allocate, renew a lease, gang, release.
    #[command(subcommand)]
    Alloc(alloc::AllocCmd),
    /// Plan (and with --apply, make) moves of movable allocations that even out utilisation.
    Optimize(alloc::OptimizeArgs),
    /// Agent state documents: get, put, history, delete.
    #[command(subcommand)]
    State(sync::StateCmd),
    /// Scope configuration: conflict policy, schema, invariants, shared pointers.
    #[command(subcommand)]
    Scope(sync::ScopeCmd),
    /// Check a scope's documents against its schema and invariants. Exits 3 when they break one.
    Validate(sync::ValidateArgs),
    /// Make the agents agree on the shared values of a scope and wait for their acknowledgements.
    Synchronize(sync::SynchronizeArgs),
    /// Sync points: consistent cuts of agents' state, completion, rollback.
    #[command(subcommand)]
    Syncpoint(sync::SyncpointCmd),
    /// Events agents published: list, watch, and the per-type schemas they are checked against.
    #[command(subcommand)]
    Events(events::EventsCmd),
    /// Triggers: a flow started once for every matching agent event.
    #[command(subcommand)]
    Trigger(trigger::TriggerCmd),
    /// Traffic metrics from the monitor.
    Metrics,
    /// Health of every service, JetStream and the NATS server: healthy, degraded or unhealthy, with reasons.
    /// Exits 3 when unhealthy, 4 when the monitor does not answer.
    Health,
    /// The monitor's health report: health, key metrics, recent anomalies and cross-service validation.
    Report,
    /// Trends, slowest agents and flows, and the bottleneck resource.
    Analysis,
    /// Recent anomalies the monitor detected.
    Anomalies {
        /// Only those since this time (ms since the epoch).
        #[arg(long)]
        since_ms: Option<u64>,
    },
    /// Cross-service consistency: allocations match running tasks, nothing on lost agents. Exits 3 on a violation.
    CheckSystem,
    /// A container's health check (the image's HEALTHCHECK): the coordkit
    /// service this container runs as its first process answers a ping within
    /// 2 s. Exits 1 when it does not, 0 in a container that runs no service.
    Healthcheck,
    /// Drive a running agent through every rule of the agent contract: a PASS/FAIL table.
    /// Exits 1 when a rule fails.
    ///
    /// The agent must be registered, running, otherwise idle, and follow the
    /// conformance task convention (docs/protocol.md, "Conformance"). The kit
    /// pins its tasks on the agent by requirements: the agent's own
    /// capabilities and labels, any --capability/--label given, and one unit
    /// of one of its resources. No requirement names an agent, so the kit
    /// runs only if the agent is the one agent those tasks can go to; when
    /// others look alike, give a --capability or --label only this agent
    /// has. The kit writes the agent's state document (default scope), sets
    /// its capacity of that resource to 0 and back (preemption), and with
    /// --stop-cmd stops the agent last.
    Conformance(conformance::ConformanceArgs),
    /// The services answering $SRV.INFO, with their endpoints.
    Services {
        /// How long to collect answers, in milliseconds.
        #[arg(long, default_value_t = 500)]
        wait_ms: u64,
    },
}

/// What every command needs: the client and how to print.
pub(crate) struct Ctx {
    pub(crate) client: Client,
    pub(crate) json: bool,
}

impl Ctx {
    /// Prints the reply as JSON or as `text` renders it.
    pub(crate) fn emit<T: Serialize>(&self, value: &T, text: impl FnOnce(&T) -> String) {
        if self.json {
            match serde_json::to_string_pretty(value) {
                Ok(s) => say(&s),
                Err(e) => eprintln!("error: cannot encode the reply: {e}"),
            }
        } else {
            say(&text(value));
        }
    }
}

/// Prints a line on stdout. When the reader has gone (`coordctl flow list | head -1`)
/// the command ends quietly with status 0, as `println!` would panic instead.
pub(crate) fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// Parses the command line, runs it and exits with its status.
pub async fn main() {
    let cli = Cli::parse();
    let json = cli.output == Output::Json;
    if let Err(e) = run(cli).await {
        if let Some(no) = e.downcast_ref::<Negative>() {
            eprintln!("{no}");
            std::process::exit(3);
        }
        let mut status = 1;
        match e.downcast_ref::<Error>() {
            Some(api) => {
                if matches!(api.code, ErrorCode::Unavailable | ErrorCode::Timeout) {
                    status = 4;
                }
                if json {
                    let body = common::error::ErrorBody { error: api.clone() };
                    say(&serde_json::to_string_pretty(&body).unwrap_or_default());
                }
                eprintln!("error [{}]: {}", api.code, api.message);
                if !api.details.is_null() {
                    eprintln!("details: {}", api.details);
                }
            }
            None => eprintln!("error: {e:#}"),
        }
        std::process::exit(status);
    }
}

/// The service this container runs is its first process, `coord-{name}`:
/// one image serves every service, so its health check finds out which.
async fn container_health(cfg: &common::config::NatsConfig) -> anyhow::Result<()> {
    let cmdline = std::fs::read("/proc/1/cmdline").unwrap_or_default();
    let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let first = String::from_utf8_lossy(first);
    let Some(service) = first
        .rsplit('/')
        .next()
        .and_then(|bin| bin.strip_prefix("coord-"))
    else {
        return Ok(());
    };
    if common::service::healthcheck(cfg, service).await {
        Ok(())
    } else {
        anyhow::bail!("coord-{service} does not answer its ping")
    }
}

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    if std::env::var_os("RUST_LOG").is_some() {
        std::mem::forget(common::telemetry::init("coordctl"));
    }
    // An agent's replies go to its own inboxes, the only ones a server that
    // isolates agents lets it read.
    if let Command::Agent { id, .. } = &cli.command {
        if cli.nats.nats_inbox_prefix.is_none() {
            cli.nats.nats_inbox_prefix = Some(crate::agent::inbox_prefix(&self::id(id)?));
        }
    }
    if let Command::Healthcheck = cli.command {
        return container_health(&cli.nats).await;
    }
    let nats =
        common::nats::connect_within(&cli.nats, "coordctl", cli.nats.request_timeout()).await?;
    let client = Client::new(nats.clone()).with_timeout(cli.nats.request_timeout());
    let ctx = Ctx {
        client: client.clone(),
        json: cli.output == Output::Json,
    };
    match cli.command {
        Command::Demo { exit, work_ms } => run_demo(nats.clone(), client, exit, work_ms).await?,
        Command::Agent {
            id,
            work_ms,
            heartbeat_ms,
        } => {
            let agent: AgentId = self::id(&id)?;
            say(&format!("agent {agent} running; Ctrl-C to stop"));
            let mut opts = demo::demo_agent_options()?;
            opts.agent_id = agent;
            opts.heartbeat_interval = Duration::from_millis(heartbeat_ms.max(50));
            demo::run_echo_agent_with(
                nats.clone(),
                opts,
                Duration::from_millis(work_ms),
                common::shutdown::signal(),
            )
            .await?;
        }
        Command::Flow(cmd) => flow::run(&ctx, cmd).await?,
        Command::Agents(cmd) => alloc::run_agents(&ctx, cmd).await?,
        Command::Capacity(cmd) => alloc::run_capacity(&ctx, cmd).await?,
        Command::Alloc(cmd) => alloc::run_alloc(&ctx, cmd).await?,
        Command::Optimize(args) => alloc::run_optimize(&ctx, args).await?,
        Command::State(cmd) => sync::run_state(&ctx, cmd).await?,
        Command::Scope(cmd) => sync::run_scope(&ctx, cmd).await?,
        Command::Validate(args) => sync::run_validate(&ctx, args).await?,
        Command::Synchronize(args) => sync::run_synchronize(&ctx, args).await?,
        Command::Syncpoint(cmd) => sync::run_syncpoint(&ctx, cmd).await?,
        Command::Conformance(args) => conformance::run(&ctx, args).await?,
        Command::Events(cmd) => events::run(&ctx, cmd).await?,
        Command::Trigger(cmd) => trigger::run(&ctx, cmd).await?,
        Command::Metrics => {
            let m = client.metrics().await?;
            ctx.emit(&m, |m| {
                let mut out = format!(
                    "{} messages, {} bytes since {}\nflows: {} created, {} completed\ntasks: {} assigned, {} completed, {} failed",
                    m.messages_total,
                    m.bytes_total,
                    m.since_ms,
                    m.flows_created,
                    m.flows_completed,
                    m.tasks_assigned,
                    m.tasks_completed,
                    m.tasks_failed
                );
                let rows = m
                    .messages_by_subject
                    .iter()
                    .map(|(s, n)| vec![s.clone(), n.to_string()])
                    .collect();
                out.push('\n');
                out.push_str(&table(&["subject", "messages"], rows));
                out
            });
        }
        Command::Health => {
            let h = client.health().await?;
            ctx.emit(&h, monitor::health_text);
            if h.verdict == common::msg::Verdict::Unhealthy {
                return Err(Negative("the system is unhealthy".into()).into());
            }
        }
        Command::Report => {
            let r = client.health_report().await?;
            ctx.emit(&r, |r| {
                let mut out = monitor::health_text(&r.health);
                out.push_str(&format!(
                    "\n\ntasks: {} completed, {} failed; flows: {} completed\nanomalies: {}\nvalidation: {}",
                    r.metrics.tasks_completed,
                    r.metrics.tasks_failed,
                    r.metrics.flows_completed,
                    r.anomalies.len(),
                    if r.validation.valid { "consistent".to_owned() } else { format!("{} violations", r.validation.violations.len()) },
                ));
                out
            });
        }
        Command::Analysis => {
            let a = client.analysis().await?;
            ctx.emit(&a, monitor::analysis_text);
        }
        Command::Anomalies { since_ms } => {
            let req = common::msg::AnomaliesRequest {
                since_ms,
                ..Default::default()
            };
            let list = client.anomalies(&req).await?;
            ctx.emit(&list, |l| {
                let rows = l
                    .anomalies
                    .iter()
                    .map(|a| {
                        vec![
                            a.at_ms.to_string(),
                            wire_name(&a.kind),
                            wire_name(&a.severity),
                            a.subject.clone(),
                            format!("{:.2} (expected {:.2})", a.value, a.expected),
                        ]
                    })
                    .collect();
                table(&["at_ms", "kind", "severity", "series", "value"], rows)
            });
        }
        // Answered above, without a connection of this process's own.
        Command::Healthcheck => {}
        Command::CheckSystem => {
            let v = client.validate_system().await?;
            ctx.emit(&v, |v| {
                let rows = v
                    .violations
                    .iter()
                    .map(|x| vec![x.rule.clone(), x.subject.clone(), x.message.clone()])
                    .collect();
                format!(
                    "{} agents and {} flows checked: {}\n{}",
                    v.agents_checked,
                    v.flows_checked,
                    if v.valid {
                        "consistent"
                    } else {
                        "violations found"
                    },
                    table(&["rule", "subject", "what"], rows)
                )
            });
            if !v.valid {
                return Err(Negative(format!("{} violations", v.violations.len())).into());
            }
        }
        Command::Services { wait_ms } => {
            let infos = discover(&nats, subject::SRV_INFO, Duration::from_millis(wait_ms)).await?;
            ctx.emit(&infos, |infos| {
                let rows = infos
                    .iter()
                    .map(|i| {
                        let endpoints: Vec<&str> = i["endpoints"]
                            .as_array()
                            .map(|a| a.iter().filter_map(|e| e["subject"].as_str()).collect())
                            .unwrap_or_default();
                        vec![
                            i["name"].as_str().unwrap_or("?").to_owned(),
                            i["version"].as_str().unwrap_or("?").to_owned(),
                            i["id"].as_str().unwrap_or("?").to_owned(),
                            endpoints.join(", "),
                        ]
                    })
                    .collect();
                table(&["service", "version", "instance", "endpoints"], rows)
            });
        }
    }
    nats.drain().await.ok();
    Ok(())
}

/// A plain text table, columns padded to their widest cell.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_uppercase()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

/// An enum's wire name (`draining`, `completed`, …), the same word the JSON output uses.
pub(crate) fn wire_name<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// An id from the command line; a bad one is the protocol's `invalid_id` error.
pub(crate) fn id<T: std::str::FromStr<Err = common::IdError>>(s: &str) -> Result<T, Error> {
    s.parse().map_err(Error::from)
}

/// `name=value` pairs from the command line.
pub(crate) fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected name=value, got `{s}`")),
    }
}

/// `resource=amount` pairs from the command line.
pub(crate) fn parse_amount(s: &str) -> Result<(String, f64), String> {
    let (k, v) = parse_pair(s)?;
    let amount: f64 = v
        .parse()
        .map_err(|_| format!("`{v}` is not a number (in `{s}`)"))?;
    Ok((k, amount))
}

/// A wire enum by its wire name (`running`, `completed`, …), so the CLI accepts
/// exactly what the protocol does.
pub(crate) fn parse_wire<T: DeserializeOwned>(s: &str) -> Result<T, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|e| e.to_string())
}

/// JSON text from the command line, `@file`, or `-` for stdin.
pub(crate) fn read_json(arg: &str) -> Result<serde_json::Value, Error> {
    let text = read_arg(arg)?;
    serde_json::from_str(&text).map_err(|e| Error::bad_request(format!("not valid JSON: {e}")))
}

pub(crate) fn read_arg(arg: &str) -> Result<String, Error> {
    if arg == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| Error::bad_request(format!("cannot read stdin: {e}")))
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path)
            .map_err(|e| Error::bad_request(format!("cannot read {path}: {e}")))
    } else {
        Ok(arg.to_owned())
    }
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
    say(&format!(
        "demo agent {} started (cpu: 2, capability: demo)",
        demo::DEMO_AGENT
    ));
    let status = demo::run_demo_flow(&client, Duration::from_secs(60)).await?;
    say(&format!(
        "flow {} finished: {}",
        status.flow_id, status.state
    ));
    say(&flow::task_table(&status));
    demo::show_state(&client).await?;
    // Give the monitor a moment to see the last events.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = client.metrics().await?;
    say(&format!(
        "monitor: {} messages, {} flows completed, {} tasks completed",
        m.messages_total, m.flows_completed, m.tasks_completed
    ));
    let services = discover(&nats, subject::SRV_PING, Duration::from_millis(300)).await?;
    let mut names: Vec<&str> = services.iter().filter_map(|s| s["name"].as_str()).collect();
    names.sort();
    names.dedup();
    say(&format!(
        "services answering $SRV.PING: {}",
        names.join(", ")
    ));
    if status.state != common::msg::FlowState::Succeeded {
        anyhow::bail!("the demo flow ended {}", status.state);
    }
    if !exit {
        say("the system is up; the demo agent keeps serving. Ctrl-C to stop.");
        common::shutdown::signal().await;
    }
    let _ = stop_agent.send(());
    agent.await??;
    Ok(())
}
