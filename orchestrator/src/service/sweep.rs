//! The periodic sweep: every unfinished flow ticked, so deadlines, back-offs
//! and ready tasks nobody placed are taken up by whichever replica runs. It
//! looks at the flows not known finished and those written since it last
//! looked (`known`), so its work follows the flows in progress, not every
//! flow ever run.

use super::*;

impl Orchestrator {
    /// Whether the sweep may skip `id` as finished, and may forget it
    /// (see [`known::Skip`]). Another replica may have re-run or changed it
    /// since, and this one must sweep it should that one go: the revision
    /// followed ([`Orchestrator::known`]) says so without a read; without
    /// it, every [`FINISHED_RECHECK_MS`] the stored revision (the header's
    /// only) is read back.
    pub(super) async fn still_finished(&self, id: &FlowId, now: u64) -> bool {
        let revision = match self.known.skip(id, now) {
            known::Skip::Forgotten | known::Skip::Finished => return true,
            known::Skip::Unfinished => return false,
            known::Skip::Check(revision) => revision,
        };
        let same = match self.flows.entry(id.as_str()).await {
            Ok(Some(e)) => e.revision == revision,
            Ok(None) => false,
            // Checked again on the next sweep.
            Err(_) => return true,
        };
        self.known.checked(id, same, now);
        same
    }

    /// Notes `id` finished at `revision`, checked at `now`: the sweep skips
    /// it while it stays at that revision.
    pub(super) fn note_finished(&self, id: FlowId, revision: u64, now: u64) {
        self.known.finished(id, revision, now);
    }

    /// The flows written since the last sweep, if the follower has now
    /// delivered the bucket's last write (see [`known::Known::reached`]):
    /// a follower whose deliveries never said "nothing pending" would
    /// otherwise leave the sweep listing every flow for good.
    async fn catch_up(&self) -> Option<HashSet<FlowId>> {
        let last = self.flows.stream.get_info().await.ok()?.state.last_sequence;
        self.known
            .reached(last)
            .then(|| self.known.take_written())?
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
            let written = match self.known.take_written() {
                Some(written) => Some(written),
                None => self.catch_up().await,
            };
            let ids = match written {
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
