//! A new flow written once with its agents' first reports.
//!
//! A small flow whose id this replica chose (it cannot be taken), all of
//! whose ready tasks were booked at creation, is not written by `create`
//! while this replica hears no other (`replicas::alone`: the agents' early
//! reports then all come here):
//! its first assignments leave at once, and its actor writes the creation
//! together with the first reports, if they come within
//! [`Config::first_write_ms`], and answers the caller once that write is stored. A short one-task flow
//! is then one write of its record, not two, on the way from its creation to
//! its end. Until the write nothing of the flow is stored: a replica that
//! dies meanwhile leaves attempts that belong to no flow, as one that dies
//! during any creation's write (see `create::sent_ahead`), and the caller,
//! who had no answer, creates the flow again.

use super::*;

impl Orchestrator {
    /// Hands a new flow, not yet written, to its actor with the assignments
    /// sent for it, and waits for the actor's write.
    pub(super) async fn defer(
        self: &Arc<Self>,
        flow: Flow,
        encoded: store::Encoded,
        (effects, cursor): (Vec<Effect>, Cursor),
        ahead: create::Ahead,
        binds: Vec<AllocateRequest>,
    ) -> Result<FlowStatus, Error> {
        let id = flow.id.clone();
        let (reply, outcome) = oneshot::channel();
        if let Ok(mut created) = self.created.lock() {
            let first = Some(First {
                effects,
                cursor,
                reply,
                span: tracing::Span::current(),
            });
            let refused = ahead.refused;
            created.insert(
                id.clone(),
                Created {
                    stored: (flow, UNWRITTEN, encoded),
                    refused,
                    first,
                },
            );
        }
        // The tick first: the actor takes up the copy above with it.
        self.send_caused(&id, Cmd::Tick, tracing::Span::none());
        self.send_ahead(&id, &ahead.sent).await;
        self.bind_sent(binds, &ahead.sent);
        outcome.await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorCode::Unavailable,
                format!("flow {id} was not written: the orchestrator is stopping"),
            ))
        })
    }

    /// Whether `flow`'s creation waits for its actor to write it.
    pub(super) fn first_write_pending(&self, flow: &FlowId) -> bool {
        self.created
            .lock()
            .is_ok_and(|c| c.get(flow).is_some_and(|c| c.first.is_some()))
    }

    /// Writes a deferred creation, as its actor's first step left it. A
    /// write that fails is answered as failed: nothing of the flow is
    /// known stored (the caller's step then reads it back).
    pub(super) async fn write_first(
        &self,
        flow: &Flow,
        body: store::Encoded,
        first: &mut Option<First>,
    ) -> Result<(u64, store::Encoded), WriteError> {
        let written = self.write_creation(flow, body).await;
        if let Err(e) = &written {
            let err = match e {
                WriteError::Failed(e) => e.clone(),
                WriteError::Conflict => Error::new(
                    ErrorCode::Conflict,
                    format!("flow {} already exists", flow.id),
                ),
            };
            if let Some(f) = first.take() {
                let _ = f.reply.send(Err(err));
            }
        }
        written
    }

    /// Once a deferred creation is stored: publishes its events, ahead of
    /// the step's own, and answers its caller with the flow as written.
    pub(super) async fn first_written(
        self: &Arc<Self>,
        flow: &Flow,
        revision: u64,
        first: &mut Option<First>,
        now: u64,
    ) {
        let Some(First {
            effects,
            mut cursor,
            reply,
            span,
        }) = first.take()
        else {
            return;
        };
        let mut driver = Driver::new(self.tick_ms);
        self.run_effects(&mut driver, None, effects, &mut cursor)
            .instrument(span)
            .await;
        self.outbox.sent(cursor, now);
        let status = flow.status(0, now);
        let _ = reply.send(Ok(FlowStatus { revision, ..status }));
    }
}

/// The revision of a flow not written yet (a stored one's is 1 at least).
pub(super) const UNWRITTEN: u64 = 0;
