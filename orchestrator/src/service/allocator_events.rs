//! The allocator's side of running flows: agents it declared lost or saw
//! leave and allocations it preempted send their flows' tasks back to be
//! placed again, and capacity changes let refused placements be asked again.

use super::*;

impl Orchestrator {
    /// Re-queues the tasks of agents the allocator declared lost and of
    /// allocations it preempted. Read from the events stream through a durable
    /// consumer, so an event published while no orchestrator ran is not missed.
    pub(super) async fn consume_allocator_events(self: Arc<Self>) {
        keep_running("allocator events", || {
            self.clone().consume_allocator_events_once()
        })
        .await;
    }

    async fn consume_allocator_events_once(self: Arc<Self>) -> Result<(), Error> {
        let mut messages = self
            .durable_messages(
                common::nats::STREAM_EVENTS,
                consumer::pull::Config {
                    durable_name: Some(
                        common::nats::CONSUMER_ORCHESTRATOR_ALLOCATOR_EVENTS.to_owned(),
                    ),
                    filter_subjects: vec![
                        subject::event::AGENT_LOST.to_owned(),
                        subject::event::AGENT_LEFT.to_owned(),
                        subject::event::ALLOCATION_PREEMPTED.to_owned(),
                    ],
                    deliver_policy: consumer::DeliverPolicy::New,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
            )
            .await?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| Error::unavailable("allocator events", e))?;
            let span = telemetry::consumer_span(&msg.subject, msg.headers.as_ref());
            let kind = serde_json::from_slice::<common::msg::Event>(&msg.payload).map(|e| e.kind);
            span.in_scope(|| match kind {
                Ok(
                    ref kind @ (EventKind::AgentLost {
                        ref agent_id,
                        ref released,
                        ..
                    }
                    | EventKind::AgentLeft {
                        ref agent_id,
                        ref released,
                    }),
                ) => {
                    let left = matches!(kind, EventKind::AgentLeft { .. });
                    let flows: HashSet<FlowId> = released
                        .iter()
                        .filter_map(|a| owner_task(&a.owner))
                        .map(|(f, _)| f)
                        .collect();
                    tracing::info!(agent = %agent_id, flows = flows.len(), left, "agent gone, re-queuing its tasks");
                    for flow in flows {
                        self.send(&flow, Cmd::AgentGone(agent_id.clone(), left));
                    }
                    self.agent_taken_away(agent_id, left);
                }
                Ok(EventKind::AllocationPreempted {
                    allocation_id,
                    owner,
                    reason,
                    ..
                }) => {
                    self.allocation_taken_away(&allocation_id, &reason);
                    if let Some((flow, task)) = owner_task(&owner) {
                        self.send(
                            &flow,
                            Cmd::Preempted {
                                task,
                                allocation: allocation_id,
                                reason,
                            },
                        );
                    }
                }
                _ => {}
            });
            let _ = msg.ack().await;
        }
        Ok(())
    }

    /// Moves the freed count when capacity may have been added (see
    /// [`machine::Placing`]); the next tick of a flow whose tasks were refused asks
    /// for them again. Forgets what creation learnt of feasibility when
    /// capacity may have gone. Core messages: one missed only delays that
    /// (a verdict is reused for at most [`FEASIBLE_FOR_MS`] anyway).
    pub(super) async fn count_capacity_changes(self: Arc<Self>) {
        let added = [
            subject::event::AGENT_REGISTERED,
            subject::event::CAPACITY_ADJUSTED,
            subject::event::RESERVATION_ENDED,
            subject::event::QUOTA_CHANGED,
        ];
        let gone = [
            subject::event::AGENT_LOST,
            subject::event::AGENT_LEFT,
            subject::event::AGENT_DEREGISTERED,
            subject::event::AGENT_RETIRED,
        ];
        let mut all = futures::stream::SelectAll::new();
        for s in added.into_iter().chain(gone) {
            match self.nats.subscribe(s).await {
                Ok(sub) => all.push(sub),
                Err(e) => tracing::warn!(subject = s, error = %e, "not subscribed"),
            }
        }
        while let Some(msg) = all.next().await {
            let subject = msg.subject.as_str();
            if gone.contains(&subject) || subject == subject::event::CAPACITY_ADJUSTED {
                self.forget_feasible();
            }
            // Every replica hears it here: what each keeps to hand on.
            let kind = serde_json::from_slice::<common::msg::Event>(&msg.payload).map(|e| e.kind);
            match &kind {
                Ok(
                    EventKind::AgentLost { agent_id, .. } | EventKind::AgentLeft { agent_id, .. },
                ) => {
                    let left = subject == subject::event::AGENT_LEFT;
                    self.agent_taken_away(agent_id, left);
                }
                Ok(EventKind::AgentDeregistered { agent_id, .. }) => self.agent_draining(agent_id),
                _ => {}
            }
            // Any amount may have been added: every held task may go.
            if added.contains(&subject) {
                self.freed.fetch_add(machine::FREED_ALL, Ordering::Relaxed);
            }
        }
    }
}

/// The flow and task an allocation owner names (`{flow}/{task}`, or
/// `{owner}/{flow}/{task}` for a flow with an owner), if it is one of ours.
fn owner_task(owner: &str) -> Option<(FlowId, TaskId)> {
    let mut parts = owner.rsplitn(3, '/');
    let task = parts.next()?;
    let flow = parts.next()?;
    Some((FlowId::new(flow).ok()?, TaskId::new(task).ok()?))
}
