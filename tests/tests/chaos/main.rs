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
//! `pauses` holds two more: one pauses an agent (its whole runtime frozen, heartbeats
//! included) past its lease: its late reports are rejected as stale and the
//! task completes once, elsewhere. The other does the same to an agent that is
//! a process of its own (`coord-proc agent`), frozen with `SIGSTOP` and
//! thawed with `SIGCONT`.

// Test code: failing fast with a clear message is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use common::msg::{EventKind, FlowSpec, FlowState, TaskState};
use common::{Client, FlowId, TaskId};
use futures::StreamExt;
use testkit::{eventually, wait_for_service, Isolated, NatsServer, Replica, SERVICES};

mod kit;
mod pauses;

use kit::*;

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
