//! Agents' reports: the durable consumer on the reports stream, each report
//! handed to its flow's actor, malformed ones refused.

use super::delivery::Delivery;
use super::*;

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
                    self.reject(
                        &report,
                        &msg,
                        ErrorCode::BadRequest,
                        RejectReason::AgentMismatch,
                        format!(
                            "report names agent {} but was published on another agent's subject, {}",
                            report.agent_id, msg.subject
                        ),
                    )
                    .await;
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
