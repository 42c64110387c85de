//! The allocator's NATS adapter.
//!
//! Agents (with their live allocations and reservations) live in the
//! `coord_agents` KV bucket. Each replica keeps a cache of that bucket, fed by a
//! KV watch, and places from it; every booking is a compare-and-set against the
//! revision the decision was made on. A stale cache therefore costs a retry,
//! never an over-allocation, and the happy path is one KV write per allocation.
//!
//! Every replica hears every heartbeat and keeps the last per agent in
//! memory ([`beats`]); it also runs a sweep ([`sweep`]) that marks agents
//! lost when they miss their heartbeats, ends expired reservations and rolls back gang members
//! whose booking replica died. The sweep's writes are compare-and-sets too, so
//! replicas racing on the same agent produce one transition and one event.

mod agents;
mod beats;
mod booking;
mod cache;
mod hand_on;
mod lanes;
mod ops;
mod paths;
mod quota;
mod reconcile;
mod records;
mod sweep;

use std::future::Future;
use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use common::msg::{
    AdjustRequest, CancelReservation, CapacityRequest, DeregisterAgent, GangRequest, LeaveAgent,
    OptimizeRequest, QuotaRequest, RegisterAgent, ReleaseRequest, RenewRequest, ReserveRequest,
};
use common::nats::{self as bus, Bucket, EventPublisher, Stream};
use common::service::Service;
use common::{subject, AgentId, Error};

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
    /// record and last heartbeat removed), in ms.
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
/// How long a look at the agents' bucket may go unanswered before the time
/// counts as a JetStream stall. On a healthy server it takes milliseconds.
const STALL_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

pub(crate) struct Allocator {
    agents: kv::Store,
    cache: cache::Cache<AgentRecord>,
    /// When this replica last heard each registered agent's heartbeat (ms
    /// since the epoch; see [`beats`]).
    beats: cache::Cache<u64>,
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
    /// For the stall probe of the agents' bucket.
    js: jetstream::Context,
    /// For the probes of the agents' assignment subjects (see [`paths`]).
    nats: async_nats::Client,
    /// When this replica's connection was last down, or it was paused, or
    /// the agents' bucket last stalled: heartbeats sent then never reached
    /// it, so that silence is not held against the agents.
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
    /// (see `fresh_quotas`): the last read with the ticket count it started
    /// at, who is reading now, and the tickets taken.
    quota_reads: tokio::sync::watch::Sender<Option<(u64, QuotaBook, u64)>>,
    quota_reading: tokio::sync::Mutex<()>,
    quota_tickets: std::sync::atomic::AtomicU64,
    /// Which agents listen on their assignment subject (see [`paths`]).
    paths: std::sync::Arc<paths::WorkPaths>,
    /// Where an answer to a heartbeat may go (see [`Allocator::heartbeat`]).
    replies: common::service::ReplyPrefixes,
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
    let quotas = bus::ensure_bucket(&js, Bucket::Quotas, cfg.nats.js_replicas).await?;
    let alloc = Arc::new(Allocator {
        agents: agents.clone(),
        cache: cache::Cache::default(),
        beats: cache::Cache::default(),
        beats_dropped: Default::default(),
        beats_dropped_warned: Default::default(),
        events: EventPublisher::new(nats.clone(), NAME),
        gang_deadline_ms: cfg.gang_deadline_ms,
        agent_retention_ms: cfg.agent_retention_ms,
        reconcile_grace_ms: cfg.reconcile_grace_ms,
        client: common::Client::new(nats.clone()),
        reconciled_at: Default::default(),
        js: js.clone(),
        nats: nats.clone(),
        outages: bus::Outages::watch(&nats),
        lanes: Default::default(),
        rotation: Default::default(),
        quotas,
        quota_cache: Default::default(),
        quota_lock: Default::default(),
        quota_reads: tokio::sync::watch::Sender::new(None),
        quota_reading: Default::default(),
        quota_tickets: Default::default(),
        paths: Default::default(),
        replies: common::service::ReplyPrefixes::from_env(),
    });
    // A replica that has just started heard no heartbeat before now: its
    // start counts like an outage, so no agent is lost for that gap.
    alloc.outages.stalled();
    bus::opening(|| alloc.read_quotas()).await?;
    let watchers = [bus::opening(|| alloc.cache.clone().start(agents.clone())).await?];

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

    // Not a queue group: every replica hears every agent.
    let beats = nats
        .subscribe(subject::HEARTBEAT_ALL)
        .await
        .map_err(|e| Error::unavailable("heartbeat subscription", e))?;
    let heartbeat_task = tokio::spawn(alloc.clone().hear_forever(beats));
    let sweep_task = tokio::spawn(alloc.clone().sweep_forever(cfg.sweep_ms));
    let probe_task = tokio::spawn(alloc.clone().probe_forever(cfg.sweep_ms));
    tracing::info!(url = %cfg.nats.nats_url, "allocator running");

    shutdown.await;
    tracing::info!("allocator shutting down");
    service.stop().await;
    heartbeat_task.abort();
    sweep_task.abort();
    probe_task.abort();
    for w in watchers {
        w.abort();
    }
    nats.drain().await.ok();
    Ok(())
}
