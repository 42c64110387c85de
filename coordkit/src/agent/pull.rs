//! The agent's assignments as a stream that does not end while the agent
//! runs: its durable consumer pulled with short requests, and opened again
//! (made again if it is gone) whenever the library's stream ends or says the
//! consumer was deleted. An agent that stopped pulling would still heartbeat,
//! look alive and never work.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::{self, consumer};
use common::Error;
use futures::StreamExt;

/// Wait between two tries at opening the consumer again.
const REOPEN_PAUSE: Duration = Duration::from_secs(1);

pub(super) struct Assignments {
    stream: jetstream::stream::Stream,
    config: consumer::pull::Config,
    messages: Option<pull::Stream>,
}

impl Assignments {
    /// Opens the durable consumer `config` names on `stream` (making it if
    /// missing); an error here is the caller's.
    pub(super) async fn open(
        stream: jetstream::stream::Stream,
        config: consumer::pull::Config,
    ) -> Result<Self, Error> {
        let messages = Some(Self::pull(&stream, &config).await?);
        Ok(Assignments {
            stream,
            config,
            messages,
        })
    }

    async fn pull(
        stream: &jetstream::stream::Stream,
        config: &consumer::pull::Config,
    ) -> Result<pull::Stream, Error> {
        let name = config.durable_name.clone().unwrap_or_default();
        let consumer = stream
            .get_or_create_consumer(&name, config.clone())
            .await
            .map_err(|e| Error::unavailable(format_args!("consumer {name}"), e))?;
        consumer
            .stream()
            .expires(common::nats::PULL_EXPIRES)
            .heartbeat(common::nats::PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| Error::unavailable(format_args!("consumer {name}"), e))
    }

    /// The next delivery, or an error worth a log line (the stream carries
    /// on after it). Never the end: a stream that ended is opened again.
    pub(super) async fn next(&mut self) -> Result<jetstream::Message, Error> {
        loop {
            let Some(messages) = self.messages.as_mut() else {
                match Self::pull(&self.stream, &self.config).await {
                    Ok(m) => {
                        tracing::info!("assignments: consumer opened again");
                        self.messages = Some(m);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "assignments: consumer not opened yet");
                        tokio::time::sleep(REOPEN_PAUSE).await;
                    }
                }
                continue;
            };
            match messages.next().await {
                Some(Ok(msg)) => return Ok(msg),
                Some(Err(e)) if e.kind() == MessagesErrorKind::ConsumerDeleted => {
                    tracing::warn!("assignments: consumer deleted; making it again");
                    self.messages = None;
                }
                Some(Err(e)) => return Err(Error::unavailable("assignments", e)),
                None => {
                    tracing::warn!("assignments: the pull stream ended; opening it again");
                    self.messages = None;
                }
            }
        }
    }
}
