//! Reports handed to the replica writing their flow.
//!
//! Every replica may step every flow, and a report reaches whichever replica
//! the stream or the queue group gives it to. Two replicas stepping one flow
//! lose each other's compare-and-sets, and each lost race costs a read of
//! the whole flow: one flow of 50,000 tasks ran at a third of one replica's
//! rate with two. So a flow's header names the replica whose step wrote it
//! last (`store::Kept::writer`), and another replica that is about to
//! apply a report to it hands the report to that one instead, on the
//! writer's own subject, while the writer answers the service's ping. The
//! writer applies it as its own and says how it was settled; the replica
//! that received it settles its copy (acknowledges, hands it back to the
//! stream, or tells the agent why it was refused). A writer that does not
//! answer in time, or has no one listening, has the report applied where it
//! came: the flow's compare-and-set keeps that safe, only slower.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::delivery::{Delivery, Settled};
use super::*;

/// How long a replica waits for the writer to settle a report it handed over.
const SETTLED_WITHIN: Duration = Duration::from_secs(5);

/// A report as handed over.
#[derive(Serialize, Deserialize)]
struct Handed {
    /// Taken as it was published: its stored copy still comes.
    early: bool,
    report: AgentReport,
}

/// The subject replica `replica` takes handed reports on.
fn subject(replica: u32) -> String {
    format!("coord.orchestrator.replica.{replica:08x}.report")
}

/// What a flow's actor knows of another replica writing the flow.
pub(super) struct Writer {
    /// That replica, as last seen; while it answers, nothing of the flow
    /// but this is kept here.
    pub(super) elsewhere: Option<u32>,
    /// Whether ready tasks this replica readied may wait in the flow: the
    /// flow's timers are then this replica's to run too, and its copy is
    /// kept. Not known before a first read.
    pub(super) readied_here: bool,
}

impl Default for Writer {
    fn default() -> Self {
        Writer {
            elsewhere: None,
            readied_here: true,
        }
    }
}

impl Orchestrator {
    /// The replica to hand a flow's reports to, given the flow's `writer`
    /// as last read or written here: that one, if it is another replica
    /// not known to be gone.
    pub(super) fn writer_elsewhere(&self, writer: Option<u32>) -> Option<u32> {
        writer.filter(|&w| w != self.replica && !self.replica_gone(w))
    }

    /// Hands the reports in `batch` to replica `to` and, with `timers`,
    /// drops the sweep's ticks and the flow's timers (that replica's own
    /// fire); leaves the rest.
    pub(super) fn hand_over_all(
        self: &Arc<Self>,
        to: u32,
        batch: &mut Vec<Cmd>,
        causes: &mut Vec<tracing::Span>,
        timers: bool,
    ) {
        let mut kept = Vec::with_capacity(batch.len());
        let mut kept_causes = Vec::with_capacity(batch.len());
        for (cmd, cause) in batch.drain(..).zip(causes.drain(..)) {
            match cmd {
                Cmd::Report { report, msg } if msg.may_forward() => {
                    tokio::spawn(self.clone().hand_over(to, report, msg, cause));
                }
                Cmd::Tick | Cmd::Due if timers => {}
                cmd => {
                    kept.push(cmd);
                    kept_causes.push(cause);
                }
            }
        }
        (*batch, *causes) = (kept, kept_causes);
    }

    /// Hands `report` to replica `to` and settles `msg` as it says; applies
    /// it here if `to` does not answer. The request carries the trace of
    /// `cause` (the agent's, where it sent one), so the writer's step
    /// continues it.
    pub(super) async fn hand_over(
        self: Arc<Self>,
        to: u32,
        report: Box<AgentReport>,
        msg: Delivery,
        cause: tracing::Span,
    ) {
        let handed = Handed {
            early: msg.came_early(),
            report: *report,
        };
        let to_subject = subject(to);
        let span = cause.in_scope(|| telemetry::client_span(&to_subject));
        let headers = span.in_scope(telemetry::headers);
        let settled = match serde_json::to_vec(&handed) {
            Ok(body) => {
                let asked = self
                    .nats
                    .request_with_headers(to_subject, headers, body.into())
                    .instrument(span);
                match tokio::time::timeout(SETTLED_WITHIN, asked).await {
                    Ok(Ok(reply)) => serde_json::from_slice::<Settled>(&reply.payload).ok(),
                    _ => None,
                }
            }
            Err(_) => None,
        };
        let report = Box::new(handed.report);
        match settled {
            Some(Settled::Applied) => msg.done().await,
            Some(Settled::Again) => msg.again().await,
            Some(Settled::Refused {
                code,
                reason,
                message,
            }) => {
                if let Some(stored) = msg.message() {
                    self.reject(&report, stored, code, reason, message).await;
                }
                msg.done().await;
            }
            None => {
                tracing::debug!(replica = to, flow = %report.flow_id, "writer did not take a report; applied here");
                let flow = report.flow_id.clone();
                let cmd = Cmd::Report {
                    report,
                    msg: msg.here(),
                };
                self.send_caused(&flow, cmd, cause);
            }
        }
    }

    /// Listens for the reports other replicas hand this one: before the
    /// service answers anything, so that no flow names this replica its
    /// writer while nobody takes its reports.
    pub(super) async fn listen_for_handed(&self) -> Result<async_nats::Subscriber, Error> {
        self.nats
            .subscribe(subject(self.replica))
            .await
            .map_err(|e| Error::unavailable("handed reports", e))
    }

    /// Takes the reports other replicas hand this one, from `first` and
    /// then from a new subscription whenever one ends.
    pub(super) async fn take_handed(self: Arc<Self>, first: async_nats::Subscriber) {
        let mut first = Some(first);
        keep_running("handed reports", || {
            let first = first.take();
            self.clone().take_handed_once(first)
        })
        .await;
    }

    async fn take_handed_once(
        self: Arc<Self>,
        listening: Option<async_nats::Subscriber>,
    ) -> Result<(), Error> {
        let mut handed = match listening {
            Some(s) => s,
            None => self.listen_for_handed().await?,
        };
        while let Some(m) = handed.next().await {
            let (Some(reply), Ok(h)) = (m.reply, serde_json::from_slice::<Handed>(&m.payload))
            else {
                continue;
            };
            let (msg, settled) = Delivery::forwarded(h.early);
            let flow = h.report.flow_id.clone();
            let cause = telemetry::consumer_span(&m.subject, m.headers.as_ref());
            let cmd = Cmd::Report {
                report: Box::new(h.report),
                msg,
            };
            self.send_caused(&flow, cmd, cause);
            let nats = self.nats.clone();
            tokio::spawn(async move {
                let settled = settled.await.unwrap_or(Settled::Again);
                if let Ok(body) = serde_json::to_vec(&settled) {
                    let _ = nats.publish(reply, body.into()).await;
                }
            });
        }
        Ok(())
    }
}
