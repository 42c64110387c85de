//! Which orchestrator replicas are up, as this one hears them answer the
//! service's ping: a ready task is placed by the replica that readied it
//! while that one is up (see [`machine::Placing`]).

use super::*;

/// How often the replicas are pinged ...
const PING_EVERY: Duration = Duration::from_secs(1);
/// ... and how long their answers are waited for.
const ANSWERS_WITHIN: Duration = Duration::from_millis(500);
/// A replica not heard this long is gone, or frozen: the tasks it readied
/// are taken up by the others. Several pings long, so that a replica slow
/// to answer under load is not taken for gone.
const GONE_AFTER_MS: u64 = 5_000;

/// A replica as a task's `readied_by` names it: a hash of the id it
/// answers the ping with (FNV-1a), the same in every replica.
pub(super) fn tag(instance_id: &str) -> u32 {
    instance_id.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// What this replica heard of the others; `None` until its first round
/// of pings is in.
pub(super) type Heard = Mutex<Option<Replicas>>;

#[derive(Default)]
pub(super) struct Replicas {
    /// When this replica's first round of pings was in.
    since_ms: u64,
    /// Each replica heard, and when last.
    heard: HashMap<u32, u64>,
    /// Replicas named by tasks but never heard, and when first met: one
    /// that joined just after a round is heard at the next.
    met: HashMap<u32, u64>,
}

impl Orchestrator {
    /// Pings the orchestrator replicas for ever, noting who answers.
    pub(super) async fn hear_replicas(self: Arc<Self>) {
        let ping = format!("{}.{NAME}", subject::SRV_PING);
        let mut every = tokio::time::interval(PING_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            let inbox = self.nats.new_inbox();
            let Ok(mut answers) = self.nats.subscribe(inbox.clone()).await else {
                continue;
            };
            if self
                .nats
                .publish_with_reply(ping.clone(), inbox, "".into())
                .await
                .is_err()
            {
                continue;
            }
            let mut heard = vec![self.replica];
            let until = tokio::time::Instant::now() + ANSWERS_WITHIN;
            while let Ok(Some(m)) = tokio::time::timeout_at(until, answers.next()).await {
                if let Ok(p) =
                    serde_json::from_slice::<async_nats::service::PingResponse>(&m.payload)
                {
                    heard.push(tag(&p.id));
                }
            }
            let now = now_ms();
            if let Ok(mut known) = self.heard.lock() {
                let known = known.get_or_insert_with(|| Replicas {
                    since_ms: now,
                    ..Replicas::default()
                });
                let recent = |at: &mut u64| now.saturating_sub(*at) < 10 * GONE_AFTER_MS;
                known.heard.retain(|_, at| recent(at));
                known.met.retain(|_, at| recent(at));
                for r in heard {
                    known.heard.insert(r, now);
                    known.met.remove(&r);
                }
            }
        }
    }

    /// Whether no other replica was heard lately (or none is known yet):
    /// every early report then comes here, so a new flow's first write may
    /// wait for them (see `first`). With others, an early report goes to
    /// any one of them, which drops it, and the stored copy they may get
    /// waits for the flow to be written before it is handed here.
    pub(super) fn alone(&self) -> bool {
        let now = now_ms();
        self.heard.lock().is_ok_and(|known| {
            known.as_ref().is_none_or(|k| {
                k.heard
                    .iter()
                    .all(|(r, at)| *r == self.replica || now.saturating_sub(*at) >= GONE_AFTER_MS)
            })
        })
    }

    /// Whether replica `r` is known to be gone: not heard for
    /// [`GONE_AFTER_MS`], or never heard in that long since it was first
    /// met (and this replica has listened that long). Not known before the
    /// first round of pings is in.
    pub(super) fn replica_gone(&self, r: u32) -> bool {
        let now = now_ms();
        let Ok(mut known) = self.heard.lock() else {
            return false;
        };
        let Some(known) = known.as_mut() else {
            return false;
        };
        let long = |at: u64| now.saturating_sub(at) >= GONE_AFTER_MS;
        match known.heard.get(&r) {
            Some(at) => long(*at),
            None => long(known.since_ms) && long(*known.met.entry(r).or_insert(now)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_replica_tag_is_the_same_everywhere_and_tells_replicas_apart() {
        assert_eq!(super::tag("a"), 0xe40c_292c, "FNV-1a of \"a\"");
        assert_ne!(
            super::tag("QmsgHg4c7yDjUvxIWfETh5"),
            super::tag("QmsgHg4c7yDjUvxIWfETh6")
        );
    }
}
