//! What the chaos runs share: their size, the seeded generator, agents on
//! runtimes of their own, random flows, and the read-back of events and
//! agent records.

use std::collections::BTreeMap;
use std::future::pending;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use common::config::NatsConfig;
use common::msg::{Event, FlowSpec, Requirements, RetryPolicy, TaskSpec};
use common::{AgentId, Client, ErrorCode, FlowId, TaskId};
use coordkit::agent::{self, AgentOptions};
use futures::StreamExt;
use serde_json::json;
use testkit::Isolated;

/// The run's size and pace, from the environment.
#[derive(Debug)]
pub(crate) struct Size {
    pub(crate) flows: usize,
    pub(crate) tasks: usize,
    pub(crate) agents: usize,
    /// How long faults are injected.
    pub(crate) seconds: u64,
    /// Mean time between faults.
    pub(crate) fault_every_ms: u64,
    pub(crate) seed: u64,
    /// Each task's fixed work time: long enough that a flow (a few tasks
    /// deep) is still running when the next one arrives, so faults meet work.
    pub(crate) work_ms: u64,
}

pub(crate) fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// Which faults a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Profile {
    /// Replicas of every service, agents mid-task, and the nats-server once.
    Mixed,
    /// Orchestrator replicas only, one killed about every 2 s: the crash
    /// debris of a dying orchestrator (allocations booked for it, events it
    /// never published) must be repaired by the system.
    Orchestrator,
}

impl Size {
    pub(crate) fn from_env(profile: Profile) -> Size {
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
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub(crate) fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo) + 1))
    }
}

/// What the agents' handlers saw: who is mid-task now, and how often each
/// task's work was run (a killed agent's attempt is run again elsewhere).
#[derive(Default)]
pub(crate) struct Ledger {
    pub(crate) busy: Mutex<BTreeMap<String, usize>>,
    pub(crate) runs: Mutex<BTreeMap<(String, String), usize>>,
}

/// An agent on a runtime of its own, so that killing it ends its handlers,
/// heartbeats and connection at once, as `kill -9` ends a process.
pub(crate) fn start_agent(
    cfg: NatsConfig,
    id: &str,
    ledger: Arc<Ledger>,
    work: Duration,
) -> Isolated {
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
pub(crate) enum FaultKind {
    Replica,
    Agent,
    Nats,
}

#[derive(Debug)]
pub(crate) struct Fault {
    pub(crate) kind: FaultKind,
    pub(crate) what: String,
    pub(crate) at_ms: u64,
}

/// A random DAG of `n` tasks: each depends on up to two earlier ones.
pub(crate) fn flow_spec(index: usize, n: usize, work_ms: u64, rng: &mut Rng) -> FlowSpec {
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
pub(crate) async fn create(client: &Client, spec: &FlowSpec) {
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
pub(crate) async fn all_events(nats: &async_nats::Client) -> Vec<Event> {
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
pub(crate) type Revisions = Arc<Mutex<BTreeMap<u64, (String, Option<Vec<u8>>)>>>;

/// Records every revision of the agents bucket as it is written, and any
/// revision number seen twice with different contents.
pub(crate) fn watch_agents(kv: kv::Store, seen: Revisions, rewritten: Arc<Mutex<Vec<u64>>>) {
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
pub(crate) fn over_allocated(record: &serde_json::Value) -> Vec<(String, f64, f64)> {
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

pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
