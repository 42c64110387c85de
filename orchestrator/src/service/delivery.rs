//! A stored report message, shared by the reports it carries. An agent may
//! send several reports in one message (a JSON array), each applied by its
//! own flow's actor; the message is acknowledged once every report in it is
//! settled, and handed back to the stream when any could not be stored, so
//! no report is dropped because another one in its message was applied.
//! (Those applied are recognised when it comes again.)

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;

/// One report's handle on the message that carried it.
pub(crate) struct Delivery(Arc<Shared>);

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
        (0..n).map(|_| Delivery(shared.clone())).collect()
    }

    /// This report is settled: applied, refused, or seen applied before.
    pub(super) async fn done(self) {
        self.finish().await;
    }

    /// This report could not be stored: the message is handed back, to
    /// come again in a moment.
    pub(super) async fn again(self) {
        self.0.again.store(true, Ordering::Release);
        self.finish().await;
    }

    async fn finish(self) {
        if self.0.left.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let msg = &self.0.msg;
        let _ = if self.0.again.load(Ordering::Acquire) {
            msg.ack_with(jetstream::AckKind::Nak(Some(Duration::from_millis(500))))
                .await
        } else {
            msg.ack().await
        };
    }
}

impl Deref for Delivery {
    type Target = jetstream::Message;

    fn deref(&self) -> &jetstream::Message {
        &self.0.msg
    }
}
