//! A report's handle on how it came. Most come as a stored message shared by
//! the reports it carries: an agent may send several reports in one message
//! (a JSON array), each applied by its own flow's actor; the message is
//! acknowledged once every report in it is settled, and handed back to the
//! stream when any could not be stored, so no report is dropped because
//! another one in its message was applied. (Those applied are recognised
//! when it comes again.)
//!
//! A final report may also come *early*, as the agent publishes it, before
//! the stream has stored it (`super::intake`): nothing to acknowledge, and
//! its stored copy still follows, so an early report that cannot be applied
//! is simply dropped and its stored copy judged as any other.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;

/// One report's handle on the message that carried it, if it was stored.
pub(crate) struct Delivery(Option<Arc<Shared>>);

struct Shared {
    msg: jetstream::Message,
    /// Reports of the message not settled yet.
    left: AtomicUsize,
    /// One of them could not be stored: the message is to come again.
    again: AtomicBool,
}

impl Delivery {
    /// A handle for each of the `n` reports `msg` carries.
    pub(super) fn split(msg: jetstream::Message, n: usize) -> Vec<Delivery> {
        let shared = Arc::new(Shared {
            msg,
            left: AtomicUsize::new(n),
            again: AtomicBool::new(false),
        });
        (0..n).map(|_| Delivery(Some(shared.clone()))).collect()
    }

    /// A report taken as it was published, not from the stream.
    pub(super) fn early() -> Delivery {
        Delivery(None)
    }

    /// The stored message, unless the report came early.
    pub(super) fn message(&self) -> Option<&jetstream::Message> {
        self.0.as_ref().map(|s| &s.msg)
    }

    /// This report is settled: applied, refused, or seen applied before.
    pub(super) async fn done(self) {
        self.finish().await;
    }

    /// This report could not be stored: the message is handed back, to
    /// come again in a moment.
    pub(super) async fn again(self) {
        if let Some(s) = &self.0 {
            s.again.store(true, Ordering::Release);
        }
        self.finish().await;
    }

    async fn finish(self) {
        let Some(shared) = self.0 else {
            return;
        };
        if shared.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let msg = &shared.msg;
        let _ = if shared.again.load(Ordering::Acquire) {
            msg.ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
                .await
        } else {
            msg.ack().await
        };
    }
}
