//! Liveness: every replica hears every heartbeat and keeps the last one per
//! agent in memory. A beat costs no stored message: at ten thousand agents a
//! bucket write per beat was ten thousand JetStream writes a second, which
//! queued behind a running flow until live agents looked silent. Only the
//! transitions (active, lost, left) are written, durably, in the agents'
//! records, each a compare-and-set that re-checks the silence, so replicas
//! racing on one agent declare it lost once.
//!
//! What a replica could not hear is not held against the agents: time its
//! connection was down, its own pauses (see [`common::nats::Outages`]), time the
//! agents' bucket did not answer (a cluster electing a leader, a node cut
//! off from its peers: see [`Allocator::probe_forever`]), and the time since
//! it started (it heard nothing before).

use std::sync::Arc;

use common::{subject, AgentId};
use futures::StreamExt;

use super::{Allocator, STALL_AFTER};

/// The least time between two heartbeats of one agent that are both recorded
/// (see [`Allocator::admit_beat`]).
const MIN_BEAT_GAP_MS: u64 = 100;
/// How often, at most, dropped heartbeats are logged.
const BEAT_DROP_WARN_EVERY_MS: u64 = 10_000;

impl Allocator {
    /// Takes every agent's heartbeats until the subscription ends. A beat is
    /// a map update, done in line: nothing waits on the server.
    pub(super) async fn hear_forever(self: Arc<Self>, mut beats: async_nats::Subscriber) {
        while let Some(msg) = beats.next().await {
            self.heartbeat(&msg);
        }
    }

    /// Records `msg` as its agent's last heartbeat, with this replica's
    /// clock. Only registered agents are remembered (a beat of any other id
    /// is noise), and a `left` agent's beats are not.
    ///
    /// A `lost` agent that still heartbeats missed its `agent.lost` event
    /// (a core message: sent while a partition cut it off, say, without its
    /// connection dropping): if the beat has a reply subject, the agent's
    /// record is sent there, `status: "lost"`, so that it registers again
    /// (only to an inbox, as any reply: see [`common::service::ReplyPrefixes`]).
    fn heartbeat(&self, msg: &async_nats::Message) {
        use common::msg::AgentStatus;
        let Some(agent) = subject::agent_of(&msg.subject) else {
            return;
        };
        let now = common::now_ms();
        let seen = self.cache.peek(&agent, |rec| {
            let lost = (rec.status == AgentStatus::Lost).then(|| rec.info(now));
            (rec.status != AgentStatus::Left).then_some((rec.heartbeat_interval_ms, lost))
        });
        let Some(Some((interval, lost))) = seen else {
            return;
        };
        if !self.admit_beat(&agent, interval, now) {
            return;
        }
        // Only the arrival counts: nothing in the body is needed to judge.
        self.beats.remember(agent, now, now);
        let reply = msg.reply.clone().filter(|r| self.replies.allows(r));
        if let (Some(info), Some(reply)) = (lost, reply) {
            let nats = self.nats.clone();
            tokio::spawn(async move {
                if let Ok(body) = serde_json::to_vec(&info) {
                    let _ = nats.publish(reply, body.into()).await;
                }
            });
        }
    }

    /// Whether a heartbeat of `agent` arriving at `now` is recorded: not if
    /// the last was recorded less than a quarter of its interval (at least
    /// [`MIN_BEAT_GAP_MS`]) before. An agent that heartbeats at its interval
    /// is never held back; a flood is, and is counted and now and then logged.
    fn admit_beat(&self, agent: &AgentId, interval_ms: u64, now: u64) -> bool {
        let gap = (interval_ms / 4).max(MIN_BEAT_GAP_MS);
        let last = self.beats.get(agent).map_or(0, |(at, _)| at);
        if now.saturating_sub(last) >= gap || last > now {
            return true;
        }
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
        false
    }

    /// The last heartbeat this replica heard from `agent` (ms since the
    /// epoch, 0 if none).
    pub(super) fn last_beat(&self, agent: &AgentId) -> u64 {
        self.beats.get(agent).map_or(0, |(at, _)| at)
    }

    /// Asks the agents' bucket's leader for its state every `every_ms`, so
    /// that a stall is seen (and counted, see [`common::nats::Outages::stalled`]):
    /// while a cluster elects a new leader, or while this replica's node is
    /// cut off from the others, the heartbeats of agents on other nodes do
    /// not reach it although they are sent, and no transition could be
    /// written anyway.
    pub(super) async fn probe_forever(self: Arc<Self>, every_ms: u64) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(every_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let Ok(stream) = self
            .js
            .get_stream_no_info(format!("KV_{}", common::nats::KV_AGENTS))
            .await
        else {
            tracing::warn!("agents' bucket not found: its stalls go unseen");
            return;
        };
        loop {
            tick.tick().await;
            let info = stream.get_info();
            if let Err(e) = self.outages.observe(STALL_AFTER, info).await {
                tracing::debug!(error = %e, "agents' bucket not answering");
            }
        }
    }
}
