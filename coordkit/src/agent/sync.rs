//! An agent's end of the synchronizer's notices (sync points, rollbacks,
//! agreed state), each acknowledged once the agent has taken it.

use std::future::Future;

use common::msg::{SyncAck, SyncNotice};
use common::{subject, AgentId, Error};
use futures::StreamExt;

/// An agent's end of the synchronizer's notices: sync points, rollbacks and
/// agreed state arrive on `coord.agents.{id}.sync`; each one the handler
/// accepts is acknowledged on `coord.agents.{id}.sync.ack` with the revision
/// it names, which is what lets a sync point complete.
pub struct SyncFollower {
    nats: async_nats::Client,
    agent: AgentId,
    notices: async_nats::Subscriber,
}

impl SyncFollower {
    /// Subscribes and waits until the server has the subscription, so no
    /// notice published after this returns is missed.
    pub async fn subscribe(nats: async_nats::Client, agent: AgentId) -> Result<Self, Error> {
        let notices = nats
            .subscribe(subject::sync_notice(&agent))
            .await
            .map_err(|e| Error::unavailable("subscribe to sync notices", e))?;
        nats.flush()
            .await
            .map_err(|e| Error::unavailable("subscribe to sync notices", e))?;
        Ok(SyncFollower {
            nats,
            agent,
            notices,
        })
    }

    /// Hands each notice to `on_notice` (which applies the state, if the agent
    /// keeps a copy) and acknowledges it when that returns true, until
    /// `shutdown` resolves.
    pub async fn run<H, Fut>(mut self, on_notice: H, shutdown: impl Future)
    where
        H: Fn(SyncNotice) -> Fut,
        Fut: Future<Output = bool>,
    {
        tokio::pin!(shutdown);
        let ack_subject = subject::sync_ack(&self.agent);
        loop {
            let msg = tokio::select! {
                _ = &mut shutdown => break,
                msg = self.notices.next() => msg,
            };
            let Some(msg) = msg else { break };
            let notice: SyncNotice = match serde_json::from_slice(&msg.payload) {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable sync notice dropped");
                    continue;
                }
            };
            let ack = SyncAck {
                notice_id: notice.notice_id.clone(),
                revision: notice.revision,
            };
            if !on_notice(notice).await {
                continue;
            }
            match serde_json::to_vec(&ack) {
                Ok(body) => {
                    if let Err(e) = self.nats.publish(ack_subject.clone(), body.into()).await {
                        tracing::warn!(error = %e, "sync acknowledgement not sent");
                    }
                }
                Err(e) => tracing::error!(error = %e, "sync acknowledgement encode failed"),
            }
        }
    }
}
