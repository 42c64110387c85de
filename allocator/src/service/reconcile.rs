//! Reconciliation: every allocation is justified by a live holder, and what
//! a crash left behind is taken back.
//!
//! A killed orchestrator can leave an allocation booked that nobody will
//! release: it died after the allocator booked a task's allocation but before
//! recording it in the flow (a later placement of the task books another), or
//! after recording the task's end but before its release went out. The
//! orchestrator knows which allocations its flows hold, so allocations booked
//! for a flow task ([`Allocation::task`]) are checked against it once they are
//! older than the grace — the time a booking may take to reach the flow's
//! record. Those no task holds are taken back with an `allocation.preempted`
//! event (reason `reclaimed`); the orchestrator's own handling of that event
//! fails any attempt that did hold it after all, so a wrong answer cannot
//! leave a task running on capacity nobody has booked. Nothing is taken back
//! when the orchestrator does not answer, nor when the allocation was bound
//! to another task since it was asked about (handed on, see
//! [`AllocateRequest::task`](common::msg::AllocateRequest::task)).
//!
//! Leased allocations (`ttl_ms`) end in the sweep when not renewed, unconfirmed
//! bookings and expired reservations likewise, quota holds whose allocation is
//! gone in the quota sweep. Here also this replica forgets what it keeps in
//! memory of agents without a record (their work paths and last heartbeats).
//!
//! Every replica reconciles; taking an allocation back is a compare-and-set,
//! so replicas racing produce one release and one event.

use std::sync::atomic::Ordering;

use common::msg::{Allocation, HeldQuery, HeldRequest};
use common::AgentId;

use super::Allocator;

/// Allocations asked about in one request.
const HELD_BATCH: usize = 500;

impl Allocator {
    /// Whether a reconciliation is due: a third of the grace after the last.
    pub(super) fn reconcile_due(&self) -> bool {
        let now = common::now_ms();
        let every = (self.reconcile_grace_ms / 3).max(100);
        let last = self.reconciled_at.load(Ordering::Relaxed);
        now.saturating_sub(last) >= every
            && self
                .reconciled_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    pub(super) async fn reconcile(&self) {
        self.reclaim_unheld().await;
        self.paths.retain(|a| self.cache.peek(a, |_| ()).is_some());
        self.beats.retain(|a| self.cache.peek(a, |_| ()).is_some());
    }

    /// Takes back task allocations past the grace that no task holds.
    async fn reclaim_unheld(&self) {
        let now = common::now_ms();
        let candidates: Vec<(HeldQuery, AgentId)> = self
            .shared_records()
            .iter()
            .flat_map(|r| {
                r.vouched_by_tasks(self.reconcile_grace_ms, now)
                    .filter_map(|a| {
                        let task = a.task.clone()?;
                        let query = HeldQuery {
                            allocation_id: a.allocation_id.clone(),
                            task,
                        };
                        Some((query, r.agent_id.clone()))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        for chunk in candidates.chunks(HELD_BATCH) {
            let req = HeldRequest {
                allocations: chunk.iter().map(|(q, _)| q.clone()).collect(),
            };
            let reply = match self.client.allocations_held(&req).await {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::debug!(code = %e.code, error = %e.message, "allocations not reconciled: the orchestrator did not answer");
                    return;
                }
            };
            for unheld in reply.unheld {
                let Some((query, agent)) = chunk
                    .iter()
                    .find(|(q, _)| q.allocation_id == unheld.allocation_id)
                else {
                    continue;
                };
                match self
                    .take_allocation_if(&query.allocation_id, Some(agent), Some(&query.task))
                    .await
                {
                    Ok(Some(a)) => self.reclaimed(a, &unheld.reason).await,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(allocation = %query.allocation_id, error = %e, "reclaim deferred")
                    }
                }
            }
        }
    }

    async fn reclaimed(&self, a: Allocation, why: &str) {
        tracing::info!(
            allocation = %a.allocation_id,
            agent = %a.agent_id,
            owner = %a.owner,
            why,
            "allocation no task holds taken back"
        );
        let taken = std::slice::from_ref(&a);
        self.forget(taken).await;
        self.preempted(taken, "reclaimed").await;
    }
}
