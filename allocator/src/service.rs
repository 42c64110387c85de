//! The allocator's NATS adapter.
//!
//! Agents (with their live allocations) live in the `coord_agents` KV bucket.
//! Each replica keeps a cache of that bucket, fed by a KV watch, and places from
//! it; the booking itself is a compare-and-set against the revision the decision
//! was made on. A stale cache therefore costs a retry, never an over-allocation,
//! and the happy path is one KV write per allocation.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use common::msg::{
    AgentInfo, AllocateRequest, Allocation, CapacityRequest, CapacityStatus, EventKind, Heartbeat,
    RegisterAgent, ReleaseReply, ReleaseRequest,
};
use common::nats::{self as bus, Bucket, EventPublisher, Step, Stream};
use common::service::Service;
use common::{subject, AgentId, AllocationId, Error, ErrorCode};
use futures::StreamExt;

use crate::machine::{self, AgentRecord};

/// Allocator settings.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    #[command(flatten)]
    pub nats: common::config::NatsConfig,
}

impl Config {
    pub fn new(nats: common::config::NatsConfig) -> Self {
        Config { nats }
    }
}

const NAME: &str = "allocator";
/// Queue group for heartbeats, so each is recorded by one replica.
const HEARTBEAT_QUEUE: &str = "allocator";

type Cache = Arc<RwLock<HashMap<AgentId, (AgentRecord, u64)>>>;

struct Allocator {
    agents: kv::Store,
    heartbeats: kv::Store,
    cache: Cache,
    events: EventPublisher,
}

/// Runs the allocator until `shutdown` resolves, then drains the connection.
pub async fn run(cfg: Config, shutdown: impl Future) -> anyhow::Result<()> {
    let nats = bus::connect(&cfg.nats, NAME).await?;
    let js = jetstream::new(nats.clone());
    bus::ensure_stream(&js, Stream::Events, cfg.nats.js_replicas).await?;
    let agents = bus::ensure_bucket(&js, Bucket::Agents, cfg.nats.js_replicas).await?;
    let heartbeats = bus::ensure_bucket(&js, Bucket::Heartbeats, cfg.nats.js_replicas).await?;
    let alloc = Arc::new(Allocator {
        agents,
        heartbeats,
        cache: Arc::default(),
        events: EventPublisher::new(nats.clone(), NAME),
    });
    let watcher = alloc.clone().start_cache().await?;

    let mut service = Service::start(&nats, NAME, "Agents, capacity and placement").await?;
    let a = alloc.clone();
    service
        .serve(subject::AGENT_REGISTER, move |r: RegisterAgent| {
            let a = a.clone();
            async move { a.register(r).await }
        })
        .await?;
    let a = alloc.clone();
    service
        .serve(subject::ALLOCATE, move |r: AllocateRequest| {
            let a = a.clone();
            async move { a.allocate(r).await }
        })
        .await?;
    let a = alloc.clone();
    service
        .serve(subject::RELEASE, move |r: ReleaseRequest| {
            let a = a.clone();
            async move { a.release(r).await }
        })
        .await?;
    let a = alloc.clone();
    service
        .serve(subject::CAPACITY_CHECK, move |r: CapacityRequest| {
            let a = a.clone();
            async move { a.capacity(r) }
        })
        .await?;

    let mut beats = nats
        .queue_subscribe(subject::HEARTBEAT_ALL, HEARTBEAT_QUEUE.to_owned())
        .await
        .map_err(|e| {
            Error::new(
                ErrorCode::Unavailable,
                format!("heartbeat subscription: {e}"),
            )
        })?;
    let a = alloc.clone();
    let heartbeat_task = tokio::spawn(async move {
        while let Some(msg) = beats.next().await {
            a.heartbeat(&msg).await;
        }
    });
    tracing::info!(url = %cfg.nats.nats_url, "allocator running");

    shutdown.await;
    tracing::info!("allocator shutting down");
    service.stop().await;
    heartbeat_task.abort();
    watcher.abort();
    nats.drain().await.ok();
    Ok(())
}

impl Allocator {
    /// Loads every agent and keeps the cache current from a KV watch. Returns
    /// once the initial state is loaded, so the first request sees every agent.
    async fn start_cache(self: Arc<Self>) -> Result<tokio::task::JoinHandle<()>, Error> {
        let unavailable = |e: &dyn std::fmt::Display| {
            Error::new(ErrorCode::Unavailable, format!("agents watch: {e}"))
        };
        // Watch first, then load: a change made in between is caught by the watch,
        // and revisions decide which copy is newer.
        let mut watch = self.agents.watch_all().await.map_err(|e| unavailable(&e))?;
        let mut keys = self.agents.keys().await.map_err(|e| unavailable(&e))?;
        while let Some(k) = keys.next().await {
            let Ok(k) = k else { continue };
            self.refresh(&k).await;
        }
        Ok(tokio::spawn(async move {
            loop {
                while let Some(entry) = watch.next().await {
                    let Ok(entry) = entry else { continue };
                    self.apply_entry(entry);
                }
                // The watch ended (e.g. the server restarted): re-create it.
                tokio::time::sleep(Duration::from_millis(500)).await;
                match self.agents.watch_with_history(">").await {
                    Ok(w) => watch = w,
                    Err(e) => tracing::warn!(error = %e, "agents watch not re-created yet"),
                }
            }
        }))
    }

    fn apply_entry(&self, entry: kv::Entry) {
        let Ok(id) = AgentId::new(entry.key.clone()) else {
            return;
        };
        let Ok(mut cache) = self.cache.write() else {
            return;
        };
        match entry.operation {
            kv::Operation::Put => {
                if let Ok(rec) = serde_json::from_slice::<AgentRecord>(&entry.value) {
                    let newer = cache.get(&id).is_none_or(|(_, rev)| *rev < entry.revision);
                    if newer {
                        cache.insert(id, (rec, entry.revision));
                    }
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                cache.remove(&id);
            }
        }
    }

    async fn refresh(&self, key: &str) {
        if let Ok(Some(entry)) = self.agents.entry(key).await {
            self.apply_entry(entry);
        }
    }

    fn remember(&self, rec: AgentRecord, revision: u64) {
        if let Ok(mut cache) = self.cache.write() {
            let newer = cache
                .get(&rec.agent_id)
                .is_none_or(|(_, rev)| *rev < revision);
            if newer {
                cache.insert(rec.agent_id.clone(), (rec, revision));
            }
        }
    }

    fn snapshot(&self) -> Vec<(AgentRecord, u64)> {
        self.cache
            .read()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    async fn register(&self, req: RegisterAgent) -> Result<AgentInfo, Error> {
        machine::check_amounts(&req.capacity)
            .map_err(|m| Error::new(ErrorCode::ValidationFailed, m))?;
        let now = common::now_ms();
        let (rec, revision) = bus::cas_update::<AgentRecord, AgentRecord, _>(
            &self.agents,
            req.agent_id.as_str(),
            |prev| {
                let rec = AgentRecord::register(&req, prev, now);
                Ok(Step::Write(rec.clone(), rec))
            },
        )
        .await?;
        self.remember(rec.clone(), revision);
        self.events
            .publish(EventKind::AgentRegistered {
                agent_id: rec.agent_id.clone(),
                capacity: rec.capacity.clone(),
            })
            .await;
        Ok(rec.info(0))
    }

    async fn allocate(&self, req: AllocateRequest) -> Result<Allocation, Error> {
        machine::check_amounts(&req.requirements.resources)
            .map_err(|m| Error::new(ErrorCode::ValidationFailed, m))?;
        for _ in 0..bus::CAS_ATTEMPTS {
            let agents = self.snapshot();
            let records: Vec<&AgentRecord> = agents.iter().map(|(r, _)| r).collect();
            let chosen =
                machine::place(records.iter().copied(), &req.requirements).map_err(|nofit| {
                    Error::new(ErrorCode::NoCapacity, nofit.message.clone()).with_details(&nofit)
                })?;
            let Some((current, revision)) =
                agents.iter().find(|(r, _)| r.agent_id == chosen.agent_id)
            else {
                continue;
            };
            let allocation = Allocation {
                allocation_id: AllocationId::random(),
                agent_id: current.agent_id.clone(),
                owner: req.owner.clone(),
                resources: req.requirements.resources.clone(),
                priority: req.priority,
                created_at_ms: common::now_ms(),
            };
            let mut next = current.clone();
            next.allocations
                .insert(allocation.allocation_id.clone(), allocation.clone());
            let body = serde_json::to_vec(&next).map_err(|e| Error::internal(e.to_string()))?;
            match self
                .agents
                .update(next.agent_id.as_str(), body.into(), *revision)
                .await
            {
                Ok(rev) => {
                    self.remember(next, rev);
                    self.events
                        .publish(EventKind::AllocationMade {
                            allocation_id: allocation.allocation_id.clone(),
                            agent_id: allocation.agent_id.clone(),
                            owner: allocation.owner.clone(),
                            resources: allocation.resources.clone(),
                        })
                        .await;
                    return Ok(allocation);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // Our view of this agent was stale: reload it and decide again.
                    self.refresh(current.agent_id.as_str()).await;
                }
                Err(e) => return Err(Error::new(ErrorCode::Unavailable, format!("kv write: {e}"))),
            }
        }
        Err(Error::new(
            ErrorCode::Conflict,
            "too much contention on the agents, gave up",
        ))
    }

    async fn release(&self, req: ReleaseRequest) -> Result<ReleaseReply, Error> {
        let key = req.agent_id.as_str();
        let (released, revision) =
            bus::cas_update::<AgentRecord, Option<AgentRecord>, _>(&self.agents, key, |rec| {
                let Some(mut rec) = rec else {
                    return Ok(Step::Keep(None));
                };
                Ok(if rec.allocations.remove(&req.allocation_id).is_some() {
                    Step::Write(rec.clone(), Some(rec))
                } else {
                    Step::Keep(None)
                })
            })
            .await?;
        let Some(rec) = released else {
            return Ok(ReleaseReply { released: false });
        };
        self.remember(rec, revision);
        self.events
            .publish(EventKind::AllocationReleased {
                allocation_id: req.allocation_id,
                agent_id: req.agent_id,
            })
            .await;
        Ok(ReleaseReply { released: true })
    }

    fn capacity(&self, req: CapacityRequest) -> Result<CapacityStatus, Error> {
        if let Some(r) = &req.requirements {
            machine::check_amounts(&r.resources)
                .map_err(|m| Error::new(ErrorCode::ValidationFailed, m))?;
        }
        let agents = self.snapshot();
        Ok(machine::capacity_status(
            agents.iter().map(|(r, _)| r),
            req.requirements.as_ref(),
        ))
    }

    /// Records the last heartbeat per agent in its own bucket, so heartbeats never
    /// race with allocations for the agent's record.
    async fn heartbeat(&self, msg: &async_nats::Message) {
        let Some(agent) = subject::agent_of(&msg.subject) else {
            return;
        };
        let beat = serde_json::from_slice::<Heartbeat>(&msg.payload).ok();
        let record = serde_json::json!({
            "agent_id": agent,
            "at_ms": common::now_ms(),
            "running": beat.map(|b| b.running).unwrap_or(0),
        });
        if let Err(e) = self
            .heartbeats
            .put(agent.as_str(), record.to_string().into())
            .await
        {
            tracing::warn!(agent = %agent, error = %e, "heartbeat not recorded");
        }
    }
}
