//! The request handlers: each decides in the pure core and books with a
//! compare-and-set on the agent records it touches.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use common::msg::{
    AdjustReply, AdjustRequest, AgentInfo, AgentStatus, AllocateRequest, Allocation, CancelReply,
    CancelReservation, CapacityRequest, CapacityStatus, DeregisterAgent, EventKind, GangReply,
    GangRequest, LeaveAgent, OptimizePlan, OptimizeRequest, QuotaExceeded, RegisterAgent,
    ReleaseReply, ReleaseRequest, RenewRequest, Requirements, Reservation, ReserveRequest,
};
use common::nats::{self as bus, Step};
use common::{AgentId, AllocationId, Error, ErrorCode, ReservationId};

use tokio::sync::oneshot;

use super::lanes::{self, Lane, Waiting};
use super::{unavailable, Allocator};
use crate::machine::{self, Admission, AgentRecord, Draw, NoFit, RenewRefused};

/// Placement decisions retried from fresh state before giving up on contention.
const PLACE_ATTEMPTS: usize = 16;
/// Agents that fit looked at per placement in a large pool (see
/// [`machine::sample`]).
const PLACEMENT_SAMPLE: usize = 64;
/// Default most moves one optimisation plans.
const DEFAULT_MAX_MOVES: usize = 100;

pub(super) fn invalid(m: String) -> Error {
    Error::new(ErrorCode::ValidationFailed, m)
}

fn check_requirements(req: &Requirements) -> Result<(), Error> {
    machine::check_amounts(&req.resources).map_err(invalid)
}

pub(super) fn check_owner(owner: &str) -> Result<(), Error> {
    if owner.trim().is_empty() || owner.len() > 256 {
        return Err(invalid("owner must be 1 to 256 characters".into()));
    }
    Ok(())
}

fn no_capacity(nofit: &NoFit) -> Error {
    Error::new(ErrorCode::NoCapacity, nofit.message.clone()).with_details(nofit)
}

fn quota_exceeded(over: &QuotaExceeded) -> Error {
    Error::new(
        ErrorCode::QuotaExceeded,
        format!(
            "quota of {} exceeded on {}: {} in use, {} asked, limit {}",
            over.quota_owner, over.resource, over.in_use, over.requested, over.limit
        ),
    )
    .with_details(over)
}

/// The longest lease an allocation may ask for: a year.
const MAX_TTL_MS: u64 = 365 * 24 * 3_600_000;

fn check_ttl(ttl_ms: Option<u64>) -> Result<(), Error> {
    match ttl_ms {
        Some(t) if t == 0 || t > MAX_TTL_MS => Err(invalid(format!(
            "ttl_ms must be between 1 and {MAX_TTL_MS}, not {t}"
        ))),
        _ => Ok(()),
    }
}

/// Refuses a request whose caller has stopped waiting for it: carried out
/// late, it would book behind the caller's back (see `AllocateRequest`).
fn past_deadline(deadline_ms: Option<u64>) -> Result<(), Error> {
    let now = common::now_ms();
    match deadline_ms {
        Some(d) if now > d => Err(Error::new(
            ErrorCode::Timeout,
            format!(
                "the request's deadline passed {} ms ago; nothing was booked",
                now - d
            ),
        )),
        _ => Ok(()),
    }
}

fn contention() -> Error {
    Error::new(
        ErrorCode::Conflict,
        "too much contention on the agents, gave up",
    )
}

impl Allocator {
    pub(super) fn records(&self) -> Vec<AgentRecord> {
        self.shared_records()
            .into_iter()
            .map(Arc::unwrap_or_clone)
            .collect()
    }

    /// The cached records without copying them, for decisions that only read.
    pub(super) fn shared_records(&self) -> Vec<Arc<AgentRecord>> {
        self.cache.snapshot().into_iter().map(|(r, _)| r).collect()
    }

    async fn refresh(&self, id: &AgentId) -> Result<(), Error> {
        match self.agents.entry(id.as_str()).await {
            Ok(Some(entry)) => {
                self.cache.apply(entry);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(unavailable("kv read", e)),
        }
    }

    fn lane(&self, id: &AgentId) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes.entry(id.clone()).or_default().clone()
    }

    /// The agent's record as this replica knows it, read from KV once per
    /// update (`fresh`) when the cache does not have it.
    async fn current(&self, id: &AgentId, fresh: &mut bool) -> Result<(AgentRecord, u64), Error> {
        let cached = match self.cache.get(id) {
            Some(c) => Some(c),
            None if !*fresh => {
                self.refresh(id).await?;
                *fresh = true;
                self.cache.get(id)
            }
            None => None,
        };
        cached.ok_or_else(|| Error::not_found(format!("no agent {id}")))
    }

    /// `best`, or, while this replica is booking on `best` already, the best
    /// other agent that fits and is not being booked: concurrent requests then
    /// book side by side instead of queueing behind one agent's lock (best
    /// fit sends every request to the same agent). The compare-and-set still
    /// re-checks the fit on the record it writes.
    fn unbusy<'a>(
        &self,
        best: AgentId,
        candidates: impl FnOnce() -> Vec<machine::Candidate<'a>>,
    ) -> AgentId {
        if self.lane(&best).lock.try_lock().is_ok() {
            return best;
        }
        candidates()
            .into_iter()
            .map(|c| c.agent.agent_id.clone())
            .find(|a| self.lane(a).lock.try_lock().is_ok())
            .unwrap_or(best)
    }

    /// Compare-and-set on one agent's record, starting from the cached copy.
    /// A lost race refreshes the copy and runs `f` again; so does a decision
    /// to change nothing made on the cache (it may be stale: a release must
    /// not miss an allocation another replica has just booked). Errors with
    /// `not_found` if the agent does not exist.
    pub(super) async fn update_agent<R>(
        &self,
        id: &AgentId,
        mut f: impl FnMut(AgentRecord) -> Result<Step<AgentRecord, R>, Error>,
    ) -> Result<R, Error> {
        // One booking per agent at a time in this replica: concurrent requests
        // for one agent queue here instead of losing compare-and-sets to each
        // other. Other replicas are still fenced by the compare-and-set.
        let lane = self.lane(id);
        let _held = lane.lock.lock().await;
        let mut fresh = false;
        for attempt in 0..bus::CAS_ATTEMPTS {
            let (rec, revision) = self.current(id, &mut fresh).await?;
            match f(rec)? {
                Step::Keep(r) if fresh => return Ok(r),
                Step::Keep(_) => {
                    self.refresh(id).await?;
                    fresh = true;
                }
                Step::Write(next, r) => {
                    if self.store(id, next, revision, attempt).await? {
                        return Ok(r);
                    }
                    fresh = true;
                }
            }
        }
        Err(contention())
    }

    /// Writes `rec` over `revision` and remembers it. A lost race refreshes
    /// the cached copy (after a pause once races keep being lost) and says
    /// so with `false`.
    async fn store(
        &self,
        id: &AgentId,
        rec: AgentRecord,
        revision: u64,
        attempt: usize,
    ) -> Result<bool, Error> {
        let body =
            serde_json::to_vec(&rec).map_err(|e| Error::internal(format!("encode agent: {e}")))?;
        match self.agents.update(id.as_str(), body.into(), revision).await {
            Ok(rev) => {
                self.cache.remember(id.clone(), rec, rev);
                Ok(true)
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.refresh(id).await?;
                if attempt > 4 {
                    let jitter = (common::now_ms() % 7) + attempt as u64;
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
                Ok(false)
            }
            Err(e) => Err(unavailable("kv write", e)),
        }
    }

    /// [`Self::update_agent`] for the hot paths (booking, release): the change
    /// joins the agent's next group write instead of a write of its own (see
    /// [`super::lanes`]). `f` edits the record in place and must leave it
    /// untouched when it keeps it or fails.
    pub(super) async fn book_agent<R: Send + 'static>(
        &self,
        id: &AgentId,
        f: impl FnMut(&mut AgentRecord) -> Result<Step<(), R>, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let (change, slot) = lanes::boxed(f);
        let (done, mut outcome) = oneshot::channel();
        let lane = self.lane(id);
        lane.push(Waiting { change, done });
        let held = lane.lock.lock().await;
        // The writer before this one answers every change it carried before
        // it unlocks: no answer yet means this change is still waiting.
        let result = match outcome.try_recv() {
            Ok(r) => r,
            Err(oneshot::error::TryRecvError::Closed) => {
                Err(Error::internal("a booking was dropped unanswered"))
            }
            Err(oneshot::error::TryRecvError::Empty) => {
                let mut group = lane.take();
                let outcomes = self.write_group(id, &mut group).await;
                for (i, w) in group.into_iter().enumerate() {
                    let o = match &outcomes {
                        Ok(each) => each[i].clone(),
                        Err(e) => Err(e.clone()),
                    };
                    let _ = w.done.send(o);
                }
                drop(held);
                outcome
                    .await
                    .unwrap_or_else(|_| Err(Error::internal("a booking was dropped unanswered")))
            }
        };
        result?;
        let r = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        r.ok_or_else(|| Error::internal("a booking decided nothing"))
    }

    /// One compare-and-set carrying every change of `group`, each decided on
    /// the record as the ones before it left it. As in
    /// [`Self::update_agent`], a group that changes nothing on the cached copy
    /// is decided again on a fresh read.
    async fn write_group(
        &self,
        id: &AgentId,
        group: &mut [Waiting],
    ) -> Result<Vec<Result<(), Error>>, Error> {
        let mut fresh = false;
        for attempt in 0..bus::CAS_ATTEMPTS {
            let (mut rec, revision) = self.current(id, &mut fresh).await?;
            let (outcomes, changed) = lanes::apply_all(&mut rec, group);
            if !changed {
                if fresh {
                    return Ok(outcomes);
                }
                self.refresh(id).await?;
                fresh = true;
                continue;
            }
            if self.store(id, rec, revision, attempt).await? {
                return Ok(outcomes);
            }
            fresh = true;
        }
        Err(contention())
    }

    pub(super) async fn preempted(&self, allocations: &[Allocation], reason: &str) {
        for a in allocations {
            self.events
                .publish(EventKind::AllocationPreempted {
                    allocation_id: a.allocation_id.clone(),
                    agent_id: a.agent_id.clone(),
                    owner: a.owner.clone(),
                    priority: a.priority,
                    reason: reason.to_owned(),
                })
                .await;
        }
    }

    async fn reservations_ended(&self, reservations: &[Reservation], reason: &str) {
        for r in reservations {
            self.events
                .publish(EventKind::ReservationEnded {
                    reservation_id: r.reservation_id.clone(),
                    agent_id: r.agent_id.clone(),
                    owner: r.owner.clone(),
                    reason: reason.to_owned(),
                })
                .await;
        }
    }

    pub(super) async fn register(&self, req: RegisterAgent) -> Result<AgentInfo, Error> {
        machine::check_amounts(&req.capacity).map_err(invalid)?;
        let now = common::now_ms();
        // Registering with less capacity than is held preempts what no longer fits:
        // the agent's word about itself wins over the ledger.
        let (shrink, revision) = bus::cas_update::<AgentRecord, machine::Shrink, _>(
            &self.agents,
            req.agent_id.as_str(),
            |prev| {
                let rec = AgentRecord::register(&req, prev, now);
                let shrink = machine::shrink_to_fit(&rec, now);
                Ok(Step::Write(shrink.record.clone(), shrink))
            },
        )
        .await?;
        let rec = shrink.record.clone();
        self.cache
            .remember(rec.agent_id.clone(), rec.clone(), revision);
        self.events
            .publish(EventKind::AgentRegistered {
                agent_id: rec.agent_id.clone(),
                capacity: rec.capacity.clone(),
            })
            .await;
        self.forget(&shrink.evicted).await;
        self.preempted(&shrink.evicted, "capacity_reduced").await;
        self.reservations_ended(&shrink.dropped, "capacity_reduced")
            .await;
        Ok(rec.info(0))
    }

    pub(super) async fn deregister(&self, req: DeregisterAgent) -> Result<AgentInfo, Error> {
        let now = common::now_ms();
        let rec = self
            .update_agent(&req.agent_id, |mut rec| {
                if rec.status == AgentStatus::Left {
                    return Err(Error::new(
                        ErrorCode::Conflict,
                        format!("agent {} has left; register again first", rec.agent_id),
                    ));
                }
                if rec.status != AgentStatus::Draining {
                    rec.status = AgentStatus::Draining;
                    rec.status_since_ms = now;
                }
                Ok(Step::Write(rec.clone(), rec))
            })
            .await?;
        self.events
            .publish(EventKind::AgentDeregistered {
                agent_id: rec.agent_id.clone(),
                allocations: rec.allocations.len(),
            })
            .await;
        let beat = self.beats.get(&rec.agent_id).map(|(b, _)| b.at_ms);
        Ok(rec.info(beat.unwrap_or(0)))
    }

    /// The agent is done: `left`, what it held released and handed back,
    /// its assignments consumer and stored assignments removed. Leaving again
    /// is a no-op that answers the same.
    pub(super) async fn leave(&self, req: LeaveAgent) -> Result<AgentInfo, Error> {
        let now = common::now_ms();
        let (rec, released) = self
            .update_agent(&req.agent_id, |mut rec| {
                let released = rec.leave(now);
                Ok(Step::Write(rec.clone(), (rec, released)))
            })
            .await?;
        tracing::info!(agent = %rec.agent_id, released = released.len(), "agent left");
        self.forget(&released).await;
        self.events
            .publish(EventKind::AgentLeft {
                agent_id: rec.agent_id.clone(),
                released,
            })
            .await;
        self.remove_work_path(&rec.agent_id).await;
        let beat = self.beats.get(&rec.agent_id).map(|(b, _)| b.at_ms);
        Ok(rec.info(beat.unwrap_or(0)))
    }

    /// Deletes the agent's assignments consumer and purges what is stored for
    /// it: durable consumers outlive their agents and a server caps how many a
    /// stream keeps. An agent that registers again creates its consumer anew.
    pub(super) async fn remove_work_path(&self, agent: &AgentId) {
        let Ok(stream) = self.js.get_stream(bus::STREAM_ASSIGN).await else {
            return;
        };
        if let Err(e) = stream.delete_consumer(&bus::agent_consumer(agent)).await {
            tracing::debug!(agent = %agent, error = %e, "no assignments consumer to delete");
        }
        if let Err(e) = stream.purge().filter(common::subject::assign(agent)).await {
            tracing::warn!(agent = %agent, error = %e, "stored assignments not purged");
        }
    }

    pub(super) async fn allocate(&self, req: AllocateRequest) -> Result<Allocation, Error> {
        check_requirements(&req.requirements)?;
        check_owner(&req.owner)?;
        check_ttl(req.ttl_ms)?;
        let (task, ttl) = (req.task.clone(), req.ttl_ms);
        let id = req
            .allocation_id
            .clone()
            .unwrap_or_else(AllocationId::random);
        for _ in 0..PLACE_ATTEMPTS {
            let now = common::now_ms();
            let shared = self.shared_records();
            let records: Vec<&AgentRecord> = shared.iter().map(|r| &**r).collect();
            // A retry of a request that was booked already gets the same answer.
            if let Some(a) = records.iter().find_map(|r| r.allocations.get(&id)) {
                if !a.pending {
                    return Ok(a.clone());
                }
            }
            past_deadline(req.deadline_ms)?;
            // Under a quota the booking stays pending until it is counted.
            let governed = self.cached_quotas().governs(&req.owner);
            let start = self
                .rotation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let found = machine::sample(
                &records,
                &req.requirements,
                Some(&req.owner),
                now,
                start,
                PLACEMENT_SAMPLE,
            );
            if found.is_empty() {
                let why = machine::why_not(
                    records.iter().copied(),
                    &req.requirements,
                    Some(&req.owner),
                    now,
                );
                return Err(no_capacity(&why));
            }
            let ranked = machine::rank(found, req.requirements.policy);
            let agent = self.unbusy(ranked[0].agent.agent_id.clone(), || ranked);
            let (wanted, owner, priority) =
                (req.requirements.clone(), req.owner.clone(), req.priority);
            let task = task.clone();
            let this = id.clone();
            let booked = self
                .book_agent(&agent, move |rec| {
                    if let Some(a) = rec.allocations.get(&this) {
                        return Ok(Step::Keep(Some((a.clone(), false))));
                    }
                    // Checked again just before the write: the replica may
                    // have stalled since the first check.
                    past_deadline(req.deadline_ms)?;
                    // Decide again on the record being written: the view it was
                    // chosen from may be stale.
                    let Ok(draw) = rec.fit(&wanted, Some(&owner), now) else {
                        return Ok(Step::Keep(None));
                    };
                    let mut a = machine::new_allocation(
                        this.clone(),
                        &rec.agent_id,
                        &owner,
                        &wanted,
                        priority,
                        draw,
                        now,
                        None,
                    );
                    a.pending = governed;
                    a.task = task.clone();
                    a.ttl_ms = ttl;
                    a.expires_at_ms = ttl.map(|t| now.saturating_add(t));
                    rec.allocations.insert(a.allocation_id.clone(), a.clone());
                    Ok(Step::Write((), Some((a, true))))
                })
                .await;
            let a = match booked {
                Ok(Some((a, true))) => a,
                Ok(Some((a, false))) if !a.pending => return Ok(a),
                // Another booking of the same id is still being counted.
                Ok(Some(_)) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                // It no longer fits there, or the agent is gone: choose again.
                Ok(None) => continue,
                Err(e) if e.code == ErrorCode::NotFound => continue,
                Err(e) => return Err(e),
            };
            // Count it against the owner's quotas; this also catches a quota
            // set after the hint above was read.
            let mut admission = self.admit(std::slice::from_ref(&a)).await;
            if admission.is_err() && !a.pending {
                // A read cut short (a stall of this replica outlasts any
                // timeout in flight) is worth one more try before giving up.
                admission = self.admit(std::slice::from_ref(&a)).await;
            }
            let admission = match admission {
                Ok(x) => x,
                // A booking stored without the pending mark reads as granted:
                // a retry of this request, here or at another replica, may
                // have been answered with it already, so taking it back could
                // take it from its holder. It stays; the caller's retry (the
                // protocol's answer to `unavailable`) gets it, and the sweep
                // counts it should a quota govern its owner after all.
                Err(e) if !a.pending => return Err(e),
                Err(e) => {
                    self.unbook(std::slice::from_ref(&agent), std::slice::from_ref(&id))
                        .await;
                    return Err(e);
                }
            };
            match admission {
                Admission::Ungoverned | Admission::Admitted => {}
                Admission::Counting => {
                    self.unbook(std::slice::from_ref(&agent), std::slice::from_ref(&id))
                        .await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Admission::Over(over) => {
                    self.unbook(std::slice::from_ref(&agent), std::slice::from_ref(&id))
                        .await;
                    return Err(quota_exceeded(&over));
                }
            }
            if a.pending && !self.confirm(&agent, std::slice::from_ref(&id)).await {
                self.unbook(std::slice::from_ref(&agent), std::slice::from_ref(&id))
                    .await;
                self.forget(std::slice::from_ref(&a)).await;
                return Err(Error::new(
                    ErrorCode::Conflict,
                    "the booking was rolled back before it was confirmed; retry",
                ));
            }
            let a = Allocation {
                pending: false,
                ..a
            };
            self.made(&a).await;
            return Ok(a);
        }
        Err(contention())
    }

    /// Confirms pending allocations `ids` on `agent`; false if any is gone (a
    /// sweep rolled it back because the confirmation came too late).
    async fn confirm(&self, agent: &AgentId, ids: &[AllocationId]) -> bool {
        self.update_agent(agent, |mut rec| {
            let mut all = true;
            for id in ids {
                match rec.allocations.get_mut(id) {
                    Some(a) => a.pending = false,
                    None => all = false,
                }
            }
            Ok(Step::Write(rec, all))
        })
        .await
        .unwrap_or(false)
    }

    async fn made(&self, a: &Allocation) {
        self.events
            .publish(EventKind::AllocationMade {
                allocation_id: a.allocation_id.clone(),
                agent_id: a.agent_id.clone(),
                owner: a.owner.clone(),
                resources: a.resources.clone(),
            })
            .await;
    }

    /// Books every member as pending, agent by agent; if one agent refuses, rolls
    /// back the others and plans again. Once all are booked, confirms them. A
    /// replica dying in between leaves pending members, which a sweep rolls back.
    pub(super) async fn allocate_gang(&self, req: GangRequest) -> Result<GangReply, Error> {
        check_owner(&req.owner)?;
        if req.members.is_empty() {
            return Err(invalid("a gang needs at least one member".into()));
        }
        if req.members.len() > 1024 {
            return Err(invalid("a gang has at most 1024 members".into()));
        }
        for m in &req.members {
            check_requirements(m)?;
        }
        let gang_id = uuid::Uuid::now_v7().simple().to_string();
        for _ in 0..PLACE_ATTEMPTS {
            let now = common::now_ms();
            let ids: Vec<AllocationId> =
                req.members.iter().map(|_| AllocationId::random()).collect();
            let plan = machine::place_gang(
                &self.records(),
                &req.members,
                &req.owner,
                req.priority,
                &ids,
                &gang_id,
                now,
            )
            .map_err(|n| no_capacity(&n))?;
            let mut by_agent: BTreeMap<AgentId, Vec<(usize, Allocation)>> = BTreeMap::new();
            for (i, a) in plan.iter().enumerate() {
                by_agent
                    .entry(a.agent_id.clone())
                    .or_default()
                    .push((i, a.clone()));
            }
            let mut booked: Vec<AgentId> = Vec::new();
            let mut placed: Vec<Option<Allocation>> = vec![None; plan.len()];
            let mut failed = false;
            for (agent, members) in &by_agent {
                let result = self
                    .update_agent(agent, |mut rec| {
                        let mut out = Vec::new();
                        for (i, a) in members {
                            let Some(member) = req.members.get(*i) else {
                                return Ok(Step::Keep(None));
                            };
                            let Ok(draw) = rec.fit(member, Some(&req.owner), now) else {
                                return Ok(Step::Keep(None));
                            };
                            let mut a = a.clone();
                            a.reservation_id = match draw {
                                Draw::Reservation(id) => Some(id),
                                Draw::General => None,
                            };
                            rec.allocations.insert(a.allocation_id.clone(), a.clone());
                            out.push((*i, a));
                        }
                        Ok(Step::Write(rec, Some(out)))
                    })
                    .await;
                match result {
                    Ok(Some(out)) => {
                        booked.push(agent.clone());
                        for (i, a) in out {
                            if let Some(slot) = placed.get_mut(i) {
                                *slot = Some(a);
                            }
                        }
                    }
                    Ok(None) => {
                        failed = true;
                        break;
                    }
                    Err(e) if e.code == ErrorCode::NotFound => {
                        failed = true;
                        break;
                    }
                    Err(e) => {
                        self.unbook(&booked, &ids).await;
                        return Err(e);
                    }
                }
            }
            if failed {
                self.unbook(&booked, &ids).await;
                continue;
            }
            // Count every member against the owner's quotas, all at once.
            let members: Vec<Allocation> = placed.iter().flatten().cloned().collect();
            match self.admit(&members).await {
                Ok(Admission::Ungoverned | Admission::Admitted) => {}
                Ok(Admission::Counting) => {
                    self.unbook(&booked, &ids).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Ok(Admission::Over(over)) => {
                    self.unbook(&booked, &ids).await;
                    return Err(quota_exceeded(&over));
                }
                Err(e) => {
                    self.unbook(&booked, &ids).await;
                    return Err(e);
                }
            }
            // Confirm: every member must still be there (a sweep may have rolled
            // back a member whose confirmation came too late).
            let mut confirmed = true;
            for agent in &booked {
                let ok = self
                    .update_agent(agent, |mut rec| {
                        let mut all = true;
                        for id in &ids {
                            if let Some(a) = rec.allocations.get_mut(id) {
                                a.pending = false;
                            }
                        }
                        for (i, slot) in placed.iter().enumerate() {
                            if slot.as_ref().is_some_and(|a| &a.agent_id == agent)
                                && ids
                                    .get(i)
                                    .is_none_or(|id| !rec.allocations.contains_key(id))
                            {
                                all = false;
                            }
                        }
                        Ok(Step::Write(rec, all))
                    })
                    .await
                    .unwrap_or(false);
                confirmed &= ok;
            }
            if !confirmed {
                self.unbook(&booked, &ids).await;
                self.forget(&members).await;
                return Err(Error::new(
                    ErrorCode::Conflict,
                    "gang booking was rolled back before it was confirmed; retry",
                ));
            }
            let allocations: Vec<Allocation> = placed
                .into_iter()
                .flatten()
                .map(|mut a| {
                    a.pending = false;
                    a
                })
                .collect();
            for a in &allocations {
                self.made(a).await;
            }
            return Ok(GangReply {
                gang_id,
                allocations,
            });
        }
        Err(contention())
    }

    /// Removes allocations `ids` from `agents`: compensates a booking that did
    /// not go through (a gang member elsewhere refused, or a quota did).
    async fn unbook(&self, agents: &[AgentId], ids: &[AllocationId]) {
        for agent in agents {
            let undone = self
                .update_agent(agent, |mut rec| {
                    let before = rec.allocations.len();
                    for id in ids {
                        rec.allocations.remove(id);
                    }
                    Ok(if rec.allocations.len() == before {
                        Step::Keep(())
                    } else {
                        Step::Write(rec, ())
                    })
                })
                .await;
            if let Err(e) = undone {
                // The sweep rolls pending members back after the deadline.
                tracing::warn!(agent = %agent, error = %e, "roll-back of a pending booking deferred to the sweep");
            }
        }
    }

    pub(super) async fn release(&self, req: ReleaseRequest) -> Result<ReleaseReply, Error> {
        let taken = self
            .take_allocation(&req.allocation_id, req.agent_id.as_ref())
            .await?;
        let Some(a) = taken else {
            return Ok(ReleaseReply { released: false });
        };
        self.forget(std::slice::from_ref(&a)).await;
        self.events
            .publish(EventKind::AllocationReleased {
                allocation_id: req.allocation_id,
                agent_id: a.agent_id,
            })
            .await;
        Ok(ReleaseReply { released: true })
    }

    pub(super) async fn renew(&self, req: RenewRequest) -> Result<Allocation, Error> {
        check_ttl(req.ttl_ms)?;
        let not_found = || {
            Error::new(
                ErrorCode::NotFound,
                format!("no allocation {}", req.allocation_id),
            )
        };
        let agent = self
            .shared_records()
            .iter()
            .find(|r| r.allocations.contains_key(&req.allocation_id))
            .map(|r| r.agent_id.clone())
            .ok_or_else(not_found)?;
        let (id, ttl) = (req.allocation_id.clone(), req.ttl_ms);
        let renewed = self
            .update_agent(&agent, move |mut rec| {
                match rec.renew(&id, ttl, common::now_ms()) {
                    Ok(a) => Ok(Step::Write(rec, Ok(a))),
                    Err(why) => Ok(Step::Keep(Err(why))),
                }
            })
            .await?;
        match renewed {
            Ok(a) => Ok(a),
            Err(RenewRefused::NotHere) => Err(not_found()),
            Err(RenewRefused::NoLease) => Err(invalid(format!(
                "allocation {} has no lease; give ttl_ms to start one",
                req.allocation_id
            ))),
        }
    }

    pub(super) async fn capacity(&self, req: CapacityRequest) -> Result<CapacityStatus, Error> {
        if let Some(r) = &req.requirements {
            check_requirements(r)?;
        }
        let records = self.records();
        let mut status = machine::capacity_status(
            &records,
            req.requirements.as_ref(),
            req.owner.as_deref(),
            common::now_ms(),
        );
        status.quotas = self.read_quotas().await?.0.report(req.owner.as_deref());
        Ok(status)
    }

    pub(super) async fn reserve(&self, req: ReserveRequest) -> Result<Reservation, Error> {
        check_owner(&req.owner)?;
        check_requirements(&req.requirements)?;
        let now = common::now_ms();
        if req.end_ms <= req.start_ms {
            return Err(invalid("end_ms must be after start_ms".into()));
        }
        if req.end_ms <= now {
            return Err(invalid("the window is already over".into()));
        }
        for _ in 0..PLACE_ATTEMPTS {
            let now = common::now_ms();
            let records = self.records();
            let agent = match &req.agent_id {
                Some(id) => {
                    let rec = records
                        .iter()
                        .find(|r| &r.agent_id == id)
                        .ok_or_else(|| Error::not_found(format!("no agent {id}")))?;
                    machine::place_reservation(
                        [rec],
                        &req.requirements,
                        req.start_ms,
                        req.end_ms,
                        now,
                    )
                }
                None => machine::place_reservation(
                    &records,
                    &req.requirements,
                    req.start_ms,
                    req.end_ms,
                    now,
                ),
            }
            .map_err(|n| no_capacity(&n))?
            .agent_id
            .clone();
            let reservation = Reservation {
                reservation_id: ReservationId::random(),
                agent_id: agent.clone(),
                owner: req.owner.clone(),
                resources: req.requirements.resources.clone(),
                start_ms: req.start_ms,
                end_ms: req.end_ms,
                created_at_ms: now,
            };
            let booked = self
                .update_agent(&agent, |mut rec| {
                    if rec
                        .fit_reservation(&req.requirements, req.start_ms, req.end_ms, now)
                        .is_err()
                    {
                        return Ok(Step::Keep(false));
                    }
                    rec.reservations
                        .insert(reservation.reservation_id.clone(), reservation.clone());
                    Ok(Step::Write(rec, true))
                })
                .await?;
            if booked {
                self.events
                    .publish(EventKind::ReservationMade {
                        reservation_id: reservation.reservation_id.clone(),
                        agent_id: agent,
                        owner: reservation.owner.clone(),
                        start_ms: reservation.start_ms,
                        end_ms: reservation.end_ms,
                        resources: reservation.resources.clone(),
                    })
                    .await;
                return Ok(reservation);
            }
        }
        Err(contention())
    }

    pub(super) async fn cancel_reservation(
        &self,
        req: CancelReservation,
    ) -> Result<CancelReply, Error> {
        let agent = req.agent_id.clone().or_else(|| {
            self.records()
                .into_iter()
                .find(|r| r.reservations.contains_key(&req.reservation_id))
                .map(|r| r.agent_id)
        });
        let none = CancelReply {
            cancelled: false,
            released: vec![],
        };
        let Some(agent) = agent else {
            return Ok(none);
        };
        let outcome = self
            .update_agent(&agent, |mut rec| {
                Ok(match rec.cancel_reservation(&req.reservation_id) {
                    Some(out) => Step::Write(rec, Some(out)),
                    None => Step::Keep(None),
                })
            })
            .await;
        let (reservation, drawn) = match outcome {
            Ok(Some(out)) => out,
            Ok(None) => return Ok(none),
            Err(e) if e.code == ErrorCode::NotFound => return Ok(none),
            Err(e) => return Err(e),
        };
        self.forget(&drawn).await;
        self.reservations_ended(std::slice::from_ref(&reservation), "cancelled")
            .await;
        self.preempted(&drawn, "reservation_ended").await;
        Ok(CancelReply {
            cancelled: true,
            released: drawn,
        })
    }

    pub(super) async fn adjust(&self, req: AdjustRequest) -> Result<AdjustReply, Error> {
        machine::check_amounts(&req.capacity).map_err(invalid)?;
        let now = common::now_ms();
        let reply = self
            .update_agent(&req.agent_id, |rec| {
                let shrink = machine::shrink_to_fit(&rec.with_capacity(&req.capacity), now);
                let overflow = !shrink.evicted.is_empty() || !shrink.dropped.is_empty();
                let mut reply = AdjustReply {
                    applied: req.preempt || !overflow,
                    capacity: shrink.record.capacity.clone(),
                    no_longer_fit: shrink.evicted.clone(),
                    reservations_no_longer_fit: shrink.dropped.clone(),
                    preempted: vec![],
                };
                if !reply.applied {
                    reply.capacity = rec.capacity.clone();
                    return Ok(Step::Keep(reply));
                }
                reply.preempted = shrink.evicted.clone();
                Ok(Step::Write(shrink.record, reply))
            })
            .await?;
        if reply.applied {
            self.events
                .publish(EventKind::CapacityAdjusted {
                    agent_id: req.agent_id.clone(),
                    capacity: reply.capacity.clone(),
                })
                .await;
            self.forget(&reply.preempted).await;
            self.preempted(&reply.preempted, "capacity_reduced").await;
            self.reservations_ended(&reply.reservations_no_longer_fit, "capacity_reduced")
                .await;
        }
        Ok(reply)
    }

    pub(super) async fn optimize(&self, req: OptimizeRequest) -> Result<OptimizePlan, Error> {
        let now = common::now_ms();
        let max_moves = req.max_moves.unwrap_or(DEFAULT_MAX_MOVES).min(10_000);
        let (moves, before, mut after) = machine::plan(&self.records(), max_moves, now);
        let mut applied = Vec::new();
        if req.apply {
            for m in &moves {
                if self.apply_move(m, now).await? {
                    applied.push(m.allocation_id.clone());
                }
            }
            after = machine::utilisation(&self.records(), common::now_ms());
        }
        Ok(OptimizePlan {
            moves,
            before,
            after,
            applied,
        })
    }

    /// Moves one allocation: books it on the destination first, then removes it
    /// from the source (so it is never held nowhere); if the source no longer
    /// has it (released meanwhile), the destination copy is removed again.
    async fn apply_move(&self, m: &common::msg::Move, now: u64) -> Result<bool, Error> {
        let Some((src, _)) = self.cache.get(&m.from) else {
            return Ok(false);
        };
        let Some(original) = src.allocations.get(&m.allocation_id).cloned() else {
            return Ok(false);
        };
        if !original.movable || original.pending || original.reservation_id.is_some() {
            return Ok(false);
        }
        let req = machine::requirements_of(&original);
        let booked = self
            .update_agent(&m.to, |mut rec| {
                if rec.fit(&req, None, now) != Ok(Draw::General) {
                    return Ok(Step::Keep(false));
                }
                let mut moved = original.clone();
                moved.agent_id = rec.agent_id.clone();
                rec.allocations.insert(moved.allocation_id.clone(), moved);
                Ok(Step::Write(rec, true))
            })
            .await?;
        if !booked {
            return Ok(false);
        }
        let removed = self
            .update_agent(&m.from, |mut rec| {
                Ok(match rec.allocations.remove(&m.allocation_id) {
                    Some(_) => Step::Write(rec, true),
                    None => Step::Keep(false),
                })
            })
            .await
            .unwrap_or(false);
        if !removed {
            self.update_agent(&m.to, |mut rec| {
                Ok(match rec.allocations.remove(&m.allocation_id) {
                    Some(_) => Step::Write(rec, ()),
                    None => Step::Keep(()),
                })
            })
            .await?;
            return Ok(false);
        }
        self.events
            .publish(EventKind::AllocationMoved {
                allocation_id: m.allocation_id.clone(),
                owner: m.owner.clone(),
                from: m.from.clone(),
                to: m.to.clone(),
            })
            .await;
        Ok(true)
    }
}
