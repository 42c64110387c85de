//! Allocations booked, confirmed, renewed and released: each placement is
//! decided in the pure core and booked with a compare-and-set on the record of
//! the agent it lands on, then counted against its owner's quotas.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::msg::{
    AllocateRequest, Allocation, EventKind, GangReply, GangRequest, ReleaseReply, ReleaseRequest,
    RenewRequest,
};
use common::nats::Step;
use common::{AgentId, AllocationId, Error, ErrorCode};

use super::ops::{
    check_owner, check_requirements, check_ttl, contention, invalid, no_capacity, past_deadline,
    quota_exceeded, PLACEMENT_SAMPLE, PLACE_ATTEMPTS,
};
use super::Allocator;
use crate::machine::{self, Admission, AgentRecord, Draw, RenewRefused};

/// How long a booking waits, at most, for a new quota's first count (see
/// [`Attempts`]); below the default request timeout, so the answer arrives.
const COUNT_WAIT: Duration = Duration::from_secs(4);

/// Placements tried from fresh state before giving up on contention. A try
/// that found the owner's quota being counted is given back, up to
/// [`COUNT_WAIT`] after the first: that is a wait whose length depends on
/// how many allocations the count reads and how loaded the machine is, not
/// contention.
struct Attempts {
    left: usize,
    counting_until: Option<Instant>,
}

impl Attempts {
    fn new() -> Attempts {
        Attempts {
            left: PLACE_ATTEMPTS,
            counting_until: None,
        }
    }

    /// Takes one try, if any is left.
    fn next(&mut self) -> bool {
        let go = self.left > 0;
        self.left = self.left.saturating_sub(1);
        go
    }

    /// The try ended on a count in progress.
    fn counting(&mut self) {
        let until = *self
            .counting_until
            .get_or_insert_with(|| Instant::now() + COUNT_WAIT);
        if Instant::now() < until {
            self.left += 1;
        }
    }
}

/// How a booking on a chosen agent ended.
enum Booked {
    Done(Box<Allocation>),
    /// The agent no longer fits, or the count is in progress: choose again.
    Again,
}

/// Pools larger than this are sampled from a window (see [`fitting`]).
const WINDOW_POOL: usize = 1024;

/// From `start` on, the first [`PLACEMENT_SAMPLE`] records that fit, or
/// `None` when a record with reservations comes first (placement weighs
/// reservations over the whole pool) or fewer fit.
fn fitting(
    rows: &[(std::sync::Arc<AgentRecord>, u64)],
    start: usize,
    wanted: &common::msg::Requirements,
    owner: Option<&str>,
    now: u64,
) -> Option<Vec<std::sync::Arc<AgentRecord>>> {
    let n = rows.len();
    let mut found = Vec::with_capacity(PLACEMENT_SAMPLE);
    for i in 0..n {
        let (r, _) = &rows[(start + i) % n];
        if !r.reservations.is_empty() {
            return None;
        }
        if r.fit(wanted, owner, now).is_ok() {
            found.push(r.clone());
            if found.len() == PLACEMENT_SAMPLE {
                return Some(found);
            }
        }
    }
    None
}

impl Allocator {
    pub(super) async fn allocate(&self, req: AllocateRequest) -> Result<Allocation, Error> {
        check_requirements(&req.requirements)?;
        check_owner(&req.owner)?;
        check_ttl(req.ttl_ms)?;
        let task = req.task.clone();
        let id = req
            .allocation_id
            .clone()
            .unwrap_or_else(AllocationId::random);
        let mut attempts = Attempts::new();
        while attempts.next() {
            let now = common::now_ms();
            // A retry of a request that was booked already gets the same answer.
            let booked = self
                .cache
                .holding(&id)
                .and_then(|(r, _)| r.allocations.get(&id).cloned());
            if let Some(a) = booked {
                if !a.pending {
                    if req.task.is_some() && a.task != req.task {
                        return self.hand_on(&req, a).await;
                    }
                    return Ok(a);
                }
            }
            past_deadline(req.deadline_ms)?;
            // Under a quota the booking stays pending until it is counted.
            let governed = self.cached_quotas().governs(&req.owner);
            let start = self
                .rotation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (wanted, owner) = (&req.requirements, Some(req.owner.as_str()));
            // A large pool is sampled from a window of agents that fit,
            // taken in place; every record is copied only when the window
            // has none to offer.
            let window = (task.is_some() && self.cache.len() > WINDOW_POOL)
                .then(|| {
                    self.cache
                        .scan(|rows| fitting(rows, start, wanted, owner, now))
                })
                .flatten();
            let mut chosen = None;
            if let Some(window) = window {
                let records: Vec<&AgentRecord> = window.iter().map(|r| &**r).collect();
                let found = machine::sample(&records, wanted, owner, now, 0, PLACEMENT_SAMPLE);
                let found = self.reachable(found, now).await;
                if !found.is_empty() {
                    chosen = Some(self.best(found, req.requirements.policy));
                }
            }
            let agent = match chosen {
                Some(agent) => agent,
                None => self.choose_from_all(&req, start, now).await?,
            };
            match self
                .book_task(&req, &id, &agent, governed, now, &mut attempts)
                .await?
            {
                Booked::Done(a) => return Ok(*a),
                Booked::Again => continue,
            }
        }
        Err(contention())
    }

    /// The best of `found` that no booking in this replica is busy with.
    fn best(&self, found: Vec<machine::Candidate<'_>>, policy: common::msg::Policy) -> AgentId {
        let ranked = machine::rank(found, policy);
        self.unbusy(ranked[0].agent.agent_id.clone(), || ranked)
    }

    /// The agent to book `req` on, chosen from every record: the answer when
    /// no window applies or the window has none to offer.
    async fn choose_from_all(
        &self,
        req: &AllocateRequest,
        start: usize,
        now: u64,
    ) -> Result<AgentId, Error> {
        let (wanted, owner) = (&req.requirements, Some(req.owner.as_str()));
        let shared = self.shared_records();
        let records: Vec<&AgentRecord> = shared.iter().map(|r| &**r).collect();
        let mut found = machine::sample(&records, wanted, owner, now, start, PLACEMENT_SAMPLE);
        // A task goes only to an agent its assignment can reach: those
        // sampled are looked up, and only when none of them has a work
        // path is every agent.
        let mut unreachable = Vec::new();
        let mut records = records.as_slice();
        let with;
        if req.task.is_some() {
            let sampled = found.len();
            found = self.reachable(found, now).await;
            if found.is_empty() && sampled > 0 {
                (with, unreachable) = self.with_work_path(records, now).await;
                records = &with;
                found = machine::sample(records, wanted, owner, now, start, PLACEMENT_SAMPLE);
            }
        }
        if found.is_empty() {
            let mut why = machine::why_not(records.iter().copied(), wanted, Some(&req.owner), now);
            if !unreachable.is_empty() {
                why.message = format!(
                    "{}; left out for not listening for assignments (yet): {}",
                    why.message,
                    listed(&unreachable)
                );
            }
            return Err(no_capacity(&why));
        }
        Ok(self.best(found, req.requirements.policy))
    }

    /// Books the task `req` asks for on `agent`, counts it against its
    /// owner's quotas and confirms it: done, or to be chosen again.
    async fn book_task(
        &self,
        req: &AllocateRequest,
        id: &AllocationId,
        agent: &AgentId,
        governed: bool,
        now: u64,
        attempts: &mut Attempts,
    ) -> Result<Booked, Error> {
        let (task, ttl, deadline) = (req.task.clone(), req.ttl_ms, req.deadline_ms);
        let agent = agent.clone();
        let id = id.clone();
        let (wanted, owner, priority) = (req.requirements.clone(), req.owner.clone(), req.priority);
        let task = task.clone();
        let this = id.clone();
        let booked = self
            .book_agent(&agent, move |rec| {
                if let Some(a) = rec.allocations.get(&this) {
                    return Ok(Step::Keep(Some((a.clone(), false))));
                }
                // Checked again just before the write: the replica may
                // have stalled since the first check.
                past_deadline(deadline)?;
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
            Ok(Some((a, false))) if !a.pending => return Ok(Booked::Done(Box::new(a))),
            // Another booking of the same id is still being counted.
            Ok(Some(_)) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Ok(Booked::Again);
            }
            // It no longer fits there, or the agent is gone: choose again.
            Ok(None) => return Ok(Booked::Again),
            Err(e) if e.code == ErrorCode::NotFound => return Ok(Booked::Again),
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
                attempts.counting();
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Ok(Booked::Again);
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
        Ok(Booked::Done(Box::new(a)))
    }

    /// Confirms pending allocations `ids` on `agent`; false if any is gone (a
    /// sweep rolled it back because the confirmation came too late).
    pub(super) async fn confirm(&self, agent: &AgentId, ids: &[AllocationId]) -> bool {
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

    pub(super) async fn made(&self, a: &Allocation) {
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
        let mut attempts = Attempts::new();
        while attempts.next() {
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
                    attempts.counting();
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
    pub(super) async fn unbook(&self, agents: &[AgentId], ids: &[AllocationId]) {
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
            .cache
            .holding(&req.allocation_id)
            .map(|(r, _)| r.agent_id.clone())
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
}

/// A few agent ids for a message, and how many more.
fn listed(agents: &[AgentId]) -> String {
    const SHOWN: usize = 5;
    let names: Vec<&str> = agents.iter().take(SHOWN).map(|a| a.as_str()).collect();
    match agents.len().saturating_sub(SHOWN) {
        0 => names.join(", "),
        more => format!("{} and {more} more", names.join(", ")),
    }
}
