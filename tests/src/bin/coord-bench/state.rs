//! The `state` scenario: the synchronizer's compare-and-set updates and a sync
//! point with rollback, each beside the same KV pattern done raw on a bucket
//! configured like the state bucket, in the same run.
//!
//! Only the synchronizer runs (in-process); the driver talks to it through the
//! typed client, as agents do. Rounds:
//!
//! - **one hot key**: `--writers` writers each read the document, bump their own
//!   counter and put it with the revision they read, until `--hot-updates`
//!   updates are accepted; once per policy (`reject` retries each refused put
//!   from a fresh read, `merge` and `lww` resolve stale puts in the service).
//!   Under `reject` and `merge` no increment may be lost: the run fails if the
//!   final counters differ from the accepted updates.
//! - **many keys**: `--keys` documents created, then each updated once from the
//!   revision its create returned (as an agent that keeps its revision does),
//!   `--concurrency` requests in flight.
//! - **sync point**: `--sync-agents` agents with a document, each acknowledging
//!   notices through the SDK's `SyncFollower`; initiate, every acknowledgement
//!   seen, complete, a burst of one update per agent, rollback (restore, read
//!   back, acknowledgements) and a diff against now, which must be unchanged.
//!
//! The raw rounds use the bucket directly (get, then update on the revision,
//! retried on a wrong last revision), so the ratio is the synchronizer's cost
//! over the store's. The sync point's floor is its KV operations per agent
//! priced at the raw read and write rates measured here.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, kv, stream};
use common::msg::{
    ConflictOutcome, ConflictPolicy, ScopeConfig, StateGet, StatePut, SyncAck, SyncPointInitiate,
    SyncPointState, SyncPointWait,
};
use common::nats::Bucket;
use common::{subject, AgentId, Error, ErrorCode, ScopeId, SyncPointId};
use coordkit::agent::SyncFollower;
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::ms;

/// Sizes of the `state` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct StateArgs {
    /// Concurrent writers on the one hot key.
    #[arg(long, default_value_t = 8)]
    pub(crate) writers: usize,
    /// Accepted updates per hot-key round (a quarter of them with one writer).
    #[arg(long, default_value_t = 2000)]
    pub(crate) hot_updates: usize,
    /// Documents in the many-keys rounds.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) keys: usize,
    /// Requests in flight in the many-keys rounds (the synchronizer's own fan-out is 64).
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// Participants of the sync point.
    #[arg(long, default_value_t = 1000)]
    pub(crate) sync_agents: usize,
}

/// One measured round of updates.
struct Updates {
    name: String,
    wall: Duration,
    latencies: Vec<Duration>,
    /// Puts refused or compare-and-sets lost (each one retried).
    retries: usize,
    /// Stale puts the service resolved (merged, overwritten, kept current).
    resolved: usize,
    note: String,
}

impl Updates {
    fn new(name: String, wall: Duration, mut latencies: Vec<Duration>) -> Updates {
        latencies.sort_unstable();
        Updates {
            name,
            wall,
            latencies,
            retries: 0,
            resolved: 0,
            note: String::new(),
        }
    }

    fn per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1]
    }
}

/// One phase of the sync point round.
struct Phase {
    name: &'static str,
    agents: usize,
    took: Duration,
    /// The raw KV time of the same reads and writes, when the phase is KV-bound.
    floor: Option<Duration>,
}

/// Raw rates over many keys, for pricing the sync point's KV operations.
struct RawRates {
    reads_per_s: f64,
    writes_per_s: f64,
}

impl RawRates {
    fn floor(&self, agents: usize, reads: usize, writes: usize) -> Duration {
        let n = agents as f64;
        Duration::from_secs_f64(
            n * reads as f64 / self.reads_per_s + n * writes as f64 / self.writes_per_s,
        )
    }
}

fn agent(name: String) -> anyhow::Result<AgentId> {
    Ok(AgentId::new(name)?)
}

fn scope(name: String) -> anyhow::Result<ScopeId> {
    Ok(ScopeId::new(name)?)
}

fn counters(writers: usize) -> Value {
    let map = (0..writers).map(|w| (format!("w{w}"), json!(0))).collect();
    Value::Object(map)
}

fn bump(doc: &mut Value, writer: usize) {
    let key = format!("w{writer}");
    let n = doc.get(&key).and_then(Value::as_u64).unwrap_or(0);
    doc[key] = json!(n + 1);
}

/// Fails the run when a writer's counter is not the number of its accepted updates.
fn check_counters(round: &str, doc: &Value, accepted: &[usize]) -> anyhow::Result<()> {
    for (w, want) in accepted.iter().enumerate() {
        let got = doc.get(format!("w{w}")).and_then(Value::as_u64);
        if got != Some(*want as u64) {
            bail!("{round}: writer {w} had {want} updates accepted but its counter is {got:?}: an update was lost");
        }
    }
    Ok(())
}

fn err(e: Error) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", e.code, e.message)
}

/// Runs the scenario against the server at `url`, starting the synchronizer in-process.
pub(crate) async fn run(
    nats: &async_nats::Client,
    url: &str,
    args: &StateArgs,
    run_id: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    if args.writers == 0 || args.hot_updates == 0 || args.keys == 0 || args.concurrency == 0 {
        bail!("--writers, --hot-updates, --keys and --concurrency must be at least 1");
    }
    if args.sync_agents == 0 {
        bail!("--sync-agents must be at least 1");
    }
    println!(
        "coord-bench state: {url}, {} writers × {} updates on one key, {} keys at {} in flight, sync point over {} agents",
        args.writers, args.hot_updates, args.keys, args.concurrency, args.sync_agents
    );
    let sync = testkit::start_service("synchronizer", common::config::NatsConfig::new(url));
    testkit::wait_for_service(nats, "synchronizer").await;
    let client = common::Client::new(nats.clone()).with_timeout(limit);

    let js = jetstream::new(nats.clone());
    let raw = raw_bucket(&js, run_id).await?;
    // Each round, and the index of the raw round it is compared with.
    let mut rounds: Vec<(Updates, Option<usize>)> = Vec::new();
    let serial = args.hot_updates.div_ceil(4);
    rounds.push((raw_hot(&raw, 1, serial).await?, None));
    rounds.push((raw_hot(&raw, args.writers, args.hot_updates).await?, None));
    let (raw_create, raw_update, raw_read) = raw_many(&raw, args.keys, args.concurrency).await?;
    let rates = RawRates {
        reads_per_s: raw_read.per_sec(),
        writes_per_s: raw_update.per_sec(),
    };
    rounds.push((raw_create, None));
    rounds.push((raw_update, None));
    rounds.push((raw_read, None));

    rounds.push((
        hot(&client, run_id, ConflictPolicy::Reject, 1, serial).await?,
        Some(0),
    ));
    for policy in [
        ConflictPolicy::Reject,
        ConflictPolicy::Merge,
        ConflictPolicy::Lww,
    ] {
        let r = hot(&client, run_id, policy, args.writers, args.hot_updates).await?;
        rounds.push((r, Some(1)));
    }
    let (create, update) = many(&client, run_id, args.keys, args.concurrency).await?;
    rounds.push((create, Some(2)));
    rounds.push((update, Some(3)));

    let phases = sync_point(nats, url, &client, run_id, args, &rates, limit).await?;

    print_updates(&rounds);
    print_phases(&phases);

    let _ = tokio::time::timeout(Duration::from_secs(10), sync.stop()).await;
    let _ = js.delete_key_value(raw.name.as_str()).await;
    Ok(())
}

/// A bucket configured like the state bucket (file storage, history 64, every
/// write republished), private to this run.
async fn raw_bucket(js: &jetstream::Context, run_id: u64) -> anyhow::Result<kv::Store> {
    let mut cfg = Bucket::State.config(1);
    cfg.bucket = format!("bench_kv_{run_id}");
    cfg.republish = Some(stream::Republish {
        source: format!("$KV.{}.>", cfg.bucket),
        destination: format!("bench.{run_id}.kvwatch.>"),
        headers_only: false,
    });
    js.create_key_value(cfg)
        .await
        .context("failed to create the raw KV bucket")
}

/// Shares `total` updates between writers: each call takes one, until none is left.
fn take(left: &AtomicUsize) -> bool {
    left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// What one hot-key writer did.
#[derive(Default)]
struct Writer {
    latencies: Vec<Duration>,
    accepted: usize,
    retries: usize,
    merged: usize,
    overwritten: usize,
    kept: usize,
}

/// One round from its writers' results (`done[w]` is writer `w`'s).
fn hot_round(name: String, wall: Duration, done: &[Writer]) -> Updates {
    let mut r = Updates::new(
        name,
        wall,
        done.iter()
            .flat_map(|w| w.latencies.iter().copied())
            .collect(),
    );
    r.retries = done.iter().map(|w| w.retries).sum();
    r.resolved = done.iter().map(|w| w.merged + w.overwritten + w.kept).sum();
    r
}

/// Read-modify-write on one raw KV key, retried on a lost compare-and-set.
async fn raw_hot(kv: &kv::Store, writers: usize, total: usize) -> anyhow::Result<Updates> {
    let name = format!("raw KV, one key, {writers} writer(s)");
    let key = format!("hot{writers}");
    kv.create(&key, serde_json::to_vec(&counters(writers))?.into())
        .await
        .context("raw create of the hot key")?;
    let left = AtomicUsize::new(total);
    let started = Instant::now();
    let done = futures::future::try_join_all((0..writers).map(|w| {
        let (left, key) = (&left, &key);
        async move {
            let mut me = Writer::default();
            while take(left) {
                let t = Instant::now();
                loop {
                    let Some(entry) = kv.entry(key).await? else {
                        bail!("raw hot key vanished");
                    };
                    let mut doc: Value = serde_json::from_slice(&entry.value)?;
                    bump(&mut doc, w);
                    let body = serde_json::to_vec(&doc)?.into();
                    match common::nats::write_at(kv, key, body, Some(entry.revision)).await? {
                        common::nats::Written::Stored(_) => break,
                        common::nats::Written::Lost => me.retries += 1,
                    }
                }
                me.latencies.push(t.elapsed());
                me.accepted += 1;
            }
            anyhow::Ok(me)
        }
    }))
    .await?;
    let wall = started.elapsed();
    let Some(last) = kv.entry(&key).await? else {
        bail!("raw hot key vanished");
    };
    let doc: Value = serde_json::from_slice(&last.value)?;
    let accepted: Vec<usize> = done.iter().map(|w| w.accepted).collect();
    check_counters(&name, &doc, &accepted)?;
    let mut r = hot_round(name, wall, &done);
    r.note = "no update lost".into();
    Ok(r)
}

fn policy_name(p: ConflictPolicy) -> &'static str {
    match p {
        ConflictPolicy::Reject => "reject",
        ConflictPolicy::Lww => "lww",
        ConflictPolicy::Merge => "merge",
    }
}

/// Read-modify-write on one document through the synchronizer: get, bump this
/// writer's counter, put with the revision read. A refused put (`reject`) is
/// retried from a fresh read; `merge` and `lww` resolve stale puts themselves.
async fn hot(
    client: &common::Client,
    run_id: u64,
    policy: ConflictPolicy,
    writers: usize,
    total: usize,
) -> anyhow::Result<Updates> {
    let pname = policy_name(policy);
    let name = format!("synchronizer, {pname}, one key, {writers} writer(s)");
    let s = scope(format!("bench-{run_id}-{pname}-{writers}"))?;
    client
        .scope_set(&ScopeConfig {
            enforce_schema: false,
            scope: s.clone(),
            policy,
            merge_fallback: Default::default(),
            schema: None,
            invariants: Vec::new(),
            shared: Vec::new(),
        })
        .await
        .map_err(err)?;
    let a = agent("hot".into())?;
    let put = |expected_revision, doc| StatePut {
        agent_id: a.clone(),
        expected_revision,
        doc,
        scope: s.clone(),
        clock: None,
    };
    let get = StateGet {
        agent_id: a.clone(),
        scope: s.clone(),
        revision: None,
    };
    client
        .state_put(&put(0, counters(writers)))
        .await
        .map_err(err)?;
    let left = AtomicUsize::new(total);
    let started = Instant::now();
    let done = futures::future::try_join_all((0..writers).map(|w| {
        let (left, put, get) = (&left, &put, &get);
        async move {
            let mut me = Writer::default();
            while take(left) {
                let t = Instant::now();
                loop {
                    let current = client.state_get_at(get).await.map_err(err)?;
                    let mut doc = current.doc;
                    bump(&mut doc, w);
                    match client.state_put(&put(current.revision, doc)).await {
                        Ok(stored) => {
                            match stored.resolution.map(|r| r.outcome) {
                                Some(ConflictOutcome::Merged) => me.merged += 1,
                                Some(ConflictOutcome::Overwritten) => me.overwritten += 1,
                                Some(ConflictOutcome::KeptCurrent) => me.kept += 1,
                                Some(ConflictOutcome::Rejected) | None => {}
                            }
                            break;
                        }
                        Err(e)
                            if e.code == ErrorCode::Conflict
                                && policy == ConflictPolicy::Reject =>
                        {
                            me.retries += 1;
                        }
                        Err(e) => return Err(err(e)),
                    }
                }
                me.latencies.push(t.elapsed());
                me.accepted += 1;
            }
            anyhow::Ok(me)
        }
    }))
    .await?;
    let wall = started.elapsed();
    let last = client.state_get_at(&get).await.map_err(err)?;
    let mut r = hot_round(name.clone(), wall, &done);
    if policy == ConflictPolicy::Lww {
        // The later clock wins whole documents: resolved puts drop increments by design.
        let overwritten: usize = done.iter().map(|w| w.overwritten).sum();
        let kept: usize = done.iter().map(|w| w.kept).sum();
        r.note = format!("{overwritten} overwrote, {kept} kept the stored document");
    } else {
        let accepted: Vec<usize> = done.iter().map(|w| w.accepted).collect();
        check_counters(&name, &last.doc, &accepted)?;
        r.note = "no update lost".into();
    }
    Ok(r)
}

/// Creates `keys` raw entries, updates each once from the revision its create
/// returned, then reads each back.
async fn raw_many(
    kv: &kv::Store,
    keys: usize,
    concurrency: usize,
) -> anyhow::Result<(Updates, Updates, Updates)> {
    let body = |n: u64, i: usize| serde_json::to_vec(&json!({"n": n, "agent": format!("m{i}")}));
    let started = Instant::now();
    let created: Vec<(Duration, u64)> = futures::stream::iter(0..keys)
        .map(|i| async move {
            let t = Instant::now();
            let rev = kv.create(format!("m{i}"), body(0, i)?.into()).await?;
            anyhow::Ok((t.elapsed(), rev))
        })
        .buffered(concurrency)
        .try_collect()
        .await?;
    let create = Updates::new(
        format!("raw KV, create {keys} keys"),
        started.elapsed(),
        created.iter().map(|(d, _)| *d).collect(),
    );
    let started = Instant::now();
    let updated: Vec<Duration> = futures::stream::iter(created.iter().enumerate())
        .map(|(i, (_, rev))| async move {
            let t = Instant::now();
            kv.update(format!("m{i}"), body(1, i)?.into(), *rev).await?;
            anyhow::Ok(t.elapsed())
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let update = Updates::new(
        format!("raw KV, update {keys} keys"),
        started.elapsed(),
        updated,
    );
    let started = Instant::now();
    let read: Vec<Duration> = futures::stream::iter(0..keys)
        .map(|i| async move {
            let t = Instant::now();
            let Some(entry) = kv.entry(format!("m{i}")).await? else {
                bail!("raw key m{i} vanished");
            };
            let _: Value = serde_json::from_slice(&entry.value)?;
            anyhow::Ok(t.elapsed())
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let read = Updates::new(format!("raw KV, read {keys} keys"), started.elapsed(), read);
    Ok((create, update, read))
}

/// Creates `keys` documents through the synchronizer, then updates each once
/// from the revision its create returned (so no put is stale).
async fn many(
    client: &common::Client,
    run_id: u64,
    keys: usize,
    concurrency: usize,
) -> anyhow::Result<(Updates, Updates)> {
    let s = scope(format!("bench-{run_id}-many"))?;
    let ids = (0..keys)
        .map(|i| agent(format!("k{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let put = |a: &AgentId, expected_revision, n: u64| StatePut {
        agent_id: a.clone(),
        expected_revision,
        doc: json!({"n": n, "agent": a}),
        scope: s.clone(),
        clock: None,
    };
    let started = Instant::now();
    let created: Vec<(Duration, u64)> = futures::stream::iter(&ids)
        .map(|a| {
            let req = put(a, 0, 0);
            async move {
                let t = Instant::now();
                let stored = client.state_put(&req).await.map_err(err)?;
                anyhow::Ok((t.elapsed(), stored.revision))
            }
        })
        .buffered(concurrency)
        .try_collect()
        .await?;
    let create = Updates::new(
        format!("synchronizer, create {keys} documents"),
        started.elapsed(),
        created.iter().map(|(d, _)| *d).collect(),
    );
    let started = Instant::now();
    let updated: Vec<Duration> = futures::stream::iter(ids.iter().zip(&created))
        .map(|(a, (_, rev))| {
            let req = put(a, *rev, 1);
            async move {
                let t = Instant::now();
                let stored = client.state_put(&req).await.map_err(err)?;
                if stored.resolution.is_some() {
                    bail!("{a}: an update from the current revision was resolved as a conflict");
                }
                anyhow::Ok(t.elapsed())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let update = Updates::new(
        format!("synchronizer, update {keys} documents"),
        started.elapsed(),
        updated,
    );
    Ok((create, update))
}

/// Waits until `want` acknowledgements of `notice` went past; returns when the last did.
async fn acks_seen(
    acks: &mut mpsc::UnboundedReceiver<(SyncPointId, Instant)>,
    notice: &SyncPointId,
    want: usize,
    deadline: Instant,
) -> anyhow::Result<Instant> {
    let mut seen = 0;
    let mut last = Instant::now();
    while seen < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let (id, at) = tokio::time::timeout(left, acks.recv())
            .await
            .with_context(|| format!("{seen} of {want} acknowledgements seen in time"))?
            .context("acknowledgement watcher ended")?;
        if id == *notice {
            seen += 1;
            last = at;
        }
    }
    Ok(last)
}

/// Connections the acknowledging agents share (each agent would have its own;
/// a thousand connections would measure the driver, not the synchronizer).
const FOLLOWER_CONNECTIONS: usize = 8;

/// A sync point over `--sync-agents` agents: initiate, acknowledgements,
/// complete, a burst of updates, rollback, diff.
async fn sync_point(
    nats: &async_nats::Client,
    url: &str,
    client: &common::Client,
    run_id: u64,
    args: &StateArgs,
    rates: &RawRates,
    limit: Duration,
) -> anyhow::Result<Vec<Phase>> {
    let n = args.sync_agents;
    let s = scope(format!("bench-{run_id}-sp"))?;
    let agents = (0..n)
        .map(|i| agent(format!("sp{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let put = |a: &AgentId, expected_revision, step: u64| StatePut {
        agent_id: a.clone(),
        expected_revision,
        doc: json!({"step": step, "agent": a}),
        scope: s.clone(),
        clock: None,
    };
    futures::stream::iter(&agents)
        .map(|a| {
            let req = put(a, 0, 0);
            async move { client.state_put(&req).await.map_err(err) }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;

    let mut conns = Vec::new();
    for _ in 0..FOLLOWER_CONNECTIONS.min(n) {
        conns.push(async_nats::connect(url).await?);
    }
    let followers: Vec<SyncFollower> = futures::stream::iter(agents.iter().enumerate())
        .map(|(i, a)| SyncFollower::subscribe(conns[i % conns.len()].clone(), a.clone()))
        .buffered(args.concurrency)
        .try_collect()
        .await
        .map_err(err)?;
    let tasks: Vec<_> = followers
        .into_iter()
        .map(|f| tokio::spawn(f.run(|_| async { true }, std::future::pending::<()>())))
        .collect();
    let mut ack_sub = nats.subscribe(subject::SYNC_ACK_ALL).await?;
    nats.flush().await?;
    let (tx, mut acks) = mpsc::unbounded_channel();
    let watcher = tokio::spawn(async move {
        while let Some(msg) = ack_sub.next().await {
            if let Ok(ack) = serde_json::from_slice::<SyncAck>(&msg.payload) {
                if tx.send((ack.notice_id, Instant::now())).is_err() {
                    break;
                }
            }
        }
    });
    let wait = |id: &SyncPointId| SyncPointWait {
        sync_point_id: id.clone(),
        timeout_ms: limit.as_millis() as u64,
    };

    let t = Instant::now();
    let sp = client
        .syncpoint_initiate(&SyncPointInitiate {
            scope: s.clone(),
            agents: agents.clone(),
            label: "coord-bench".into(),
        })
        .await
        .map_err(err)?;
    let initiate = t.elapsed();
    if sp.cut.len() != n {
        bail!("the cut holds {} agents, not {n}", sp.cut.len());
    }
    let acked = acks_seen(&mut acks, &sp.id, n, t + limit).await? - t;

    let t = Instant::now();
    let done = client
        .syncpoint_complete(&wait(&sp.id))
        .await
        .map_err(err)?;
    let complete = t.elapsed();
    if done.state != SyncPointState::Completed || done.acked.len() != n {
        bail!(
            "sync point {:?} with {} of {n} acknowledgements; missing {:?}",
            done.state,
            done.acked.len(),
            done.missing
        );
    }

    let t = Instant::now();
    futures::stream::iter(&agents)
        .map(|a| {
            let req = put(a, sp.cut.get(a).copied().unwrap_or(0), 1);
            async move { client.state_put(&req).await.map_err(err) }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    let burst = t.elapsed();

    let t = Instant::now();
    let rb = client
        .syncpoint_rollback(&wait(&sp.id))
        .await
        .map_err(err)?;
    let rollback = t.elapsed();
    let unacked = rb.agents.iter().filter(|r| !r.acked).count();
    if !rb.verified || !rb.mismatches.is_empty() || rb.agents.len() != n || unacked > 0 {
        bail!(
            "rollback verified={} mismatches={:?}, {unacked} of {} unacknowledged",
            rb.verified,
            rb.mismatches,
            rb.agents.len()
        );
    }

    let t = Instant::now();
    let diff = client.syncpoint_diff(&sp.id).await.map_err(err)?;
    let diffed = t.elapsed();
    if !diff.unchanged || diff.agents.len() != n {
        bail!("after rollback the state differs from the cut");
    }

    watcher.abort();
    for task in tasks {
        task.abort();
    }
    let phase = |name, took, floor| Phase {
        name,
        agents: n,
        took,
        floor,
    };
    Ok(vec![
        phase(
            "initiate (cut: read, store; notify)",
            initiate,
            Some(rates.floor(n, 1, 1)),
        ),
        phase(
            "every acknowledgement published (from initiate)",
            acked,
            None,
        ),
        phase(
            "complete (every acknowledgement stored and read)",
            complete,
            Some(rates.floor(n, 1, 0)),
        ),
        phase(
            "burst: one update per agent",
            burst,
            Some(rates.floor(n, 0, 1)),
        ),
        phase(
            "rollback (restore, read back, notify, acknowledged)",
            rollback,
            Some(rates.floor(n, 3, 1)),
        ),
        phase(
            "diff against now (unchanged)",
            diffed,
            Some(rates.floor(n, 2, 0)),
        ),
    ])
}

fn print_updates(rounds: &[(Updates, Option<usize>)]) {
    println!();
    println!("| round | updates | wall s | updates/s | retries | resolved | p50 ms | p99 ms | max ms | updates/s vs raw KV | p99 vs raw KV | notes |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for (r, base) in rounds {
        let (rate, p99) = match base.and_then(|b| rounds.get(b)).map(|(b, _)| b) {
            Some(b) => (
                format!("{:.1} %", 100.0 * r.per_sec() / b.per_sec()),
                format!(
                    "{:.1}×",
                    r.pct(0.99).as_secs_f64() / b.pct(0.99).as_secs_f64().max(1e-9)
                ),
            ),
            None => ("(baseline)".to_owned(), "(baseline)".to_owned()),
        };
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {} | {rate} | {p99} | {} |",
            r.name,
            r.latencies.len(),
            r.wall.as_secs_f64(),
            r.per_sec(),
            r.retries,
            r.resolved,
            ms(r.pct(0.50)),
            ms(r.pct(0.99)),
            ms(r.pct(1.0)),
            r.note
        );
    }
}

fn print_phases(phases: &[Phase]) {
    println!();
    println!("| sync point phase | agents | ms | agents/s | raw KV floor ms | vs floor |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for p in phases {
        let (floor, ratio) = match p.floor {
            Some(f) => (
                ms(f),
                format!("{:.1}×", p.took.as_secs_f64() / f.as_secs_f64().max(1e-9)),
            ),
            None => ("—".to_owned(), "—".to_owned()),
        };
        println!(
            "| {} | {} | {} | {:.0} | {floor} | {ratio} |",
            p.name,
            p.agents,
            ms(p.took),
            p.agents as f64 / p.took.as_secs_f64().max(f64::MIN_POSITIVE),
        );
    }
}
