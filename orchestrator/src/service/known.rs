//! Every flow's key in the flows bucket and the revision it was last
//! written at, followed as the bucket is written: the sweep's list of flows
//! to look at, without listing the bucket or reading a finished flow again.
//!
//! Flows are kept for good, so a replica that listed every key each sweep
//! and read every finished flow back now and then (to see whether another
//! replica had re-run it) did work that grew with every flow ever run: a
//! second a sweep at 100,000 flows. Here a headers-only ordered consumer
//! delivers one message per write (the subject names the flow, the stream
//! sequence is its new revision) from each key's last revision on: the
//! sweep then looks only at flows written since it last looked, and a flow
//! it saw finished stays skipped while its revision is the one it finished
//! at.
//!
//! Nor does this replica's memory grow with every flow ever run: a flow
//! seen finished at the revision last written is forgotten (both its
//! revision and its finish), as only a later write brings it back to the
//! sweep, and that write is followed. A follower started again resumes
//! after the last write it saw instead of delivering every key again (which
//! would read every flow forgotten so back once).

use async_nats::jetstream::consumer::{push, DeliverPolicy};

use super::*;

/// What the consumer has delivered.
#[derive(Default)]
pub(super) struct Known(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    /// Each flow's last revision seen.
    revisions: HashMap<FlowId, u64>,
    /// Flows written since the sweep last took them.
    written: HashSet<FlowId>,
    /// Whether every key stored when the consumer started has been seen.
    caught_up: bool,
    /// The last stream sequence delivered: where a follower started again
    /// resumes.
    last_sequence: u64,
    /// Flows seen finished, so the sweep does not load them again. Not
    /// final: a re-run or a change makes a flow run again, so an entry is
    /// dropped when this replica's actor steps the flow back to running, and
    /// checked against the revision last written in case another replica
    /// did it (and is gone before it sweeps the flow).
    finished: HashMap<FlowId, Finished>,
}

/// A flow this replica saw finished: at which revision, and when last checked.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Finished {
    revision: u64,
    checked_ms: u64,
}

/// What the sweep may do with a flow, as far as [`Known`] can tell without a
/// read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Skip {
    /// Finished at the revision last written: skipped, and forgotten here
    /// (the next write of it brings it back).
    Forgotten,
    /// Finished, by a write yet to be followed (or checked lately): skipped.
    Finished,
    /// Not known finished: looked at.
    Unfinished,
    /// Seen finished at this revision, but no write of it is followed (the
    /// follower has not caught up, or the flow is gone): its stored revision
    /// is to be read and compared ([`Known::checked`]).
    Check(u64),
}

impl Known {
    /// Whether the sweep may skip `id` as finished at `now` (see [`Skip`]).
    pub(super) fn skip(&self, id: &FlowId, now: u64) -> Skip {
        let Ok(mut inner) = self.0.lock() else {
            return Skip::Unfinished;
        };
        let Some(done) = inner.finished.get(id).copied() else {
            return Skip::Unfinished;
        };
        match inner.revisions.get(id).copied() {
            // Written last by the write it finished with: nothing but a new
            // write (followed, so looked at) can change it. Kept while the
            // sweep still lists every flow (the follower not caught up).
            Some(rev) if rev == done.revision && !inner.caught_up => Skip::Finished,
            Some(rev) if rev == done.revision => {
                inner.revisions.remove(id);
                inner.finished.remove(id);
                Skip::Forgotten
            }
            // The write it finished with is yet to come: it brings it back.
            Some(rev) if rev < done.revision => Skip::Finished,
            // Written since: re-run or changed.
            Some(_) => {
                inner.finished.remove(id);
                Skip::Unfinished
            }
            None if now.saturating_sub(done.checked_ms) < FINISHED_RECHECK_MS => Skip::Finished,
            None => Skip::Check(done.revision),
        }
    }

    /// The outcome of a [`Skip::Check`]: whether the stored revision was
    /// still the one `id` finished at.
    pub(super) fn checked(&self, id: &FlowId, same: bool, now: u64) {
        if let Ok(mut inner) = self.0.lock() {
            if same {
                if let Some(done) = inner.finished.get_mut(id) {
                    done.checked_ms = now;
                }
            } else {
                inner.finished.remove(id);
            }
        }
    }

    /// Notes `id` finished at `revision`, checked at `now`: the sweep skips
    /// it while it stays at that revision.
    pub(super) fn finished(&self, id: FlowId, revision: u64, now: u64) {
        if let Ok(mut inner) = self.0.lock() {
            let done = Finished {
                revision,
                checked_ms: now,
            };
            inner.finished.insert(id, done);
        }
    }

    /// Notes `id` running again (a step of this replica's left it unfinished).
    pub(super) fn unfinished(&self, id: &FlowId) {
        if let Ok(mut inner) = self.0.lock() {
            inner.finished.remove(id);
        }
    }

    /// Flows whose revision or finish is held here: what the sweep has yet
    /// to forget.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.0.lock().map_or(0, |i| {
            let mut ids: HashSet<&FlowId> = i.revisions.keys().collect();
            ids.extend(i.finished.keys());
            ids.len()
        })
    }

    /// The flows written since the last call, once every stored key has been
    /// seen (`None` before: the caller lists the bucket instead).
    pub(super) fn take_written(&self) -> Option<HashSet<FlowId>> {
        let mut inner = self.0.lock().ok()?;
        inner.caught_up.then(|| std::mem::take(&mut inner.written))
    }

    fn saw(&self, id: FlowId, revision: Option<u64>) {
        if let Ok(mut inner) = self.0.lock() {
            match revision {
                Some(r) => {
                    inner.revisions.insert(id.clone(), r);
                }
                None => {
                    inner.revisions.remove(&id);
                    inner.finished.remove(&id);
                }
            }
            inner.written.insert(id);
        }
    }

    fn delivered(&self, sequence: u64) {
        if let Ok(mut inner) = self.0.lock() {
            inner.last_sequence = inner.last_sequence.max(sequence);
        }
    }

    /// Forgets every revision: the stream was made anew, and they are of
    /// the one before.
    fn reset(&self) {
        if let Ok(mut inner) = self.0.lock() {
            inner.revisions.clear();
            inner.finished.clear();
            inner.last_sequence = 0;
        }
    }

    /// The last stream sequence delivered (0: none yet).
    fn last_sequence(&self) -> u64 {
        self.0.lock().map_or(0, |i| i.last_sequence)
    }

    fn caught_up(&self) {
        if let Ok(mut inner) = self.0.lock() {
            inner.caught_up = true;
        }
    }

    /// Counts the follower caught up once it has delivered the stream's
    /// `last` write: deliveries come in sequence order, so every key stored
    /// by then has been seen. A check that does not lean on the pending
    /// count a delivery carries (an ordered consumer started again after
    /// its last write delivers none to carry it).
    pub(super) fn reached(&self, last: u64) -> bool {
        let Ok(mut inner) = self.0.lock() else {
            return false;
        };
        if inner.last_sequence >= last {
            inner.caught_up = true;
        }
        inner.caught_up
    }
}

impl Orchestrator {
    /// Follows the flows bucket's writes into [`Orchestrator::known`].
    pub(super) async fn follow_flows(self: Arc<Self>) {
        keep_running("flow writes", || self.clone().follow_flows_once()).await;
    }

    async fn follow_flows_once(self: Arc<Self>) -> Result<(), Error> {
        let prefix = self.flows.prefix.clone();
        // Started again: after the last write seen, unless the stream holds
        // none that late (it was made anew, its sequences with it).
        let seen = self.known.last_sequence();
        let stored = match seen {
            0 => 0,
            _ => self
                .flows
                .stream
                .get_info()
                .await
                .map_or(0, |i| i.state.last_sequence),
        };
        let deliver_policy = if seen > 0 && stored >= seen {
            DeliverPolicy::ByStartSequence {
                start_sequence: seen + 1,
            }
        } else {
            if seen > 0 {
                self.known.reset();
            }
            DeliverPolicy::LastPerSubject
        };
        let consumer = self
            .flows
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.nats.new_inbox(),
                filter_subject: format!("{prefix}>"),
                deliver_policy,
                headers_only: true,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::unavailable("flow writes", e))?;
        if consumer.cached_info().num_pending == 0 {
            self.known.caught_up();
        }
        let mut writes = consumer
            .messages()
            .await
            .map_err(|e| Error::unavailable("flow writes", e))?;
        while let Some(msg) = writes.next().await {
            let msg = msg.map_err(|e| Error::unavailable("flow writes", e))?;
            let Ok(info) = msg.info() else {
                continue;
            };
            let (revision, pending) = (info.stream_sequence, info.pending);
            self.known.delivered(revision);
            // Page keys hold a `.`, which no flow id does.
            let id = msg
                .subject
                .strip_prefix(prefix.as_str())
                .and_then(|k| FlowId::new(k).ok());
            if let Some(id) = id {
                let removed = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| op.as_str() != "PUT");
                self.known.saw(id, (!removed).then_some(revision));
            }
            if pending == 0 {
                self.known.caught_up();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(i: usize) -> FlowId {
        FlowId::new(format!("f{i}")).unwrap()
    }

    #[test]
    fn flows_finished_at_their_last_write_are_forgotten() {
        let known = Known::default();
        known.caught_up();
        for i in 0..1_000 {
            let rev = 2 * i as u64 + 1;
            known.saw(flow(i), Some(rev));
            known.finished(flow(i), rev, 0);
        }
        assert_eq!(known.held(), 1_000);
        assert_eq!(known.take_written().map(|w| w.len()), Some(1_000));
        for i in 0..1_000 {
            assert_eq!(known.skip(&flow(i), 1), Skip::Forgotten);
        }
        assert_eq!(known.held(), 0, "a swept finished flow is not kept");
        // Only a new write brings one back, and that one is looked at.
        known.saw(flow(7), Some(5_000));
        assert_eq!(known.take_written(), Some(HashSet::from([flow(7)])));
        assert_eq!(known.skip(&flow(7), 2), Skip::Unfinished);
    }

    #[test]
    fn a_finish_whose_write_is_yet_to_come_is_kept_until_it_comes() {
        let known = Known::default();
        known.caught_up();
        known.saw(flow(1), Some(6));
        known.finished(flow(1), 7, 0);
        assert_eq!(known.skip(&flow(1), 1), Skip::Finished);
        assert_eq!(known.held(), 1);
        known.saw(flow(1), Some(7));
        assert_eq!(known.skip(&flow(1), 2), Skip::Forgotten);
        assert_eq!(known.held(), 0);
    }

    #[test]
    fn a_flow_written_after_its_finish_is_unfinished() {
        let known = Known::default();
        known.caught_up();
        known.saw(flow(1), Some(7));
        known.finished(flow(1), 7, 0);
        known.saw(flow(1), Some(9));
        assert_eq!(known.skip(&flow(1), 1), Skip::Unfinished);
        // Its revision is kept until it finishes again.
        assert_eq!(known.held(), 1);
        known.finished(flow(1), 9, 2);
        assert_eq!(known.skip(&flow(1), 3), Skip::Forgotten);
    }

    #[test]
    fn a_finish_no_write_confirms_is_checked_now_and_then() {
        let known = Known::default();
        known.finished(flow(1), 3, 0);
        assert_eq!(known.skip(&flow(1), 1), Skip::Finished);
        assert_eq!(known.skip(&flow(1), FINISHED_RECHECK_MS), Skip::Check(3));
        known.checked(&flow(1), true, FINISHED_RECHECK_MS);
        assert_eq!(
            known.skip(&flow(1), FINISHED_RECHECK_MS + 1),
            Skip::Finished
        );
        known.checked(&flow(1), false, FINISHED_RECHECK_MS + 1);
        assert_eq!(
            known.skip(&flow(1), FINISHED_RECHECK_MS + 2),
            Skip::Unfinished
        );
        assert_eq!(known.held(), 0);
    }

    #[test]
    fn a_deleted_flow_is_forgotten() {
        let known = Known::default();
        known.saw(flow(1), Some(3));
        known.finished(flow(1), 3, 0);
        known.saw(flow(1), None);
        assert_eq!(known.held(), 0);
        assert_eq!(known.skip(&flow(1), 1), Skip::Unfinished);
    }

    #[test]
    fn a_follower_resumes_after_the_last_write_it_saw() {
        let known = Known::default();
        assert_eq!(known.last_sequence(), 0);
        known.delivered(12);
        known.delivered(9);
        assert_eq!(known.last_sequence(), 12);
        known.saw(flow(1), Some(12));
        known.reset();
        assert_eq!((known.last_sequence(), known.held()), (0, 0));
    }

    #[test]
    fn a_follower_that_delivered_the_last_write_is_caught_up() {
        let known = Known::default();
        assert!(known.reached(0), "an empty stream has nothing to follow");
        let known = Known::default();
        known.saw(flow(1), Some(4));
        known.delivered(4);
        assert!(!known.reached(6));
        assert_eq!(known.take_written(), None);
        known.saw(flow(2), Some(6));
        known.delivered(6);
        assert!(known.reached(6));
        assert_eq!(
            known.take_written(),
            Some(HashSet::from([flow(1), flow(2)]))
        );
    }

    #[test]
    fn nothing_is_forgotten_while_the_sweep_lists_every_flow() {
        // Before the follower has caught up, the sweep lists the bucket: a
        // flow forgotten then would be read back on every sweep.
        let known = Known::default();
        known.saw(flow(1), Some(3));
        known.finished(flow(1), 3, 0);
        assert_eq!(known.skip(&flow(1), 1), Skip::Finished);
        assert_eq!(known.skip(&flow(1), 2), Skip::Finished);
        known.caught_up();
        assert_eq!(known.skip(&flow(1), 3), Skip::Forgotten);
    }
}
