//! The agent records: the cached view, and every write to a record as a
//! compare-and-set, queued per agent (its lane) so that bookings on one agent
//! in this replica go out together instead of racing each other.

use std::sync::Arc;

use common::msg::{Allocation, EventKind, Reservation};
use common::nats::{self as bus, Step, Written};
use common::{AgentId, Error};

use tokio::sync::oneshot;

use super::lanes::{self, Lane, Waiting};
use super::ops::contention;
use super::Allocator;
use crate::machine::{self, AgentRecord};

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

    pub(super) async fn refresh(&self, id: &AgentId) -> Result<(), Error> {
        match self.agents.entry(id.as_str()).await {
            Ok(Some(entry)) => {
                self.cache.apply(entry);
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(e) => Err(Error::unavailable("kv read", e)),
        }
    }

    pub(super) fn lane(&self, id: &AgentId) -> Arc<Lane> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes.entry(id.clone()).or_default().clone()
    }

    /// The agent's record as this replica knows it, read from KV once per
    /// update (`fresh`) when the cache does not have it.
    pub(super) async fn current(
        &self,
        id: &AgentId,
        fresh: &mut bool,
    ) -> Result<(AgentRecord, u64), Error> {
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
    pub(super) fn unbusy<'a>(
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
    pub(super) async fn store(
        &self,
        id: &AgentId,
        rec: AgentRecord,
        revision: u64,
        attempt: usize,
    ) -> Result<bool, Error> {
        let body: bytes::Bytes = serde_json::to_vec(&rec)
            .map_err(|e| Error::internal_from("encode agent", e))?
            .into();
        let rec = Arc::new(rec);
        self.cache.expect(id, body.clone(), rec.clone());
        let written = bus::write_at(&self.agents, id.as_str(), body, Some(revision)).await;
        self.cache.sent(id);
        match written? {
            Written::Stored(rev) => {
                self.cache.keep(id.clone(), rec, rev);
                Ok(true)
            }
            Written::Lost => {
                self.refresh(id).await?;
                bus::lost_race_pause(attempt).await;
                Ok(false)
            }
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
        // Answered by another's group write, or the lane's turn to write.
        // The answer is not waited for behind the lock: a group of hundreds
        // would otherwise hand the lock on once per change, each a wake-up.
        let held = tokio::select! {
            biased;
            answered = &mut outcome => Err(answered),
            held = lane.lock.lock() => Ok(held),
        };
        let result = match held {
            Err(answered) => answered
                .unwrap_or_else(|_| Err(Error::internal("a booking was dropped unanswered"))),
            Ok(held) => self.write_turn(id, &lane, held, outcome).await,
        };
        result?;
        let r = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        r.ok_or_else(|| Error::internal("a booking decided nothing"))
    }

    /// The lane's lock is `held`: writes every waiting change in one group
    /// unless this one's was carried already, and returns its outcome.
    async fn write_turn(
        &self,
        id: &AgentId,
        lane: &Lane,
        held: tokio::sync::MutexGuard<'_, ()>,
        mut outcome: oneshot::Receiver<Result<(), Error>>,
    ) -> Result<(), Error> {
        // The writer before this one answers every change it carried before
        // it unlocks: no answer yet means this change is still waiting.
        match outcome.try_recv() {
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
        }
    }

    /// One compare-and-set carrying every change of `group`, each decided on
    /// the record as the ones before it left it. As in
    /// [`Self::update_agent`], a group that changes nothing on the cached copy
    /// is decided again on a fresh read.
    pub(super) async fn write_group(
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

    pub(super) async fn reservations_ended(&self, reservations: &[Reservation], reason: &str) {
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
}
