//! Creating flows: validation, the infeasibility check (with the verdicts
//! it may reuse), uploaded tasks, the size check, placing a small flow's
//! first tasks and the first write.

use super::*;

/// Infeasible-requirement warnings listed one by one; more are counted.
pub(super) const MAX_WARNINGS: usize = 100;

/// Tasks a new flow places before its first write, at most (see
/// [`Orchestrator::place_at_creation`]): enough for small flows to start
/// at once, few enough that a wide flow's reply does not wait on many
/// bookings (its actor places the rest in batches).
const PLACED_AT_CREATION: usize = 8;

/// How long creation waits for those bookings: an allocator that is slow
/// to answer (frozen, say) delays the reply by this much at most, and the
/// tasks it did not place go the usual way. The request's deadline is as
/// short, so a booking read later books nothing (one that got no answer in
/// time is released, as any placement's).
const PLACED_AT_CREATION_WAIT: Duration = Duration::from_millis(500);

/// How long creation waits for the allocator's word on whether a task's
/// requirements could ever fit, when that is only advice (a warning): a
/// slow allocator delays the reply by this much, not a request timeout.
const FEASIBLE_CHECK_WAIT: Duration = Duration::from_secs(1);

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
        let id = spec.id.clone().unwrap_or_else(FlowId::random);
        let now = common::now_ms();
        let trace = telemetry::traceparent();
        let (mut flow, mut effects) = off_worker(large, || {
            let (mut flow, effects) = Flow::new(id.clone(), spec, now);
            flow.claim_ready(self.replica, events_of(&effects));
            flow.warnings = warnings;
            flow.started_by = origin;
            flow.trace = trace;
            (flow, effects)
        });
        let (booked, refused) = if large {
            Default::default()
        } else {
            self.place_at_creation(&mut flow, &mut effects).await
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
        // A flow not written gives its bookings back; one whose write may
        // have been stored keeps them (reconciliation takes them back if not).
        let unbook = |o: &Arc<Self>| {
            for (agent, allocation) in booked.iter().cloned() {
                o.release(agent, allocation);
            }
        };
        let encoded = encoded.inspect_err(|_| unbook(self))?;
        self.fits_in_entries(&flow, &encoded)
            .inspect_err(|_| unbook(self))?;
        let (revision, encoded) = match store::create(&self.flows, &flow, encoded).await {
            Ok(written) => written,
            Err(WriteError::Conflict) => {
                unbook(self);
                return Err(Error::new(
                    ErrorCode::Conflict,
                    format!("flow {id} already exists"),
                ));
            }
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
            // Only the assignments of what creation placed: the flow's
            // actor has the driver that places the rest.
            let mut driver = Driver::new(o.tick_ms);
            let now = common::now_ms();
            o.run_effects(&mut driver, Some((&flow, now)), effects, &mut cursor)
                .await;
            o.outbox.sent(cursor, common::now_ms());
            if let Ok(mut created) = o.created.lock() {
                let stored = (flow, revision, encoded);
                created.insert(id.clone(), Created { stored, refused });
            }
            o.send(&id, Cmd::Tick);
        };
        if large {
            tokio::spawn(after.in_current_span());
        } else {
            after.await;
        }
        Ok(FlowStatus { revision, ..status })
    }

    /// Places a new small flow's first tasks before it is first written, so
    /// the write that creates it assigns them too: a one-task flow is then
    /// three writes (create and assign, report, complete), not four, and
    /// its assignments leave right after the reply. Tasks with a
    /// concurrency key and any the allocator does not grant at once go the
    /// usual way, through the flow's actor. Returns what was booked, and
    /// the tasks refused (for the actor to hold back as if it had asked).
    async fn place_at_creation(
        self: &Arc<Self>,
        flow: &mut Flow,
        effects: &mut Vec<Effect>,
    ) -> (Vec<(AgentId, AllocationId)>, Vec<(TaskId, u64)>) {
        let now = common::now_ms();
        let asked_at = self.freed.load(Ordering::Relaxed);
        // Its tasks are this replica's to place (`claim_ready`).
        let mut placing = machine::Placing::default();
        placing.drive(Some(self.replica), None);
        let placements: Vec<machine::Placement> = flow
            .placements(now, &placing, |_| false)
            .into_iter()
            .filter(|p| p.slot.is_none())
            .take(PLACED_AT_CREATION)
            .collect();
        let client = self.client.clone().with_timeout(PLACED_AT_CREATION_WAIT);
        let granted = futures::future::join_all(placements.into_iter().map(|mut p| {
            let span = tracing::info_span!("place", flow = %flow.id, task = %p.task);
            let client = &client;
            async move {
                p.request.allocation_id = Some(AllocationId::random());
                let placed = self.place_via(client, &p.request).await;
                (p.task, placed)
            }
            .instrument(span)
        }))
        .await;
        let granted_ms = common::now_ms();
        let (mut booked, mut refused) = (Vec::new(), Vec::new());
        for (task, placed) in granted {
            let Some(a) = placed else {
                refused.push((task, asked_at));
                continue;
            };
            let placed = machine::Command::Placed {
                task: &task,
                agent: &a.agent_id,
                allocation: &a.allocation_id,
                granted_ms,
            };
            match flow.apply(placed, 0, granted_ms) {
                Ok(e) => {
                    effects.extend(e);
                    booked.push((a.agent_id, a.allocation_id));
                }
                Err(_) => self.release(a.agent_id, a.allocation_id),
            }
        }
        (booked, refused)
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

    /// Tasks whose requirements no registered agent could satisfy even when
    /// idle: no agent has the capabilities and labels, or none has the
    /// capacity at all. Each distinct requirement is asked about once.
    ///
    /// As advice (`strict` false) a recent "fits" is taken as it stands,
    /// the allocator is waited for [`FEASIBLE_CHECK_WAIT`] at most, and
    /// without its answer nothing is known: no warning rather than a false
    /// one. For a flow to refuse when infeasible (`strict`) every verdict is
    /// asked afresh, and no answer is an error: it is not known whether the
    /// flow could run.
    pub(super) async fn infeasible(
        &self,
        spec: &FlowSpec,
        strict: bool,
    ) -> Result<Vec<common::msg::ValidationProblem>, Error> {
        let client = if strict {
            self.client.clone()
        } else {
            self.client.clone().with_timeout(FEASIBLE_CHECK_WAIT)
        };
        let mut verdicts: Vec<(&common::msg::Requirements, Option<String>)> = Vec::new();
        let mut out = Vec::new();
        for t in &spec.tasks {
            let known = verdicts
                .iter()
                .find(|(r, _)| *r == &t.requirements)
                .map(|(_, v)| v.clone());
            let verdict = match known {
                Some(v) => v,
                None => {
                    let v = if !strict && self.known_feasible(&t.requirements) {
                        None
                    } else {
                        match self.never_fits(&client, &t.requirements).await {
                            Ok(None) => {
                                self.note_feasible(&t.requirements);
                                None
                            }
                            Ok(why) => why,
                            Err(e) if strict => {
                                return Err(Error::unavailable(
                                    "not known whether registered agents could run every \
                                     task (the flow sets `require_feasible`)",
                                    e,
                                ))
                            }
                            Err(_) => None,
                        }
                    };
                    verdicts.push((&t.requirements, v.clone()));
                    v
                }
            };
            if let Some(why) = verdict {
                out.push(common::msg::ValidationProblem {
                    code: "infeasible_requirements".into(),
                    message: format!("task {}: {why}", t.id),
                    task_id: Some(t.id.clone()),
                    path: Vec::new(),
                });
            }
        }
        // Stored with the flow and sent in every status: a large flow's
        // warnings are summed up past the first few.
        if out.len() > MAX_WARNINGS {
            let more = out.len() - MAX_WARNINGS;
            out.truncate(MAX_WARNINGS);
            out.push(common::msg::ValidationProblem {
                code: "infeasible_requirements".into(),
                message: format!("and {more} more tasks no registered agent could run"),
                task_id: None,
                path: Vec::new(),
            });
        }
        Ok(out)
    }

    fn known_feasible(&self, req: &common::msg::Requirements) -> bool {
        let (Ok(key), Ok(known)) = (serde_json::to_string(req), self.feasible.lock()) else {
            return false;
        };
        known
            .get(&key)
            .is_some_and(|until| *until > common::now_ms())
    }

    fn note_feasible(&self, req: &common::msg::Requirements) {
        let (Ok(key), Ok(mut known)) = (serde_json::to_string(req), self.feasible.lock()) else {
            return;
        };
        if known.len() >= FEASIBLE_KEPT {
            known.clear();
        }
        known.insert(key, common::now_ms() + FEASIBLE_FOR_MS);
    }

    /// An agent left or its capacity changed: "some agent could run it"
    /// must be asked again.
    pub(super) fn forget_feasible(&self) {
        if let Ok(mut known) = self.feasible.lock() {
            known.clear();
        }
    }

    /// Why no registered agent could ever run a task with `req`, if none
    /// could; an error when the allocator did not answer through `client`.
    pub(super) async fn never_fits(
        &self,
        client: &common::Client,
        req: &common::msg::Requirements,
    ) -> Result<Option<String>, Error> {
        let check = CapacityRequest {
            requirements: Some(req.clone()),
            ..Default::default()
        };
        let status = client.capacity(&check).await?;
        if status.fits == Some(true) {
            return Ok(None);
        }
        let Some(best) = status
            .no_fit
            .as_ref()
            .and_then(|n| n.best_candidate.clone())
        else {
            return Ok(Some(match status.no_fit {
                Some(n) => format!(
                    "no registered agent has the capabilities and labels it needs ({})",
                    n.message
                ),
                None => "no registered agent has the capabilities and labels it needs".to_owned(),
            }));
        };
        let Some(totals) = status.agents.get(&best) else {
            return Ok(None);
        };
        let short: Vec<String> = req
            .resources
            .iter()
            .filter(|(r, need)| totals.get(*r).map(|c| c.capacity).unwrap_or(0.0) < **need)
            .map(|(r, need)| format!("{r} {need}"))
            .collect();
        Ok((!short.is_empty()).then(|| {
            format!(
                "needs {} but no suitable agent has that much in all",
                short.join(", ")
            )
        }))
    }
}
