//! Creating flows: validation, uploaded tasks, the size check, placing a
//! small flow's first tasks and the first write (the infeasibility check is
//! `feasible`'s; a write made with the first reports, `first`'s).

use super::*;

/// Tasks a new flow books beside its first write, at most (see
/// [`Orchestrator::placements_at_creation`]): enough for small flows to
/// start at once, few enough that a wide flow's reply does not wait on many
/// bookings (its actor places the rest in batches).
const PLACED_AT_CREATION: usize = 8;

/// How long creation waits for those bookings: an allocator that is slow
/// to answer (frozen, say) delays the reply by this much at most, and the
/// tasks it did not place go the usual way. The request's deadline is as
/// short, so a booking read later books nothing (one that got no answer in
/// time is released, as any placement's).
const PLACED_AT_CREATION_WAIT: Duration = Duration::from_millis(500);

/// A flow in [`Orchestrator::creating`] for as long as this lives; its
/// actor waits for this to drop (`_done` closes then).
struct Creating {
    o: Arc<Orchestrator>,
    id: FlowId,
    _done: watch::Sender<()>,
}

impl Creating {
    fn new(o: &Arc<Orchestrator>, id: &FlowId) -> Self {
        let (done, waiting) = watch::channel(());
        if let Ok(mut c) = o.creating.lock() {
            c.insert(id.clone(), waiting);
        }
        Creating {
            o: o.clone(),
            id: id.clone(),
            _done: done,
        }
    }
}

impl Drop for Creating {
    fn drop(&mut self) {
        if let Ok(mut c) = self.o.creating.lock() {
            c.remove(&self.id);
        }
    }
}

/// A kept allocation a new task takes, and the request that binds it.
type Spare = (Allocation, AllocateRequest);

/// See [`Orchestrator::sent_ahead`].
#[derive(Default)]
pub(super) struct Ahead {
    pub(super) sent: Vec<(TaskId, Allocation, Assignment)>,
    pub(super) refused: Vec<(TaskId, u64)>,
    /// Whether the actor's first step may wait for reports.
    pub(super) hold: bool,
    /// Whether every task there was to place was sent.
    pub(super) all_sent: bool,
}

impl Orchestrator {
    pub(super) async fn create(self: &Arc<Self>, spec: FlowSpec) -> Result<FlowStatus, Error> {
        self.create_from(spec, None).await
    }

    /// Creates a flow; `origin` names the trigger and event that started it.
    pub(super) async fn create_from(
        self: &Arc<Self>,
        mut spec: FlowSpec,
        origin: Option<common::msg::FlowOrigin>,
    ) -> Result<FlowStatus, Error> {
        if let Some(name) = spec.tasks_object.take() {
            spec.tasks = self.uploaded_tasks(&name, !spec.tasks.is_empty()).await?;
        }
        let large = spec.tasks.len() > store::PAGE_TASKS;
        if let Err(problems) = off_worker(large, || machine::validate(&spec)) {
            let summary: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
            return Err(Error::new(
                ErrorCode::ValidationFailed,
                format!("flow is invalid: {}", summary.join("; ")),
            )
            .with_details(serde_json::json!({ "problems": problems })));
        }
        let warnings = self.infeasible(&spec, spec.require_feasible).await?;
        if spec.require_feasible && !warnings.is_empty() {
            let summary: Vec<&str> = warnings.iter().map(|p| p.message.as_str()).collect();
            return Err(Error::new(
                ErrorCode::ValidationFailed,
                format!(
                    "flow cannot run on the registered agents: {}",
                    summary.join("; ")
                ),
            )
            .with_details(serde_json::json!({ "problems": warnings })));
        }
        let early = spec.id.is_none();
        let id = spec.id.clone().unwrap_or_else(FlowId::random);
        let now = common::now_ms();
        let trace = telemetry::traceparent();
        let (mut flow, effects) = off_worker(large, || {
            let (mut flow, effects) = Flow::new(id.clone(), spec, now);
            flow.claim_ready(self.replica, events_of(&effects));
            flow.warnings = warnings;
            flow.started_by = origin;
            flow.trace = trace;
            (flow, effects)
        });
        // A small flow's first tasks are booked while its first write is
        // stored, not before it (see `sent_ahead`).
        let (placements, all_placed) = if large {
            (Vec::new(), false)
        } else {
            self.placements_at_creation(&mut flow)
        };
        let (flow, effects, encoded, status) = off_worker(large, || {
            let mut flow = flow;
            let mut outbox = Vec::new();
            let (cursor, _) = self
                .outbox
                .stage(&mut flow, &mut outbox, events_of(&effects), now);
            let kept = store::Kept {
                pages: store::lay_out(&flow),
                outbox,
                writer: Some(self.replica),
            };
            let encoded = store::encode(&mut flow, kept, None).map(|(e, _)| e);
            let status = flow.status(0, now);
            (flow, (effects, cursor), encoded, status)
        });
        let encoded = encoded?;
        self.fits_in_entries(&flow, &encoded)?;
        let asked_at = self.freed.load(Ordering::Relaxed);
        let creating = (!large).then(|| Creating::new(self, &id));
        let (written, (ahead, binds)) =
            if early && all_placed && !self.first_write.is_zero() && self.alone() {
                // Every ready task is booked here: its actor may write the
                // creation together with the agents' first reports (`defer`).
                let (granted, binds) = self.book_at_creation(&flow.id, placements).await;
                let ahead = self.sent_ahead(&flow, granted, asked_at);
                if ahead.all_sent {
                    drop(creating);
                    return self.defer(flow, encoded, effects, ahead, binds).await;
                }
                self.send_ahead(&flow.id, &ahead.sent).await;
                (self.write_creation(&flow, encoded).await, (ahead, binds))
            } else {
                // A flow whose id this replica chose cannot be another's, so its
                // first assignments leave as soon as they are booked, while its
                // creation is written (see `sent_ahead`). One the client named
                // may exist already (`conflict`): its assignments wait for the
                // write.
                let booking = async {
                    let (granted, binds) = self.book_at_creation(&flow.id, placements).await;
                    let ahead = self.sent_ahead(&flow, granted, asked_at);
                    if early {
                        self.send_ahead(&flow.id, &ahead.sent).await;
                    }
                    (ahead, binds)
                };
                tokio::join!(self.write_creation(&flow, encoded), booking)
            };
        let (revision, encoded) = match written {
            Ok(written) => written,
            // Assignments sent ahead are the actor's to settle, once this
            // returns: it records them if the write was stored after all,
            // else takes them back and gives their allocations back.
            Err(WriteError::Conflict) => {
                // Only a client's own id is taken already: nothing was sent.
                for (_, a, _) in ahead.sent {
                    self.release(a.agent_id, a.allocation_id);
                }
                return Err(Error::new(
                    ErrorCode::Conflict,
                    format!("flow {id} already exists"),
                ));
            }
            // Not stored, or not known to be: the bookings not sent stay with
            // the flow's ready tasks, under the ids they were asked with, for
            // the sweep's tick to place if the flow was stored and for
            // reconciliation to take back if it was not.
            Err(WriteError::Failed(e)) => return Err(e),
        };
        // A small flow's first assignments and events go out before the
        // reply, at once. A large flow's creation is many events (each root
        // becomes ready): the reply does not wait for them, and dispatch
        // starts after them.
        let o = self.clone();
        let after = async move {
            #[cfg(feature = "failpoints")]
            crate::failpoints::after_write(&id).await;
            let (effects, mut cursor) = effects;
            if let Ok(mut created) = o.created.lock() {
                let stored = (flow, revision, encoded);
                let refused = ahead.refused;
                let first = None;
                created.insert(
                    id.clone(),
                    Created {
                        stored,
                        refused,
                        first,
                    },
                );
            }
            if !early {
                o.send_ahead(&id, &ahead.sent).await;
            }
            // Without a cause, so that the step that records the grants
            // continues the report's trace; queued before the actor may step.
            o.send_caused(&id, Cmd::Tick, tracing::Span::none());
            if !ahead.hold {
                // Tasks are left to place: the first step is not held back.
                o.send(&id, Cmd::Wake);
            }
            drop(creating);
            let mut driver = Driver::new(o.tick_ms);
            o.run_effects(&mut driver, None, effects, &mut cursor).await;
            o.outbox.sent(cursor, common::now_ms());
            o.bind_sent(binds, &ahead.sent);
        };
        if large {
            tokio::spawn(after.in_current_span());
        } else {
            after.await;
        }
        Ok(FlowStatus { revision, ..status })
    }

    /// A new small flow's first tasks to book as its first write is stored:
    /// enough for small flows to start at once (a one-task flow is then two
    /// writes on its path, not three: the creation, beside the booking,
    /// and the completion). Tasks with a concurrency key go the usual way,
    /// through the flow's actor. Each has its allocation id chosen here, or
    /// takes an allocation kept to hand on (see `spare`), with the request
    /// that binds it to the task.
    ///
    /// Also tells whether those are all the tasks there are to place.
    fn placements_at_creation(
        &self,
        flow: &mut Flow,
    ) -> (Vec<(machine::Placement, Option<Spare>)>, bool) {
        let now = common::now_ms();
        // Its tasks are this replica's to place (`claim_ready`).
        let mut placing = machine::Placing::default();
        placing.drive(Some(self.replica), None);
        let all = flow.placements(now, &placing, |_| false);
        let total = all.len();
        let taken: Vec<_> = all
            .into_iter()
            .filter(|p| p.slot.is_none())
            .take(PLACED_AT_CREATION)
            .map(|mut p| {
                let spare = self.take_spare(&p.request);
                let id = spare
                    .as_ref()
                    .map_or_else(AllocationId::random, |(a, _)| a.allocation_id.clone());
                if let Some(t) = flow.tasks.get_mut(&p.task) {
                    t.asked = Some(id.clone());
                }
                p.request.allocation_id = Some(id);
                (p, spare)
            })
            .collect();
        let all_placed = !taken.is_empty() && taken.len() == total;
        (taken, all_placed)
    }

    /// Books the placements, all at once, within [`PLACED_AT_CREATION_WAIT`]:
    /// those that took a kept allocation have it at once. Also returns the
    /// requests that bind those to their tasks.
    async fn book_at_creation(
        self: &Arc<Self>,
        flow: &FlowId,
        placements: Vec<(machine::Placement, Option<Spare>)>,
    ) -> (Vec<(TaskId, Option<Allocation>)>, Vec<AllocateRequest>) {
        let client = self.client.clone().with_timeout(PLACED_AT_CREATION_WAIT);
        let mut binds = Vec::new();
        let mut kept = Vec::new();
        let mut asked = Vec::new();
        for (p, spare) in placements {
            match spare {
                Some((a, bind)) => {
                    binds.push(bind);
                    kept.push((p.task, Some(a)));
                }
                None => asked.push(p),
            }
        }
        let booked = futures::future::join_all(asked.into_iter().map(|p| {
            let span = tracing::info_span!("place", flow = %flow, task = %p.task);
            let client = &client;
            async move { (p.task, self.place_via(client, &p.request, true).await) }.instrument(span)
        }))
        .await;
        kept.extend(booked);
        (kept, binds)
    }

    /// Writes a new flow's first copy (whoever makes the write: `create`,
    /// or its actor for a deferred creation, see `first`).
    pub(super) async fn write_creation(
        &self,
        flow: &Flow,
        encoded: store::Encoded,
    ) -> Result<(u64, store::Encoded), WriteError> {
        #[cfg(feature = "failpoints")]
        if crate::failpoints::create_write(&flow.id).await {
            return Err(WriteError::Failed(Error::new(
                ErrorCode::Unavailable,
                "the creation's write failed (fail point)",
            )));
        }
        store::create(&self.flows, flow, encoded).await
    }

    /// Allocations handed on, once their grants are queued (see `spare`).
    pub(super) fn bind_sent(
        self: &Arc<Self>,
        binds: Vec<AllocateRequest>,
        sent: &[(TaskId, Allocation, Assignment)],
    ) {
        for bind in binds {
            let task = bind.task.as_ref().map(|t| &t.task_id);
            if sent.iter().any(|(t, _, _)| Some(t) == task) {
                self.handed_on(bind);
            }
        }
    }

    /// Queues the grants of assignments sent ahead of their record for the
    /// flow's actor, then sends the assignments: queued first, so that the
    /// actor has each grant before any report on it.
    pub(super) async fn send_ahead(
        self: &Arc<Self>,
        id: &FlowId,
        sent: &[(TaskId, Allocation, Assignment)],
    ) {
        let granted_ms = common::now_ms();
        for (task, allocation, assignment) in sent {
            let cmd = Cmd::Assign {
                task: task.clone(),
                allocation: Box::new(allocation.clone()),
                slot: None,
                granted_ms,
                sent: Some(assignment.attempt),
            };
            self.send_caused(id, cmd, tracing::Span::none());
        }
        for (_, _, assignment) in sent {
            if let Err(e) = self.publish_assignment(assignment).await {
                tracing::warn!(flow = %id, task = %assignment.task_id, error = %e, "assignment not sent, sending it again later");
            }
        }
    }

    /// What creation's bookings lead to: the assignments to send ahead of
    /// their record, worked out on a copy of the flow as the step that
    /// records them will (the same attempt), and the tasks refused, for the
    /// actor to hold back as if it had asked.
    ///
    /// Sending before recording saves the record's write on a short task's
    /// path: the actor's first step records the grants, and waits up to
    /// [`Config::first_record_ms`] for the agents' first reports so that one
    /// write takes both (`hold`, when the flow has nothing else to place).
    /// A flow whose id this replica chose sends them before its creation is
    /// even stored, so that the agent works while it is (the one write then
    /// on a one-task flow's path is its completion's). Its actor steps
    /// nothing until the write's outcome is known (`creating`): stored,
    /// the step records the grants; not stored, it finds no flow and takes
    /// the attempts back (a cancel notice, the allocation given back).
    /// Should this replica die before the write, the attempt belongs to no
    /// flow: its report is refused as `unknown_flow` and reconciliation
    /// takes the allocation back, and the client, which had no answer,
    /// creates the flow again. Should it die after the write, the flow
    /// holds its tasks as ready, each with the allocation id it was asked
    /// for with (`Task::asked`): the replica that takes them up asks with
    /// that id again and gets back the same booking, so the same agent is
    /// sent the same attempt again (it may run it twice: at least once).
    fn sent_ahead(
        self: &Arc<Self>,
        flow: &Flow,
        granted: Vec<(TaskId, Option<Allocation>)>,
        asked_at: u64,
    ) -> Ahead {
        let now = common::now_ms();
        let mut probe = flow.clone();
        let mut ahead = Ahead::default();
        for (task, placed) in granted {
            let Some(a) = placed else {
                ahead.refused.push((task, asked_at));
                continue;
            };
            let assignment = machine::assignment_ahead(
                &mut probe,
                &task,
                &a.agent_id,
                &a.allocation_id,
                now,
                self.tick_ms,
            );
            match assignment {
                Ok(assignment) => ahead.sent.push((task, a, assignment)),
                Err(_) => self.release(a.agent_id, a.allocation_id),
            }
        }
        let mut placing = machine::Placing::default();
        placing.drive(Some(self.replica), None);
        ahead.all_sent =
            !ahead.sent.is_empty() && probe.placements(now, &placing, |_| false).is_empty();
        ahead.hold = ahead.all_sent && !self.first_record.is_zero();
        ahead
    }

    /// The tasks a client uploaded ahead of a spec too large for one message;
    /// the upload is deleted once read.
    pub(super) async fn uploaded_tasks(
        &self,
        name: &str,
        inline_too: bool,
    ) -> Result<Vec<TaskSpec>, Error> {
        if inline_too {
            return Err(Error::new(
                ErrorCode::BadRequest,
                "a spec with `tasks_object` must leave `tasks` empty",
            ));
        }
        let uploads = bus::ensure_uploads(&self.js).await?;
        let mut object = uploads.get(name).await.map_err(|e| {
            Error::new(
                ErrorCode::BadRequest,
                format!("no uploaded tasks {name:?} ({e}); uploads are kept for an hour"),
            )
        })?;
        let mut body = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut object, &mut body)
            .await
            .map_err(|e| Error::unavailable(format_args!("uploaded tasks {name:?}"), e))?;
        let tasks = serde_json::from_slice(&body).map_err(|e| {
            Error::new(
                ErrorCode::BadRequest,
                format!("uploaded tasks {name:?} are not a JSON array of tasks: {e}"),
            )
        });
        if let Err(e) = uploads.delete(name).await {
            tracing::debug!(error = %e, name, "upload not deleted; it expires");
        }
        tasks
    }

    /// Each entry of a flow (the flow, or its header and pages) grows as it
    /// runs (outputs, errors, attempt history): one that would start above
    /// half the server's `max_payload` is refused up front, with the figures,
    /// rather than failing its first write or a later one.
    pub(super) fn fits_in_entries(
        &self,
        flow: &Flow,
        encoded: &store::Encoded,
    ) -> Result<(), Error> {
        let size = encoded
            .pages
            .iter()
            .map(|p| p.len() + 64)
            .chain([encoded.header.len()])
            .max()
            .unwrap_or(0);
        let limit = self.nats.server_info().max_payload;
        if limit > 0 && size > limit / 2 {
            return Err(Error::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the flow would be stored in entries of up to {size} bytes, more than \
                     half the server's max_payload of {limit} bytes (room is kept for its run \
                     state); make task inputs smaller, split the flow or raise max_payload"
                ),
            )
            .with_details(serde_json::json!({
                "stored_bytes": size,
                "max_payload": limit,
                "tasks": flow.tasks.len(),
            })));
        }
        Ok(())
    }
}
