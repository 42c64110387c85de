//! The per-flow actor: commands queued for a flow, applied in batches by one
//! machine step each and written with one compare-and-set.

use super::forward::Writer;
use super::*;

/// A large flow's watch updates are this far apart at least, and 1 ms more
/// per [`WATCH_TASKS_PER_MS`] tasks.
pub(super) const WATCH_EVERY_MS: u64 = 250;
pub(super) const WATCH_TASKS_PER_MS: usize = 40;

/// The watch updates of one flow. A status is a scan of every task (and its
/// critical path): a large (paged) flow's is sent at most every
/// [`WATCH_EVERY_MS`] or, larger still, at intervals growing with its size
/// (2.5 s at 100,000 tasks), so that it costs a bounded share of the
/// orchestrator's time; a change of the flow's own state is sent at once,
/// and the last change by the first tick after the interval.
#[derive(Debug, Default)]
pub(super) struct Watch {
    pub(super) pending: bool,
    pub(super) last_ms: u64,
    pub(super) last_state: Option<FlowState>,
}

impl Watch {
    pub(super) fn due(&self, flow: &Flow, now: u64) -> bool {
        self.pending
            && (!store::large(flow)
                || self.last_state != Some(flow.state)
                || now.saturating_sub(self.last_ms)
                    >= WATCH_EVERY_MS.max((flow.tasks.len() / WATCH_TASKS_PER_MS) as u64))
    }
}

impl Orchestrator {
    /// Queues a command for the flow's actor, starting one if needed. The
    /// current span goes with it as the command's cause.
    pub(super) fn send(self: &Arc<Self>, flow: &FlowId, cmd: Cmd) {
        self.send_caused(flow, cmd, tracing::Span::current());
    }

    /// Queues a command for the flow's actor with `cause` as its cause (a
    /// disabled span: none, so the step continues the flow's own trace).
    pub(super) fn send_caused(self: &Arc<Self>, flow: &FlowId, cmd: Cmd, cause: tracing::Span) {
        let mut cmd = (cmd, cause);
        // An actor goes idle between our lookup and our send at most once in
        // a while; a fresh one that is gone at once means the runtime is
        // shutting down.
        for _ in 0..3 {
            let tx = {
                let Ok(mut actors) = self.actors.lock() else {
                    return;
                };
                actors
                    .entry(flow.clone())
                    .or_insert_with(|| {
                        let (tx, rx) = mpsc::unbounded_channel();
                        // No span: the actor outlives its first sender; each
                        // step runs in a span of the commands it applies.
                        tokio::spawn(self.clone().actor(flow.clone(), rx));
                        tx
                    })
                    .clone()
            };
            match tx.send(cmd) {
                Ok(()) => return,
                // The actor went idle in between: start a fresh one.
                Err(mpsc::error::SendError(back)) => {
                    cmd = back;
                    if let Ok(mut actors) = self.actors.lock() {
                        if actors.get(flow).is_some_and(|t| t.same_channel(&tx)) {
                            actors.remove(flow);
                        }
                    }
                }
            }
        }
        tracing::debug!(%flow, "command dropped: the runtime is shutting down");
    }

    pub(super) async fn actor(
        self: Arc<Self>,
        flow: FlowId,
        mut rx: mpsc::UnboundedReceiver<Queued>,
    ) {
        // What the actor decides around the steps (placements, wake-ups,
        // redeliveries) and remembers between them.
        let mut driver = Driver::for_replica(self.tick_ms, self.replica);
        // The flow as this actor last wrote it, with its revision.
        let mut cache: Option<Stored> = None;
        let mut watch = Watch::default();
        // What this replica knows of another writing the flow.
        let mut writer = Writer::default();
        // How far into the agent events each wait was looked for.
        let mut looked = agent_events::Looked::default();
        // The revision this actor last noted the flow finished at: noted
        // again, a flow the sweep has forgotten would be held for good.
        let mut noted = None;
        // A creation this actor is to write (see `first`).
        let mut unwritten = None;
        loop {
            let first = match tokio::time::timeout(ACTOR_IDLE, rx.recv()).await {
                Ok(Some(cmd)) => cmd,
                Ok(None) => return,
                Err(_) => {
                    // Idle: leave, unless a command slipped in meanwhile.
                    let Ok(mut actors) = self.actors.lock() else {
                        return;
                    };
                    match rx.try_recv() {
                        Ok(cmd) => cmd,
                        Err(_) => {
                            actors.remove(&flow);
                            self.outbox.forget(&flow);
                            self.note_waiting(&flow, None);
                            return;
                        }
                    }
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            self.hold_first_record(&flow, &mut batch, &mut rx).await;
            self.drop_applied_early(&mut batch).await;
            if batch.is_empty() {
                continue;
            }
            let creating = self
                .creating
                .lock()
                .ok()
                .and_then(|c| c.get(&flow).cloned());
            if let Some(mut done) = creating {
                // Nothing is stepped while its creation is written (its first
                // assignments may be out already, and their reports here):
                // once it is, the step starts from the copy written, and
                // takes the tick the creation queued.
                let _ = done.changed().await;
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(cmd) => batch.push(cmd),
                        Err(_) => break,
                    }
                }
            }
            let ticked = batch.iter().any(|(c, _)| matches!(c, Cmd::Tick));
            // Whether the copy about to be stepped is known current without a
            // read: the one this replica's creation wrote just now, for a step
            // of ticks only (nothing it could settle wrongly from a stale copy).
            let mut current = false;
            if ticked {
                // A flow this replica just created (which ticks it) starts
                // from the copy it wrote.
                let seed = self.created.lock().ok().and_then(|mut c| c.remove(&flow));
                if let Some(Created {
                    stored,
                    refused,
                    first,
                }) = seed
                {
                    let now = common::now_ms();
                    for (task, asked_at) in refused {
                        driver.refused(&Exec(&self), task, asked_at, now);
                    }
                    if cache.is_none() {
                        cache = Some(stored);
                        current = batch.iter().all(|(c, _)| matches!(c, Cmd::Tick));
                        unwritten = first;
                    }
                }
                // Events a wait task waits for go first, before the tick
                // could time it out.
                // Not for a flow another replica writes: its own tick looks.
                if cache.is_some() || writer.elsewhere.is_none() || writer.readied_here {
                    let found = self.events_for_waits(&flow, &mut cache, &mut looked).await;
                    current &= found.is_empty();
                    let span = tracing::Span::current();
                    batch.splice(0..0, found.into_iter().map(|c| (c, span.clone())));
                }
            }
            let finished = self
                .apply_batch(
                    &flow,
                    batch,
                    &mut driver,
                    &mut cache,
                    &mut watch,
                    current,
                    &mut writer,
                    &mut unwritten,
                )
                .await;
            self.note_waiting(&flow, cache.as_ref().map(|(f, _, _)| f));
            if let Some((f, _, _)) = &mut cache {
                driver.set_alarm(&mut Exec(&self), f, common::now_ms());
            }
            // A flow another replica writes is that one's to send again,
            // publish and watch: the copy here may be stale (see `forward`).
            let elsewhere = cache
                .as_ref()
                .is_some_and(|(_, _, enc)| self.writer_elsewhere(enc.kept.writer).is_some());
            if ticked && !elsewhere {
                if let Some((f, rev, enc)) = &cache {
                    let now = common::now_ms();
                    driver.redeliver(&mut Exec(&self), f, now);
                    self.outbox
                        .republish(&self.events_js, &f.id, &enc.kept.outbox, now)
                        .await;
                    if watch.due(f, now) {
                        self.publish_watch(f, *rev, now, &mut watch).await;
                    }
                }
            }
            // Any step that leaves the flow unfinished (a re-run, a change)
            // must put it back under the sweep: timeouts and back-offs need it.
            match (finished, &cache) {
                (true, Some((_, revision, _))) => {
                    if noted != Some(*revision) {
                        noted = Some(*revision);
                        self.note_finished(flow.clone(), *revision, common::now_ms());
                    }
                }
                (true, None) => {}
                (false, _) => {
                    noted = None;
                    self.known.unfinished(&flow);
                }
            }
        }
    }

    /// Holds back a step that would only record assignments sent ahead of
    /// their record (a new flow's, see `create`) until a command that
    /// matters comes, such as the agents' first reports, or
    /// [`Config::first_record_ms`] has passed: one write then records the
    /// grants and the reports. A tick is no reason to write. A creation
    /// this actor is to write (see `first`) is held so, but not as long.
    async fn hold_first_record(
        &self,
        flow: &FlowId,
        batch: &mut Vec<Queued>,
        rx: &mut mpsc::UnboundedReceiver<Queued>,
    ) {
        let quiet = |c: &Cmd| matches!(c, Cmd::Tick | Cmd::Assign { sent: Some(_), .. });
        let ahead = |c: &Cmd| matches!(c, Cmd::Assign { sent: Some(_), .. });
        if !batch.iter().all(|(c, _)| quiet(c)) {
            return;
        }
        // A deferred creation's tick may come alone: its grants follow.
        let hold = if self.first_write_pending(flow) {
            self.first_write
        } else if !self.first_record.is_zero() && batch.iter().any(|(c, _)| ahead(c)) {
            self.first_record
        } else {
            return;
        };
        let until = tokio::time::Instant::now() + hold;
        while batch.len() < MAX_BATCH {
            let Ok(Some(cmd)) = tokio::time::timeout_at(until, rx.recv()).await else {
                return;
            };
            let matters = !quiet(&cmd.0);
            batch.push(cmd);
            if matters {
                break;
            }
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
    }

    /// Acknowledges, without a step, the stored copies (from this replica's
    /// consumer) of completions it applied early: one that came while the step applying its
    /// early copy was being written reached the actor before that step
    /// noted it (see `intake`), and would cost a step of its own (a read,
    /// often a write) just as the client that waited for the flow sends
    /// its next.
    async fn drop_applied_early(&self, batch: &mut Vec<Queued>) {
        if !batch.iter().any(|(c, _)| matches!(c, Cmd::Report { .. })) {
            return;
        }
        let mut kept = Vec::with_capacity(batch.len());
        for (cmd, cause) in batch.drain(..) {
            match cmd {
                // Only this replica's own stored copies: one handed over by
                // another is settled by a step, whose outcome goes back.
                Cmd::Report { report, msg }
                    if msg.message().is_some() && self.early.take(&report) =>
                {
                    msg.done().await;
                }
                cmd => kept.push((cmd, cause)),
            }
        }
        *batch = kept;
    }

    /// Applies a batch of commands in one step. Returns whether the flow is finished.
    ///
    /// The step starts from the flow as this actor last wrote it, which saves a
    /// read while one replica drives the flow: the compare-and-set proves the
    /// copy was current. A step that writes nothing proves nothing, so it is
    /// redone on a fresh read before anything (a rejection, say) is settled,
    /// unless the flow is large and its header shows it unchanged since, or
    /// the caller knows the copy `current`.
    ///
    /// The step's span continues the trace of the first command that has one
    /// and links to the others' (see [`step_span`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn apply_batch(
        self: &Arc<Self>,
        flow_id: &FlowId,
        batch: Vec<Queued>,
        driver: &mut Driver,
        cache: &mut Option<Stored>,
        watch: &mut Watch,
        current: bool,
        writer: &mut Writer,
        first: &mut Option<First>,
    ) -> bool {
        let (mut batch, mut causes): (Vec<Cmd>, Vec<tracing::Span>) = batch.into_iter().unzip();
        let now = common::now_ms();
        for _ in 0..bus::CAS_ATTEMPTS {
            // A flow another replica writes is not kept here, only who
            // writes it, looked at again on the sweep's tick (see `forward`).
            let handable = |c: &Cmd| matches!(c, Cmd::Report { .. } | Cmd::Tick | Cmd::Due);
            if cache.is_none() && !writer.readied_here && batch.iter().all(handable) {
                let ticked = batch.iter().any(|c| matches!(c, Cmd::Tick));
                let to = match writer.elsewhere.filter(|_| !ticked) {
                    Some(to) => self.writer_elsewhere(Some(to)),
                    None => match store::peek(&self.flows, flow_id).await {
                        Ok(Some(p)) if !p.state.is_terminal() => self.writer_elsewhere(p.writer),
                        _ => None,
                    },
                };
                writer.elsewhere = to;
                if let Some(to) = to {
                    self.hand_over_all(to, &mut batch, &mut causes, true);
                    if batch.is_empty() {
                        return false;
                    }
                }
            }
            let cached = cache.take();
            let from_cache = cached.is_some();
            let (mut flow, revision, stored) = match cached {
                Some(c) => c,
                None => match store::read(&self.flows, flow_id).await {
                    Ok(Some(found)) => found,
                    Ok(None) => {
                        self.settle_missing(flow_id, batch).await;
                        return true;
                    }
                    Err(e) => {
                        self.settle_failed(flow_id, batch, &e, driver).await;
                        return false;
                    }
                },
            };
            // Reports go to the replica writing the flow, and its timers are
            // that one's too, unless tasks this replica readied wait here to
            // be placed (see `forward`).
            if let Some(to) = self.writer_elsewhere(stored.kept.writer) {
                writer.readied_here = flow.readied_any_by(self.replica);
                self.hand_over_all(to, &mut batch, &mut causes, !writer.readied_here);
                if batch.is_empty() {
                    // Finished there, its last events stored: not looked at
                    // again here (the sweep ticks every flow with an actor
                    // here, and each tick would read it).
                    let finished = flow.state.is_terminal() && stored.kept.outbox.is_empty();
                    if finished {
                        self.note_finished(flow_id.clone(), revision, common::now_ms());
                    }
                    if writer.readied_here {
                        *cache = Some((flow, revision, stored));
                    } else {
                        writer.elsewhere = Some(to);
                    }
                    return finished;
                }
            }
            let outcomes: Vec<Result<Vec<Effect>, Rejection>> = batch
                .iter()
                .map(|cmd| flow.apply(cmd.command(), revision, now))
                .collect();
            let events = outcomes.iter().flatten().flat_map(|e| events_of(e));
            flow.claim_ready(self.replica, events);
            // The step's events go into the record with it (the outbox).
            let mut kept = stored.kept.clone();
            kept.writer = Some(self.replica);
            let (mut cursor, outbox_changed) = self.outbox.stage(
                &mut flow,
                &mut kept.outbox,
                outcomes.iter().flatten().flat_map(|e| events_of(e)),
                now,
            );
            // The encoding tells whether the step changed anything: it is
            // needed for the write anyway, and keeping a copy of a large
            // flow to compare against cost more than the step itself.
            let (mut body, dirty) = match store::encode(&mut flow, kept, Some(&stored)) {
                Ok(encoded) => encoded,
                Err(err) => {
                    self.settle_failed(flow_id, batch, &err, driver).await;
                    return false;
                }
            };
            // A creation not written yet is written whatever the step did.
            let unwritten = revision == first::UNWRITTEN && first.is_some();
            let changed = unwritten
                || outbox_changed
                || store::before_outbox(&body.header) != store::before_outbox(&stored.header);
            if !changed {
                body.kept.outbox = stored.kept.outbox.clone();
                body.kept.writer = stored.kept.writer;
            }
            if !changed && from_cache && !current && !self.still_current(&flow, revision).await {
                continue;
            }
            let span = step_span(&mut flow, changed, &causes, driver.placing(), now);
            if changed {
                // What this step readied is this replica's to place.
                *writer = Writer::default();
            }
            let revision = if !changed {
                revision
            } else if unwritten {
                match self
                    .write_first(&flow, body, first)
                    .instrument(span.clone())
                    .await
                {
                    Ok((rev, written)) => {
                        body = written;
                        rev
                    }
                    // Its caller is told; the flow is read back: stored after
                    // all, it is stepped as usual; not, its attempts are
                    // taken back (`settle_missing`).
                    Err(_) => continue,
                }
            } else {
                match store::write(&self.flows, &self.nats, &flow, &body, &dirty, revision)
                    .instrument(span.clone())
                    .await
                {
                    Ok(rev) => rev,
                    Err(WriteError::Conflict) => continue,
                    Err(WriteError::Failed(err)) => {
                        self.settle_failed(flow_id, batch, &err, driver).await;
                        return false;
                    }
                }
            };
            #[cfg(feature = "failpoints")]
            if changed {
                crate::failpoints::after_write(flow_id).await;
            }
            if unwritten {
                self.first_written(&flow, revision, first, now).await;
            }
            watch.pending |= changed;
            // Each command's outcome in its cause's span (the step's when it
            // has none): a report's transitions and the assignment a
            // placement leads to continue the trace they came from.
            for ((cmd, outcome), cause) in batch.into_iter().zip(outcomes).zip(causes) {
                let span = if cause.is_disabled() {
                    span.clone()
                } else {
                    cause
                };
                let cursor = &mut cursor;
                async {
                    let effects = self
                        .settle(&flow, revision, now, cmd, outcome, driver)
                        .await;
                    self.run_effects(driver, Some((&flow, now)), effects, cursor)
                        .await;
                }
                .instrument(span)
                .await;
            }
            self.outbox.sent(cursor, now);
            span.in_scope(|| driver.dispatch(&mut Exec(self), &mut flow, now));
            // Watchers last: agents, events and the allocator are what the
            // flow's progress waits for.
            if watch.due(&flow, now) {
                self.publish_watch(&flow, revision, now, watch)
                    .instrument(span.clone())
                    .await;
            }
            // Finished once its last events are known to be stored too.
            let finished = flow.state.is_terminal() && body.kept.outbox.is_empty();
            *cache = Some((flow, revision, body));
            return finished;
        }
        let err = bus::contention(flow_id.as_str());
        self.settle_failed(flow_id, batch, &err, driver).await;
        false
    }

    /// Whether a large flow's stored header is still at `revision`, so the
    /// copy this actor holds is current without reading every page again
    /// (a tick that changes nothing would otherwise read the whole flow).
    pub(super) async fn still_current(&self, flow: &Flow, revision: u64) -> bool {
        if !store::large(flow) {
            return false;
        }
        matches!(
            self.flows.entry(flow.id.as_str()).await,
            Ok(Some(e)) if e.revision == revision && e.operation == kv::Operation::Put
        )
    }
}

/// The span of one step (one write) of a flow's actor. It continues the
/// trace of the first command that has one and links the others'; a step
/// driven only by the sweep continues the flow's own trace. A sweep's step that
/// changes nothing and places nothing gets no span, else every unfinished flow
/// would add one to its trace every sweep.
pub(super) fn step_span(
    flow: &mut Flow,
    changed: bool,
    causes: &[tracing::Span],
    placing: &HashSet<TaskId>,
    now: u64,
) -> tracing::Span {
    let caused = causes.iter().any(|c| !c.is_disabled());
    // Only asked when nothing else says the step matters.
    let mut places = || {
        flow.room(placing.len()) > 0
            && flow
                .dispatchable_up_to(now, placing.len() + 1)
                .iter()
                .any(|t| !placing.contains(t))
    };
    if !caused && !changed && !places() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        parent: None,
        "flow step",
        flow = %flow.id,
        commands = causes.len()
    );
    telemetry::join_causes(&span, causes, flow.trace.as_deref());
    span
}

/// The events among a step's effects.
pub(super) fn events_of(effects: &[Effect]) -> impl Iterator<Item = &EventKind> {
    effects.iter().filter_map(|e| match e {
        Effect::Event(kind) => Some(kind),
        _ => None,
    })
}
