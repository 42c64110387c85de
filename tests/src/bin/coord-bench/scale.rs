//! The scale scenarios:
//!
//! - `dag`: one flow per graph shape — a fan-out (one root, `--fan-out`
//!   children), a chain of `--chain` tasks, a random graph of `--random-tasks`
//!   (each task depends on 0–3 earlier ones, a quarter are roots) — run to
//!   completion; makespan (create request to `flow.completed`) against the
//!   lower bound the graph allows: the critical path times `--work-ms`, or the
//!   total work over every agent slot if that is longer. With no-op agents the
//!   bound is ~0 and the figure that matters is the overhead per task on the
//!   critical path.
//! - `alloc`: the allocator alone with `--alloc-agents` agents registered
//!   directly (no runtimes; a heartbeat interval of an hour keeps them alive),
//!   `--alloc-ops` allocate + release pairs from `--alloc-concurrency`
//!   callers; beside it the floor of the same pair in the store: two
//!   compare-and-sets on one key of a bucket holding one key per agent.
//! - `curves`: `--tasks` independent tasks in `--flows` flows against
//!   `--curve-agents` agents and `--curve-replicas` orchestrator replicas, and
//!   `--curve-flow-sizes` tasks (one flow each, up to `MAX_TASKS`) with the
//!   process's memory per task (measured first, in a fresh process); printed
//!   as tables and, with `--svg-dir`, drawn to SVG files captioned with the
//!   command that made them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, kv, stream};
use clap::ValueEnum;
use common::config::NatsConfig;
use common::msg::{
    AllocateRequest, Event, EventKind, FlowSpec, FlowState, RegisterAgent, ReleaseRequest,
    Requirements, TaskSpec,
};
use common::{subject, AgentId, Client, FlowId, TaskId};
use futures::StreamExt;
use orchestrator::machine::MAX_TASKS;

use super::svg::{Chart, Series};
use super::{
    dispatch_pipelined, memory_kib, ms, round, spawned_config, Args, Round, System,
    AGENT_CONCURRENCY,
};
use testkit::NatsServer;

/// A graph shape of the `dag` scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Shape {
    /// One root, `--fan-out` tasks depending on it.
    FanOut,
    /// `--chain` tasks, each depending on the one before.
    Chain,
    /// `--random-tasks` tasks, each depending on 0–3 earlier ones.
    Random,
}

/// Sizes of the `dag`, `alloc` and `curves` scenarios.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScaleArgs {
    /// Milliseconds each agent spends on a task in `dag` and `curves` (0: no-op).
    #[arg(long, default_value_t = 0)]
    pub(crate) work_ms: u64,
    /// Graphs the `dag` scenario runs, one flow each, in this order.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "fan-out,chain,random"
    )]
    pub(crate) dag_shapes: Vec<Shape>,
    /// Children of the fan-out's root.
    #[arg(long, default_value_t = 1000)]
    pub(crate) fan_out: usize,
    /// Tasks in the chain.
    #[arg(long, default_value_t = 1000)]
    pub(crate) chain: usize,
    /// Tasks in the random graph.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) random_tasks: usize,
    /// Seed of the random graph.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Registered agents, one allocator round each.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub(crate) alloc_agents: Vec<usize>,
    /// Allocate + release pairs per round.
    #[arg(long, default_value_t = 2000)]
    pub(crate) alloc_ops: usize,
    /// Callers in flight, each doing pairs one after the other.
    #[arg(long, default_value_t = 32)]
    pub(crate) alloc_concurrency: usize,
    /// Agent counts of the first curve (1 orchestrator).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    pub(crate) curve_agents: Vec<usize>,
    /// Orchestrator replica counts of the second curve (`--agents` agents).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    pub(crate) curve_replicas: Vec<usize>,
    /// Task counts of the flow-size curve, one flow each (at most 1,000,000).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub(crate) curve_flow_sizes: Vec<usize>,
    /// Write the curves as SVG files into this directory.
    #[arg(long)]
    pub(crate) svg_dir: Option<PathBuf>,
}

/// A small deterministic generator (splitmix64), so a seed names one graph.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The dependencies of each task, by index (always on earlier tasks).
fn graph(shape: Shape, args: &ScaleArgs) -> Vec<Vec<usize>> {
    match shape {
        Shape::FanOut => (0..=args.fan_out)
            .map(|i| if i == 0 { vec![] } else { vec![0] })
            .collect(),
        Shape::Chain => (0..args.chain)
            .map(|i| if i == 0 { vec![] } else { vec![i - 1] })
            .collect(),
        Shape::Random => {
            let mut rng = args.seed;
            (0..args.random_tasks)
                .map(|i| {
                    if i == 0 {
                        return vec![];
                    }
                    let k = next(&mut rng) % 4;
                    let mut deps: Vec<usize> = (0..k)
                        .map(|_| (next(&mut rng) % i as u64) as usize)
                        .collect();
                    deps.sort_unstable();
                    deps.dedup();
                    deps
                })
                .collect()
        }
    }
}

/// Tasks on the longest dependency chain.
fn critical_path(deps: &[Vec<usize>]) -> usize {
    let mut depth = vec![0usize; deps.len()];
    for (i, d) in deps.iter().enumerate() {
        depth[i] = 1 + d.iter().map(|&j| depth[j]).max().unwrap_or(0);
    }
    depth.into_iter().max().unwrap_or(0)
}

fn dag_spec(id: &FlowId, deps: &[Vec<usize>]) -> anyhow::Result<FlowSpec> {
    let task_id = |i: usize| TaskId::new(format!("t{i}"));
    let tasks = deps
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut t = TaskSpec::new(task_id(i)?);
            t.kind = "noop".into();
            t.requirements.resources.insert("cpu".into(), 1.0);
            t.depends_on = d.iter().map(|&j| task_id(j)).collect::<Result<_, _>>()?;
            Ok(t)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut spec = FlowSpec::new("bench-dag", tasks);
    spec.id = Some(id.clone());
    Ok(spec)
}

/// Waits for `flow`'s `flow.completed` event and fails unless it succeeded,
/// naming the task states and the first errors.
async fn flow_completed(
    client: &Client,
    events: &mut async_nats::Subscriber,
    flow: &FlowId,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, events.next())
            .await
            .with_context(|| format!("flow {flow} did not complete in time"))?
            .context("event subscription ended")?;
        let Ok(event) = serde_json::from_slice::<Event>(&msg.payload) else {
            continue;
        };
        if let EventKind::FlowCompleted { flow_id, state } = event.kind {
            if flow_id == *flow {
                if state != FlowState::Succeeded {
                    let status = client.flow_status(flow).await;
                    let (counts, errors) = match &status {
                        Ok(s) => (
                            format!("{:?}", s.counts),
                            s.tasks
                                .iter()
                                .filter_map(|t| {
                                    Some(format!("{}: {}", t.task_id, t.error.as_ref()?))
                                })
                                .take(3)
                                .collect::<Vec<_>>()
                                .join("; "),
                        ),
                        Err(e) => (format!("status unavailable: {e}"), String::new()),
                    };
                    bail!("flow {flow} ended {state:?}: {counts}; {errors}");
                }
                return Ok(());
            }
        }
    }
}

/// Makespan of each graph shape against its lower bound.
pub(crate) async fn dag(
    nats: &async_nats::Client,
    url: &str,
    args: &Args,
    run_id: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let s = &args.scale;
    let work = Duration::from_millis(s.work_ms);
    let graphs = s
        .dag_shapes
        .iter()
        .map(|&shape| (shape, graph(shape, s)))
        .collect::<Vec<_>>();
    if let Some((shape, g)) = graphs.iter().find(|(_, g)| g.len() > MAX_TASKS) {
        bail!(
            "{shape:?} has {} tasks; a flow holds at most {MAX_TASKS}",
            g.len()
        );
    }
    println!(
        "coord-bench dag: {url}, {} agents ({AGENT_CONCURRENCY} tasks at once each), {} orchestrator replica(s), {} ms of work per task",
        args.agents, args.orchestrators, s.work_ms
    );
    // The bus's own round in the same run: every rate is also a share of it.
    let (base, _) = super::baseline(nats, args, run_id, limit).await?;
    println!(
        "baseline (JetStream work queue round, pipelined): {:.0} tasks/s",
        base.per_sec()
    );
    let system =
        System::start(nats, url, args.orchestrators, args.agents, "d", work, limit).await?;
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(60));
    let mut rows = Vec::new();
    for (i, (shape, deps)) in graphs.iter().enumerate() {
        let id = FlowId::new(format!("bench-{run_id}-d{i}"))?;
        let spec = dag_spec(&id, deps)?;
        let mut events = nats.subscribe(subject::event::FLOW_COMPLETED).await?;
        nats.flush().await?;
        let started = Instant::now();
        client
            .create_flow(&spec)
            .await
            .map_err(|e| anyhow::anyhow!("flow create failed: {e}"))?;
        flow_completed(&client, &mut events, &id, started + limit).await?;
        let makespan = started.elapsed();
        let cp = critical_path(deps);
        let slots = (args.agents * AGENT_CONCURRENCY).max(1);
        let bound = (work * cp as u32).max(work * deps.len().div_ceil(slots) as u32);
        rows.push((*shape, deps.len(), cp, makespan, bound));
    }
    system.stop(nats).await;

    println!();
    println!("| graph | tasks | critical path (tasks) | makespan s | lower bound s | makespan / bound | overhead per critical-path task ms | overhead per task ms | tasks/s | tasks/s vs baseline |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (shape, tasks, cp, makespan, bound) in rows {
        let over = makespan.saturating_sub(bound);
        let ratio = if bound.is_zero() {
            "—".to_owned()
        } else {
            format!("{:.2}×", makespan.as_secs_f64() / bound.as_secs_f64())
        };
        let name = match shape {
            Shape::FanOut => format!("fan-out 1 → {}", tasks - 1),
            Shape::Chain => format!("chain of {tasks}"),
            Shape::Random => format!("random (seed {})", s.seed),
        };
        let rate = tasks as f64 / makespan.as_secs_f64().max(f64::MIN_POSITIVE);
        println!(
            "| {name} | {tasks} | {cp} | {:.2} | {:.2} | {ratio} | {} | {:.3} | {rate:.0} | {:.1} % |",
            makespan.as_secs_f64(),
            bound.as_secs_f64(),
            ms(over / cp.max(1) as u32),
            over.as_secs_f64() * 1e3 / tasks.max(1) as f64,
            100.0 * rate / base.per_sec().max(f64::MIN_POSITIVE),
        );
    }
    Ok(())
}

/// Runs `ops` pairs split over `concurrency` workers; each worker gets its
/// index and its share, and returns its pair latencies.
async fn pairs<F, Fut>(
    ops: usize,
    concurrency: usize,
    limit: Duration,
    worker: F,
) -> anyhow::Result<(Duration, Vec<Duration>)>
where
    F: Fn(usize, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Vec<Duration>>> + Send + 'static,
{
    let concurrency = concurrency.clamp(1, ops.max(1));
    let started = Instant::now();
    let handles: Vec<_> = (0..concurrency)
        .map(|w| {
            let share = ops / concurrency + usize::from(w < ops % concurrency);
            tokio::spawn(worker(w, share))
        })
        .collect();
    let mut latencies = Vec::with_capacity(ops);
    for h in handles {
        let left = limit.saturating_sub(started.elapsed());
        latencies.extend(
            tokio::time::timeout(left, h)
                .await
                .context("the round timed out")???,
        );
    }
    Ok((started.elapsed(), latencies))
}

/// Allocate + release round trips with large pools, against raw KV.
pub(crate) async fn alloc(
    nats: &async_nats::Client,
    url: &str,
    args: &Args,
    run_id: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let s = &args.scale;
    if s.alloc_ops == 0 || s.alloc_concurrency == 0 || s.alloc_agents.contains(&0) {
        bail!("--alloc-ops, --alloc-concurrency and --alloc-agents must be at least 1");
    }
    let service = testkit::start_service("allocator", NatsConfig::new(url.to_owned()));
    testkit::wait_for_service(nats, "allocator").await;
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(30));
    let js = jetstream::new(nats.clone());
    let bucket_name = format!("BENCH_CAS_{run_id}");
    let bucket = js
        .create_key_value(kv::Config {
            bucket: bucket_name.clone(),
            history: 1,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("failed to create the raw KV bucket")?;
    println!(
        "coord-bench alloc: {url}, 1 allocator, {} pairs per round from {} callers",
        s.alloc_ops, s.alloc_concurrency
    );
    let (base, _) = super::baseline(nats, args, run_id, limit).await?;
    println!(
        "baseline (JetStream work queue round, pipelined): {:.0} tasks/s",
        base.per_sec()
    );
    let mut rounds: Vec<(usize, Round, Round)> = Vec::new();
    let mut registering = Vec::new();
    for (r, &n) in s.alloc_agents.iter().enumerate() {
        let capability = format!("bench-{run_id}-a{r}");
        let ids = (0..n)
            .map(|i| Ok(AgentId::new(format!("{capability}-{i}"))?))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let t = Instant::now();
        let mut registers = futures::stream::iter(ids.iter().cloned())
            .map(|agent_id| {
                let req = RegisterAgent {
                    agent_id,
                    capabilities: vec![capability.clone()],
                    labels: Default::default(),
                    capacity: [("cpu".to_owned(), 1_000.0)].into(),
                    // Long enough that no agent is declared lost during the round.
                    heartbeat_interval_ms: 3_600_000,
                };
                let client = client.clone();
                async move { client.register_agent(&req).await }
            })
            .buffer_unordered(64);
        while let Some(res) = registers.next().await {
            res.map_err(|e| anyhow::anyhow!("register failed: {e}"))?;
        }
        registering.push((n, t.elapsed()));

        let req = Arc::new(AllocateRequest {
            owner: "bench".into(),
            requirements: Requirements {
                resources: [("cpu".to_owned(), 1.0)].into(),
                capabilities: vec![capability.clone()],
                ..Default::default()
            },
            priority: 0,
            allocation_id: None,
            deadline_ms: None,
            task: None,
            ttl_ms: None,
        });
        let (wall, latencies) = pairs(s.alloc_ops, s.alloc_concurrency, limit, |_, share| {
            let (client, req) = (client.clone(), req.clone());
            async move {
                let mut lat = Vec::with_capacity(share);
                for _ in 0..share {
                    let t = Instant::now();
                    let a = client
                        .allocate(&req)
                        .await
                        .map_err(|e| anyhow::anyhow!("allocate failed: {e}"))?;
                    let release = ReleaseRequest {
                        allocation_id: a.allocation_id,
                        agent_id: Some(a.agent_id),
                    };
                    client
                        .release(&release)
                        .await
                        .map_err(|e| anyhow::anyhow!("release failed: {e}"))?;
                    lat.push(t.elapsed());
                }
                Ok(lat)
            }
        })
        .await?;
        let allocator = round("allocator: allocate + release", wall, latencies);

        // The store's floor: one key per agent, each pair two compare-and-sets
        // on one key (as allocate and release each write the agent's record).
        let body = vec![b'x'; 256];
        let mut creates = futures::stream::iter(0..n)
            .map(|i| {
                let (bucket, body) = (bucket.clone(), body.clone());
                async move { bucket.put(format!("a{r}-{i}"), body.into()).await }
            })
            .buffer_unordered(64);
        while let Some(res) = creates.next().await {
            res.context("raw KV put failed")?;
        }
        let workers = s.alloc_concurrency.min(n);
        let (wall, latencies) = pairs(s.alloc_ops, workers, limit, |w, share| {
            let (bucket, body) = (bucket.clone(), body.clone());
            async move {
                // Worker w owns keys w, w + workers, …: no two writers share a key.
                let keys: Vec<String> = (w..n)
                    .step_by(workers)
                    .map(|i| format!("a{r}-{i}"))
                    .collect();
                let mut revs: Vec<u64> = Vec::with_capacity(keys.len());
                for k in &keys {
                    revs.push(bucket.entry(k).await?.map(|e| e.revision).unwrap_or(0));
                }
                let mut lat = Vec::with_capacity(share);
                for j in 0..share {
                    let i = j % keys.len();
                    let t = Instant::now();
                    let rev = bucket
                        .update(&keys[i], body.clone().into(), revs[i])
                        .await?;
                    revs[i] = bucket.update(&keys[i], body.clone().into(), rev).await?;
                    lat.push(t.elapsed());
                }
                Ok(lat)
            }
        })
        .await?;
        let raw = round("raw KV: 2 compare-and-sets on one key", wall, latencies);
        rounds.push((n, allocator, raw));

        let mut gone = futures::stream::iter(ids.iter())
            .map(|id| client.deregister_agent(id))
            .buffer_unordered(64);
        while let Some(res) = gone.next().await {
            res.map_err(|e| anyhow::anyhow!("deregister failed: {e}"))?;
        }
    }
    let _ = js.delete_key_value(&bucket_name).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), service.stop()).await;

    println!();
    for (n, took) in registering {
        println!(
            "registered {n} agents in {:.2} s ({:.0}/s, 64 in flight)",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64().max(f64::MIN_POSITIVE)
        );
    }
    println!();
    println!("| round | agents | pairs | wall s | pairs/s | requests/s | p50 ms | p99 ms | max ms | pairs/s vs raw KV | pairs/s vs baseline round |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (n, allocator, raw) in &rounds {
        for (r, vs) in [
            (
                allocator,
                format!("{:.1} %", 100.0 * allocator.per_sec() / raw.per_sec()),
            ),
            (raw, "(baseline)".to_owned()),
        ] {
            println!(
                "| {} | {n} | {} | {:.2} | {:.0} | {:.0} | {} | {} | {} | {vs} | {:.1} % |",
                r.name,
                r.tasks,
                r.wall.as_secs_f64(),
                r.per_sec(),
                2.0 * r.per_sec(),
                ms(r.pct(0.50)),
                ms(r.pct(0.99)),
                ms(r.pct(1.0)),
                100.0 * r.per_sec() / base.per_sec().max(f64::MIN_POSITIVE),
            );
        }
    }
    Ok(())
}

/// Resets the process's peak resident memory (Linux ≥ 4.0), so a point's
/// peak is its own; if it cannot, the peak is the process's so far.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One point of a curve.
struct Point {
    x: usize,
    round: Round,
    /// Resident memory before, peak during and after the round, in KiB.
    memory: (u64, u64, u64),
}

fn print_curve(title: &str, x_name: &str, points: &[Point]) {
    println!();
    println!("{title}");
    println!();
    println!("| {x_name} | tasks | wall s | tasks/s | p50 ms | p99 ms |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for p in points {
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} |",
            p.x,
            p.round.tasks,
            p.round.wall.as_secs_f64(),
            p.round.per_sec(),
            ms(p.round.pct(0.5)),
            ms(p.round.pct(0.99)),
        );
    }
}

/// Today's date (UTC) from the wall clock, for the charts' captions.
pub(crate) fn today() -> String {
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let days = (common::now_ms() / 86_400_000) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let doe = days - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// Tasks/s against agents, orchestrator replicas and flow size.
pub(crate) async fn curves(
    nats: &async_nats::Client,
    url: &str,
    args: &Args,
    run_id: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let s = &args.scale;
    let work = Duration::from_millis(s.work_ms);
    if [&s.curve_agents, &s.curve_replicas, &s.curve_flow_sizes]
        .iter()
        .any(|v| v.contains(&0))
    {
        bail!("--curve-agents, --curve-replicas and --curve-flow-sizes must be at least 1");
    }
    println!(
        "coord-bench curves: {url}, {} tasks in {} flows per point of the agent and replica curves, {} agents beside the agent curve, {} ms of work per task",
        args.tasks, args.flows, args.agents, s.work_ms
    );
    let pid = std::process::id();
    let mut point = 0usize;
    let mut measure = |nats: async_nats::Client,
                       url: String,
                       orchestrators: usize,
                       agents: usize,
                       tasks: usize,
                       flows: usize| {
        point += 1;
        let tag = format!("c{point}-");
        async move {
            let system =
                System::start(&nats, &url, orchestrators, agents, &tag, work, limit).await?;
            reset_peak();
            let (before, _) = memory_kib(pid);
            let round =
                dispatch_pipelined(&nats, tasks, flows, &format!("{run_id}-{tag}"), limit).await?;
            let (after, peak) = memory_kib(pid);
            system.stop(&nats).await;
            anyhow::Ok((round, (before, peak, after)))
        }
    };
    // Flow size first, smallest first: the process's memory then holds
    // only what earlier sizes left (freed pages are kept and reused).
    let mut by_size = Vec::new();
    for &n in &s.curve_flow_sizes {
        let (round, memory) = measure(
            nats.clone(),
            url.to_owned(),
            1,
            args.agents,
            n,
            n.div_ceil(MAX_TASKS),
        )
        .await?;
        by_size.push(Point {
            x: n,
            round,
            memory,
        });
    }
    // The other curves on a fresh server when this run started one: after
    // a 1,000,000-task point on the same server the agent curve ran four
    // times slower (each new orchestrator reads every flow it has not seen
    // finish once, a million-task flow for seconds).
    let fresh = args
        .spawn
        .then(|| NatsServer::start_with_config(&spawned_config(args.fsync_always)));
    let (nats, url) = match &fresh {
        Some(server) => (server.connect().await, server.url().to_owned()),
        None => (nats.clone(), url.to_owned()),
    };
    let mut by_agents = Vec::new();
    for &n in &s.curve_agents {
        let (round, memory) =
            measure(nats.clone(), url.clone(), 1, n, args.tasks, args.flows).await?;
        by_agents.push(Point {
            x: n,
            round,
            memory,
        });
    }
    print_curve(
        "Tasks/s against agents (1 orchestrator)",
        "agents",
        &by_agents,
    );
    let mut by_replicas = Vec::new();
    for &n in &s.curve_replicas {
        let (round, memory) = measure(
            nats.clone(),
            url.clone(),
            n,
            args.agents,
            args.tasks,
            args.flows,
        )
        .await?;
        by_replicas.push(Point {
            x: n,
            round,
            memory,
        });
    }
    print_curve(
        &format!(
            "Tasks/s against orchestrator replicas ({} agents)",
            args.agents
        ),
        "replicas",
        &by_replicas,
    );
    println!();
    println!(
        "Flow size ({} agents, 1 orchestrator; one flow per point, up to {MAX_TASKS} tasks; memory of the whole process)",
        args.agents
    );
    println!();
    // The first task done bounds what creating the flow took (upload,
    // validation, storing it) plus one task's round.
    println!("| tasks | flows | first task done s | wall s | tasks/s | µs per task | p99 ms | RSS before MiB | peak MiB | after MiB | peak growth per task KiB |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for p in &by_size {
        let (before, peak, after) = p.memory;
        println!(
            "| {} | {} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.2} |",
            p.x,
            p.x.div_ceil(MAX_TASKS),
            p.round.pct(0.0).as_secs_f64(),
            p.round.wall.as_secs_f64(),
            p.round.per_sec(),
            p.round.wall.as_secs_f64() * 1e6 / p.x as f64,
            ms(p.round.pct(0.99)),
            mib(before),
            mib(peak),
            mib(after),
            peak.saturating_sub(before) as f64 / p.x as f64,
        );
    }

    if let Some(dir) = &s.svg_dir {
        let mut command = vec!["coord-bench".to_owned()];
        command.extend(std::env::args().skip(1));
        let caption = format!("{} (measured {})", command.join(" "), today());
        let rate = |points: &[Point]| {
            points
                .iter()
                .map(|p| (p.x as f64, p.round.per_sec()))
                .collect()
        };
        let charts = [
            (
                "curve-agents.svg",
                Chart {
                    title: "Tasks/s against agents (1 orchestrator)".into(),
                    x_label: "agents".into(),
                    y_label: "tasks/s".into(),
                    log_x: true,
                    series: vec![Series {
                        name: format!("{} tasks in {} flows", args.tasks, args.flows),
                        points: rate(&by_agents),
                    }],
                    caption: caption.clone(),
                },
            ),
            (
                "curve-replicas.svg",
                Chart {
                    title: format!(
                        "Tasks/s against orchestrator replicas ({} agents)",
                        args.agents
                    ),
                    x_label: "orchestrator replicas".into(),
                    y_label: "tasks/s".into(),
                    log_x: false,
                    series: vec![Series {
                        name: format!("{} tasks in {} flows", args.tasks, args.flows),
                        points: rate(&by_replicas),
                    }],
                    caption: caption.clone(),
                },
            ),
            (
                "curve-flow-size.svg",
                Chart {
                    title: format!(
                        "Tasks/s against tasks submitted at once ({} agents)",
                        args.agents
                    ),
                    x_label: "tasks in one flow".to_owned(),
                    y_label: "tasks/s".into(),
                    log_x: true,
                    series: vec![Series {
                        name: "tasks/s".into(),
                        points: rate(&by_size),
                    }],
                    caption: caption.clone(),
                },
            ),
            (
                "curve-flow-memory.svg",
                Chart {
                    title: "Peak memory growth per task (whole process)".into(),
                    x_label: "tasks in one flow".to_owned(),
                    y_label: "KiB per task".into(),
                    log_x: true,
                    series: vec![Series {
                        name: "peak RSS growth / tasks".into(),
                        points: by_size
                            .iter()
                            .map(|p| {
                                let (before, peak, _) = p.memory;
                                (p.x as f64, peak.saturating_sub(before) as f64 / p.x as f64)
                            })
                            .collect(),
                    }],
                    caption,
                },
            ),
        ];
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        println!();
        for (file, chart) in charts {
            let path = dir.join(file);
            std::fs::write(&path, chart.render())
                .with_context(|| format!("failed to write {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
