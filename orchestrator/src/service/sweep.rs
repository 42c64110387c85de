//! The periodic sweep: every unfinished flow ticked, so deadlines, back-offs
//! and ready tasks nobody placed are taken up by whichever replica runs. It
//! looks at the flows not known finished and those written since it last
//! looked (`known`), so its work follows the flows in progress, not every
//! flow ever run.

use super::*;

impl Orchestrator {
    /// Whether the sweep may skip `id` as finished: its revision is the one
    /// it finished at. Another replica may have re-run or changed it since,
    /// and this one must sweep it should that one go: the revision followed
    /// ([`Orchestrator::known`]) says so without a read; without it, every
    /// [`FINISHED_RECHECK_MS`] the stored revision (the header's only) is
    /// read back.
    pub(super) async fn still_finished(&self, id: &FlowId, now: u64) -> bool {
        let known = self.finished.lock().ok().and_then(|d| d.get(id).copied());
        let Some(known) = known else {
            return false;
        };
        let same = match self.known.revision(id) {
            // The write it finished with is yet to come: it brings it back.
            Some(rev) if rev <= known.revision => return true,
            Some(_) => false,
            None if now.saturating_sub(known.checked_ms) < FINISHED_RECHECK_MS => return true,
            None => match self.flows.entry(id.as_str()).await {
                Ok(Some(e)) => e.revision == known.revision,
                Ok(None) => false,
                // Checked again on the next sweep.
                Err(_) => return true,
            },
        };
        if let Ok(mut done) = self.finished.lock() {
            if same {
                done.insert(
                    id.clone(),
                    Finished {
                        checked_ms: now,
                        ..known
                    },
                );
            } else {
                done.remove(id);
            }
        }
        same
    }

    /// Notes `id` finished at `revision`, checked at `now`: the sweep skips
    /// it while it stays at that revision.
    pub(super) fn note_finished(&self, id: FlowId, revision: u64, now: u64) {
        if let Ok(mut done) = self.finished.lock() {
            done.insert(
                id,
                Finished {
                    revision,
                    checked_ms: now,
                },
            );
        }
    }

    /// Ticks every unfinished flow: deadlines, back-offs, unplaced tasks.
    pub(super) async fn sweep(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reconcile = 0;
        // The flows to look at: all unfinished ones, and those written since
        // the last sweep (see `known`).
        let mut looked_at: HashSet<FlowId> = HashSet::new();
        loop {
            tick.tick().await;
            let now = common::now_ms();
            self.outbox.recheck(&self.events_js, now).await;
            if now.saturating_sub(last_reconcile) >= crate::slots::GRACE_MS / 3 {
                last_reconcile = now;
                let load = |id: FlowId| {
                    let flows = self.flows.clone();
                    async move { Ok(store::read(&flows, &id).await?.map(|(f, _, _)| f)) }
                };
                if let Err(e) = self.slots.reconcile(now, load).await {
                    tracing::warn!(error = %e, "concurrency slots not reconciled");
                }
            }
            let ids = match self.known.take_written() {
                Some(written) => {
                    looked_at.extend(written);
                    looked_at.iter().cloned().collect()
                }
                // Not followed yet: every stored flow, listed.
                None => match self.flow_ids().await {
                    Ok(ids) => ids,
                    Err(_) => continue,
                },
            };
            for id in ids {
                if self.still_finished(&id, now).await {
                    looked_at.remove(&id);
                    continue;
                }
                // A flow with an actor here is ticked without a read: the
                // actor holds it current and notes when it is finished.
                let live = self
                    .actors
                    .lock()
                    .map(|a| a.contains_key(&id))
                    .unwrap_or(false);
                if live {
                    self.send(&id, Cmd::Tick);
                    continue;
                }
                match store::read(&self.flows, &id).await {
                    // Its last events still in its outbox: ticked until stored.
                    Ok(Some((flow, revision, enc)))
                        if flow.state.is_terminal() && enc.kept.outbox.is_empty() =>
                    {
                        self.note_finished(id, revision, now);
                    }
                    Ok(Some(_)) => self.send(&id, Cmd::Tick),
                    Ok(None) => {
                        looked_at.remove(&id);
                    }
                    Err(_) => {}
                }
            }
        }
    }
}
