//! Agents' reports: the durable consumer on the reports stream, each report
//! handed to its flow's actor, malformed ones refused.
//!
//! A completion is also taken *early*, as the agent publishes it (a core
//! subscription in a queue group beside the stream's): its step need not
//! wait for the stream to store the report and deliver it, which at an
//! fsync per write is a disk write and a hop off every task's path. The
//! stream's copy still comes and is what is acknowledged; a replica that
//! applied the early copy knows it ([`Early`]) and acknowledges the stored
//! one without a step, and any other finds it applied ("already applied":
//! a completed attempt is one the flow records), so nothing is applied
//! twice and nothing waits on the early path: a lost early copy costs only
//! the time it would have saved. Only completions come early: a failure
//! applied twice would read as a stale attempt once the task was retried.
//! And only to a flow whose actor is here: with several replicas, the one
//! that gets the early copy may not be the one driving the flow.

use common::msg::ReportKind;

use super::delivery::Delivery;
use super::*;

/// The core subscription's queue group: each early report goes to one replica.
const EARLY_GROUP: &str = "coord-orchestrator-early-reports";
/// Early completions remembered until their stored copies come, at most; a
/// stored copy another replica took leaves its entry behind, so past this
/// size entries older than [`EARLY_KEEP_MS`] are dropped (and all of them if
/// that is not enough: a forgotten entry costs one step, not a report).
const EARLY_MAX: usize = 16_384;
const EARLY_KEEP_MS: u64 = 10_000;

/// The completions this replica applied early, keyed by what fences a
/// report (flow, task, attempt, agent), with when.
#[derive(Default)]
pub(super) struct Early(Mutex<HashMap<(FlowId, TaskId, u32, AgentId), u64>>);

impl Early {
    fn key(r: &AgentReport) -> (FlowId, TaskId, u32, AgentId) {
        (
            r.flow_id.clone(),
            r.task_id.clone(),
            r.attempt,
            r.agent_id.clone(),
        )
    }

    /// An early completion was applied and stored.
    pub(super) fn applied(&self, report: &AgentReport, now: u64) {
        let Ok(mut seen) = self.0.lock() else {
            return;
        };
        if seen.len() >= EARLY_MAX {
            seen.retain(|_, at| now.saturating_sub(*at) < EARLY_KEEP_MS);
            if seen.len() >= EARLY_MAX {
                seen.clear();
            }
        }
        seen.insert(Self::key(report), now);
    }

    /// Whether this stored report is a completion already applied early
    /// here (forgotten as it is asked about: its stored copy comes once).
    pub(super) fn take(&self, report: &AgentReport) -> bool {
        matches!(report.kind, ReportKind::Completed { .. })
            && self
                .0
                .lock()
                .is_ok_and(|mut seen| seen.remove(&Self::key(report)).is_some())
    }
}

impl Orchestrator {
    /// Opens (creating it if needed) a durable pull consumer and its messages.
    pub(super) async fn durable_messages(
        &self,
        stream: &str,
        config: consumer::pull::Config,
    ) -> Result<consumer::pull::Stream, Error> {
        let name = config.durable_name.clone().unwrap_or_default();
        let stream = self
            .js
            .get_stream(stream)
            .await
            .map_err(|e| Error::unavailable(format_args!("stream {stream}"), e))?;
        // Create or update: a consumer made by an older build gets this
        // build's filters (the allocator events grew `agent.left`).
        let consumer: consumer::PullConsumer = match stream.create_consumer(config.clone()).await {
            Ok(c) => c,
            Err(_) => stream
                .get_or_create_consumer(&name, config)
                .await
                .map_err(|e| Error::unavailable(format_args!("consumer {name}"), e))?,
        };
        // Short pulls: one lost with a consumer leader that moved is noticed
        // in seconds (see `common::nats::PULL_EXPIRES`).
        consumer
            .stream()
            .expires(bus::PULL_EXPIRES)
            .heartbeat(bus::PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| Error::unavailable(format_args!("consumer {name}"), e))
    }

    /// Hands agents' reports from the shared durable consumer to the flows' actors.
    pub(super) async fn consume_reports(self: Arc<Self>, ack_wait: Duration) {
        keep_running("reports", || self.clone().consume_reports_once(ack_wait)).await;
    }

    pub(super) async fn consume_reports_once(
        self: Arc<Self>,
        ack_wait: Duration,
    ) -> Result<(), Error> {
        let mut messages = self
            .durable_messages(
                common::nats::STREAM_REPORTS,
                consumer::pull::Config {
                    durable_name: Some(common::nats::CONSUMER_ORCHESTRATOR.to_owned()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait,
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(|e| Error::unavailable("reports", e))?;
            let reports = match common::msg::reports_in(&msg.payload) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(subject = %msg.subject, error = %e, "unreadable report dropped");
                    let _ = msg.ack_with(jetstream::AckKind::Term).await;
                    if let Some(agent) = subject::agent_of(&msg.subject) {
                        self.tell_rejected(&agent, malformed(&msg, &e)).await;
                    }
                    continue;
                }
            };
            // The agent's trace goes with its report into the flow's actor.
            // A message carries one trace: an array's first report's; the
            // others' steps continue their flows' own traces.
            let span = telemetry::consumer_span(&msg.subject, msg.headers.as_ref());
            let sender = subject::agent_of(&msg.subject);
            let parts = Delivery::split(msg, reports.len());
            for (i, (report, msg)) in reports.into_iter().zip(parts).enumerate() {
                // Identity comes from the subject the agent may publish on, not from the JSON.
                if sender.as_ref() != Some(&report.agent_id) {
                    if let Some(stored) = msg.message() {
                        self.reject(
                            &report,
                            stored,
                            ErrorCode::BadRequest,
                            RejectReason::AgentMismatch,
                            format!(
                                "report names agent {} but was published on another agent's subject, {}",
                                report.agent_id, stored.subject
                            ),
                        )
                        .await;
                    }
                    msg.done().await;
                    continue;
                }
                if self.early.take(&report) {
                    msg.done().await;
                    continue;
                }
                let flow = report.flow_id.clone();
                let cause = if i == 0 {
                    span.clone()
                } else {
                    tracing::Span::none()
                };
                let cmd = Cmd::Report {
                    report: Box::new(report),
                    msg,
                };
                self.send_caused(&flow, cmd, cause);
            }
        }
        Ok(())
    }

    /// Hands agents' completions to the flows' actors as they are published
    /// (see the module's doc).
    pub(super) async fn take_early_reports(self: Arc<Self>) {
        keep_running("early reports", || self.clone().take_early_reports_once()).await;
    }

    async fn take_early_reports_once(self: Arc<Self>) -> Result<(), Error> {
        let mut published = self
            .nats
            .queue_subscribe(subject::REPORT_ALL, EARLY_GROUP.to_owned())
            .await
            .map_err(|e| Error::unavailable("early reports", e))?;
        while let Some(msg) = published.next().await {
            // Whatever is wrong with it is told when its stored copy comes.
            let (Some(sender), Ok(reports)) = (
                subject::agent_of(&msg.subject),
                common::msg::reports_in(&msg.payload),
            ) else {
                continue;
            };
            // The agent's trace goes with the first report taken, as it does
            // with the stored copy's first (see `consume_reports_once`).
            let mut traced = false;
            for report in reports {
                if report.agent_id != sender || !matches!(report.kind, ReportKind::Completed { .. })
                {
                    continue;
                }
                // Only to a flow this replica is driving: another's actor
                // would race its driver's writes for nothing the stored copy
                // does not do as well.
                let flow = report.flow_id.clone();
                let driving = self.actors.lock().is_ok_and(|a| a.contains_key(&flow));
                if !driving {
                    continue;
                }
                let cause = if traced {
                    tracing::Span::none()
                } else {
                    traced = true;
                    telemetry::consumer_span(&msg.subject, msg.headers.as_ref())
                };
                let cmd = Cmd::Report {
                    report: Box::new(report),
                    msg: Delivery::early(),
                };
                self.send_caused(&flow, cmd, cause);
            }
        }
        Ok(())
    }
}

/// A report's `Nats-Msg-Id` header, if it had one.
pub(super) fn msg_id(msg: &jetstream::Message) -> Option<String> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.to_string())
}

/// The verdict on a report that is not an `AgentReport`: whatever of its ids
/// can be read is echoed, so the agent can tell which report it was.
pub(super) fn malformed(msg: &jetstream::Message, e: &serde_json::Error) -> ReportRejected {
    let body: Option<serde_json::Map<String, Value>> = serde_json::from_slice(&msg.payload).ok();
    let text = |k: &str| {
        body.as_ref()
            .and_then(|b| b.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    ReportRejected {
        flow_id: text("flow_id"),
        task_id: text("task_id"),
        attempt: body
            .as_ref()
            .and_then(|b| b.get("attempt"))
            .and_then(Value::as_u64)
            .and_then(|a| u32::try_from(a).ok()),
        report_type: text("type"),
        code: ErrorCode::BadRequest,
        reason: RejectReason::Malformed,
        message: format!("not a report: {e}"),
        msg_id: msg_id(msg),
        at_ms: now_ms(),
        event_type: None,
        event_id: None,
    }
}
