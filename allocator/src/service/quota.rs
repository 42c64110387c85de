//! Quotas per owner over the wire: the quota book in KV, counting bookings
//! against it, setting and lowering limits (with preemption), and the sweep
//! that repairs the book after a crash.
//!
//! The book is one KV document, so "is there room under the quota?" and
//! "count it" are one compare-and-set, whichever replica asks. Allocations
//! stay in the agent records; a booking under a quota is made pending on its
//! agent, counted in the book, then confirmed (see [`crate::machine::QuotaBook`]).

use std::collections::BTreeMap;
use std::time::Duration;

use common::msg::{Allocation, EventKind, QuotaReply, QuotaRequest};
use common::nats::{self as bus, Step, Written};
use common::{AgentId, AllocationId, Error, ErrorCode};

use super::Allocator;
use crate::machine::{self, Admission, AgentRecord, Quota, QuotaBook};

/// The quota book's key in `coord_quotas`.
const KEY: &str = "pool";
/// Attempts at a consistent view of every agent before leaving the first count
/// of a new quota to the sweep.
const COUNT_ATTEMPTS: usize = 50;

impl Allocator {
    /// The book as this replica last read or wrote it: a hint for whether a
    /// quota may apply, never the basis of a decision (those are CAS steps).
    pub(super) fn cached_quotas(&self) -> QuotaBook {
        self.quota_cache
            .read()
            .map(|c| c.0.clone())
            .unwrap_or_default()
    }

    fn remember_quotas(&self, book: QuotaBook, revision: u64) {
        if let Ok(mut c) = self.quota_cache.write() {
            if c.1 <= revision {
                *c = (book, revision);
            }
        }
    }

    /// Reads the book from KV (and refreshes the hint).
    pub(super) async fn read_quotas(&self) -> Result<(QuotaBook, u64), Error> {
        let (book, rev) = bus::get_json::<QuotaBook>(&self.quotas, KEY)
            .await?
            .unwrap_or_default();
        self.remember_quotas(book.clone(), rev);
        Ok((book, rev))
    }

    /// A read of the book that started after this call did: bookings that
    /// need one share it. Each takes a ticket once its booking is stored; a
    /// read serves every ticket taken before it started, so one read in
    /// flight at a time answers all the bookings that arrived meanwhile.
    /// They wait for it together, not in turn behind a lock: hundreds of
    /// bookings at once would otherwise wake one after the other.
    async fn fresh_quotas(&self) -> Result<(QuotaBook, u64), Error> {
        use std::sync::atomic::Ordering::SeqCst;
        let ticket = self.quota_tickets.fetch_add(1, SeqCst) + 1;
        let mut reads = self.quota_reads.subscribe();
        loop {
            if let Some((served, book, rev)) = &*reads.borrow_and_update() {
                if *served >= ticket {
                    return Ok((book.clone(), *rev));
                }
            }
            let Ok(reading) = self.quota_reading.try_lock() else {
                // A read is in flight: it may have started before this
                // ticket, so look again once it ends.
                let _ = reads.changed().await;
                continue;
            };
            // Whatever becomes of this read (done, failed, dropped), the
            // others look again when it ends.
            let _ends = ReadEnds(&self.quota_reads, Some(reading));
            let served = self.quota_tickets.load(SeqCst);
            let (book, rev) = self.read_quotas().await?;
            self.quota_reads
                .send_replace(Some((served, book.clone(), rev)));
            return Ok((book, rev));
        }
    }

    /// Compare-and-set on the book. Bookings in this replica queue on a lock
    /// rather than losing races to each other; other replicas are fenced by
    /// the compare-and-set.
    async fn update_quotas<R>(
        &self,
        mut f: impl FnMut(QuotaBook) -> Result<Step<QuotaBook, R>, Error>,
    ) -> Result<R, Error> {
        let _held = self.quota_lock.lock().await;
        let ((r, written), rev) =
            bus::cas_update::<QuotaBook, (R, Option<QuotaBook>), _>(&self.quotas, KEY, |cur| {
                Ok(match f(cur.unwrap_or_default())? {
                    Step::Write(book, r) => Step::Write(book.clone(), (r, Some(book))),
                    Step::Keep(r) => Step::Keep((r, None)),
                })
            })
            .await?;
        if let Some(book) = written {
            self.remember_quotas(book, rev);
        }
        Ok(r)
    }

    /// Whether the same quotas cover owners `a` and `b`, on a fresh read: an
    /// allocation may then change hands between them with every quota's
    /// count unchanged.
    pub(super) async fn same_quotas(&self, a: &str, b: &str) -> Result<bool, Error> {
        if a == b {
            return Ok(true);
        }
        let (book, _) = self.fresh_quotas().await?;
        let names = |o| book.covering(o).map(|(n, _)| n.clone()).collect::<Vec<_>>();
        Ok(names(a) == names(b))
    }

    /// Counts one request's allocations against the quotas covering its owner.
    /// The first read is fresh, and made after the booking, so a quota created
    /// meanwhile is either seen here or counts this booking itself (its count
    /// starts after it is stored); owners without a quota stop at this read.
    pub(super) async fn admit(&self, allocs: &[Allocation]) -> Result<Admission, Error> {
        let Some(owner) = allocs.first().map(|a| a.owner.as_str()) else {
            return Ok(Admission::Ungoverned);
        };
        if !self.fresh_quotas().await?.0.governs(owner) {
            return Ok(Admission::Ungoverned);
        }
        self.update_quotas(|mut book| {
            Ok(match book.admit(allocs) {
                Admission::Admitted => Step::Write(book, Admission::Admitted),
                other => Step::Keep(other),
            })
        })
        .await
    }

    /// Stops counting allocations that are gone. Best effort: a hold left
    /// behind only holds too much, and the sweep drops it.
    pub(super) async fn forget(&self, allocs: &[Allocation]) {
        if allocs.is_empty() || self.cached_quotas().quotas.is_empty() {
            return;
        }
        let ids: Vec<&AllocationId> = allocs.iter().map(|a| &a.allocation_id).collect();
        let done = self
            .update_quotas(|mut book| {
                Ok(if book.forget(ids.iter().copied()) {
                    Step::Write(book, ())
                } else {
                    Step::Keep(())
                })
            })
            .await;
        if let Err(e) = done {
            tracing::warn!(error = %e, "quota holds left for the sweep");
        }
    }

    /// Every allocation on every agent at one instant, or `None` when the
    /// agents changed while they were read. Two reads that find every record
    /// at the same revision saw the state between them: a record's revision
    /// only grows, so none changed in between.
    async fn live_allocations(&self) -> Result<Option<BTreeMap<AllocationId, Allocation>>, Error> {
        let first = self.read_agents().await?;
        let second = self.read_agents().await?;
        let revisions = |m: &BTreeMap<String, (u64, Option<AgentRecord>)>| {
            m.iter()
                .map(|(k, (r, _))| (k.clone(), *r))
                .collect::<Vec<_>>()
        };
        if revisions(&first) != revisions(&second) {
            return Ok(None);
        }
        let mut live = BTreeMap::new();
        for (_, rec) in second.into_values() {
            for (id, a) in rec.map(|r| r.allocations).unwrap_or_default() {
                live.insert(id, a);
            }
        }
        Ok(Some(live))
    }

    async fn read_agents(&self) -> Result<BTreeMap<String, (u64, Option<AgentRecord>)>, Error> {
        let mut out = BTreeMap::new();
        for k in bus::keys(&self.agents).await? {
            let entry = self
                .agents
                .entry(&k)
                .await
                .map_err(|e| Error::unavailable("kv read", e))?;
            if let Some(e) = entry {
                let rec = serde_json::from_slice::<AgentRecord>(&e.value).ok();
                out.insert(k, (e.revision, rec));
            }
        }
        Ok(out)
    }

    /// One attempt at bringing the book in line with the agents: read the
    /// book, then a consistent view of the agents, then write the book back
    /// against the revision read first (any booking in between moves it on,
    /// and the attempt is simply made again later). Returns whether the book
    /// is now in line (`false`: try again).
    async fn reconcile_once(&self) -> Result<bool, Error> {
        let (mut book, rev) = self.read_quotas().await?;
        let Some(live) = self.live_allocations().await? else {
            return Ok(false);
        };
        if !book.reconcile(&live) {
            return Ok(true);
        }
        let body =
            serde_json::to_vec(&book).map_err(|e| Error::internal_from("encode quotas", e))?;
        if rev == 0 {
            // No book was ever written: there is nothing to count against.
            return Ok(true);
        }
        match bus::write_at(&self.quotas, KEY, body.into(), Some(rev)).await? {
            Written::Stored(rev) => {
                tracing::info!("quota book reconciled with the agents");
                self.remember_quotas(book, rev);
                Ok(true)
            }
            Written::Lost => Ok(false),
        }
    }

    /// The sweep's part: counts new quotas whose setter died before counting,
    /// and drops holds whose allocation is gone (a release or preemption that
    /// crashed before forgetting it). Cheap when the cached agents agree with
    /// the book.
    pub(super) async fn sweep_quotas(&self) {
        let Ok((book, _)) = self.read_quotas().await else {
            return;
        };
        if book.quotas.is_empty() && book.holds.is_empty() {
            return;
        }
        let cached: BTreeMap<AllocationId, Allocation> = self
            .records()
            .into_iter()
            .flat_map(|r| r.allocations)
            .collect();
        let mut probe = book.clone();
        if !probe.reconcile(&cached) {
            return;
        }
        if let Err(e) = self.reconcile_once().await {
            tracing::debug!(error = %e, "quota reconciliation deferred");
        }
    }

    /// `coord.allocator.quota.set`.
    pub(super) async fn set_quota(&self, req: QuotaRequest) -> Result<QuotaReply, Error> {
        super::ops::check_owner(&req.owner)?;
        machine::check_amounts(&req.limits).map_err(super::ops::invalid)?;
        let owner = req.owner.clone();
        if req.limits.is_empty() {
            let cleared = self
                .update_quotas(|mut book| {
                    Ok(if book.clear(&owner) {
                        Step::Write(book, true)
                    } else {
                        Step::Keep(false)
                    })
                })
                .await?;
            if cleared {
                self.quota_changed(&owner, &req.limits).await;
            }
            return Ok(QuotaReply {
                owner,
                applied: true,
                quota: None,
                no_longer_fit: vec![],
                preempted: vec![],
            });
        }
        // A new quota is first created with no limits and counted: what the
        // owner holds already must be known before anything is admitted.
        let (created, counted) = self
            .update_quotas(|mut book| {
                Ok(match book.quotas.get(&owner) {
                    Some(q) => Step::Keep((false, q.counted)),
                    None => {
                        book.quotas.insert(owner.clone(), Quota::default());
                        Step::Write(book, (true, false))
                    }
                })
            })
            .await?;
        if !counted {
            let mut done = false;
            for _ in 0..COUNT_ATTEMPTS {
                let in_line = self.reconcile_once().await?;
                let (book, _) = self.read_quotas().await?;
                if in_line && book.quotas.get(&owner).is_some_and(|q| q.counted) {
                    done = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !done {
                return Err(Error::new(
                    ErrorCode::Unavailable,
                    "the agents kept changing while the owner's allocations were counted; retry",
                ));
            }
        }
        let (applied, victims, status) = self
            .update_quotas(|mut book| {
                let victims = book.over_limits(&owner, &req.limits);
                if !victims.is_empty() && !req.preempt {
                    return Ok(Step::Keep((false, victims, book.status(&owner))));
                }
                // The victims stay counted until they are taken back, so
                // nothing is admitted into room they still occupy.
                if let Some(q) = book.quotas.get_mut(&owner) {
                    q.limits = req.limits.clone();
                }
                let status = book.status(&owner);
                Ok(Step::Write(book, (true, victims, status)))
            })
            .await?;
        if !applied {
            let mut quota = status;
            if created {
                // Refused: the owner is left without a quota, as before.
                self.update_quotas(|mut book| {
                    Ok(if book.clear(&owner) {
                        Step::Write(book, ())
                    } else {
                        Step::Keep(())
                    })
                })
                .await?;
                quota = None;
            }
            return Ok(QuotaReply {
                owner,
                applied: false,
                quota,
                no_longer_fit: victims,
                preempted: vec![],
            });
        }
        self.quota_changed(&owner, &req.limits).await;
        // The lower limit is in force (nothing new is admitted beyond it);
        // now take back what is over it.
        let mut preempted = Vec::new();
        for v in &victims {
            if let Some(a) = self
                .take_allocation(&v.allocation_id, Some(&v.agent_id))
                .await?
            {
                preempted.push(a);
            }
        }
        self.forget(&victims).await;
        self.preempted(&preempted, "quota_reduced").await;
        let quota = self.read_quotas().await?.0.status(&owner);
        Ok(QuotaReply {
            owner,
            applied: true,
            quota,
            no_longer_fit: victims,
            preempted,
        })
    }

    async fn quota_changed(&self, owner: &str, limits: &BTreeMap<String, f64>) {
        self.events
            .publish(EventKind::QuotaChanged {
                owner: owner.to_owned(),
                limits: limits.clone(),
            })
            .await;
    }

    /// Removes allocation `id` from its agent (`hint`, or wherever it is now).
    pub(super) async fn take_allocation(
        &self,
        id: &AllocationId,
        hint: Option<&AgentId>,
    ) -> Result<Option<Allocation>, Error> {
        self.take_allocation_if(id, hint, None).await
    }

    /// As [`Self::take_allocation`], but only while the allocation is still
    /// bound to task `bound` when that is given: one handed on to another
    /// task since it was looked at stays.
    pub(super) async fn take_allocation_if(
        &self,
        id: &AllocationId,
        hint: Option<&AgentId>,
        bound: Option<&common::msg::TaskRef>,
    ) -> Result<Option<Allocation>, Error> {
        let remove = || {
            let id = id.clone();
            let bound = bound.cloned();
            move |rec: &mut AgentRecord| {
                let still = rec
                    .allocations
                    .get(&id)
                    .is_some_and(|a| bound.is_none() || a.task == bound);
                Ok(match still.then(|| rec.allocations.remove(&id)).flatten() {
                    Some(a) => Step::Write((), Some(a)),
                    None => Step::Keep(None),
                })
            }
        };
        if let Some(agent) = hint {
            match self.book_agent(agent, remove()).await {
                Ok(Some(a)) => return Ok(Some(a)),
                Ok(None) => {}
                Err(e) if e.code == ErrorCode::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // It may have been moved by a rebalancing: take it where it is now.
        let elsewhere = self
            .cache
            .holding(id)
            .filter(|(r, _)| Some(&r.agent_id) != hint);
        match elsewhere {
            Some((rec, _)) => self.book_agent(&rec.agent_id, remove()).await,
            None => Ok(None),
        }
    }
}

/// A fresh read of the quota book in flight; when it ends, however it
/// ends, the bookings waiting for it look again.
struct ReadEnds<'a>(
    &'a tokio::sync::watch::Sender<Option<(u64, QuotaBook, u64)>>,
    Option<tokio::sync::MutexGuard<'a, ()>>,
);

impl Drop for ReadEnds<'_> {
    fn drop(&mut self) {
        // Unlocked first: one that looks again may start the next read.
        drop(self.1.take());
        self.0.send_modify(|_| {});
    }
}
