//! The periodic sweep: every unfinished flow ticked, so deadlines, back-offs
//! and ready tasks nobody placed are taken up by whichever replica runs.

use super::*;

impl Orchestrator {
    /// Whether the sweep may skip `id` as finished. Every
    /// [`FINISHED_RECHECK_MS`] the stored revision (the header's only) is
    /// compared with the one the flow finished at: another replica may have
    /// re-run or changed it, and this one must sweep it should that one go.
    pub(super) async fn still_finished(&self, id: &FlowId, now: u64) -> bool {
        let known = self.finished.lock().ok().and_then(|d| d.get(id).copied());
        let Some(known) = known else {
            return false;
        };
        if now.saturating_sub(known.checked_ms) < FINISHED_RECHECK_MS {
            return true;
        }
        let same = match self.flows.entry(id.as_str()).await {
            Ok(Some(e)) => e.revision == known.revision,
            Ok(None) => false,
            // Checked again on the next sweep.
            Err(_) => return true,
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

    /// Ticks every unfinished flow: deadlines, back-offs, unplaced tasks.
    pub(super) async fn sweep(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_reconcile = 0;
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
            let Ok(ids) = self.flow_ids().await else {
                continue;
            };
            for id in ids {
                if self.still_finished(&id, now).await {
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
                        if let Ok(mut done) = self.finished.lock() {
                            let checked_ms = now;
                            done.insert(
                                id,
                                Finished {
                                    revision,
                                    checked_ms,
                                },
                            );
                        }
                    }
                    Ok(Some(_)) => self.send(&id, Cmd::Tick),
                    Ok(None) | Err(_) => {}
                }
            }
        }
    }
}
