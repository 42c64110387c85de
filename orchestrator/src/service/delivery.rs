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
//!
//! A report handed over by another replica (`super::forward`) is settled by
//! sending its outcome back: that replica holds the stored message and acts
//! on it (acknowledges it, hands it back, or tells the agent it was refused).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use common::msg::RejectReason;
use common::ErrorCode;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

/// One report's handle on the message that carried it, if it was stored.
pub(crate) struct Delivery {
    via: Via,
    /// To be applied by this replica, not handed to the flow's writer.
    here: bool,
}

enum Via {
    Stored(Arc<Shared>),
    Early,
    /// Handed over by another replica (see `super::forward`), which settles
    /// its own copy by the outcome sent back.
    Forwarded {
        early: bool,
        refused: Option<Settled>,
        reply: oneshot::Sender<Settled>,
    },
}

/// How a report handed to another replica was settled there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub(super) enum Settled {
    /// Applied, or found applied already.
    Applied,
    /// Not stored: its message is to come again.
    Again,
    /// Refused: the replica holding the stored message tells the agent.
    Refused {
        code: ErrorCode,
        reason: RejectReason,
        message: String,
    },
}

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
        (0..n)
            .map(|_| Delivery {
                via: Via::Stored(shared.clone()),
                here: false,
            })
            .collect()
    }

    /// A report taken as it was published, not from the stream.
    pub(super) fn early() -> Delivery {
        Delivery {
            via: Via::Early,
            here: false,
        }
    }

    /// A report another replica handed over; its outcome comes out of the
    /// receiver once it is settled (the sender dropped unsettled: again).
    pub(super) fn forwarded(early: bool) -> (Delivery, oneshot::Receiver<Settled>) {
        let (reply, settled) = oneshot::channel();
        let via = Via::Forwarded {
            early,
            refused: None,
            reply,
        };
        (Delivery { via, here: true }, settled)
    }

    /// The same report, to be applied here whoever wrote its flow last.
    pub(super) fn here(self) -> Delivery {
        Delivery { here: true, ..self }
    }

    /// Whether the report may be handed to the replica writing its flow.
    pub(super) fn may_forward(&self) -> bool {
        !self.here
    }

    /// The stored message, unless the report came early or from another replica.
    pub(super) fn message(&self) -> Option<&jetstream::Message> {
        match &self.via {
            Via::Stored(s) => Some(&s.msg),
            _ => None,
        }
    }

    /// Whether the report was taken as it was published (here or by the
    /// replica that handed it over): its stored copy still comes.
    pub(super) fn came_early(&self) -> bool {
        matches!(self.via, Via::Early | Via::Forwarded { early: true, .. })
    }

    /// The report is refused; a report handed over takes the verdict back
    /// to the replica that holds its stored message.
    pub(super) fn refused(&mut self, code: ErrorCode, reason: RejectReason, message: String) {
        if let Via::Forwarded { refused, .. } = &mut self.via {
            *refused = Some(Settled::Refused {
                code,
                reason,
                message,
            });
        }
    }

    /// This report is settled: applied, refused, or seen applied before.
    pub(super) async fn done(self) {
        self.finish(false).await;
    }

    /// This report could not be stored: the message is handed back, to
    /// come again in a moment.
    pub(super) async fn again(self) {
        self.finish(true).await;
    }

    async fn finish(self, again: bool) {
        let shared = match self.via {
            Via::Stored(shared) => shared,
            Via::Early => return,
            Via::Forwarded { refused, reply, .. } => {
                let settled = match (again, refused) {
                    (true, _) => Settled::Again,
                    (false, Some(r)) => r,
                    (false, None) => Settled::Applied,
                };
                let _ = reply.send(settled);
                return;
            }
        };
        if again {
            shared.again.store(true, Ordering::Release);
        }
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
