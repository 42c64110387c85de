//! The chaos suite: flows run to the end while service replicas, agents and
//! the nats-server are killed under them, and nothing is lost, done twice or
//! over-booked.
//!
//! F flows of T tasks run over A agents (the coordkit runtime, a short fixed
//! work time) with two replicas of every service. At random intervals (a
//! seeded generator; the seed is printed) a random replica is killed as
//! `kill -9` would (its runtime dropped) and a new one started, an agent is
//! killed mid-task and started again under the same id, and once the
//! nats-server itself is killed and brought back on the same port and store.
//! Then, from the stored state and the events stream read back from its start:
//!
//! - **0 tasks lost**: every flow finishes and every task of it succeeded;
//! - **0 duplicate completions accepted**: at most one `task.succeeded` event
//!   per task;
//! - **0 over-allocations at any revision**: every revision of every agent's
//!   record in `coord_agents` (watched live, so none ages out of the 64-value
//!   history unseen) holds no more of a resource than the agent's capacity.
//!
//! - **nothing left behind**: once the faults stop every flow is final within
//!   the drain bound, the pool holds no allocation (what dead replicas left
//!   is reconciled), and every committed transition has its event, stored
//!   once (no event id twice; one `flow.created` and one `flow.completed` per
//!   flow, one `task.succeeded` per task).
//!
//! A second profile kills only orchestrator replicas, about every 2 s.
//!
//! It prints the figures: faults by kind, tasks, retries, rejected reports,
//! and each fault's time to recover (from the fault to the next accepted
//! completion). The size comes from `CHAOS_FLOWS`, `CHAOS_TASKS`,
//! `CHAOS_AGENTS`, `CHAOS_SECONDS`, `CHAOS_FAULT_EVERY_MS` and `CHAOS_SEED`
//! (see docs/RELIABILITY.md); the defaults are the CI size.
//!
//! Another test pauses an agent (its whole runtime frozen, heartbeats
//! included) past its lease: its late reports are rejected as stale and the
//! task completes once, elsewhere. A third does the same to an agent that is
//! a process of its own (`coord-proc agent`), frozen with `SIGSTOP` and
//! thawed with `SIGCONT`.

// Test code: failing fast with a clear message is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::pending;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use common::config::NatsConfig;
use common::msg::{
    Event, EventKind, FlowSpec, FlowState, Requirements, RetryPolicy, TaskSpec, TaskState,
};
use common::{AgentId, Client, ErrorCode, FlowId, TaskId};
use coordkit::agent::{self, AgentOptions};
use futures::StreamExt;
use serde_json::json;
use testkit::{
    eventually, wait_for_service, Isolated, NatsServer, Process, Replica, System, SERVICES,
};

/// The run's size and pace, from the environment.
#[derive(Debug)]
struct Size {
    flows: usize,
    tasks: usize,
    agents: usize,
    /// How long faults are injected.
    seconds: u64,
    /// Mean time between faults.
    fault_every_ms: u64,
    seed: u64,
    /// Each task's fixed work time: long enough that a flow (a few tasks
    /// deep) is still running when the next one arrives, so faults meet work.
    work_ms: u64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// Which faults a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    /// Replicas of every service, agents mid-task, and the nats-server once.
    Mixed,
    /// Orchestrator replicas only, one killed about every 2 s: the crash
    /// debris of a dying orchestrator (allocations booked for it, events it
    /// never published) must be repaired by the system.
    Orchestrator,
}

impl Size {
    fn from_env(profile: Profile) -> Size {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let (seconds, every) = match profile {
            Profile::Mixed => (60, 5_000),
            Profile::Orchestrator => (30, 2_000),
        };
        Size {
            flows: env_u64("CHAOS_FLOWS", 10) as usize,
            tasks: env_u64("CHAOS_TASKS", 10) as usize,
            agents: env_u64("CHAOS_AGENTS", 4) as usize,
            seconds: env_u64("CHAOS_SECONDS", seconds),
            fault_every_ms: env_u64("CHAOS_FAULT_EVERY_MS", every),
            seed: env_u64("CHAOS_SEED", now.as_nanos() as u64 & 0xffff_ffff),
            work_ms: env_u64("CHAOS_WORK_MS", 1_000),
        }
    }
}

/// splitmix64: small, seeded, good enough to pick faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}

/// What the agents' handlers saw: who is mid-task now, and how often each
/// task's work was run (a killed agent's attempt is run again elsewhere).
#[derive(Default)]
struct Ledger {
    busy: Mutex<BTreeMap<String, usize>>,
    runs: Mutex<BTreeMap<(String, String), usize>>,
}

/// An agent on a runtime of its own, so that killing it ends its handlers,
/// heartbeats and connection at once, as `kill -9` ends a process.
fn start_agent(cfg: NatsConfig, id: &str, ledger: Arc<Ledger>, work: Duration) -> Isolated {
    let me = id.to_owned();
    Isolated::spawn(async move {
        let nats = common::nats::connect(&cfg, &format!("agent-{me}"))
            .await
            .unwrap();
        let mut opts = AgentOptions::new(AgentId::new(&me).unwrap()).capacity("cpu", 2.0);
        opts.heartbeat_interval = Duration::from_millis(500);
        opts.concurrency = 2;
        let handler = move |a: common::msg::Assignment| {
            let (ledger, me) = (ledger.clone(), me.clone());
            async move {
                *ledger.busy.lock().unwrap().entry(me.clone()).or_default() += 1;
                tokio::time::sleep(work).await;
                *ledger
                    .runs
                    .lock()
                    .unwrap()
                    .entry((a.flow_id.to_string(), a.task_id.to_string()))
                    .or_default() += 1;
                *ledger.busy.lock().unwrap().entry(me.clone()).or_default() -= 1;
                Ok(json!({"by": me}))
            }
        };
        if let Err(e) = agent::run(nats, opts, handler, pending::<()>()).await {
            eprintln!("agent stopped: {e}");
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum FaultKind {
    Replica,
    Agent,
    Nats,
}

#[derive(Debug)]
struct Fault {
    kind: FaultKind,
    what: String,
    at_ms: u64,
}

/// A random DAG of `n` tasks: each depends on up to two earlier ones.
fn flow_spec(index: usize, n: usize, work_ms: u64, rng: &mut Rng) -> FlowSpec {
    let tasks = (0..n)
        .map(|i| {
            let mut t = TaskSpec::new(TaskId::new(format!("t{i}")).unwrap());
            t.kind = "work".into();
            t.requirements = Requirements {
                resources: [("cpu".to_string(), 1.0)].into(),
                ..Default::default()
            };
            if i > 0 {
                for _ in 0..rng.below(3) {
                    let d = TaskId::new(format!("t{}", rng.below(i as u64))).unwrap();
                    if !t.depends_on.contains(&d) {
                        t.depends_on.push(d);
                    }
                }
            }
            // The lease: an attempt whose agent died is retried after this.
            t.timeouts.start_to_close_ms = Some(2_000 + 3 * work_ms);
            t.retry = RetryPolicy {
                max_attempts: 20,
                backoff_base_ms: 100,
                backoff_max_ms: 1_000,
                ..Default::default()
            };
            t
        })
        .collect();
    let mut spec = FlowSpec::new("chaos", tasks);
    spec.id = Some(FlowId::new(format!("chaos-{index}")).unwrap());
    spec
}

/// Creates a flow, retrying through faults; an earlier try that was stored
/// but not answered shows up as "already exists".
async fn create(client: &Client, spec: &FlowSpec) {
    loop {
        match client.create_flow(spec).await {
            Ok(_) => return,
            Err(e) if e.code == ErrorCode::Conflict => return,
            Err(e) => {
                eprintln!("chaos: create {:?} failed ({e}), retrying", spec.id);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Every event the events stream holds, read from its start with an ordered
/// consumer up to the last sequence it has now.
async fn all_events(nats: &async_nats::Client) -> Vec<Event> {
    let js = jetstream::new(nats.clone());
    let mut stream = js.get_stream(common::nats::STREAM_EVENTS).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), messages.next())
            .await
            .expect("the events stream reads back")
            .unwrap()
            .unwrap();
        let seq = msg.info().unwrap().stream_sequence;
        if let Ok(e) = serde_json::from_slice::<Event>(&msg.payload) {
            out.push(e);
        }
        if seq >= last {
            return out;
        }
    }
}

/// Every revision of the agents bucket seen so far: revision → (key, value;
/// `None` for a delete).
type Revisions = Arc<Mutex<BTreeMap<u64, (String, Option<Vec<u8>>)>>>;

/// Records every revision of the agents bucket as it is written, and any
/// revision number seen twice with different contents.
fn watch_agents(kv: kv::Store, seen: Revisions, rewritten: Arc<Mutex<Vec<u64>>>) {
    tokio::spawn(async move {
        let mut watch = kv.watch_all_from_revision(1).await.unwrap();
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { continue };
            let value = matches!(entry.operation, kv::Operation::Put).then(|| entry.value.to_vec());
            let mut seen = seen.lock().unwrap();
            if let Some(old) = seen.get(&entry.revision) {
                if *old != (entry.key.clone(), value.clone()) {
                    rewritten.lock().unwrap().push(entry.revision);
                }
            }
            seen.insert(entry.revision, (entry.key, value));
        }
    });
}

/// Over-allocations in one revision of an agent's record: per resource, what
/// its allocations hold against its capacity.
fn over_allocated(record: &serde_json::Value) -> Vec<(String, f64, f64)> {
    let mut held: BTreeMap<String, f64> = BTreeMap::new();
    for a in record["allocations"]
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
    {
        for (r, n) in a["resources"].as_object().into_iter().flatten() {
            *held.entry(r.clone()).or_default() += n.as_f64().unwrap_or(0.0);
        }
    }
    held.into_iter()
        .filter_map(|(r, n)| {
            let cap = record["capacity"][&r].as_f64().unwrap_or(0.0);
            (n > cap + 1e-9).then_some((r, n, cap))
        })
        .collect()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_task_is_lost_or_completed_twice_and_no_agent_over_allocated_under_chaos() {
    chaos(Profile::Mixed).await;
}

/// Two orchestrator replicas, one killed about every 2 s for 30 s: every
/// flow finishes within the drain bound once the kills stop, nothing stays
/// booked (what the dead replicas left is reconciled), and every committed
/// transition has its event, stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_replicas_killed_every_two_seconds_leave_nothing_behind() {
    chaos(Profile::Orchestrator).await;
}

async fn chaos(profile: Profile) {
    let size = Size::from_env(profile);
    eprintln!(
        "chaos: {profile:?} {size:?} (rerun with CHAOS_SEED={})",
        size.seed
    );
    let mut rng = Rng(size.seed);
    common::telemetry::init_for_tests();
    let mut server = NatsServer::start();
    let cfg = server.config();
    let mut replicas: Vec<Replica> = SERVICES
        .iter()
        .flat_map(|n| [0, 1].map(|_| Replica::start(n, cfg.clone())))
        .collect();
    let nats = common::nats::connect(&cfg, "chaos-checker").await.unwrap();
    let client = Client::new(nats.clone()).with_timeout(Duration::from_secs(5));
    for name in SERVICES {
        wait_for_service(&nats, name).await;
    }
    let js = jetstream::new(nats.clone());
    let agents_kv = js.get_key_value(common::nats::KV_AGENTS).await.unwrap();
    let revisions: Revisions = Arc::default();
    let rewritten: Arc<Mutex<Vec<u64>>> = Arc::default();
    watch_agents(agents_kv.clone(), revisions.clone(), rewritten.clone());

    let ledger: Arc<Ledger> = Arc::default();
    let work = Duration::from_millis(size.work_ms);
    let ids: Vec<String> = (0..size.agents).map(|i| format!("agent{i}")).collect();
    let mut agents: BTreeMap<String, Isolated> = ids
        .iter()
        .map(|id| {
            (
                id.clone(),
                start_agent(cfg.clone(), id, ledger.clone(), work),
            )
        })
        .collect();
    eventually(
        Duration::from_secs(30),
        "every agent registered",
        || async {
            let cap = client.capacity(&Default::default()).await.ok()?;
            (cap.agents.len() == size.agents).then_some(())
        },
    )
    .await;

    // Flows arrive through the first 80% of the window, so faults meet work.
    let specs: Vec<FlowSpec> = (0..size.flows)
        .map(|i| flow_spec(i, size.tasks, size.work_ms, &mut rng))
        .collect();
    let flow_ids: Vec<FlowId> = specs.iter().map(|s| s.id.clone().unwrap()).collect();
    let started = Instant::now();
    let window = Duration::from_secs(size.seconds);
    let gap = window.mul_f64(0.8) / size.flows.max(1) as u32;
    let submitter = {
        let client = client.clone();
        tokio::spawn(async move {
            for (i, spec) in specs.iter().enumerate() {
                tokio::time::sleep_until((started + gap * i as u32).into()).await;
                create(&client, spec).await;
            }
        })
    };

    // The faults.
    let mut faults: Vec<Fault> = Vec::new();
    let nats_at = window.mul_f64(0.3 + 0.3 * (rng.below(1000) as f64 / 1000.0));
    let mut nats_done = false;
    loop {
        let wait = rng.millis(size.fault_every_ms / 2, size.fault_every_ms * 3 / 2);
        if started.elapsed() + wait >= window {
            break;
        }
        tokio::time::sleep(wait).await;
        if profile == Profile::Orchestrator {
            let orchestrators: Vec<usize> = (0..replicas.len())
                .filter(|i| replicas[*i].name == "orchestrator")
                .collect();
            let i = orchestrators[rng.below(orchestrators.len() as u64) as usize];
            replicas.swap_remove(i).kill();
            faults.push(Fault {
                kind: FaultKind::Replica,
                what: "orchestrator".to_owned(),
                at_ms: common::now_ms(),
            });
            tokio::time::sleep(rng.millis(0, 1_000)).await;
            replicas.push(Replica::start("orchestrator", cfg.clone()));
            continue;
        }
        if !nats_done && started.elapsed() >= nats_at {
            nats_done = true;
            faults.push(restart_nats(&mut server, &mut rng).await);
            continue;
        }
        if rng.below(3) < 2 {
            let i = rng.below(replicas.len() as u64) as usize;
            let old = replicas.swap_remove(i);
            let name = old.name;
            old.kill();
            faults.push(Fault {
                kind: FaultKind::Replica,
                what: name.to_owned(),
                at_ms: common::now_ms(),
            });
            tokio::time::sleep(rng.millis(0, 1_000)).await;
            replicas.push(Replica::start(name, cfg.clone()));
        } else {
            // Mid-task if any agent is: wait a moment for one to be.
            let mut victim = None;
            for _ in 0..40 {
                let busy = ledger.busy.lock().unwrap().clone();
                let working: Vec<&String> =
                    ids.iter().filter(|a| busy.get(*a) > Some(&0)).collect();
                if !working.is_empty() {
                    victim = Some(working[rng.below(working.len() as u64) as usize].clone());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (id, mid_task) = match victim {
                Some(id) => (id, true),
                None => (ids[rng.below(ids.len() as u64) as usize].clone(), false),
            };
            agents.remove(&id).unwrap().kill();
            ledger.busy.lock().unwrap().remove(&id);
            faults.push(Fault {
                kind: FaultKind::Agent,
                what: format!("{id}{}", if mid_task { " mid-task" } else { " idle" }),
                at_ms: common::now_ms(),
            });
            // Sometimes back within the heartbeat-loss window, sometimes after it.
            tokio::time::sleep(rng.millis(200, 3_000)).await;
            agents.insert(
                id.clone(),
                start_agent(cfg.clone(), &id, ledger.clone(), work),
            );
        }
    }
    if !nats_done && profile == Profile::Mixed {
        faults.push(restart_nats(&mut server, &mut rng).await);
    }
    submitter.await.unwrap();
    let chaos_over = Instant::now();

    // Every flow reaches a final state.
    let drain = Duration::from_secs(env_u64("CHAOS_DRAIN_SECONDS", 90));
    let mut finals = BTreeMap::new();
    while finals.len() < flow_ids.len() && chaos_over.elapsed() < drain {
        for f in &flow_ids {
            if finals.contains_key(f) {
                continue;
            }
            if let Ok(s) = client.flow_status(f).await {
                if s.state.is_terminal() {
                    finals.insert(f.clone(), s);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let finished_after = started.elapsed();
    let drained_in = chaos_over.elapsed();

    // Nothing stays booked: what dead replicas left is reconciled (after the
    // allocator's grace, 30 s).
    let booked = eventually(Duration::from_secs(90), "nothing left booked", || async {
        let cap = client.capacity(&Default::default()).await.ok()?;
        let held: f64 = cap.pool.values().map(|r| r.allocated).sum();
        (held == 0.0).then_some(cap.agents.values().flat_map(|r| r.values()).count())
    })
    .await;
    let settled_in = chaos_over.elapsed();
    let mut stuck = Vec::new();
    for f in flow_ids.iter().filter(|f| !finals.contains_key(*f)) {
        match client.flow_status(f).await {
            Ok(s) => stuck.push(format!(
                "{f}: {:?} {:?}",
                s.counts,
                s.tasks
                    .iter()
                    .filter(|t| !t.state.is_terminal())
                    .map(|t| {
                        (
                            t.task_id.to_string(),
                            t.state,
                            t.attempt,
                            t.agent_id.clone(),
                            t.deadline_ms.map(|d| d as i64 - common::now_ms() as i64),
                        )
                    })
                    .collect::<Vec<_>>()
            )),
            Err(e) => stuck.push(format!("{f}: {e}")),
        }
    }

    // Figures and checks, from the events stream and the stored state.
    let events = all_events(&nats).await;
    let mut ids = BTreeSet::new();
    let duplicate_ids = events
        .iter()
        .filter(|e| !ids.insert(e.event_id.clone()))
        .count();
    let mut created_events: BTreeMap<FlowId, usize> = BTreeMap::new();
    let mut finished_events: BTreeMap<FlowId, usize> = BTreeMap::new();
    for e in &events {
        match &e.kind {
            EventKind::FlowCreated { flow_id, .. } => {
                *created_events.entry(flow_id.clone()).or_default() += 1
            }
            EventKind::FlowCompleted { flow_id, .. } => {
                *finished_events.entry(flow_id.clone()).or_default() += 1
            }
            _ => {}
        }
    }
    let flows_missing_events: Vec<&FlowId> = flow_ids
        .iter()
        .filter(|f| created_events.get(*f) != Some(&1) || finished_events.get(*f) != Some(&1))
        .collect();
    let mut succeeded: BTreeMap<(FlowId, TaskId), usize> = BTreeMap::new();
    let mut completions: Vec<u64> = Vec::new();
    let (mut rejected, mut timed_out, mut lost, mut failed) = (0, 0, 0, 0);
    for e in &events {
        match &e.kind {
            EventKind::TaskTransition {
                flow_id,
                task_id,
                to,
                ..
            } => match to {
                TaskState::Succeeded => {
                    *succeeded
                        .entry((flow_id.clone(), task_id.clone()))
                        .or_default() += 1;
                    completions.push(e.at_ms);
                }
                TaskState::TimedOut => timed_out += 1,
                TaskState::Failed => failed += 1,
                _ => {}
            },
            EventKind::ReportRejected { .. } => rejected += 1,
            EventKind::AgentLost { .. } => lost += 1,
            _ => {}
        }
    }
    completions.sort_unstable();
    let twice: Vec<_> = succeeded.iter().filter(|(_, n)| **n > 1).collect();
    let mut not_succeeded = Vec::new();
    let (mut tasks, mut retried) = (0, 0);
    for s in finals.values() {
        if s.state != FlowState::Succeeded {
            not_succeeded.push(format!("{}: {:?}", s.flow_id, s.counts));
        }
        for t in &s.tasks {
            tasks += 1;
            retried += usize::from(t.attempt > 1);
            if t.state != TaskState::Succeeded {
                not_succeeded.push(format!("{}/{}: {:?}", s.flow_id, t.task_id, t.state));
            }
        }
    }
    let unrecorded = tasks - succeeded.len().min(tasks);
    let runs: usize = ledger.runs.lock().unwrap().values().sum();

    // Every revision of every agent's record, the live watch's and what the
    // bucket's history still holds.
    let keys: Vec<String> = agents_kv
        .keys()
        .await
        .unwrap()
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    for key in keys {
        let mut history = agents_kv.history(&key).await.unwrap();
        while let Some(Ok(entry)) = history.next().await {
            let value = matches!(entry.operation, kv::Operation::Put).then(|| entry.value.to_vec());
            revisions
                .lock()
                .unwrap()
                .entry(entry.revision)
                .or_insert((entry.key, value));
        }
    }
    // (`kv::Store::status` answers from a copy taken when the store was opened.)
    let last_revision = js
        .get_stream(format!("KV_{}", common::nats::KV_AGENTS))
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    let revisions = revisions.lock().unwrap().clone();
    let missing_revisions = (1..=last_revision)
        .filter(|r| !revisions.contains_key(r))
        .count();
    let mut over = Vec::new();
    for (rev, (key, value)) in &revisions {
        if let Some(v) = value {
            let record: serde_json::Value = serde_json::from_slice(v).unwrap();
            for o in over_allocated(&record) {
                over.push(format!("{key} at revision {rev}: {o:?}"));
            }
        }
    }

    // Time to recover: from each fault to the next accepted completion (a
    // fault after the last completion met no work, so it has none).
    let mut recover: BTreeMap<FaultKind, Vec<u64>> = BTreeMap::new();
    let mut idle = 0;
    for f in &faults {
        match completions.iter().find(|c| **c >= f.at_ms) {
            Some(c) => recover.entry(f.kind).or_default().push(c - f.at_ms),
            None => idle += 1,
        }
    }
    eprintln!("chaos: seed {}", size.seed);
    eprintln!(
        "chaos: {} flows x {} tasks = {tasks} tasks over {} agents, 2 replicas per service, \
         faults for {} s, all final after {:.1} s",
        size.flows,
        size.tasks,
        size.agents,
        size.seconds,
        finished_after.as_secs_f64()
    );
    for f in &faults {
        eprintln!(
            "chaos:   fault at +{:>6} ms: {:?} {}",
            f.at_ms.saturating_sub(faults[0].at_ms),
            f.kind,
            f.what
        );
    }
    for (kind, mut ms) in recover.clone() {
        ms.sort_unstable();
        eprintln!(
            "chaos: {kind:?} faults {}, recovered from {}, time to recover p50 {} ms, max {} ms",
            faults.iter().filter(|f| f.kind == kind).count(),
            ms.len(),
            percentile(&ms, 0.5),
            ms.last().copied().unwrap_or(0)
        );
    }
    eprintln!(
        "chaos: faults {} ({idle} after the last completion), tasks {tasks}, succeeded events {} \
         (tasks without one: {unrecorded}), duplicate completions {}, work runs {runs}, \
         tasks retried {retried}, attempts timed out {timed_out}, failed {failed}, \
         agents declared lost {lost}, reports rejected {rejected}",
        faults.len(),
        succeeded.values().sum::<usize>(),
        twice.len(),
    );
    eprintln!(
        "chaos: all flows final {:.1} s after the faults stopped, nothing booked {:.1} s after \
         ({booked} resources checked); events {} (duplicate ids {duplicate_ids}), flows without \
         exactly one created and one finished event {}",
        drained_in.as_secs_f64(),
        settled_in.as_secs_f64(),
        events.len(),
        flows_missing_events.len()
    );
    eprintln!(
        "chaos: agent record revisions checked {} of {last_revision} (missing {missing_revisions}, \
         rewritten {}), over-allocations {}",
        revisions.len(),
        rewritten.lock().unwrap().len(),
        over.len()
    );

    assert!(
        stuck.is_empty(),
        "flows not final (seed {}): {stuck:#?}",
        size.seed
    );
    assert!(
        not_succeeded.is_empty(),
        "tasks lost (seed {}): {not_succeeded:#?}",
        size.seed
    );
    assert!(
        twice.is_empty(),
        "completions accepted twice (seed {}): {twice:?}",
        size.seed
    );
    assert!(
        over.is_empty(),
        "over-allocations (seed {}): {over:#?}",
        size.seed
    );
    assert_eq!(
        missing_revisions, 0,
        "agent record revisions never seen, so never checked (seed {})",
        size.seed
    );
    assert!(
        rewritten.lock().unwrap().is_empty(),
        "agent record revisions written twice with different contents (seed {}): {:?}",
        size.seed,
        rewritten.lock().unwrap()
    );
    assert_eq!(
        (unrecorded, duplicate_ids),
        (0, 0),
        "succeeded tasks without their event, or events stored twice (seed {})",
        size.seed
    );
    assert!(
        flows_missing_events.is_empty(),
        "flows without exactly one created and one finished event (seed {}): {flows_missing_events:?}",
        size.seed
    );
    let nats_faults = faults.iter().any(|f| f.kind == FaultKind::Nats);
    assert!(
        (nats_faults || profile == Profile::Orchestrator) && faults.len() >= 3,
        "too few faults to mean anything: {faults:?}"
    );
    drop(agents);
    drop(replicas);
}

/// Kills the nats-server, keeps it down 1–2 s, and starts it again on the
/// same port and store.
async fn restart_nats(server: &mut NatsServer, rng: &mut Rng) -> Fault {
    let at_ms = common::now_ms();
    tokio::task::block_in_place(|| server.kill());
    tokio::time::sleep(rng.millis(1_000, 2_000)).await;
    tokio::task::block_in_place(|| server.resume());
    Fault {
        kind: FaultKind::Nats,
        what: "nats-server killed and restarted".into(),
        at_ms,
    }
}

/// How long the paused agent is frozen: well past its heartbeat-loss window
/// (3 × 300 ms, checked every 500 ms) and its task's start-to-close lease
/// (3 s, long enough that the loss decides first and the frozen agent,
/// declared lost, is not given the retry).
const PAUSE: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_paused_past_its_lease_has_its_late_reports_rejected() {
    let sys = System::start().await;
    let flow_id = FlowId::new("paused").unwrap();
    let task_id = TaskId::new("t").unwrap();

    // "sleeper" runs on one thread of its own; its handler blocks that thread
    // on the first attempt, which freezes the whole agent (heartbeats, acks,
    // reports) the way SIGSTOP freezes a process.
    let cfg = sys.server.config();
    let (stop_sleeper, sleeper_stopped) = tokio::sync::oneshot::channel::<()>();
    let sleeper = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let nats = common::nats::connect(&cfg, "agent-sleeper").await.unwrap();
            let mut opts = AgentOptions::new(AgentId::new("sleeper").unwrap()).capacity("cpu", 1.0);
            opts.heartbeat_interval = Duration::from_millis(300);
            opts.concurrency = 1;
            agent::run(
                nats,
                opts,
                |a| async move {
                    if a.attempt == 1 {
                        std::thread::sleep(PAUSE);
                    }
                    Ok(json!({"by": "sleeper"}))
                },
                async {
                    let _ = sleeper_stopped.await;
                },
            )
            .await
        })
    });
    eventually(Duration::from_secs(10), "sleeper registered", || async {
        let cap = sys.client.capacity(&Default::default()).await.ok()?;
        cap.agents
            .contains_key(&AgentId::new("sleeper").unwrap())
            .then_some(())
    })
    .await;

    let mut t = TaskSpec::new(task_id.clone());
    t.requirements = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    t.timeouts.start_to_close_ms = Some(3_000);
    t.retry = RetryPolicy {
        max_attempts: 5,
        backoff_base_ms: 100,
        ..Default::default()
    };
    let mut spec = FlowSpec::new("paused", vec![t]);
    spec.id = Some(flow_id.clone());
    sys.client.create_flow(&spec).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the sleeper running it",
        || async {
            let s = sys.client.flow_status(&flow_id).await.ok()?;
            (s.tasks[0].state == TaskState::Running).then_some(())
        },
    )
    .await;

    // While it is frozen, another agent joins and the task moves to it.
    let steady_nats = common::nats::connect(&sys.server.config(), "agent-steady")
        .await
        .unwrap();
    let mut opts = AgentOptions::new(AgentId::new("steady").unwrap()).capacity("cpu", 1.0);
    opts.heartbeat_interval = Duration::from_millis(300);
    let (stop_steady, steady_stopped) = tokio::sync::oneshot::channel::<()>();
    let steady = tokio::spawn(agent::run(
        steady_nats,
        opts,
        |_| async { Ok(json!({"by": "steady"})) },
        async {
            let _ = steady_stopped.await;
        },
    ));
    let done = eventually(PAUSE * 3, "the task done elsewhere", || async {
        let s = sys.client.flow_status(&flow_id).await.ok()?;
        s.state.is_terminal().then_some(s)
    })
    .await;
    assert_eq!(done.state, FlowState::Succeeded);
    let task = &done.tasks[0];
    assert!(task.attempt >= 2, "attempt {}", task.attempt);
    assert_eq!(task.output, json!({"by": "steady"}));

    // Thawed, the sleeper reports attempt 1 completed: rejected as stale.
    let events = eventually(PAUSE * 3, "the late report rejected", || async {
        let events = all_events(&sys.nats).await;
        events
            .iter()
            .any(|e| {
                matches!(&e.kind, EventKind::ReportRejected { attempt: 1, agent_id, .. }
                    if agent_id.as_str() == "sleeper")
            })
            .then_some(events)
    })
    .await;
    let completions: BTreeSet<(u32, Option<String>)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::TaskTransition {
                to: TaskState::Succeeded,
                attempt,
                agent_id,
                ..
            } => Some((*attempt, agent_id.as_ref().map(|a| a.to_string()))),
            _ => None,
        })
        .collect();
    assert_eq!(
        completions,
        BTreeSet::from([(task.attempt, Some("steady".to_string()))]),
        "completed once, by the agent holding the lease"
    );
    let status = sys.client.flow_status(&flow_id).await.unwrap();
    assert_eq!(status.tasks[0].output, json!({"by": "steady"}));

    let _ = stop_sleeper.send(());
    sleeper.join().unwrap().unwrap();
    let _ = stop_steady.send(());
    steady.await.unwrap().unwrap();
}

/// How long the stopped agent process works on a task: long enough that it is
/// frozen mid-task, whatever the machine's load.
const STOPPED_WORK_MS: u64 = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_process_stopped_past_its_lease_is_told_and_its_late_report_rejected() {
    let sys = System::start().await;
    let mut notices = sys
        .nats
        .subscribe(common::subject::cancel(&AgentId::new("sleeper").unwrap()))
        .await
        .unwrap();
    sys.nats.flush().await.unwrap();
    let flow_id = FlowId::new("stopped").unwrap();
    let work_ms = STOPPED_WORK_MS.to_string();
    // A real process, frozen by SIGSTOP: sockets open, nothing running.
    let mut sleeper = Process::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_coord-proc")),
        [
            "--nats-url",
            sys.server.url(),
            "agent",
            "--id",
            "sleeper",
            "--heartbeat-ms",
            "300",
            "--work-ms",
            &work_ms,
        ],
    );
    eventually(Duration::from_secs(20), "sleeper registered", || async {
        let cap = sys.client.capacity(&Default::default()).await.ok()?;
        cap.agents
            .contains_key(&AgentId::new("sleeper").unwrap())
            .then_some(())
    })
    .await;

    let mut t = TaskSpec::new(TaskId::new("t").unwrap());
    t.requirements = Requirements {
        resources: [("cpu".to_string(), 1.0)].into(),
        ..Default::default()
    };
    t.timeouts.start_to_close_ms = Some(3_000);
    t.retry = RetryPolicy {
        max_attempts: 5,
        backoff_base_ms: 100,
        ..Default::default()
    };
    let mut spec = FlowSpec::new("stopped", vec![t]);
    spec.id = Some(flow_id.clone());
    sys.client.create_flow(&spec).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the sleeper running it",
        || async {
            let s = sys.client.flow_status(&flow_id).await.ok()?;
            (s.tasks[0].state == TaskState::Running).then_some(())
        },
    )
    .await;
    sleeper.stop();
    let stopped = Instant::now();

    // While it is frozen, another agent joins and the task moves to it.
    let steady_nats = common::nats::connect(&sys.server.config(), "agent-steady")
        .await
        .unwrap();
    let mut opts = AgentOptions::new(AgentId::new("steady").unwrap()).capacity("cpu", 1.0);
    opts.heartbeat_interval = Duration::from_millis(300);
    let (stop_steady, steady_stopped) = tokio::sync::oneshot::channel::<()>();
    let steady = tokio::spawn(agent::run(
        steady_nats,
        opts,
        |_| async { Ok(json!({"by": "steady"})) },
        async {
            let _ = steady_stopped.await;
        },
    ));
    let done = eventually(
        Duration::from_secs(30),
        "the task done elsewhere",
        || async {
            let s = sys.client.flow_status(&flow_id).await.ok()?;
            s.state.is_terminal().then_some(s)
        },
    )
    .await;
    assert_eq!(done.state, FlowState::Succeeded);
    let task = &done.tasks[0];
    assert!(task.attempt >= 2, "attempt {}", task.attempt);
    assert_eq!(task.output, json!({"by": "steady"}));
    // Frozen past its lease and its work time, so it wakes with attempt 1 done.
    let frozen = Duration::from_millis(STOPPED_WORK_MS + 1_000);
    tokio::time::sleep(frozen.saturating_sub(stopped.elapsed())).await;
    assert!(sleeper.is_alive(), "the stopped agent exited");
    let frozen_for = stopped.elapsed();
    sleeper.resume();

    // It was told its attempt was taken away (it was lost, or timed out)...
    let notice = tokio::time::timeout(Duration::from_secs(10), notices.next())
        .await
        .expect("a cancel notice for the frozen agent")
        .unwrap();
    let notice: common::msg::CancelNotice = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(notice.attempt, 1, "{notice:?}");
    // ...but thawed, it may still report attempt 1 done before it reads the
    // notice (its work timer and the notice are both due): such a report is
    // rejected as stale. Either way, nothing it says counts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = all_events(&sys.nats).await;
    for e in &events {
        if let EventKind::ReportRejected {
            attempt, agent_id, ..
        } = &e.kind
        {
            if agent_id.as_str() == "sleeper" {
                assert_eq!(*attempt, 1, "{e:?}");
            }
        }
    }
    let completions: BTreeSet<(u32, Option<String>)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::TaskTransition {
                to: TaskState::Succeeded,
                attempt,
                agent_id,
                ..
            } => Some((*attempt, agent_id.as_ref().map(|a| a.to_string()))),
            _ => None,
        })
        .collect();
    assert_eq!(
        completions,
        BTreeSet::from([(task.attempt, Some("steady".to_string()))]),
        "completed once, by the agent holding the lease"
    );
    let status = sys.client.flow_status(&flow_id).await.unwrap();
    assert_eq!(status.tasks[0].output, json!({"by": "steady"}));
    assert_eq!(status.tasks[0].attempt, task.attempt);
    assert!(sleeper.is_alive(), "the resumed agent exited");
    eprintln!(
        "stopped agent: frozen {:.1} s, told ({:?}), task done by steady at attempt {}",
        frozen_for.as_secs_f64(),
        notice.code,
        task.attempt
    );
    let _ = stop_steady.send(());
    steady.await.unwrap().unwrap();
}
