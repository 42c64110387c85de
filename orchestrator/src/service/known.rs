//! Every flow's key in the flows bucket and the revision it was last
//! written at, followed as the bucket is written: the sweep's list of flows
//! to look at, without listing the bucket or reading a finished flow again.
//!
//! Flows are kept for good, so a replica that listed every key each sweep
//! and read every finished flow back now and then (to see whether another
//! replica had re-run it) did work that grew with every flow ever run: a
//! second a sweep at 100,000 flows. Here a headers-only ordered consumer
//! delivers one message per write (the subject names the flow, the stream
//! sequence is its new revision) from each key's last revision on: the
//! sweep then looks only at flows written since it last looked, and a flow
//! it saw finished stays skipped while its revision is the one it finished
//! at.

use async_nats::jetstream::consumer::{push, DeliverPolicy};

use super::*;

/// What the consumer has delivered.
#[derive(Default)]
pub(super) struct Known(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    /// Each flow's last revision seen.
    revisions: HashMap<FlowId, u64>,
    /// Flows written since the sweep last took them.
    written: HashSet<FlowId>,
    /// Whether every key stored when the consumer started has been seen.
    caught_up: bool,
}

impl Known {
    /// The flow's last revision seen, if any.
    pub(super) fn revision(&self, id: &FlowId) -> Option<u64> {
        self.0.lock().ok()?.revisions.get(id).copied()
    }

    /// The flows written since the last call, once every stored key has been
    /// seen (`None` before: the caller lists the bucket instead).
    pub(super) fn take_written(&self) -> Option<HashSet<FlowId>> {
        let mut inner = self.0.lock().ok()?;
        inner.caught_up.then(|| std::mem::take(&mut inner.written))
    }

    fn saw(&self, id: FlowId, revision: Option<u64>) {
        if let Ok(mut inner) = self.0.lock() {
            match revision {
                Some(r) => {
                    inner.revisions.insert(id.clone(), r);
                }
                None => {
                    inner.revisions.remove(&id);
                }
            }
            inner.written.insert(id);
        }
    }

    fn caught_up(&self) {
        if let Ok(mut inner) = self.0.lock() {
            inner.caught_up = true;
        }
    }
}

impl Orchestrator {
    /// Follows the flows bucket's writes into [`Orchestrator::known`].
    pub(super) async fn follow_flows(self: Arc<Self>) {
        keep_running("flow writes", || self.clone().follow_flows_once()).await;
    }

    async fn follow_flows_once(self: Arc<Self>) -> Result<(), Error> {
        let prefix = self.flows.prefix.clone();
        let consumer = self
            .flows
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.nats.new_inbox(),
                filter_subject: format!("{prefix}>"),
                deliver_policy: DeliverPolicy::LastPerSubject,
                headers_only: true,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::unavailable("flow writes", e))?;
        if consumer.cached_info().num_pending == 0 {
            self.known.caught_up();
        }
        let mut writes = consumer
            .messages()
            .await
            .map_err(|e| Error::unavailable("flow writes", e))?;
        while let Some(msg) = writes.next().await {
            let msg = msg.map_err(|e| Error::unavailable("flow writes", e))?;
            let Ok(info) = msg.info() else {
                continue;
            };
            let (revision, pending) = (info.stream_sequence, info.pending);
            // Page keys hold a `.`, which no flow id does.
            let id = msg
                .subject
                .strip_prefix(prefix.as_str())
                .and_then(|k| FlowId::new(k).ok());
            if let Some(id) = id {
                let removed = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some_and(|op| op.as_str() != "PUT");
                self.known.saw(id, (!removed).then_some(revision));
            }
            if pending == 0 {
                self.known.caught_up();
            }
        }
        Ok(())
    }
}
