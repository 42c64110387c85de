//! One writer per agent record in a replica, with group commit.
//!
//! Every booking rewrites the agent's whole record (it holds the agent's live
//! allocations, so that the fit check and the booking are one compare-and-set).
//! Requests for one agent therefore queue behind one another in a replica;
//! on the hot paths (allocate, release) the queue is drained in one go: the
//! writer applies every waiting change to the record in turn and stores the
//! result with a single compare-and-set. Under load that turns N record writes
//! into one, and each change still decides on the exact record it is written
//! to, so a lost race re-runs the whole group on fresh state.

use std::sync::{Arc, Mutex};

use common::nats::Step;
use common::Error;
use tokio::sync::oneshot;

use crate::machine::AgentRecord;

/// A change to one record: edits it in place and says whether it did. It must
/// leave the record untouched when it keeps it or fails.
pub(super) type Change = Box<dyn FnMut(&mut AgentRecord) -> Result<Step<(), ()>, Error> + Send>;

/// A change waiting for its agent's next write, and where its outcome goes.
pub(super) struct Waiting {
    pub(super) change: Change,
    pub(super) done: oneshot::Sender<Result<(), Error>>,
}

/// The lock that makes one writer per agent in this replica, and the changes
/// waiting for the next write.
#[derive(Default)]
pub(super) struct Lane {
    pub(super) lock: tokio::sync::Mutex<()>,
    waiting: Mutex<Vec<Waiting>>,
}

impl Lane {
    pub(super) fn push(&self, w: Waiting) {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(w);
    }

    pub(super) fn take(&self) -> Vec<Waiting> {
        std::mem::take(&mut *self.waiting.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Wraps a change that yields `R` into a [`Change`]; the last outcome it
/// decided is left in the returned slot (a lost race runs it again).
pub(super) fn boxed<R: Send + 'static>(
    mut f: impl FnMut(&mut AgentRecord) -> Result<Step<(), R>, Error> + Send + 'static,
) -> (Change, Arc<Mutex<Option<R>>>) {
    let slot: Arc<Mutex<Option<R>>> = Arc::default();
    let out = slot.clone();
    let change: Change = Box::new(move |rec| {
        let (step, r) = match f(rec)? {
            Step::Write((), r) => (Step::Write((), ()), r),
            Step::Keep(r) => (Step::Keep(()), r),
        };
        *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
        Ok(step)
    });
    (change, slot)
}

/// Applies every change of a group to `rec` in order. Returns each one's
/// outcome and whether any changed the record.
pub(super) fn apply_all(
    rec: &mut AgentRecord,
    group: &mut [Waiting],
) -> (Vec<Result<(), Error>>, bool) {
    let mut changed = false;
    let outcomes = group
        .iter_mut()
        .map(|w| match (w.change)(rec) {
            Ok(Step::Write((), ())) => {
                changed = true;
                Ok(())
            }
            Ok(Step::Keep(())) => Ok(()),
            Err(e) => Err(e),
        })
        .collect();
    (outcomes, changed)
}
