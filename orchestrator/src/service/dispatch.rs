//! Placement and assignment: ready tasks asked of the allocator, granted
//! allocations recorded and sent to agents, redelivery, slots and releases.

use super::*;

/// The service's hands for a flow actor's decisions (see [`Driver`]): each
/// job spawned, its outcome sent back to the actor as a command.
pub(super) struct Exec<'a>(pub(super) &'a Arc<Orchestrator>);

impl Executor for Exec<'_> {
    fn place(&mut self, flow: &FlowId, mut placement: machine::Placement) {
        // A task asked for before keeps its id (see `Task::asked`).
        let kept = placement.request.allocation_id.is_some();
        if !kept {
            placement.request.allocation_id = Some(AllocationId::random());
        }
        // The grant goes back to the actor with this span as its cause,
        // so the assignment it leads to continues the same trace.
        let span = tracing::info_span!("place", flow = %flow, task = %placement.task);
        let placed = self.0.clone().place_task(flow.clone(), placement, kept);
        tokio::spawn(placed.instrument(span));
    }

    fn assign(&mut self, flow: &Flow, assignment: Assignment, again: bool) {
        if !again {
            tokio::spawn(self.0.clone().deliver(assignment).in_current_span());
            return;
        }
        // In the flow's trace: the sweep that got here has none of its own.
        let span = tracing::info_span!(parent: None, "redeliver", flow = %flow.id, task = %assignment.task_id);
        telemetry::join_causes(&span, &[], flow.trace.as_deref());
        span.in_scope(|| {
            tracing::debug!(attempt = assignment.attempt, "assignment published again")
        });
        tokio::spawn(self.0.clone().deliver(assignment).instrument(span));
    }

    fn release(
        &mut self,
        agent: AgentId,
        allocation: AllocationId,
        hand_on: Option<machine::HandOn>,
    ) {
        self.0.release_or_keep(agent, allocation, hand_on);
    }

    fn free_slot(&mut self, key: String, holder: String) {
        self.0.free_slot(Some((key, holder)));
    }

    fn cancel(&mut self, agent: AgentId, notice: CancelNotice) {
        tokio::spawn(self.0.clone().send_cancel(agent, notice).in_current_span());
    }

    fn wake(&mut self, flow: &FlowId, after_ms: u64, why: Wake) {
        let cmd = match why {
            Wake::Timer => Cmd::Due,
            Wake::Placing => Cmd::Wake,
        };
        self.0
            .send_after(flow, Duration::from_millis(after_ms), cmd);
    }

    fn known_full(&self, key: &str, now_ms: u64) -> bool {
        self.0.slots.known_full(key, now_ms)
    }

    fn freed(&self) -> u64 {
        self.0.freed.load(Ordering::Relaxed)
    }

    fn gone_replicas(&self) -> Option<machine::Gone> {
        let o = self.0.clone();
        Some(machine::Gone(Box::new(move |r| o.replica_gone(r))))
    }
}

impl Orchestrator {
    /// Queues `cmd` for the flow's actor once `after` has passed.
    pub(super) fn send_after(self: &Arc<Self>, flow: &FlowId, after: Duration, cmd: Cmd) {
        let (o, flow) = (self.clone(), flow.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            o.send(&flow, cmd);
        });
    }

    /// Takes the task's concurrency slot (if it names a key), asks the
    /// allocator, and sends the actor the grant (`Assign`) or the refusal
    /// (`Unplaced`, with the slot given back).
    async fn place_task(
        self: Arc<Self>,
        flow_id: FlowId,
        placement: machine::Placement,
        kept: bool,
    ) {
        let machine::Placement {
            task,
            slot,
            request,
        } = placement;
        let asked_at = self.freed.load(Ordering::Relaxed);
        if let Some((limit, holder)) = &slot {
            let now = common::now_ms();
            match self.slots.acquire(limit, holder, &flow_id, now).await {
                Ok(true) => {}
                Ok(false) => {
                    self.send(&flow_id, Cmd::Unplaced { task, asked_at });
                    return;
                }
                Err(e) => {
                    tracing::warn!(key = %limit.key, error = %e, "concurrency slot not taken");
                    self.send(&flow_id, Cmd::Unplaced { task, asked_at });
                    return;
                }
            }
        }
        let slot = slot.map(|(limit, holder)| (limit.key, holder));
        let spare = (!kept).then(|| self.take_spare(&request)).flatten();
        if let Some((allocation, bind)) = spare {
            let cmd = Cmd::Assign {
                task,
                allocation: Box::new(allocation),
                slot,
                granted_ms: common::now_ms(),
                sent: None,
            };
            // Bound at the allocator once the grant is queued: a refusal's
            // preemption then reaches the actor after it.
            self.send(&flow_id, cmd);
            self.handed_on(bind);
            return;
        }
        let cmd = match self.place_via(&self.client, &request, kept).await {
            Some(allocation) => Cmd::Assign {
                task,
                allocation: Box::new(allocation),
                slot,
                granted_ms: common::now_ms(),
                sent: None,
            },
            None => {
                self.free_slot(slot);
                Cmd::Unplaced { task, asked_at }
            }
        };
        self.send(&flow_id, cmd);
    }

    /// One placement through `client` (and so within its timeout), with at
    /// most [`MAX_PLACING`] in flight per replica. A request that got no
    /// answer may still have been booked, so its (caller-chosen) allocation
    /// id is released, now and once more a little later in case the booking
    /// lands after the first release; unless the id is `kept` in the flow
    /// (`Task::asked`), where asking again gets the booking back.
    pub(super) async fn place_via(
        self: &Arc<Self>,
        client: &common::Client,
        request: &AllocateRequest,
        kept: bool,
    ) -> Option<Allocation> {
        let _slot = self.placing.acquire().await.ok()?;
        match client.allocate(request).await {
            Ok(allocation) => Some(allocation),
            Err(e) => {
                // No capacity yet is normal: the next tick tries again.
                tracing::debug!(owner = %request.owner, code = %e.code, message = %e.message, "not placed");
                if matches!(e.code, ErrorCode::NoCapacity | ErrorCode::QuotaExceeded) {
                    self.give_back_spares_for(request);
                }
                if let (ErrorCode::Timeout | ErrorCode::Unavailable, Some(id), false) =
                    (e.code, &request.allocation_id, kept)
                {
                    tokio::spawn(self.clone().release_unanswered(id.clone()));
                }
                None
            }
        }
    }

    /// Releases a booking whose request got no answer, now and once more
    /// 10 s later, in case the booking lands after the first release.
    async fn release_unanswered(self: Arc<Self>, id: AllocationId) {
        self.release_by_id(id.clone(), None).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        self.release_by_id(id, None).await;
    }

    /// Sends one assignment to its agent: a plain message, not stored. The
    /// flow's record holds the assignment; until the attempt's `started` is
    /// stored, the sweep sends it again ([`machine::REDELIVER_AFTER_MS`]), so
    /// one lost here (the agent reconnecting, this connection down) costs a
    /// redelivery, never the attempt.
    async fn deliver(self: Arc<Self>, assignment: Assignment) {
        if let Err(e) = self.publish_assignment(&assignment).await {
            tracing::warn!(flow = %assignment.flow_id, task = %assignment.task_id, error = %e, "assignment not sent, sending it again later");
        }
    }

    pub(super) async fn publish_assignment(&self, a: &Assignment) -> Result<(), Error> {
        let body =
            serde_json::to_vec(a).map_err(|e| Error::internal_from("encode assignment", e))?;
        let to = subject::assign(&a.agent_id);
        let headers = telemetry::producer_headers(&to);
        self.nats
            .publish_with_headers(to.clone(), headers, body.into())
            .await
            .map_err(|e| Error::unavailable(format_args!("publish to {to}"), e))
    }

    /// Gives a concurrency slot back, then wakes this replica's flows that
    /// found its key full.
    pub(super) fn free_slot(self: &Arc<Self>, slot: SlotHeld) {
        let Some((key, holder)) = slot else {
            return;
        };
        self.freed.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(self.clone().free_slot_now(key, holder).in_current_span());
    }

    async fn free_slot_now(self: Arc<Self>, key: String, holder: String) {
        for flow in self.slots.free(&key, &holder).await {
            self.send(&flow, Cmd::Tick);
        }
    }

    /// Gives an allocation back. The freed count moves now, so the step
    /// that released asks for a held task at once, and again once the
    /// allocator has it, so a refusal that raced the release is stale.
    pub(super) fn release(self: &Arc<Self>, agent: AgentId, allocation: AllocationId) {
        self.freed.fetch_add(1, Ordering::Relaxed);
        let o = self.clone();
        let released = async move { o.release_by_id(allocation, Some(agent)).await };
        tokio::spawn(released.in_current_span());
    }

    /// Releases an allocation a failed step was to record, once the flow can
    /// be read and does not hold it. A write that timed out may have been
    /// stored (the server went away before answering): releasing at once
    /// would leave an assigned task on capacity the allocator thinks is free.
    pub(super) fn release_unless_held(
        self: &Arc<Self>,
        flow_id: FlowId,
        task: TaskId,
        allocation: Allocation,
        slot: SlotHeld,
        sent: Option<u32>,
    ) {
        let checked = self
            .clone()
            .release_if_not_held(flow_id, task, allocation, slot, sent);
        tokio::spawn(checked.in_current_span());
    }

    async fn release_if_not_held(
        self: Arc<Self>,
        flow_id: FlowId,
        task: TaskId,
        allocation: Allocation,
        slot: SlotHeld,
        sent: Option<u32>,
    ) {
        let mut pause = Duration::from_millis(200);
        let held = loop {
            match store::read(&self.flows, &flow_id).await {
                Ok(flow) => {
                    break flow.is_some_and(|(f, _, _)| {
                        f.tasks.get(&task).is_some_and(|t| {
                            t.allocation.as_ref() == Some(&allocation.allocation_id)
                        })
                    })
                }
                Err(e) if pause < Duration::from_secs(60) => {
                    tracing::debug!(error = %e, "flow unreadable, checking the allocation later");
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                // Still unknown after a minute: give it back rather than hold
                // it for ever.
                Err(_) => break false,
            }
        };
        if !held {
            if let Some(attempt) = sent {
                let why = "the step that was to record it failed";
                self.take_back(&flow_id, &task, attempt, &allocation.agent_id, why);
            }
            self.free_slot(slot);
            self.release_by_id(allocation.allocation_id, Some(allocation.agent_id))
                .await;
        }
    }

    /// Releases are idempotent, and a lost one holds the agent's capacity
    /// until the agent itself is lost, so one that gets no answer (or an
    /// unavailable store) is tried again with back-off, for about a minute.
    pub(super) async fn release_by_id(&self, allocation: AllocationId, agent: Option<AgentId>) {
        // Given back: never handed on again (see `spare`).
        self.spares.forget(&allocation);
        let req = ReleaseRequest {
            allocation_id: allocation,
            agent_id: agent,
        };
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=RELEASE_ATTEMPTS {
            match self.client.release(&req).await {
                Ok(_) => {
                    self.freed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(e)
                    if attempt < RELEASE_ATTEMPTS
                        && matches!(e.code, ErrorCode::Timeout | ErrorCode::Unavailable) =>
                {
                    tracing::debug!(allocation = %req.allocation_id, error = %e, attempt, "release unanswered, trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(10));
                }
                Err(e) => {
                    tracing::warn!(allocation = %req.allocation_id, error = %e, "release failed");
                    return;
                }
            }
        }
    }
}
