//! The allocator's ledger under replica kills, checked from its history.
//!
//! Two allocator replicas serve C clients (8 by default), each doing N random
//! allocate/release operations (2,000 by default) against a few agents with
//! small capacities, while a replica is killed at random intervals (as
//! `kill -9` would: its runtime dropped) and a new one started. Clients
//! behave as real ones must: allocation ids are their own, an unanswered
//! request is retried under the same id until it gets an answer, and an
//! allocation whose request went unanswered and was then refused is released
//! to be sure. Every attempt is recorded with its outcome (granted, released,
//! typed error, or indeterminate), and every revision of every agent record is
//! recorded by a KV watch started before the run. The checker
//! ([`checker::check`], unit-tested on bad histories below it) then proves that
//! no agent was ever over capacity, no allocation was lost, doubled or brought
//! back after its release, and the end state is what the clients were told.
//!
//! A second test runs one of the two replicas as a process of its own
//! (`coord-proc allocator`) and freezes it with `SIGSTOP` mid-run, for several
//! client timeouts, then thaws it: the other replica carries on meanwhile, and
//! what the thawed one then does with the requests it read late is checked
//! the same way.
//!
//! Sized by `ALLOC_HISTORY_CLIENTS`, `ALLOC_HISTORY_OPS`,
//! `ALLOC_HISTORY_STOP_OPS`, `ALLOC_HISTORY_KILL_EVERY_MS` and
//! `ALLOC_HISTORY_SEED` (docs/RELIABILITY.md).

// Test code: failing fast with a clear message is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod checker;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use checker::{Attempt, Op, Outcome, Record, Revision};
use common::msg::{AllocateRequest, RegisterAgent, ReleaseRequest, Requirements};
use common::{AgentId, AllocationId, Client, Error, ErrorCode};
use futures::StreamExt;
use testkit::{eventually, wait_for_service, NatsServer, Process, Replica};

/// Agents, each with this much cpu; clients ask for 1 or 2 and hold up to
/// [`MAX_HELD`] each, so together they want about three times what there is.
const AGENTS: usize = 3;
const AGENT_CPU: f64 = 4.0;
const MAX_HELD: usize = 3;
/// How long a client waits for an answer before counting the attempt
/// indeterminate and retrying.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a number")),
        Err(_) => default,
    }
}

/// splitmix64: small and seeded.
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
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

type History = Arc<Mutex<Vec<Attempt>>>;

/// What an error means for the client: a typed refusal did nothing; no answer,
/// or a service that could not reach its store, may have done it.
fn outcome_of(e: &Error) -> Outcome {
    match e.code {
        ErrorCode::Timeout | ErrorCode::Unavailable => Outcome::Indeterminate,
        code => Outcome::Refused(code.to_string()),
    }
}

/// One client: random allocations and releases, each retried until it is
/// answered (or `give_up` passes, which leaves it unsettled).
struct Driver {
    index: usize,
    client: Client,
    history: History,
    give_up: Instant,
    /// Held allocations: id → the agent the grant named.
    held: Vec<(AllocationId, AgentId)>,
}

impl Driver {
    async fn attempt<T>(
        &self,
        op: Op,
        call: impl std::future::Future<Output = Result<T, Error>>,
        ok: impl FnOnce(&T) -> Outcome,
    ) -> Outcome {
        let invoked_us = now_us();
        let outcome = match call.await {
            Ok(v) => ok(&v),
            Err(e) => outcome_of(&e),
        };
        self.history.lock().unwrap().push(Attempt {
            client: self.index,
            op,
            invoked_us,
            completed_us: now_us(),
            outcome: outcome.clone(),
        });
        outcome
    }

    async fn allocate(&mut self, id: AllocationId, cpu: f64) {
        let req = AllocateRequest {
            owner: format!("client-{}", self.index),
            requirements: Requirements {
                resources: [("cpu".to_string(), cpu)].into(),
                ..Default::default()
            },
            priority: 0,
            allocation_id: Some(id.clone()),
            deadline_ms: None,
            task: None,
            ttl_ms: None,
        };
        let mut unanswered = false;
        while Instant::now() < self.give_up {
            let op = Op::Allocate { id: id.to_string() };
            let outcome = self
                .attempt(op, self.client.allocate(&req), |a| Outcome::Granted {
                    agent: a.agent_id.to_string(),
                })
                .await;
            match outcome {
                Outcome::Granted { agent } => {
                    self.held.push((id, AgentId::new(agent).unwrap()));
                    return;
                }
                Outcome::Indeterminate => unanswered = true,
                Outcome::Refused(code) if code == ErrorCode::Conflict.as_str() => {}
                Outcome::Refused(_) | Outcome::Released(_) => {
                    // An earlier unanswered try may have booked it after all.
                    if unanswered {
                        self.release(id, None).await;
                    }
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn release(&mut self, id: AllocationId, agent: Option<AgentId>) {
        let req = ReleaseRequest {
            allocation_id: id.clone(),
            agent_id: agent,
        };
        while Instant::now() < self.give_up {
            let op = Op::Release { id: id.to_string() };
            let outcome = self
                .attempt(op, self.client.release(&req), |r| {
                    Outcome::Released(r.released)
                })
                .await;
            match outcome {
                Outcome::Indeterminate => {}
                Outcome::Refused(code) if code == ErrorCode::Conflict.as_str() => {}
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn run(mut self, ops: usize, mut rng: Rng) {
        for n in 0..ops {
            let grab = self.held.is_empty() || (self.held.len() < MAX_HELD && rng.below(2) == 0);
            if grab {
                let id = AllocationId::new(format!("c{}-{n}", self.index)).unwrap();
                let cpu = (1 + rng.below(2)) as f64;
                self.allocate(id, cpu).await;
            } else {
                let i = rng.below(self.held.len() as u64) as usize;
                let (id, agent) = self.held.swap_remove(i);
                self.release(id, Some(agent)).await;
            }
        }
    }
}

/// Records every revision of the agents bucket with the time the server
/// stored it.
fn watch_agents(kv: kv::Store, seen: Arc<Mutex<BTreeMap<u64, Revision>>>) {
    tokio::spawn(async move {
        let mut watch = kv.watch_all_from_revision(1).await.unwrap();
        while let Some(entry) = watch.next().await {
            let Ok(entry) = entry else { continue };
            let record = matches!(entry.operation, kv::Operation::Put).then(|| {
                let v: serde_json::Value = serde_json::from_slice(&entry.value).unwrap();
                let amounts = |m: &serde_json::Value| -> BTreeMap<String, f64> {
                    m.as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, n)| (k.clone(), n.as_f64().unwrap_or(0.0)))
                        .collect()
                };
                Record {
                    capacity: amounts(&v["capacity"]),
                    allocations: v["allocations"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(id, a)| (id.clone(), amounts(&a["resources"])))
                        .collect(),
                }
            });
            let at_us = (entry.created.unix_timestamp_nanos() / 1_000) as u64;
            seen.lock().unwrap().insert(
                entry.revision,
                Revision {
                    revision: entry.revision,
                    at_us,
                    agent: entry.key,
                    record,
                },
            );
        }
    });
}

/// What one run needs besides the replicas: the checker's connection, the
/// watch's revisions, and the clients' history.
struct Run {
    nats: async_nats::Client,
    cfg: common::config::NatsConfig,
    seen: Arc<Mutex<BTreeMap<u64, Revision>>>,
    history: History,
}

impl Run {
    /// Watches the agents bucket from its first revision, then registers the
    /// agents (the allocator must be up).
    async fn start(cfg: common::config::NatsConfig) -> Run {
        let nats = common::nats::connect(&cfg, "alloc-history").await.unwrap();
        wait_for_service(&nats, "allocator").await;
        let js = jetstream::new(nats.clone());
        let agents_kv = js.get_key_value(common::nats::KV_AGENTS).await.unwrap();
        let seen: Arc<Mutex<BTreeMap<u64, Revision>>> = Arc::default();
        watch_agents(agents_kv, seen.clone());
        let client = Client::new(nats.clone()).with_timeout(REQUEST_TIMEOUT);
        for i in 0..AGENTS {
            let req = RegisterAgent {
                agent_id: AgentId::new(format!("agent{i}")).unwrap(),
                capabilities: vec![],
                labels: Default::default(),
                capacity: [("cpu".to_string(), AGENT_CPU)].into(),
                // Never lost in this test: only releases free capacity.
                heartbeat_interval_ms: 3_600_000,
            };
            // Registering is idempotent: retry through a replica's death.
            eventually(Duration::from_secs(30), "agent registered", || async {
                client.register_agent(&req).await.ok()
            })
            .await;
        }
        Run {
            nats,
            cfg,
            seen,
            history: Arc::default(),
        }
    }

    /// Starts `clients` clients of `ops` operations each, each on a
    /// connection of its own, as separate processes would be.
    async fn clients(
        &self,
        clients: usize,
        ops: usize,
        give_up: Instant,
        rng: &mut Rng,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut drivers = Vec::new();
        for index in 0..clients {
            let nats = common::nats::connect(&self.cfg, &format!("alloc-history-{index}"))
                .await
                .unwrap();
            let driver = Driver {
                index,
                client: Client::new(nats).with_timeout(REQUEST_TIMEOUT),
                history: self.history.clone(),
                give_up,
                held: Vec::new(),
            };
            drivers.push(tokio::spawn(driver.run(ops, Rng(rng.next()))));
        }
        drivers
    }

    /// Waits until the watch has seen every revision the bucket has, prints
    /// the figures and checks the history; fails the test on any violation.
    async fn check(&self, what: &str, elapsed: Duration, seed: u64) -> checker::Summary {
        let js = jetstream::new(self.nats.clone());
        let last = js
            .get_stream(format!("KV_{}", common::nats::KV_AGENTS))
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .last_sequence;
        eventually(
            Duration::from_secs(30),
            "the watch to see every revision",
            || async { (self.seen.lock().unwrap().len() as u64 >= last).then_some(()) },
        )
        .await;
        let revisions: Vec<Revision> = self.seen.lock().unwrap().values().cloned().collect();
        let history = self.history.lock().unwrap().clone();
        let count = |f: &dyn Fn(&Outcome) -> bool| history.iter().filter(|a| f(&a.outcome)).count();
        eprintln!(
            "{what}: {} attempts in {:.1} s: {} granted, {} refused, {} released \
             (of which {} found nothing), {} indeterminate; {} agent record revisions \
             checked (last {last})",
            history.len(),
            elapsed.as_secs_f64(),
            count(&|o| matches!(o, Outcome::Granted { .. })),
            count(&|o| matches!(o, Outcome::Refused(_))),
            count(&|o| matches!(o, Outcome::Released(_))),
            count(&|o| *o == Outcome::Released(false)),
            count(&|o| *o == Outcome::Indeterminate),
            revisions.len(),
        );
        let (summary, violations) = checker::check(&history, &revisions);
        eprintln!("{what}: {summary:?}");
        assert!(
            violations.is_empty(),
            "{what}: the history is inconsistent (seed {seed}), {} violations: {:#?}",
            violations.len(),
            &violations[..violations.len().min(50)],
        );
        summary
    }
}

fn seed_from_env() -> u64 {
    env_u64(
        "ALLOC_HISTORY_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            & 0xffff_ffff,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocator_history_under_replica_kills_has_no_overcommit_and_no_lost_or_doubled_release() {
    let clients = env_u64("ALLOC_HISTORY_CLIENTS", 8) as usize;
    let ops = env_u64("ALLOC_HISTORY_OPS", 2_000) as usize;
    let kill_every_ms = env_u64("ALLOC_HISTORY_KILL_EVERY_MS", 2_000);
    let limit = Duration::from_secs(env_u64("ALLOC_HISTORY_LIMIT_SECONDS", 600));
    let seed = seed_from_env();
    eprintln!(
        "alloc-history: {clients} clients x {ops} ops, a kill every ~{kill_every_ms} ms \
         (rerun with ALLOC_HISTORY_SEED={seed})"
    );
    let mut rng = Rng(seed);
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let cfg = server.config();
    let mut replicas: Vec<Replica> = (0..2)
        .map(|_| Replica::start("allocator", cfg.clone()))
        .collect();
    let run = Run::start(cfg.clone()).await;
    let started = Instant::now();
    let drivers = run.clients(clients, ops, started + limit, &mut rng).await;

    // Kill a random replica every so often and start a new one, until the
    // clients are done.
    let mut kills = 0;
    loop {
        let wait = Duration::from_millis(kill_every_ms / 2 + rng.below(kill_every_ms + 1));
        let finished = tokio::time::timeout(wait, async {
            while drivers.iter().any(|d| !d.is_finished()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        if finished.is_ok() {
            break;
        }
        let i = rng.below(replicas.len() as u64) as usize;
        replicas.swap_remove(i).kill();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.below(500))).await;
        replicas.push(Replica::start("allocator", cfg.clone()));
    }
    for d in drivers {
        d.await.unwrap();
    }
    let elapsed = started.elapsed();
    eprintln!(
        "alloc-history: seed {seed}: {} ops by {clients} clients in {:.1} s, {kills} replica kills",
        clients * ops,
        elapsed.as_secs_f64(),
    );
    let summary = run.check("alloc-history", elapsed, seed).await;
    assert_eq!(
        summary.unsettled, 0,
        "operations left unanswered when the clients gave up (seed {seed})"
    );
    assert!(
        kills >= 1,
        "no replica was killed: the run was too short to mean anything"
    );
    drop(replicas);
}

/// How long the stopped replica stays frozen: several client timeouts, so
/// requests pile up unread in its socket and clients retry them elsewhere.
const FROZEN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allocator_replica_stopped_mid_run_and_resumed_does_nothing_twice() {
    let clients = env_u64("ALLOC_HISTORY_CLIENTS", 8) as usize;
    let ops = env_u64("ALLOC_HISTORY_STOP_OPS", 300) as usize;
    let seed = seed_from_env();
    eprintln!("stopped-replica: {clients} clients x {ops} ops (ALLOC_HISTORY_SEED={seed})");
    let mut rng = Rng(seed);
    common::telemetry::init_for_tests();
    let server = NatsServer::start();
    let cfg = server.config();
    // One replica a process of its own, the one that is frozen; it serves
    // alone first, so it is known to be up before the other starts.
    let frozen = Process::spawn(
        std::path::Path::new(env!("CARGO_BIN_EXE_coord-proc")),
        ["--nats-url", server.url(), "allocator"],
    );
    let run = Run::start(cfg.clone()).await;
    let steady = Replica::start("allocator", cfg.clone());
    let started = Instant::now();
    let drivers = run
        .clients(clients, ops, started + Duration::from_secs(300), &mut rng)
        .await;

    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(
        drivers.iter().any(|d| !d.is_finished()),
        "the clients finished before the replica was frozen: give them more ops"
    );
    frozen.stop();
    let stopped_at = started.elapsed();
    tokio::time::sleep(FROZEN).await;
    let during = run.history.lock().unwrap().len();
    frozen.resume();
    for d in drivers {
        d.await.unwrap();
    }
    // Let the thawed replica work off what it read late before looking.
    tokio::time::sleep(REQUEST_TIMEOUT).await;
    let elapsed = started.elapsed();
    eprintln!(
        "stopped-replica: seed {seed}: {} ops by {clients} clients in {:.1} s, the process \
         replica frozen {:.1} s from +{:.1} s ({during} attempts done by then)",
        clients * ops,
        elapsed.as_secs_f64(),
        FROZEN.as_secs_f64(),
        stopped_at.as_secs_f64(),
    );
    // The requests the frozen replica read only once thawed came long after
    // their clients stopped waiting, retried them elsewhere and perhaps
    // released what the retry got. Carried out, they would bring allocations
    // back after their release ("booked again"); their deadline has them
    // refused instead.
    let summary = run.check("stopped-replica", elapsed, seed).await;
    assert_eq!(
        summary.unsettled, 0,
        "operations left unanswered (seed {seed})"
    );
    let indeterminate = run
        .history
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.outcome == Outcome::Indeterminate)
        .count();
    assert!(
        indeterminate > 0,
        "no request went unanswered: the frozen replica took no part"
    );
    drop(steady);
    drop(frozen);
}
