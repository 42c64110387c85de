//! The allocator's NATS adapter.
//!
//! Agents (with their live allocations and reservations) live in the
//! `coord_agents` KV bucket. Each replica keeps a cache of that bucket, fed by a
//! KV watch, and places from it; every booking is a compare-and-set against the
//! revision the decision was made on. A stale cache therefore costs a retry,
//! never an over-allocation, and the happy path is one KV write per allocation.
//!
//! Every replica also runs a sweep ([`sweep`]) that marks agents lost when they
//! miss their heartbeats, ends expired reservations and rolls back gang members
//! whose booking replica died. The sweep's writes are compare-and-sets too, so
//! replicas racing on the same agent produce one transition and one event.

mod agents;
mod booking;
mod cache;
mod jsproxy;
mod lanes;
mod ops;
mod paths;
mod quota;
mod reconcile;
mod records;
mod sweep;

use std::future::Future;
use std::sync::Arc;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, kv};
use common::msg::{
    AdjustRequest, CancelReservation, CapacityRequest, DeregisterAgent, GangRequest, LeaveAgent,
    OptimizeRequest, QuotaRequest, RegisterAgent, ReleaseRequest, RenewRequest, ReserveRequest,
};
use common::nats::{self as bus, Bucket, EventPublisher, Stream};
use common::service::Service;
use common::{subject, AgentId, Error};
use futures::StreamExt;

use crate::machine::{AgentRecord, QuotaBook};

/// Allocator settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub nats: common::config::NatsConfig,
    /// How often each replica looks for lost agents, expired reservations and
    /// unconfirmed gang members, in ms.
    #[arg(long, env = "COORD_ALLOCATOR_SWEEP_MS", default_value_t = 500)]
    pub sweep_ms: u64,
    /// How long a gang member may stay booked but unconfirmed before a sweep
    /// rolls it back (its booking replica is presumed dead), in ms.
    #[arg(
        long,
        env = "COORD_ALLOCATOR_GANG_DEADLINE_MS",
        default_value_t = 30_000
    )]
    pub gang_deadline_ms: u64,
    /// How long a lost or left agent stays listed before it is retired (its
    /// record, consumer and stored assignments removed), in ms.
    #[arg(
        long,
        env = "COORD_ALLOCATOR_AGENT_RETENTION_MS",
        default_value_t = 3_600_000
    )]
    pub agent_retention_ms: u64,
    /// How old an allocation booked for a flow task must be before the
    /// reconciliation asks the orchestrator whether the task still holds it
    /// (and takes it back if not), in ms. It covers the time from booking to
    /// the orchestrator recording the assignment.
    #[arg(
        long,
        env = "COORD_ALLOCATOR_RECONCILE_GRACE_MS",
        default_value_t = 30_000
    )]
    pub reconcile_grace_ms: u64,
}

impl Config {
    pub fn new(nats: common::config::NatsConfig) -> Self {
        Config {
            nats,
            sweep_ms: 500,
            gang_deadline_ms: 30_000,
            agent_retention_ms: 3_600_000,
            reconcile_grace_ms: 30_000,
        }
    }
}

const NAME: &str = "allocator";
/// Queue group for heartbeats, so each is recorded by one replica.
const HEARTBEAT_QUEUE: &str = "allocator";
/// Heartbeats being recorded at once per replica; more wait in the subscription.
const HEARTBEATS_IN_FLIGHT: usize = 256;
/// How long a heartbeat write or read, or a look at the heartbeat stream, may
/// go unanswered before the time counts as a JetStream stall. On a healthy
/// server it takes milliseconds.
const STALL_AFTER: std::time::Duration = std::time::Duration::from_millis(250);
/// The least time between two heartbeats of one agent that are both recorded
/// (see [`Allocator::admit_beat`]): an agent flooding its heartbeat subject
/// costs a handful of bucket writes, not one per message.
const MIN_BEAT_GAP_MS: u64 = 100;
/// How often, at most, dropped heartbeats are logged.
const BEAT_DROP_WARN_EVERY_MS: u64 = 10_000;

pub(crate) struct Allocator {
    agents: kv::Store,
    heartbeats: kv::Store,
    /// The stream under `heartbeats`, whose leader the stall probe asks.
    heartbeat_stream: jetstream::stream::Stream,
    cache: cache::Cache<AgentRecord>,
    beats: cache::Cache<cache::Beat>,
    /// When this replica last accepted a heartbeat of each agent for writing.
    beat_gate: std::sync::Mutex<std::collections::HashMap<AgentId, u64>>,
    /// Heartbeats dropped for arriving too soon after the last one recorded.
    beats_dropped: std::sync::atomic::AtomicU64,
    /// When dropped heartbeats were last logged (ms since the epoch).
    beats_dropped_warned: std::sync::atomic::AtomicU64,
    events: EventPublisher,
    gang_deadline_ms: u64,
    agent_retention_ms: u64,
    reconcile_grace_ms: u64,
    /// Asks the orchestrator which task allocations are still held.
    client: common::Client,
    /// When this replica last reconciled (ms since the epoch).
    reconciled_at: std::sync::atomic::AtomicU64,
    /// For the agents' assignment consumers, removed when an agent leaves.
    js: jetstream::Context,
    /// When this replica's connection was last down, or its heartbeat
    /// bucket last stalled: heartbeats sent then never reached it or were not
    /// recorded, so that silence is not held against the agents.
    outages: bus::Outages,
    /// Per-agent writers with their waiting changes (see [`lanes`]).
    lanes: std::sync::Mutex<std::collections::HashMap<AgentId, Arc<lanes::Lane>>>,
    /// Where the next placement starts looking in a large pool.
    rotation: std::sync::atomic::AtomicUsize,
    /// Owner quotas and what is counted against them (see `quota`).
    quotas: kv::Store,
    /// The quota book as last read or written here, with its revision.
    quota_cache: std::sync::RwLock<(QuotaBook, u64)>,
    /// Quota book updates in this replica, one at a time.
    quota_lock: tokio::sync::Mutex<()>,
    /// Fresh reads of the quota book shared by the bookings waiting for one
    /// (see `fresh_quotas`): the last read with the ticket count it started at.
    quota_reads: tokio::sync::Mutex<Option<(u64, QuotaBook, u64)>>,
    quota_tickets: std::sync::atomic::AtomicU64,
    /// Which agents have an assignments consumer (see [`paths`]).
    paths: paths::WorkPaths,
}

macro_rules! serve {
    ($service:expr, $alloc:expr, $subject:expr, $req:ty, $method:ident) => {
        serve!(serve, $service, $alloc, $subject, $req, $method)
    };
    ($how:ident, $service:expr, $alloc:expr, $subject:expr, $req:ty, $method:ident) => {{
        let a = $alloc.clone();
        $service
            .$how($subject, move |r: $req| {
                let a = a.clone();
                async move { a.$method(r).await }
            })
            .await?;
    }};
}

/// Runs the allocator until `shutdown` resolves, then drains the connection.
pub async fn run(cfg: Config, shutdown: impl Future) -> anyhow::Result<()> {
    // NATS may not be up yet: wait for it, unless asked to stop first.
    tokio::pin!(shutdown);
    let Some(nats) = bus::connect_until(&cfg.nats, NAME, shutdown.as_mut()).await? else {
        return Ok(());
    };
    let js = jetstream::new(nats.clone());
    bus::ensure_stream(&js, Stream::Events, cfg.nats.js_replicas).await?;
    let agents = bus::ensure_bucket(&js, Bucket::Agents, cfg.nats.js_replicas).await?;
    let heartbeats = bus::ensure_bucket(&js, Bucket::Heartbeats, cfg.nats.js_replicas).await?;
    let quotas = bus::ensure_bucket(&js, Bucket::Quotas, cfg.nats.js_replicas).await?;
    let heartbeat_stream = js
        .get_stream(format!("KV_{}", bus::KV_HEARTBEATS))
        .await
        .map_err(|e| Error::unavailable("heartbeat stream", e))?;
    let alloc = Arc::new(Allocator {
        agents: agents.clone(),
        heartbeats: heartbeats.clone(),
        heartbeat_stream,
        cache: cache::Cache::default(),
        beats: cache::Cache::default(),
        beat_gate: Default::default(),
        beats_dropped: Default::default(),
        beats_dropped_warned: Default::default(),
        events: EventPublisher::new(nats.clone(), NAME),
        gang_deadline_ms: cfg.gang_deadline_ms,
        agent_retention_ms: cfg.agent_retention_ms,
        reconcile_grace_ms: cfg.reconcile_grace_ms,
        client: common::Client::new(nats.clone()),
        reconciled_at: Default::default(),
        js: js.clone(),
        outages: bus::Outages::watch(&nats),
        lanes: Default::default(),
        rotation: Default::default(),
        quotas,
        quota_cache: Default::default(),
        quota_lock: Default::default(),
        quota_reads: Default::default(),
        quota_tickets: Default::default(),
        paths: Default::default(),
    });
    // A replica that has just started heard no heartbeat before now: the
    // bucket's last beats may be old (no allocator was recording them), so
    // its start counts like an outage and no agent is lost for that gap.
    alloc.outages.stalled();
    alloc.read_quotas().await?;
    let watchers = [
        alloc.cache.clone().start(agents).await?,
        alloc.beats.clone().start(heartbeats).await?,
    ];

    let mut service = Service::start(&nats, NAME, "Agents, capacity and placement").await?;
    // An agent (de)registers on its own subject, so it cannot do so for another.
    serve!(
        serve_agent,
        service,
        alloc,
        subject::AGENT_REGISTER_ALL,
        RegisterAgent,
        register
    );
    serve!(
        serve_agent,
        service,
        alloc,
        subject::AGENT_DEREGISTER_ALL,
        DeregisterAgent,
        deregister
    );
    serve!(
        serve_agent,
        service,
        alloc,
        subject::AGENT_LEAVE_ALL,
        LeaveAgent,
        leave
    );
    // The shared subjects, for operators' tools and agents written before.
    serve!(
        service,
        alloc,
        subject::AGENT_REGISTER,
        RegisterAgent,
        register
    );
    serve!(
        service,
        alloc,
        subject::AGENT_DEREGISTER,
        DeregisterAgent,
        deregister
    );
    serve!(
        service,
        alloc,
        subject::ALLOCATE,
        common::msg::AllocateRequest,
        allocate
    );
    serve!(
        service,
        alloc,
        subject::ALLOCATE_GANG,
        GangRequest,
        allocate_gang
    );
    serve!(service, alloc, subject::RELEASE, ReleaseRequest, release);
    serve!(service, alloc, subject::RENEW, RenewRequest, renew);
    serve!(
        service,
        alloc,
        subject::CAPACITY_CHECK,
        CapacityRequest,
        capacity
    );
    serve!(
        service,
        alloc,
        subject::CAPACITY_RESERVE,
        ReserveRequest,
        reserve
    );
    serve!(
        service,
        alloc,
        subject::RESERVATION_CANCEL,
        CancelReservation,
        cancel_reservation
    );
    serve!(
        service,
        alloc,
        subject::CAPACITY_ADJUST,
        AdjustRequest,
        adjust
    );
    serve!(service, alloc, subject::QUOTA_SET, QuotaRequest, set_quota);
    serve!(service, alloc, subject::OPTIMIZE, OptimizeRequest, optimize);

    let mut jetstream_endpoints =
        jsproxy::serve(nats.clone(), common::service::ReplyPrefixes::from_env())
            .await
            .map_err(|e| Error::unavailable("JetStream endpoints for agents", e))?;

    let mut beats = nats
        .queue_subscribe(subject::HEARTBEAT_ALL, HEARTBEAT_QUEUE.to_owned())
        .await
        .map_err(|e| Error::unavailable("heartbeat subscription", e))?;
    let a = alloc.clone();
    let heartbeat_task = tokio::spawn(async move {
        // Recorded side by side: one write stuck on a slow or restarting
        // server must not hold back every other agent's heartbeat until it
        // times out, long enough for them all to look lost.
        let limit = Arc::new(tokio::sync::Semaphore::new(HEARTBEATS_IN_FLIGHT));
        while let Some(msg) = beats.next().await {
            let Ok(permit) = limit.clone().acquire_owned().await else {
                break;
            };
            let a = a.clone();
            tokio::spawn(async move {
                a.heartbeat(&msg).await;
                drop(permit);
            });
        }
    });
    let sweep_task = tokio::spawn(alloc.clone().sweep_forever(cfg.sweep_ms));
    let probe_task = tokio::spawn(alloc.clone().probe_forever(cfg.sweep_ms));
    tracing::info!(url = %cfg.nats.nats_url, "allocator running");

    shutdown.await;
    tracing::info!("allocator shutting down");
    service.stop().await;
    heartbeat_task.abort();
    jetstream_endpoints.abort_all();
    sweep_task.abort();
    probe_task.abort();
    for w in watchers {
        w.abort();
    }
    nats.drain().await.ok();
    Ok(())
}

impl Allocator {
    /// Records the last heartbeat per agent in its own bucket, so heartbeats never
    /// race with allocations for the agent's record.
    async fn heartbeat(&self, msg: &async_nats::Message) {
        let Some(agent) = subject::agent_of(&msg.subject) else {
            return;
        };
        let now = common::now_ms();
        if !self.admit_beat(&agent, now) {
            return;
        }
        let beat = serde_json::from_slice::<common::msg::Heartbeat>(&msg.payload).ok();
        let record = cache::Beat {
            agent_id: agent.clone(),
            at_ms: now,
            running: beat.map(|b| b.running).unwrap_or(0),
        };
        let Ok(body) = serde_json::to_vec(&record) else {
            return;
        };
        let put = self.heartbeats.put(agent.as_str(), body.into());
        if let Err(e) = self.outages.observe(STALL_AFTER, put).await {
            tracing::warn!(agent = %agent, error = %e, "heartbeat not recorded");
        }
    }

    /// The least time between two recorded heartbeats of `agent`: a quarter
    /// of its registered interval, at least [`MIN_BEAT_GAP_MS`]. An agent
    /// that heartbeats at its interval is never held back; a flood is.
    fn beat_gap_ms(&self, agent: &AgentId) -> u64 {
        let interval = self
            .cache
            .get(agent)
            .map_or(0, |(rec, _)| rec.heartbeat_interval_ms);
        (interval / 4).max(MIN_BEAT_GAP_MS)
    }

    /// Whether a heartbeat of `agent` arriving at `now` is recorded: not if
    /// one was recorded less than [`Self::beat_gap_ms`] before, by this
    /// replica or (as its cache of the bucket shows) another. A dropped one is
    /// counted and, now and then, logged.
    fn admit_beat(&self, agent: &AgentId, now: u64) -> bool {
        let gap = self.beat_gap_ms(agent);
        let elsewhere = self.beats.get(agent).map_or(0, |(b, _)| b.at_ms);
        let admitted = {
            let mut gate = match self.beat_gate.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            let last = gate.get(agent).copied().unwrap_or(0).max(elsewhere);
            if now.saturating_sub(last) < gap && last <= now {
                false
            } else {
                // Forget agents not heard from for a while, so the gate stays
                // as small as the set of agents heartbeating now.
                if gate.len() >= 1024 && !gate.contains_key(agent) {
                    gate.retain(|_, at| now.saturating_sub(*at) < 600_000);
                }
                gate.insert(agent.clone(), now);
                true
            }
        };
        if !admitted {
            use std::sync::atomic::Ordering::Relaxed;
            let dropped = self.beats_dropped.fetch_add(1, Relaxed) + 1;
            let warned = self.beats_dropped_warned.load(Relaxed);
            if now.saturating_sub(warned) >= BEAT_DROP_WARN_EVERY_MS
                && self
                    .beats_dropped_warned
                    .compare_exchange(warned, now, Relaxed, Relaxed)
                    .is_ok()
            {
                tracing::warn!(
                    agent = %agent,
                    dropped,
                    gap_ms = gap,
                    "heartbeats dropped: sent sooner than the least gap after the last recorded"
                );
            }
        }
        admitted
    }

    /// The last heartbeat recorded for `agent`, as the heartbeat stream's
    /// leader holds it: declaring an agent lost must not rest on a stale view,
    /// neither this replica's cache nor a KV read that any replica of the
    /// stream may answer (a node rejoining its cluster serves what it had
    /// before it was cut off until it has caught up).
    async fn last_beat(&self, agent: &AgentId) -> u64 {
        let subject = format!("$KV.{}.{}", bus::KV_HEARTBEATS, agent.as_str());
        let read = async {
            match self
                .heartbeat_stream
                .get_last_raw_message_by_subject(&subject)
                .await
            {
                Ok(msg) => Ok(serde_json::from_slice::<cache::Beat>(&msg.payload).ok()),
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(e),
            }
        };
        match self.outages.observe(STALL_AFTER, read).await {
            Ok(beat) => beat.map_or(0, |b| b.at_ms),
            Err(_) => self.beats.get(agent).map(|(b, _)| b.at_ms).unwrap_or(0),
        }
    }

    /// Asks the heartbeat stream's leader for its state every `every_ms`, so
    /// that a stall is seen (and counted, see [`bus::Outages::stalled`]) even
    /// when no heartbeat reaches this replica to be written: while a cluster
    /// elects a new leader, or while this replica's node is cut off from the
    /// others, recorded heartbeats stop although agents keep sending them.
    async fn probe_forever(self: Arc<Self>, every_ms: u64) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(every_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let info = self.heartbeat_stream.get_info();
            if let Err(e) = self.outages.observe(STALL_AFTER, info).await {
                tracing::debug!(error = %e, "heartbeat stream not answering");
            }
        }
    }
}
