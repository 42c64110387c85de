//! The `agents` scenario: many agents on one deployment. For each count of
//! `--agents-curve`, that many simulated agents, sharing [`CONNECTIONS`]
//! connections as a fleet behind a few gateways would, join at once
//! (listen for assignments and register, [`JOINING_AT_ONCE`] at a time), heartbeat every `--agents-beat-ms` (spread over the interval),
//! sit idle for `--agents-idle-s`, then run one flow of
//! `--agents-flow-tasks` independent one-cpu no-op tasks, each agent taking
//! one at a time (capacity cpu=1, as the fleet did); with
//! `--agents-soak-s`, flows of the same size run back to back for that long
//! after the largest count's flow (so one run gives the curve and the soak
//! at the scale it is for).
//!
//! Printed per count: the join's wall time; the heartbeat path's latency
//! (a heartbeat published until the allocator has heard it: the time it
//! recorded, read back once a second from its capacity reply, against the
//! time of publishing, on the one clock of this machine, to the ms) while
//! idle and during the flow; the flow's tasks/s;
//! and how many `agent.lost` events were published for agents that never
//! stopped (falsely lost). The services run in-process, one replica each.
//! With `--svg-dir`, the flow's rate and the heartbeat path's p99 are drawn
//! against the agent count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream;
use common::msg::{AgentReport, Assignment, Heartbeat, RegisterAgent, ReportKind};
use common::{subject, AgentId, FlowId};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::watch;

use super::scale::today;
use super::svg::{Chart, Series};
use super::{flow_spec, Args, System};

/// Connections the simulated agents share.
const CONNECTIONS: usize = 4;
/// Agents joining at once.
const JOINING_AT_ONCE: usize = 64;

#[derive(clap::Args, Debug)]
pub(crate) struct AgentsArgs {
    /// Agent counts of the `agents` scenario, one point each.
    #[arg(long, value_delimiter = ',', default_value = "100,300,1000,2000")]
    pub(crate) agents_curve: Vec<usize>,
    /// Tasks of the flow run while the agents are up.
    #[arg(long, default_value_t = 2000)]
    pub(crate) agents_flow_tasks: usize,
    /// Each simulated agent's heartbeat interval, in ms.
    #[arg(long, default_value_t = 1000)]
    pub(crate) agents_beat_ms: u64,
    /// Seconds of idle heartbeating measured before the flow.
    #[arg(long, default_value_t = 10)]
    pub(crate) agents_idle_s: u64,
    /// After the largest count's measured flow, seconds of flows run back
    /// to back (the soak): agents falsely lost and the heartbeat path over
    /// it are printed in a table of their own. Zero: no soak.
    #[arg(long, default_value_t = 0)]
    pub(crate) agents_soak_s: u64,
}

/// One count's figures.
struct Point {
    agents: usize,
    join: Duration,
    idle: Vec<Duration>,
    busy: Vec<Duration>,
    flow: Duration,
    state: String,
    lost: usize,
    soak: Option<Soak>,
}

/// What the soak after the measured flow saw.
struct Soak {
    took: Duration,
    flows: usize,
    failed: usize,
    tasks: usize,
    busy: Vec<Duration>,
    lost: usize,
}

/// When each agent's last two heartbeats were published (ms since the
/// epoch), what the allocator last said it heard, and the latencies seen.
#[derive(Default)]
struct Beats {
    sent: HashMap<AgentId, [u64; 2]>,
    heard: HashMap<AgentId, u64>,
    seen: Vec<Duration>,
}

impl Beats {
    /// Takes one capacity reply's heartbeats: each newly heard one is
    /// matched with the last beat published before it was heard.
    fn heard(&mut self, heard: std::collections::BTreeMap<AgentId, u64>) {
        for (agent, at) in heard {
            if self.heard.insert(agent.clone(), at) == Some(at) {
                continue;
            }
            let Some(sent) = self.sent.get(&agent) else {
                continue;
            };
            if let Some(s) = sent.iter().filter(|s| **s > 0 && **s <= at).max() {
                self.seen.push(Duration::from_millis(at - s));
            }
        }
    }
}

/// Runs the curve against the server at `url`; `setting` names its
/// durability setting in the charts' file names (`page-cache`, `fsync`).
pub(crate) async fn run(
    url: &str,
    args: &Args,
    setting: &str,
    run_id: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    let a = &args.agents_scale;
    if a.agents_curve.contains(&0) || a.agents_flow_tasks == 0 || a.agents_beat_ms == 0 {
        bail!("--agents-curve, --agents-flow-tasks and --agents-beat-ms must be at least 1");
    }
    println!(
        "coord-bench agents: {url}, agents on {CONNECTIONS} connections, heartbeat every {} ms, {} s idle, then a flow of {} one-cpu tasks (each agent cpu=1)",
        a.agents_beat_ms, a.agents_idle_s, a.agents_flow_tasks
    );
    println!();
    println!("| agents | join s | heartbeat path p50 / p99 ms, idle | during the flow | flow tasks/s | flow | falsely lost |");
    println!("| ---: | ---: | ---: | ---: | ---: | --- | ---: |");
    let mut points = Vec::new();
    let largest = a.agents_curve.iter().copied().max().unwrap_or(0);
    for &n in &a.agents_curve {
        let soak_s = if n == largest { a.agents_soak_s } else { 0 };
        let p = point(url, n, a, soak_s, run_id, limit).await?;
        let pct = |v: &[Duration], q: f64| -> String {
            percentile_ms(v, q).map_or("—".into(), |ms| format!("{ms:.1}"))
        };
        println!(
            "| {} | {:.2} | {} / {} | {} / {} | {:.0} | {} | {} |",
            p.agents,
            p.join.as_secs_f64(),
            pct(&p.idle, 0.5),
            pct(&p.idle, 0.99),
            pct(&p.busy, 0.5),
            pct(&p.busy, 0.99),
            a.agents_flow_tasks as f64 / p.flow.as_secs_f64().max(1e-9),
            p.state,
            p.lost
        );
        points.push(p);
    }
    if a.agents_soak_s > 0 {
        println!();
        println!(
            "soak: flows of {} tasks back to back after the measured flow",
            a.agents_flow_tasks
        );
        println!();
        println!("| agents | soak s | flows (failed) | tasks/s | heartbeat path p50 / p99 ms | falsely lost |");
        println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
        for p in &points {
            let Some(s) = &p.soak else { continue };
            let pct =
                |q: f64| percentile_ms(&s.busy, q).map_or("—".into(), |ms| format!("{ms:.1}"));
            println!(
                "| {} | {:.0} | {} ({}) | {:.0} | {} / {} | {} |",
                p.agents,
                s.took.as_secs_f64(),
                s.flows,
                s.failed,
                s.tasks as f64 / s.took.as_secs_f64().max(1e-9),
                pct(0.5),
                pct(0.99),
                s.lost
            );
        }
    }
    if let Some(dir) = &args.scale.svg_dir {
        write_charts(dir, setting, a.agents_flow_tasks, &points)?;
    }
    Ok(())
}

fn percentile_ms(v: &[Duration], q: f64) -> Option<f64> {
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len().max(1));
    v.get(i - 1).map(|d| d.as_secs_f64() * 1e3)
}

/// `agents-{setting}-flow.svg` (the flow's tasks/s against agents) and
/// `agents-{setting}-heartbeat.svg` (the heartbeat path's p99, idle and
/// during the flow).
fn write_charts(
    dir: &std::path::Path,
    setting: &str,
    tasks: usize,
    points: &[Point],
) -> anyhow::Result<()> {
    let mut command = vec!["coord-bench".to_owned()];
    command.extend(std::env::args().skip(1));
    let caption = format!("{} (measured {})", command.join(" "), today());
    let p99 = |pick: fn(&Point) -> &Vec<Duration>| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter_map(|p| Some((p.agents as f64, percentile_ms(pick(p), 0.99)?)))
            .collect()
    };
    let rate = points
        .iter()
        .map(|p| {
            (
                p.agents as f64,
                tasks as f64 / p.flow.as_secs_f64().max(1e-9),
            )
        })
        .collect();
    let charts = [
        (
            format!("agents-{setting}-flow.svg"),
            Chart {
                title: format!("A {tasks}-task flow's tasks/s against agents ({setting})"),
                x_label: "agents (cpu=1 each)".into(),
                y_label: "tasks/s".into(),
                log_x: true,
                series: vec![Series {
                    name: "tasks/s".into(),
                    points: rate,
                }],
                caption: caption.clone(),
            },
        ),
        (
            format!("agents-{setting}-heartbeat.svg"),
            Chart {
                title: format!("Heartbeat path p99 against agents ({setting})"),
                x_label: "agents".into(),
                y_label: "ms, publish to heard".into(),
                log_x: true,
                series: vec![
                    Series {
                        name: "idle".into(),
                        points: p99(|p| &p.idle),
                    },
                    Series {
                        name: "during the flow".into(),
                        points: p99(|p| &p.busy),
                    },
                ],
                caption,
            },
        ),
    ];
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    println!();
    for (file, chart) in charts {
        let path = dir.join(file);
        std::fs::write(&path, chart.render())
            .with_context(|| format!("failed to write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

async fn point(
    url: &str,
    n: usize,
    a: &AgentsArgs,
    soak_s: u64,
    run_id: u64,
    limit: Duration,
) -> anyhow::Result<Point> {
    let nats = async_nats::connect(url)
        .await
        .with_context(|| format!("failed to connect to {url}"))?;
    let system = System::start(&nats, url, 1, 0, "", Duration::ZERO, limit).await?;
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(async_nats::connect(url).await?);
    }
    let ids = (0..n)
        .map(|i| Ok(AgentId::new(format!("swarm-{run_id}-{n}-{i}"))?))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let lost = Arc::new(AtomicUsize::new(0));
    let mut lost_sub = nats.subscribe(subject::event::AGENT_LOST).await?;
    let lost_count = lost.clone();
    // Only this point's agents: those of the last one may be lost now.
    let ours = format!("\"swarm-{run_id}-{n}-");
    let lost_task = tokio::spawn(async move {
        while let Some(msg) = lost_sub.next().await {
            if String::from_utf8_lossy(&msg.payload).contains(&ours) {
                lost_count.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let beats = Arc::new(Mutex::new(Beats::default()));
    let (seen, asker) = (beats.clone(), common::Client::new(nats.clone()));
    let beat_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Ok(cap) = asker.capacity(&Default::default()).await {
                if let Ok(mut b) = seen.lock() {
                    b.heard(cap.last_heartbeat_ms);
                }
            }
        }
    });

    // The join storm. Each agent heartbeats from the moment it has
    // registered, as a real one does, not from when the last has joined.
    let beat = Duration::from_millis(a.agents_beat_ms);
    let (stop, stopped) = watch::channel(false);
    let mut running = Vec::new();
    let started = Instant::now();
    let joined: Vec<(async_nats::Subscriber, tokio::task::JoinHandle<()>)> =
        futures::stream::iter(ids.iter().enumerate())
            .map(|(i, id)| {
                let beating = Beating {
                    every: beat,
                    offset: beat.mul_f64(i as f64 / n as f64),
                    beats: beats.clone(),
                    stop: stopped.clone(),
                };
                join(&conns[i % CONNECTIONS], id, beating)
            })
            .buffered(JOINING_AT_ONCE)
            .try_collect()
            .await?;
    let join_time = started.elapsed();

    for (i, (id, (assignments, beating))) in ids.iter().zip(joined).enumerate() {
        running.push(beating);
        running.push(tokio::spawn(work(
            conns[i % CONNECTIONS].clone(),
            id.clone(),
            assignments,
            stopped.clone(),
        )));
    }

    tokio::time::sleep(Duration::from_secs(a.agents_idle_s)).await;
    let idle = take_seen(&beats);

    let client = common::Client::new(nats.clone());
    let flow = FlowId::new(format!("swarm-{run_id}-{n}"))?;
    let flow_started = Instant::now();
    client
        .create_flow(&flow_spec(&flow, a.agents_flow_tasks)?)
        .await
        .map_err(|e| anyhow::anyhow!("flow not created: {e}"))?;
    let state = loop {
        if let Ok(s) = client.flow_status(&flow).await {
            if s.state.is_terminal() {
                break format!("{:?}", s.state).to_lowercase();
            }
        }
        if flow_started.elapsed() > limit {
            break "unfinished".to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let flow_time = flow_started.elapsed();
    let busy = take_seen(&beats);
    let lost_then = lost.load(Ordering::Relaxed);
    let soak = if soak_s > 0 {
        let (mut flows, mut failed) = (0, 0);
        let soak_started = Instant::now();
        while soak_started.elapsed() < Duration::from_secs(soak_s) {
            let id = FlowId::new(format!("soak-{run_id}-{n}-{flows}"))?;
            flows += 1;
            let done = async {
                client
                    .create_flow(&flow_spec(&id, a.agents_flow_tasks)?)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                loop {
                    if let Ok(s) = client.flow_status(&id).await {
                        if s.state.is_terminal() {
                            return Ok::<_, anyhow::Error>(
                                s.state == common::msg::FlowState::Succeeded,
                            );
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            match tokio::time::timeout(limit, done).await {
                Ok(Ok(true)) => {}
                _ => failed += 1,
            }
        }
        Some(Soak {
            took: soak_started.elapsed(),
            flows,
            failed,
            tasks: flows * a.agents_flow_tasks,
            busy: take_seen(&beats),
            lost: lost.load(Ordering::Relaxed) - lost_then,
        })
    } else {
        None
    };
    // Counted up to here: agents stopped next fall silent, and are lost.
    let lost = lost_then;

    let _ = stop.send(true);
    for r in running {
        let _ = tokio::time::timeout(Duration::from_secs(10), r).await;
    }
    beat_task.abort();
    lost_task.abort();
    system.stop_with(&nats, &ids).await;
    Ok(Point {
        agents: n,
        join: join_time,
        idle,
        busy,
        flow: flow_time,
        state,
        lost,
        soak,
    })
}

fn take_seen(beats: &Mutex<Beats>) -> Vec<Duration> {
    let mut seen = beats
        .lock()
        .map(|mut b| std::mem::take(&mut b.seen))
        .unwrap_or_default();
    seen.sort_unstable();
    seen
}

/// How a joined agent heartbeats (see [`heartbeat`]).
struct Beating {
    every: Duration,
    offset: Duration,
    beats: Arc<Mutex<Beats>>,
    stop: watch::Receiver<bool>,
}

/// Listens on one agent's assignment subject, registers it (cpu=1) and
/// starts its heartbeats, as the protocol page's agent does.
async fn join(
    conn: &async_nats::Client,
    id: &AgentId,
    beating: Beating,
) -> anyhow::Result<(async_nats::Subscriber, tokio::task::JoinHandle<()>)> {
    let beat = beating.every;
    let assignments = conn
        .subscribe(subject::assign(id))
        .await
        .with_context(|| format!("{id}: assignments subscription"))?;
    let client = common::Client::new(conn.clone());
    client
        .register_agent(&RegisterAgent {
            agent_id: id.clone(),
            capabilities: Vec::new(),
            labels: Default::default(),
            capacity: [("cpu".to_string(), 1.0)].into(),
            heartbeat_interval_ms: beat.as_millis() as u64,
        })
        .await
        .map_err(|e| anyhow::anyhow!("{id} not registered: {e}"))?;
    let Beating {
        every,
        offset,
        beats,
        stop,
    } = beating;
    let beats = tokio::spawn(heartbeat(
        conn.clone(),
        id.clone(),
        every,
        offset,
        beats,
        stop,
    ));
    Ok((assignments, beats))
}

/// Heartbeats every `every`, the first after `offset`.
async fn heartbeat(
    conn: async_nats::Client,
    id: AgentId,
    every: Duration,
    offset: Duration,
    beats: Arc<Mutex<Beats>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
    let to = subject::heartbeat(&id);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let beat = Heartbeat {
            agent_id: id.clone(),
            at_ms: common::now_ms(),
            running: 0,
        };
        let Ok(body) = serde_json::to_vec(&beat) else {
            return;
        };
        if let Ok(mut b) = beats.lock() {
            let sent = b.sent.entry(id.clone()).or_default();
            *sent = [sent[1], beat.at_ms];
        }
        let _ = conn.publish(to.clone(), body.into()).await;
    }
}

/// Takes assignments one at a time and completes each at once (a repeat
/// of one completed already is skipped).
async fn work(
    conn: async_nats::Client,
    id: AgentId,
    mut assignments: async_nats::Subscriber,
    mut stop: watch::Receiver<bool>,
) {
    let js = jetstream::new(conn);
    let mut done = std::collections::HashSet::new();
    loop {
        let msg = tokio::select! {
            m = assignments.next() => match m {
                Some(m) => m,
                None => return,
            },
            _ = stop.changed() => return,
        };
        let Ok(a) = serde_json::from_slice::<Assignment>(&msg.payload) else {
            continue;
        };
        if !done.insert((a.flow_id.clone(), a.task_id.clone(), a.attempt)) {
            continue;
        }
        let report = AgentReport {
            flow_id: a.flow_id,
            task_id: a.task_id,
            attempt: a.attempt,
            agent_id: id.clone(),
            kind: ReportKind::Completed {
                output: serde_json::Value::Null,
            },
            at_ms: common::now_ms(),
        };
        if let Ok(body) = serde_json::to_vec(&report) {
            if let Ok(ack) = js.publish(subject::report(&id), body.into()).await {
                let _ = ack.await;
            }
        }
    }
}
