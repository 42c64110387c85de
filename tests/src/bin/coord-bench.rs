//! `coord-bench`: end-to-end throughput and latency of coordkit, side by side with
//! the bus's own limit for the same message pattern, measured in the same run.
//!
//! Nothing starts by magic: `--spawn` starts a private nats-server through the
//! test kit (or `--nats-url` names one), the four services run in-process (with
//! `--orchestrators` replicas of the orchestrator), and `--agents` no-op agents
//! built on the real agent runtime do the work. Then:
//!
//! - `baseline`: the raw JetStream round a task needs at least once — publish to a
//!   work-queue stream, a pull consumer per worker, ack, a completion published on
//!   a core subject the driver subscribes to — pipelined and one at a time;
//! - `dispatch`: the baseline first, then `--tasks` independent no-op tasks as
//!   `--flows` flows submitted at once, then `--serial` one-task flows one at a
//!   time; every figure is also printed as a ratio of the baseline's. With
//!   `--spawn` it runs at both settings, page cache then fsync always, on a
//!   server each (`--page-cache` or `--fsync-always` picks one);
//! - `monitor`: the monitor alone, in a child process of its own (so its memory
//!   is its own), fed task events, heartbeats and reports on `coord.>` at each
//!   of `--monitor-rates` for `--monitor-seconds`; it prints what the monitor
//!   counted against what was published, beside a plain subscription to
//!   `coord.>` in the driver (the bus's own limit), and the monitor's memory.
//! - `state`: the synchronizer alone — compare-and-set updates on one hot key
//!   under each conflict policy and over many keys, and a sync point with
//!   rollback — beside the same KV pattern done raw (see `state.rs`).
//! - `dag`, `alloc`, `curves`: makespan of wide, deep and random graphs against
//!   the critical path; allocate/release round trips over large agent pools
//!   against raw KV compare-and-sets; tasks/s against agents, replicas and flow
//!   size, drawn to SVG (see `scale.rs`).
//! - `events`: agent events stored through the synchronizer against the same
//!   JetStream publish done raw, and read back through the list endpoint
//!   (see `events.rs`).
//! - `agents`: many simulated agents on one deployment — a join storm, the
//!   heartbeat path idle and under a flow, the flow's rate, agents falsely
//!   declared lost — for each count of `--agents-curve`; with `--spawn` at
//!   both settings (see `agents.rs`).
//!
//! Latency is from just before a flow's create request (or a message's publish)
//! to the driver receiving its task's `task.succeeded` event (or completion).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use common::config::NatsConfig;
use common::msg::{Event, EventKind, FlowSpec, FlowState, TaskSpec, TaskState};
use common::{subject, AgentId, FlowId, TaskId};
use coordkit::agent::{self, AgentOptions};
use futures::{stream::FuturesUnordered, StreamExt};
use testkit::{NatsServer, ServiceHandle};
use tokio::sync::oneshot;

#[path = "coord-bench/agents.rs"]
mod agents;
#[path = "coord-bench/baseline.rs"]
mod baseline;
use baseline::baseline;
#[path = "coord-bench/dispatch.rs"]
mod dispatch;
use dispatch::{dispatch_on, setting_name};
#[path = "coord-bench/events.rs"]
mod events;
#[path = "coord-bench/monitor.rs"]
mod monitor_ingest;
use monitor_ingest::memory_kib;
#[path = "coord-bench/scale.rs"]
mod scale;
#[path = "coord-bench/state.rs"]
mod state;
#[path = "coord-bench/svg.rs"]
mod svg;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// The raw JetStream round only.
    Baseline,
    /// The baseline, then independent no-op tasks through the whole system.
    Dispatch,
    /// The monitor's ingest rate and memory under sustained traffic.
    Monitor,
    /// The synchronizer's updates and sync points against raw KV.
    State,
    /// Makespan of fan-out, chain and random graphs against the critical path.
    Dag,
    /// Allocate/release round trips with large agent pools against raw KV.
    Alloc,
    /// Tasks/s against agents, orchestrator replicas and flow size, as tables and SVG.
    Curves,
    /// Agent events stored through the synchronizer against raw JetStream, and read back.
    Events,
    /// Many simulated agents: join storm, heartbeat path, a flow, falsely lost.
    Agents,
}

/// End-to-end benchmarks of coordkit against the bus's own limit.
#[derive(Debug, Parser)]
#[command(name = "coord-bench")]
struct Args {
    /// Start a private nats-server (JetStream, temp store, 8 MB `max_payload`) for this run.
    #[arg(long, conflicts_with = "nats_url")]
    spawn: bool,
    /// With `--spawn`: fsync every JetStream write (`sync_interval: always`,
    /// the shipped setting) instead of the server's default background flush.
    /// `dispatch` runs at both settings, one server each, unless this or
    /// `--page-cache` picks one.
    #[arg(long, requires = "spawn", conflicts_with = "page_cache")]
    fsync_always: bool,
    /// With `--spawn`: only the server's default background flush.
    #[arg(long, requires = "spawn")]
    page_cache: bool,
    /// Use this NATS server instead (it must have JetStream on).
    #[arg(long, env = "COORD_BENCH_NATS_URL")]
    nats_url: Option<String>,
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,
    /// Independent no-op tasks in the pipelined round.
    #[arg(long, default_value_t = 2000)]
    tasks: usize,
    /// Flows the tasks are split into, submitted at once.
    #[arg(long, default_value_t = 20)]
    flows: usize,
    /// No-op agents (baseline: pull consumers).
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Orchestrator replicas.
    #[arg(long, default_value_t = 1)]
    orchestrators: usize,
    /// Tasks run one after the other (each waits for the last to complete).
    #[arg(long, default_value_t = 100)]
    serial: usize,
    /// Give up on a round after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout_s: u64,
    /// With `dispatch`: the baseline and the system's rounds this many times
    /// on the same server, each printed, then the median and range of each
    /// ratio. Runs minutes apart move a lot (the disk most): a goal is
    /// judged on the median.
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Messages per second offered to the monitor, one step each.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,20000,40000,80000,160000"
    )]
    monitor_rates: Vec<u64>,
    /// How long each monitor step lasts.
    #[arg(long, default_value_t = 10)]
    monitor_seconds: u64,
    #[command(flatten)]
    state: state::StateArgs,
    #[command(flatten)]
    events: events::EventsArgs,
    #[command(flatten)]
    scale: scale::ScaleArgs,
    #[command(flatten)]
    agents_scale: agents::AgentsArgs,
}

/// One measured round.
struct Round {
    name: String,
    tasks: usize,
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Round {
    fn per_sec(&self) -> f64 {
        self.tasks as f64 / self.wall.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1]
    }
}

fn round(name: &str, wall: Duration, mut latencies: Vec<Duration>) -> Round {
    latencies.sort_unstable();
    Round {
        name: name.to_owned(),
        tasks: latencies.len(),
        wall,
        latencies,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// The services' own allocator (see [`common::service::main`]), so their
/// in-process copies here cost what the shipped binaries do.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Ok(url) = std::env::var(monitor_ingest::MONITOR_CHILD) {
        return monitor_ingest::monitor_child(url).await;
    }
    let args = Args::parse();
    // Stopped by Ctrl-C or SIGTERM, the run is dropped, and with it the
    // nats-server it spawned (a private server left running would hold its
    // store and memory until found).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        done = bench(args) => done,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = term.recv() => bail!("terminated"),
    }
}

async fn bench(args: Args) -> anyhow::Result<()> {
    if args.tasks == 0 || args.flows == 0 || args.agents == 0 || args.orchestrators == 0 {
        bail!("--tasks, --flows, --agents and --orchestrators must be at least 1");
    }
    let both = matches!(args.scenario, Scenario::Dispatch | Scenario::Agents);
    if both && args.spawn && !args.fsync_always && !args.page_cache {
        // Both settings, each on a server of its own, in one run.
        for fsync in [false, true] {
            let server = NatsServer::start_with_config(&spawned_config(fsync));
            println!("\n### {}\n", setting_name(fsync));
            match args.scenario {
                Scenario::Agents => {
                    let limit = Duration::from_secs(args.timeout_s);
                    let setting = if fsync { "fsync" } else { "page-cache" };
                    agents::run(server.url(), &args, setting, common::now_ms(), limit).await?
                }
                _ => dispatch_on(&args, server.url()).await?,
            }
        }
        return Ok(());
    }
    let server = if args.spawn {
        Some(NatsServer::start_with_config(&spawned_config(
            args.fsync_always,
        )))
    } else {
        None
    };
    let url = match (&server, &args.nats_url) {
        (Some(s), _) => s.url().to_owned(),
        (None, Some(u)) => u.clone(),
        (None, None) => bail!("give --spawn or --nats-url"),
    };
    if matches!(args.scenario, Scenario::Baseline | Scenario::Dispatch) {
        if args.spawn {
            println!("\n### {}\n", setting_name(args.fsync_always));
        }
        return dispatch_on(&args, &url).await;
    }
    let nats = async_nats::connect(&url)
        .await
        .with_context(|| format!("failed to connect to {url}"))?;
    if args.scenario == Scenario::Monitor {
        return monitor_ingest::monitor_ingest(&url, &args).await;
    }
    let run_id = common::now_ms();
    let limit = Duration::from_secs(args.timeout_s);
    match args.scenario {
        Scenario::State => return state::run(&nats, &url, &args.state, run_id, limit).await,
        Scenario::Dag => return scale::dag(&nats, &url, &args, run_id, limit).await,
        Scenario::Alloc => return scale::alloc(&nats, &url, &args, run_id, limit).await,
        Scenario::Curves => return scale::curves(&nats, &url, &args, run_id, limit).await,
        Scenario::Events => return events::run(&nats, &url, &args.events, run_id, limit).await,
        Scenario::Agents => {
            if args.spawn {
                println!("\n### {}\n", setting_name(args.fsync_always));
            }
            let setting = match (args.spawn, args.fsync_always) {
                (true, true) => "fsync",
                (true, false) => "page-cache",
                (false, _) => "server",
            };
            return agents::run(&url, &args, setting, run_id, limit).await;
        }
        Scenario::Baseline | Scenario::Dispatch | Scenario::Monitor => Ok(()),
    }
}

type AgentHandle = (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), common::Error>>,
);

/// Tasks an agent runs at once; its capacity is far above what a round asks.
const AGENT_CONCURRENCY: usize = 1024;

/// What `--spawn` gives its nats-server beyond the test kit's settings: a
/// flow entry of 10,000 tasks (before flows had pages) was about 2 MB of
/// JSON, over the default 1 MB `max_payload`.
const SPAWNED_CONFIG: &str = "max_payload: 8MB\n";

/// The spawned server's config: [`SPAWNED_CONFIG`], and with `fsync` the
/// shipped durability setting.
fn spawned_config(fsync: bool) -> String {
    let mut config = SPAWNED_CONFIG.to_owned();
    if fsync {
        config.push_str("jetstream {\n  sync_interval: always\n}\n");
    }
    config
}

/// The services in-process and agents on the real runtime, for one round.
struct System {
    services: Vec<ServiceHandle>,
    agents: Vec<AgentHandle>,
    ids: Vec<AgentId>,
}

impl System {
    /// Starts `orchestrators` orchestrator replicas, the other three services
    /// and `agents` agents (`bench-{tag}{i}`) that each take `work` per task,
    /// and waits until every agent is registered.
    async fn start(
        nats: &async_nats::Client,
        url: &str,
        orchestrators: usize,
        agents: usize,
        tag: &str,
        work: Duration,
        limit: Duration,
    ) -> anyhow::Result<System> {
        let cfg = NatsConfig::new(url.to_owned());
        let mut services: Vec<ServiceHandle> = Vec::new();
        for _ in 0..orchestrators {
            // As deployed (the test kit's sweeps every 200 ms, which a
            // million-task flow pays for in full on every tick), or tuned.
            let cfg = dispatch::orchestrator_config(cfg.clone());
            services.push(ServiceHandle::spawn("orchestrator", move |rx| {
                orchestrator::run(cfg, async move {
                    let _ = rx.await;
                })
            }));
        }
        for name in ["allocator", "synchronizer", "monitor"] {
            services.push(testkit::start_service(name, cfg.clone()));
        }
        for name in testkit::SERVICES {
            testkit::wait_for_service(nats, name).await;
        }
        let run_id = common::now_ms();
        let ids = (0..agents)
            .map(|i| Ok(AgentId::new(format!("bench-{run_id}-{tag}{i}"))?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Heartbeats of a thousand agents are load of their own: spread them.
        let beat = Duration::from_millis((10 * agents as u64).max(1000));
        let started = ids
            .iter()
            .map(|id| start_agent(nats, id.clone(), work, beat))
            .collect();
        let mut system = System {
            services,
            agents: started,
            ids,
        };
        wait_registered(nats, &system.ids, limit).await?;
        // An agent registers before it opens its assignment consumer; one that
        // failed there would take placements and never start them.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for ((_, handle), id) in system.agents.iter_mut().zip(&system.ids) {
            if handle.is_finished() {
                let outcome = handle.await;
                bail!("agent {id} stopped after registering: {outcome:?}");
            }
        }
        Ok(system)
    }

    /// Stops the agents, has each leave (the next round must not be placed
    /// on them, nor judge them lost while it runs),
    /// deletes their durable assignment consumers (they outlive the agent,
    /// and the server refuses new ones after about a thousand), then stops
    /// the services.
    async fn stop(self, nats: &async_nats::Client) {
        self.stop_with(nats, &[]).await;
    }

    /// [`System::stop`], taking `others` (agents run outside the system)
    /// out of the pool with its own.
    async fn stop_with(self, nats: &async_nats::Client, others: &[AgentId]) {
        for (stop, handle) in self.agents {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
        }
        let ids: Vec<&AgentId> = self.ids.iter().chain(others).collect();
        let client = common::Client::new(nats.clone());
        let mut gone = futures::stream::iter(ids.iter().copied())
            .map(|id| client.leave_agent(id))
            .buffer_unordered(64);
        while gone.next().await.is_some() {}
        for s in self.services {
            let _ = tokio::time::timeout(Duration::from_secs(10), s.stop()).await;
        }
    }
}

/// An agent that takes `work` per task (no-op when zero), with room for far
/// more tasks than a round runs at once.
fn start_agent(
    nats: &async_nats::Client,
    id: AgentId,
    work: Duration,
    heartbeat: Duration,
) -> AgentHandle {
    let mut opts = AgentOptions::new(id).capacity("cpu", 100_000.0);
    opts.concurrency = AGENT_CONCURRENCY;
    opts.heartbeat_interval = heartbeat;
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(agent::run(
        nats.clone(),
        opts,
        move |_assignment| async move {
            if !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            Ok(serde_json::Value::Null)
        },
        async {
            let _ = stopped.await;
        },
    ));
    (stop, handle)
}

async fn wait_registered(
    nats: &async_nats::Client,
    want: &[AgentId],
    limit: Duration,
) -> anyhow::Result<()> {
    let client = common::Client::new(nats.clone());
    let started = Instant::now();
    loop {
        if let Ok(cap) = client.capacity(&Default::default()).await {
            if want.iter().all(|a| cap.agents.contains_key(a)) {
                return Ok(());
            }
        }
        if started.elapsed() > limit {
            bail!("agents did not register within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn flow_spec(id: &FlowId, tasks: usize) -> anyhow::Result<FlowSpec> {
    let tasks = (0..tasks)
        .map(|i| {
            let mut t = TaskSpec::new(TaskId::new(format!("t{i}"))?);
            t.kind = "noop".into();
            t.requirements.resources.insert("cpu".into(), 1.0);
            Ok(t)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut spec = FlowSpec::new("bench", tasks);
    spec.id = Some(id.clone());
    Ok(spec)
}

/// `task.succeeded` and `flow.completed` events, as one stream.
async fn completion_events(
    nats: &async_nats::Client,
) -> anyhow::Result<impl futures::Stream<Item = async_nats::Message> + Unpin> {
    let tasks = nats.subscribe(subject::event::TASK_SUCCEEDED).await?;
    let failed = nats.subscribe(subject::event::TASK_FAILED).await?;
    let timed_out = nats.subscribe(subject::event::TASK_TIMED_OUT).await?;
    let flows = nats.subscribe(subject::event::FLOW_COMPLETED).await?;
    nats.flush().await?;
    Ok(futures::stream::select_all([
        tasks, failed, timed_out, flows,
    ]))
}

/// Waits for `want` distinct task completions of the flows that are `mine`
/// and returns when each arrived (another flow's completion, such as an
/// earlier round's event published again from its outbox, does not count:
/// counted, it would end the round before its own tasks are done); fails
/// as soon as a task fails for good or a flow ends other than `succeeded`
/// (the round could never finish), saying why.
async fn completions(
    events: &mut (impl futures::Stream<Item = async_nats::Message> + Unpin),
    want: usize,
    mine: &dyn Fn(&FlowId) -> bool,
    deadline: Instant,
) -> anyhow::Result<BTreeMap<(FlowId, TaskId), Instant>> {
    let mut done = BTreeMap::new();
    while done.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, events.next())
            .await
            .with_context(|| format!("timed out with {} of {want} tasks done", done.len()))?
            .context("event subscription ended")?;
        let Ok(event) = serde_json::from_slice::<Event>(&msg.payload) else {
            continue;
        };
        match event.kind {
            EventKind::TaskTransition {
                flow_id,
                task_id,
                to: TaskState::Succeeded,
                ..
            } if mine(&flow_id) => {
                done.entry((flow_id, task_id)).or_insert_with(Instant::now);
            }
            EventKind::TaskTransition {
                to: TaskState::Succeeded,
                ..
            } => {}
            EventKind::TaskTransition {
                flow_id,
                task_id,
                to,
                attempt,
                agent_id,
                reason,
                ..
            } if flow_id.as_str().starts_with("bench-") => {
                bail!(
                    "task {task_id} of flow {flow_id} ended {to:?} (attempt {attempt}, agent {}): {}; {} of {want} tasks done",
                    agent_id.map_or("none".to_owned(), |a| a.to_string()),
                    reason.as_deref().unwrap_or("no reason given"),
                    done.len()
                )
            }
            EventKind::FlowCompleted { flow_id, state }
                if state != FlowState::Succeeded && flow_id.as_str().starts_with("bench-") =>
            {
                bail!(
                    "flow {flow_id} ended {state:?} with {} of {want} tasks done",
                    done.len()
                )
            }
            _ => {}
        }
    }
    Ok(done)
}

/// `tasks` independent no-op tasks as `flows` flows (ids `bench-{tag}{f}`),
/// all created at once; the round ends when every task succeeded.
async fn dispatch_pipelined(
    nats: &async_nats::Client,
    tasks: usize,
    flows: usize,
    tag: &str,
    limit: Duration,
) -> anyhow::Result<Round> {
    let client = common::Client::new(nats.clone()).with_timeout(Duration::from_secs(30));
    let mut events = completion_events(nats).await?;
    let per_flow = tasks.div_ceil(flows);
    let mut specs = Vec::new();
    let mut left = tasks;
    for f in 0..flows {
        let n = per_flow.min(left);
        if n == 0 {
            break;
        }
        left -= n;
        let id = FlowId::new(format!("bench-{tag}{f}"))?;
        specs.push((id.clone(), flow_spec(&id, n)?));
    }
    let total: usize = specs.iter().map(|(_, s)| s.tasks.len()).sum();
    let started = Instant::now();
    let mut submitted = BTreeMap::new();
    let mut creates = FuturesUnordered::new();
    for (id, spec) in specs {
        submitted.insert(id, Instant::now());
        let client = client.clone();
        creates.push(async move { client.create_flow(&spec).await });
    }
    let creating = async {
        while let Some(r) = creates.next().await {
            r.map_err(|e| anyhow::anyhow!("flow create failed: {e}"))?;
        }
        anyhow::Ok(())
    };
    let mine = |f: &FlowId| submitted.contains_key(f);
    let (created, done) = tokio::join!(
        creating,
        completions(&mut events, total, &mine, started + limit)
    );
    created?;
    let done = done?;
    let wall = started.elapsed();
    let latencies = done
        .iter()
        .filter_map(|((flow, _), at)| Some(at.duration_since(*submitted.get(flow)?)))
        .collect();
    Ok(round(
        &format!("dispatch, {} flows × {} tasks", flows.min(total), per_flow),
        wall,
        latencies,
    ))
}
