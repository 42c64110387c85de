//! The periodic sweep every replica runs: lost agents, expired reservations,
//! unconfirmed bookings and leases, and the quota book's repairs; now and
//! then also the reconciliation ([`reconcile`](super::reconcile)).
//!
//! Replicas sweep independently; each transition is a compare-and-set that
//! re-checks its condition on the record being written, so when two replicas
//! race, one writes and publishes the event and the other finds nothing to do.

use std::sync::Arc;
use std::time::Duration;

use common::msg::EventKind;
use common::nats::{self as bus, Step};
use futures::StreamExt;

use super::Allocator;
use crate::machine::{AgentRecord, Expired};

/// How much later than its interval a sweep may come before the gap counts
/// as this replica's own pause.
const PAUSE_SLACK: Duration = Duration::from_millis(1_000);
/// Silent agents judged at once by one sweep (each a compare-and-set).
const LOSING_AT_ONCE: usize = 16;

impl Allocator {
    pub(super) async fn sweep_forever(self: Arc<Self>, every_ms: u64) {
        let every = Duration::from_millis(every_ms.max(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            // A judge that was paused (frozen, starved) heard nothing meanwhile:
            // the gap counts like an outage, so agents are not lost for it.
            let now = tokio::time::Instant::now();
            if now.duration_since(last) > every + PAUSE_SLACK {
                tracing::info!(
                    gap_ms = now.duration_since(last).as_millis() as u64,
                    "sweep was paused; its gap counts as an outage"
                );
                self.outages.stalled();
            }
            self.sweep().await;
            if self.reconcile_due() {
                self.reconcile().await;
            }
            // From the end of this sweep: a slow sweep is not a pause.
            last = tokio::time::Instant::now();
        }
    }

    async fn sweep(&self) {
        let now = common::now_ms();
        let mut silent = Vec::new();
        for rec in self.shared_records() {
            let heard = self
                .last_beat(&rec.agent_id)
                .max(self.outages.last_down_ms());
            if rec.lost_at(heard, now).is_some() {
                silent.push(rec.clone());
            }
            if rec.has_expired(now, self.gang_deadline_ms) {
                self.expire(&rec).await;
            }
            if rec.retire_at(self.agent_retention_ms, now) {
                self.retire(&rec).await;
            }
        }
        if !silent.is_empty() {
            // Give the outage watcher a poll first: if this replica was just
            // paused, the watcher counts the pause before the silent are
            // judged on. Once for all of them: a rack of agents gone at once
            // is declared lost in one sweep, not one poll apart each.
            tokio::time::sleep(common::nats::Outages::POLL * 2).await;
            futures::stream::iter(&silent)
                .for_each_concurrent(LOSING_AT_ONCE, |rec| self.lose(rec))
                .await;
        }
        self.sweep_quotas().await;
    }

    /// Marks the agent lost if, on fresh data, it still has missed its
    /// heartbeats (the sweep gives the outage watcher a poll first).
    /// Time this replica spent disconnected or paused, or saw the agents'
    /// bucket stalled, counts as heard from: a NATS outage or a cluster's failover
    /// silences every agent at once, and must not make them all lost.
    async fn lose(&self, rec: &AgentRecord) {
        let beat = self.last_beat(&rec.agent_id);
        let heard = beat.max(self.outages.last_down_ms());
        let now = common::now_ms();
        let outcome = self
            .update_agent(&rec.agent_id, |mut rec| {
                if rec.lost_at(heard, now).is_none() {
                    return Ok(Step::Keep(None));
                }
                // The event names the real last sign of life, not the outage.
                let seen = rec.lost_at(beat, now).unwrap_or(heard);
                let released = rec.mark_lost();
                rec.status_since_ms = now;
                Ok(Step::Write(rec, Some((seen, released))))
            })
            .await;
        match outcome {
            Ok(Some((last_seen_ms, released))) => {
                // What this replica heard, for telling a silent agent from
                // heartbeats that did not reach it (a route, a subscription).
                tracing::info!(
                    agent = %rec.agent_id,
                    released = released.len(),
                    silent_ms = now.saturating_sub(last_seen_ms),
                    heard_a_beat = beat > 0,
                    interval_ms = rec.heartbeat_interval_ms,
                    "agent lost"
                );
                self.forget(&released).await;
                self.events
                    .publish(EventKind::AgentLost {
                        agent_id: rec.agent_id.clone(),
                        last_seen_ms,
                        released,
                    })
                    .await;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(agent = %rec.agent_id, error = %e, "lost check deferred"),
        }
    }

    /// Removes a lost or left agent past the retention period: its record
    /// (a delete over the revision that still shows it retired-to-be, so a
    /// registration meanwhile wins), its last heartbeat and its work path.
    async fn retire(&self, rec: &AgentRecord) {
        let now = common::now_ms();
        let Ok(entry) = self.agents.entry(rec.agent_id.as_str()).await else {
            return;
        };
        let Some(entry) = entry else { return };
        let Ok(current) = serde_json::from_slice::<AgentRecord>(&entry.value) else {
            return;
        };
        if !current.retire_at(self.agent_retention_ms, now) {
            return;
        }
        match bus::delete_at(&self.agents, rec.agent_id.as_str(), entry.revision).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::debug!(agent = %rec.agent_id, "retirement deferred: the record changed");
                return;
            }
            Err(e) => {
                tracing::debug!(agent = %rec.agent_id, error = %e, "retirement deferred");
                return;
            }
        }
        self.beats.forget(&rec.agent_id);
        self.remove_work_path(&rec.agent_id).await;
        tracing::info!(agent = %rec.agent_id, status = ?current.status, "agent retired");
        self.events
            .publish(EventKind::AgentRetired {
                agent_id: rec.agent_id.clone(),
                status: current.status,
            })
            .await;
    }

    async fn expire(&self, rec: &AgentRecord) {
        let now = common::now_ms();
        let deadline = self.gang_deadline_ms;
        let outcome = self
            .update_agent(&rec.agent_id, |mut rec| {
                let expired = rec.expire(now, deadline);
                Ok(if expired.is_empty() {
                    Step::Keep(Expired::default())
                } else {
                    Step::Write(rec, expired)
                })
            })
            .await;
        match outcome {
            Ok(expired) => {
                self.forget(&expired.drawn).await;
                self.forget(&expired.unconfirmed).await;
                self.forget(&expired.unrenewed).await;
                self.reservations_ended_pub(&expired).await;
            }
            Err(e) => tracing::debug!(agent = %rec.agent_id, error = %e, "expiry deferred"),
        }
    }

    async fn reservations_ended_pub(&self, expired: &Expired) {
        for r in &expired.reservations {
            self.events
                .publish(EventKind::ReservationEnded {
                    reservation_id: r.reservation_id.clone(),
                    agent_id: r.agent_id.clone(),
                    owner: r.owner.clone(),
                    reason: "expired".into(),
                })
                .await;
        }
        for (allocs, reason) in [
            (&expired.drawn, "reservation_ended"),
            (&expired.unconfirmed, "gang_rolled_back"),
            (&expired.unrenewed, "expired"),
        ] {
            for a in allocs {
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
    }
}
