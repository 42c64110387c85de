//! After a step: what the actor does once the write succeeded (effects,
//! watch updates) or failed (re-read, refuse, tell the agent).

use super::*;

/// A stored report of a flow not found is handed back, not refused, for this
/// long after it was stored: its flow's first assignments leave before the
/// flow's creation is stored (see `create`), so a report may overtake it, to
/// a replica that reads the flow before the write lands.
const UNKNOWN_FLOW_GRACE_MS: u64 = 2_000;

impl Orchestrator {
    /// After a successful write: acknowledge and answer; returns the
    /// command's effects to carry out.
    pub(super) async fn settle(
        self: &Arc<Self>,
        flow: &Flow,
        revision: u64,
        now: u64,
        cmd: Cmd,
        outcome: Result<Vec<Effect>, Rejection>,
        driver: &mut Driver,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        match (cmd, outcome) {
            (Cmd::Report { report, msg }, Ok(e)) => {
                if msg.came_early() {
                    self.early.applied(&report, now);
                }
                msg.done().await;
                effects.extend(e);
            }
            (Cmd::Report { msg, .. }, Err(Rejection::AlreadyApplied)) => {
                tracing::debug!(
                    early = msg.came_early(),
                    "report delivered again after it was applied"
                );
                msg.done().await;
            }
            (Cmd::Report { report, mut msg }, Err(rejection)) => {
                // An early report's stored copy follows, and is judged then.
                let (code, reason) = rejection.verdict();
                if let Some(stored) = msg.message() {
                    self.reject(&report, stored, code, reason, rejection.to_string())
                        .await;
                } else {
                    msg.refused(code, reason, rejection.to_string());
                }
                msg.done().await;
            }
            (Cmd::Assign { task, sent, .. }, Ok(e)) => {
                driver.granted(&task);
                // An assignment that went out before its record is not sent again.
                let sent_already =
                    |e: &Effect| sent.is_some() && matches!(e, Effect::Assign { .. });
                effects.extend(e.into_iter().filter(|e| !sent_already(e)));
            }
            (
                Cmd::Assign {
                    task,
                    allocation,
                    slot,
                    sent,
                    ..
                },
                Err(rejection),
            ) => {
                tracing::debug!(flow = %flow.id, %task, %rejection, "placement not used");
                let (agent, allocation) = (allocation.agent_id, allocation.allocation_id);
                // A task asked for twice under one id (`Task::asked`: a
                // replica that took it up, or a tick that read the flow
                // before its creation's grants came) may have recorded this
                // very allocation from the other grant: it is in use.
                let recorded = flow
                    .tasks
                    .get(&task)
                    .is_some_and(|t| t.allocation.as_ref() == Some(&allocation));
                if recorded {
                    driver.granted(&task);
                    self.free_slot(slot);
                    return effects;
                }
                if let Some(attempt) = sent {
                    self.take_back(&flow.id, &task, attempt, &agent, &rejection.to_string());
                }
                driver.grant_unused(&mut Exec(self), &task, agent, allocation, slot);
            }
            (Cmd::Unplaced { task, asked_at }, _) => {
                driver.refused(&Exec(self), task, asked_at, now);
            }
            (Cmd::Control { reply, .. }, Ok(e)) => {
                effects.extend(e);
                let _ = reply.send(Ok(flow.status(revision, now)));
            }
            (Cmd::Control { reply, .. }, Err(rejection)) => {
                let _ = reply.send(Err(rejection.error()));
            }
            (_, Ok(e)) => effects.extend(e),
            (_, Err(_)) => {}
        }
        effects
    }

    /// Tells watchers of the flow what it looks like now (counts and progress,
    /// not every task: a watcher that wants those asks for the status).
    pub(super) async fn publish_watch(
        &self,
        flow: &Flow,
        revision: u64,
        now: u64,
        watch: &mut Watch,
    ) {
        *watch = Watch {
            pending: false,
            last_ms: now,
            last_state: Some(flow.state),
        };
        let status = off_worker(store::large(flow), || flow.overview(revision, now));
        if let Ok(body) = serde_json::to_vec(&status) {
            if let Err(e) = self
                .nats
                .publish(subject::flow_watch(&flow.id), body.into())
                .await
            {
                tracing::debug!(error = %e, "watch update not sent");
            }
        }
    }

    /// The flow is gone: nothing in the batch can apply.
    pub(super) async fn settle_missing(self: &Arc<Self>, flow_id: &FlowId, batch: Vec<Cmd>) {
        for cmd in batch {
            match cmd {
                Cmd::Report { report, mut msg } => {
                    let young = msg.message().and_then(|m| m.info().ok()).is_some_and(|i| {
                        common::now_ms().saturating_sub(agent_events::stored_ms_of(&i))
                            < UNKNOWN_FLOW_GRACE_MS
                    });
                    if young {
                        // Its flow's creation may not be stored yet: the
                        // first assignments leave before (see `create`).
                        msg.again().await;
                        continue;
                    }
                    let why = format!("no flow {flow_id}");
                    if let Some(stored) = msg.message() {
                        self.reject(
                            &report,
                            stored,
                            ErrorCode::NotFound,
                            RejectReason::UnknownFlow,
                            why,
                        )
                        .await;
                    } else {
                        msg.refused(ErrorCode::NotFound, RejectReason::UnknownFlow, why);
                    }
                    msg.done().await;
                }
                Cmd::Assign {
                    task,
                    allocation,
                    slot,
                    sent,
                    ..
                } => {
                    if let Some(attempt) = sent {
                        self.take_back(
                            flow_id,
                            &task,
                            attempt,
                            &allocation.agent_id,
                            "the flow is gone",
                        );
                    }
                    self.release(allocation.agent_id, allocation.allocation_id);
                    self.free_slot(slot);
                }
                Cmd::Control { reply, .. } => {
                    let _ = reply.send(Err(Error::not_found(format!("no flow {flow_id}"))));
                }
                _ => {}
            }
        }
    }

    /// Storage failed: reports are redelivered later, placements given back
    /// unless the write landed after all, and the tasks may be placed again.
    pub(super) async fn settle_failed(
        self: &Arc<Self>,
        flow_id: &FlowId,
        batch: Vec<Cmd>,
        err: &Error,
        driver: &mut Driver,
    ) {
        tracing::warn!(error = %err, "flow step not applied");
        for cmd in batch {
            match cmd {
                Cmd::Report { msg, .. } => {
                    msg.again().await;
                }
                Cmd::Assign {
                    task,
                    allocation,
                    slot,
                    sent,
                    ..
                } => {
                    driver.abandoned(&task);
                    self.release_unless_held(flow_id.clone(), task, *allocation, slot, sent);
                }
                Cmd::Unplaced { task, .. } => {
                    driver.abandoned(&task);
                }
                Cmd::Control { reply, .. } => {
                    let _ = reply.send(Err(err.clone()));
                }
                _ => {}
            }
        }
    }

    /// A report changed nothing: the agent hears why on its own subject, and
    /// the rejection is an event.
    pub(super) async fn reject(
        &self,
        report: &AgentReport,
        msg: &jetstream::Message,
        code: ErrorCode,
        why: RejectReason,
        reason: String,
    ) {
        tracing::info!(flow = %report.flow_id, task = %report.task_id, attempt = report.attempt, %reason, "report rejected");
        if let Some(agent) = subject::agent_of(&msg.subject) {
            self.tell_rejected(
                &agent,
                ReportRejected {
                    flow_id: Some(report.flow_id.to_string()),
                    task_id: Some(report.task_id.to_string()),
                    attempt: Some(report.attempt),
                    report_type: Some(report.kind.type_name().to_owned()),
                    code,
                    reason: why,
                    message: reason.clone(),
                    msg_id: msg_id(msg),
                    at_ms: now_ms(),
                    event_type: None,
                    event_id: None,
                },
            )
            .await;
        }
        self.events
            .publish(EventKind::ReportRejected {
                flow_id: report.flow_id.clone(),
                task_id: report.task_id.clone(),
                attempt: report.attempt,
                agent_id: report.agent_id.clone(),
                reason,
            })
            .await;
    }

    /// Publishes a verdict on the agent's `rejected` subject (core NATS: an
    /// agent that is not listening loses nothing but the explanation).
    pub(super) async fn tell_rejected(&self, agent: &AgentId, verdict: ReportRejected) {
        if let Ok(body) = serde_json::to_vec(&verdict) {
            if let Err(e) = self
                .nats
                .publish_with_headers(
                    subject::rejected(agent),
                    telemetry::producer_headers(&subject::rejected(agent)),
                    body.into(),
                )
                .await
            {
                tracing::warn!(agent = %agent, error = %e, "rejection not sent");
            }
        }
    }

    /// Carries out a step's effects (`step`: the flow as just written, for
    /// its assignments); its events are published under the numbers
    /// `cursor` gives them (those the step stored them under).
    pub(super) async fn run_effects(
        self: &Arc<Self>,
        driver: &mut Driver,
        step: Option<(&Flow, u64)>,
        effects: Vec<Effect>,
        cursor: &mut Cursor,
    ) {
        let (flow, now) = step.map_or((None, now_ms()), |(f, now)| (Some(f), now));
        for kind in driver.carry_out(&mut Exec(self), flow, now, effects) {
            self.outbox.publish(&self.events_js, cursor, kind).await;
        }
    }

    /// Tells an agent to stop an attempt it was sent that its flow did not
    /// record (a new flow's, sent before its record: see `create`), since
    /// its allocation is given back.
    pub(super) fn take_back(
        self: &Arc<Self>,
        flow: &FlowId,
        task: &TaskId,
        attempt: u32,
        agent: &AgentId,
        why: &str,
    ) {
        let notice = CancelNotice {
            flow_id: flow.clone(),
            task_id: task.clone(),
            attempt,
            code: common::msg::CancelCode::Preempted,
            reason: format!(
                "the assignment was not recorded ({why}): its allocation is given back"
            ),
        };
        tokio::spawn(
            self.clone()
                .send_cancel(agent.clone(), notice)
                .in_current_span(),
        );
    }

    /// Tells an agent to stop an attempt (core NATS: an agent not listening
    /// misses only the notice; its report for the attempt is refused).
    pub(super) async fn send_cancel(self: Arc<Self>, agent: AgentId, notice: CancelNotice) {
        let Ok(body) = serde_json::to_vec(&notice) else {
            return;
        };
        let to = subject::cancel(&agent);
        let headers = telemetry::producer_headers(&to);
        if let Err(e) = self
            .nats
            .publish_with_headers(to, headers, body.into())
            .await
        {
            tracing::warn!(agent = %agent, error = %e, "cancel notice not sent");
        }
    }
}
