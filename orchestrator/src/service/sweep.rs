//! The periodic sweep: every unfinished flow ticked, so deadlines, back-offs
//! and ready tasks nobody placed are taken up by whichever replica runs. It
//! looks at the flows not known finished and those written since it last
//! looked (`known`), so its work follows the flows in progress, not every
//! flow ever run.

use super::*;

/// What the sweep does with a flow it looks at.
pub(super) enum Look {
    /// Finished, at the revision it finished at: no longer looked at.
    Finished,
    /// Finished, its outbox another replica's to settle: looked at again
    /// each sweep, without a read, in case that one goes.
    Parked,
    /// Ticked.
    Open,
}

impl Orchestrator {
    /// Whether `flow` (stored at `revision` with `kept`) is finished for the
    /// sweep: terminal, and its last events need nothing more from this
    /// replica (see `crate::outbox`). `None` while they do.
    pub(super) fn settled(
        &self,
        flow: &Flow,
        kept: &store::Kept,
        revision: u64,
        now: u64,
    ) -> Option<Finished> {
        if !flow.state.is_terminal() {
            return None;
        }
        let finished = |parked| Finished {
            revision,
            checked_ms: now,
            parked,
        };
        let newest = kept
            .outbox
            .iter()
            .map(|b| b.at_ms)
            .filter(|at| now.saturating_sub(*at) < crate::outbox::REPEAT_UNTIL_MS)
            .max();
        let Some(newest) = newest else {
            return Some(finished(None));
        };
        if kept.writer == Some(self.replica) {
            return self
                .outbox
                .settled(&flow.id, &kept.outbox, now)
                .then(|| finished(None));
        }
        // A gone writer's (or one that did not say) is this replica's to
        // publish again and empty.
        let writer = self.writer_elsewhere(kept.writer)?;
        Some(finished(Some(Parked {
            writer,
            until_ms: newest + crate::outbox::REPEAT_UNTIL_MS,
        })))
    }

    /// Whether the sweep may skip `id` as finished: its revision is the one
    /// it finished at. Another replica may have re-run or changed it since,
    /// and this one must sweep it should that one go: the revision followed
    /// ([`Orchestrator::known`]) says so without a read; without it, every
    /// [`FINISHED_RECHECK_MS`] the stored revision (the header's only) is
    /// read back. A flow parked on another replica is looked at again once
    /// that one is gone.
    pub(super) async fn still_finished(&self, id: &FlowId, now: u64) -> Look {
        let known = self.finished.lock().ok().and_then(|d| d.get(id).copied());
        let Some(mut known) = known else {
            return Look::Open;
        };
        if let Some(p) = known.parked {
            if now >= p.until_ms {
                known.parked = None;
                if let Ok(mut done) = self.finished.lock() {
                    done.insert(id.clone(), known);
                }
            } else if self.replica_gone(p.writer) {
                if let Ok(mut done) = self.finished.lock() {
                    done.remove(id);
                }
                return Look::Open;
            }
        }
        let finished = if known.parked.is_some() {
            Look::Parked
        } else {
            Look::Finished
        };
        let same = match self.known.revision(id) {
            // The write it finished with is yet to come: it brings it back.
            Some(rev) if rev <= known.revision => return finished,
            Some(_) => false,
            None if now.saturating_sub(known.checked_ms) < FINISHED_RECHECK_MS => return finished,
            None => match self.flows.entry(id.as_str()).await {
                Ok(Some(e)) => e.revision == known.revision,
                Ok(None) => false,
                // Checked again on the next sweep.
                Err(_) => return finished,
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
        if same {
            finished
        } else {
            Look::Open
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
                match self.still_finished(&id, now).await {
                    Look::Finished => {
                        looked_at.remove(&id);
                        continue;
                    }
                    Look::Parked => continue,
                    Look::Open => {}
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
                    // Its last events not yet settled: ticked until they are.
                    Ok(Some((flow, revision, enc))) => {
                        match self.settled(&flow, &enc.kept, revision, now) {
                            Some(finished) => {
                                if finished.parked.is_none() {
                                    looked_at.remove(&id);
                                }
                                if let Ok(mut done) = self.finished.lock() {
                                    done.insert(id, finished);
                                }
                            }
                            None => self.send(&id, Cmd::Tick),
                        }
                    }
                    Ok(None) => {
                        looked_at.remove(&id);
                    }
                    Err(_) => {}
                }
            }
        }
    }
}
