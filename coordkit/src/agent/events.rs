//! Events of the agent's own, published on its own subject with the verdict
//! awaited.

use std::time::Duration;

use common::{AgentId, Client, Error, ErrorCode};
use serde_json::Value;

use super::DELIVERY_DEADLINE;

/// Publishes an event of the agent's own (`coord.agents.{id}.events.{type}`)
/// and waits for the verdict: the stored event, or why it was refused (a
/// type's schema not met, say). Without an `event_id` one is made here, so a
/// publish retried through an outage (for up to [`DELIVERY_DEADLINE`]) is
/// stored once.
pub async fn publish_event(
    client: &Client,
    agent: &AgentId,
    event_type: &str,
    data: Value,
    event_id: Option<String>,
) -> Result<common::msg::AgentEvent, Error> {
    let body = common::msg::AgentEventPublish {
        data,
        event_id: Some(event_id.unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string())),
    };
    let deadline = tokio::time::Instant::now() + DELIVERY_DEADLINE;
    let mut pause = Duration::from_millis(100);
    loop {
        match client.publish_event(agent, event_type, &body).await {
            Err(e)
                if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout)
                    && tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::debug!(error = %e, "event not stored yet, retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}
