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

/// The replicas heard from, and when each was last heard; `None` until the
/// first round of pings is in.
pub(super) type Heard = Mutex<Option<HashMap<u32, u64>>>;

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
                let known = known.get_or_insert_with(HashMap::new);
                known.retain(|_, at| now.saturating_sub(*at) < 10 * GONE_AFTER_MS);
                for r in heard {
                    known.insert(r, now);
                }
            }
        }
    }

    /// The replicas heard from within [`GONE_AFTER_MS`], `None` before the
    /// first round of pings is in.
    pub(super) fn live_replicas(&self) -> Option<Vec<u32>> {
        let now = now_ms();
        let known = self.heard.lock().ok()?;
        let live = known
            .as_ref()?
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) < GONE_AFTER_MS)
            .map(|(r, _)| *r)
            .collect();
        Some(live)
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
