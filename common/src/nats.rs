//! The NATS connection, the JetStream resources ([`assets`]), and the few bus
//! operations every service repeats: publishing an event, reading and
//! compare-and-setting a KV entry ([`cas`]), and writing several entries in
//! one atomic batch ([`batch`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;

use crate::config::NatsConfig;
use crate::error::{Error, ErrorCode};
use crate::msg::{Event, EventKind};
use crate::telemetry;

mod assets;
mod batch;
mod cas;

pub use assets::*;
pub use batch::*;
pub use cas::*;

/// Longest pause between two reconnect attempts. async-nats backs off up to
/// 4 s by default; a shorter cap brings everyone back within a heartbeat
/// interval of the server's return, at the cost of a few more attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// How long one pull request of a long-lived consumer waits, and the idle
/// heartbeat the server sends meanwhile: a pull lost with a departed or
/// re-elected consumer leader (a node stopped, a cluster settling) is
/// noticed within this. The library's 30 s / 15 s would leave a message
/// waiting that long.
pub const PULL_EXPIRES: Duration = Duration::from_secs(10);
pub const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

/// Opens a connection that retries its first attempt in the background and
/// reconnects without limit afterwards. It returns at once; nothing is sent
/// before the server is reached (see [`connect`] and [`connect_until`]).
async fn open(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, Error> {
    let mut opts = match &cfg.nats_creds {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path.clone())
            .await
            .map_err(|e| {
                let what = format!("cannot read credentials {}", path.display());
                Error::from_source(ErrorCode::BadRequest, what, e)
            })?,
        None => async_nats::ConnectOptions::new(),
    };
    if let (Some(user), Some(pass)) = (&cfg.nats_user, &cfg.nats_password) {
        opts = opts.user_and_password(user.clone(), pass.clone());
    }
    if let Some(ca) = &cfg.nats_tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&cfg.nats_tls_cert, &cfg.nats_tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if cfg.nats_tls_required {
        opts = opts.require_tls(true);
    }
    if let Some(prefix) = &cfg.nats_inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix);
    }
    let name = name.to_owned();
    let opts = opts
        .name(name.clone())
        .retry_on_initial_connect()
        .reconnect_delay_callback(|attempts| {
            let exp = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
            Duration::from_millis(2_u64.saturating_pow(exp)).min(MAX_RECONNECT_DELAY)
        })
        .request_timeout(Some(cfg.request_timeout()))
        .ping_interval(cfg.ping_interval())
        .event_callback(move |event| {
            let name = name.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(client = %name, "connected to nats")
                    }
                    async_nats::Event::Disconnected => {
                        LAST_DISCONNECT_MS.fetch_max(crate::now_ms(), Ordering::Relaxed);
                        tracing::warn!(client = %name, "disconnected from nats")
                    }
                    other => tracing::debug!(client = %name, event = %other, "nats event"),
                }
            }
        });
    let urls = cfg.nats_url.as_str();
    // Several servers (a cluster) are a comma-separated list; the client
    // moves to another one when the server it is on goes away.
    let servers: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    opts.connect(servers)
        .await
        .map_err(|e| Error::unavailable(format_args!("cannot connect to nats at {urls}"), e))
}

/// Waits until `client` has reached the server, saying every few seconds
/// that it is still waiting.
async fn connected(client: &async_nats::Client, urls: &str) {
    let started = std::time::Instant::now();
    let mut said = started;
    while client.connection_state() != async_nats::connection::State::Connected {
        if said.elapsed() >= Duration::from_secs(5) {
            said = std::time::Instant::now();
            tracing::info!(
                url = urls,
                waited_s = started.elapsed().as_secs(),
                "waiting for nats"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Connects, waiting as long as it takes for the server to come up (a service
/// may start before NATS does), and reconnects without limit afterwards.
pub async fn connect(cfg: &NatsConfig, name: &str) -> Result<async_nats::Client, Error> {
    let client = open(cfg, name).await?;
    connected(&client, &cfg.nats_url).await;
    Ok(client)
}

/// [`connect`] for a service's start: gives up (with `None`) if `shutdown`
/// resolves first, so a service waiting for NATS still stops when asked.
pub async fn connect_until<F: std::future::Future>(
    cfg: &NatsConfig,
    name: &str,
    shutdown: std::pin::Pin<&mut F>,
) -> Result<Option<async_nats::Client>, Error> {
    let client = open(cfg, name).await?;
    tokio::select! {
        _ = connected(&client, &cfg.nats_url) => Ok(Some(client)),
        _ = shutdown => Ok(None),
    }
}

/// [`connect`] for a command someone waits on: fails with `unavailable` if
/// the server is not reached within `patience`.
pub async fn connect_within(
    cfg: &NatsConfig,
    name: &str,
    patience: Duration,
) -> Result<async_nats::Client, Error> {
    let client = open(cfg, name).await?;
    tokio::time::timeout(patience, connected(&client, &cfg.nats_url))
        .await
        .map_err(|_| {
            Error::new(
                ErrorCode::Unavailable,
                format!(
                    "cannot connect to nats at {}: no answer within {} ms",
                    cfg.nats_url,
                    patience.as_millis()
                ),
            )
        })?;
    Ok(client)
}

/// When a connection was last seen down, kept current by the connections'
/// event callbacks: every disconnect, however short.
static LAST_DISCONNECT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// When a connection of this process made by [`connect`] (or its kin) last found
/// its server gone (0: never). What a server acknowledged without waiting for
/// its disk (a stream with `persist_mode: async`) before then may be lost.
pub fn last_disconnect_ms() -> u64 {
    LAST_DISCONNECT_MS.load(Ordering::Relaxed)
}

/// A process that decides on silence (no heartbeat for a while) must not count
/// the time it could hear nothing: while it was disconnected, messages were
/// not lost by their senders but never reached it. Clones share one watcher,
/// which ends when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Outages {
    last_down_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Outages {
    /// How often the watcher looks at the connection: an outage shorter than
    /// this may go unseen, and one that short hides no heartbeat interval.
    pub const POLL: Duration = Duration::from_millis(50);
    /// How much later than [`Outages::POLL`] a poll may come before the gap
    /// counts as this process's own pause.
    pub const PAUSED: Duration = Duration::from_millis(500);

    /// Starts watching `client` (needs a Tokio runtime).
    pub fn watch(client: &async_nats::Client) -> Outages {
        let last_down_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (client, down) = (client.clone(), std::sync::Arc::downgrade(&last_down_ms));
        tokio::spawn(async move {
            let mut paused = false;
            loop {
                let Some(down) = down.upgrade() else { return };
                if paused || client.connection_state() != async_nats::connection::State::Connected {
                    down.fetch_max(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
                }
                drop(down);
                // A poll that comes far later than asked means this process
                // was paused (frozen, starved): it heard nothing meanwhile,
                // which is not the silence of whoever it listens to.
                let asked = tokio::time::Instant::now();
                tokio::time::sleep(Self::POLL).await;
                paused = asked.elapsed() > Self::POLL + Self::PAUSED;
            }
        });
        Outages { last_down_ms }
    }

    /// The last moment (ms since the epoch) the connection was seen down, or
    /// JetStream stalled (see [`Outages::stalled`]), 0 if never.
    pub fn last_down_ms(&self) -> u64 {
        self.last_down_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counts this moment as an outage although the connection is up:
    /// JetStream is not answering (a stream without a leader while a cluster
    /// fails over, or a node cut off from its peers), so what the process
    /// would have written or read, heartbeats among them, did not get through.
    pub fn stalled(&self) {
        self.last_down_ms
            .fetch_max(crate::now_ms(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs a JetStream operation, counting as stalled every moment it is
    /// still unanswered past `slow`, and the moment it fails.
    pub async fn observe<T, E>(
        &self,
        slow: Duration,
        op: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        tokio::pin!(op);
        let mut late = tokio::time::interval_at(tokio::time::Instant::now() + slow, Self::POLL);
        loop {
            tokio::select! {
                out = &mut op => {
                    if out.is_err() {
                        self.stalled();
                    }
                    return out;
                }
                _ = late.tick() => self.stalled(),
            }
        }
    }
}

/// Publishes domain events with the current trace context.
#[derive(Clone, Debug)]
pub struct EventPublisher {
    client: async_nats::Client,
    source: &'static str,
}

impl EventPublisher {
    pub fn new(client: async_nats::Client, source: &'static str) -> Self {
        EventPublisher { client, source }
    }

    /// Publishes one event. Core publish (no ack round trip) keeps events off the
    /// hot path's latency; the events stream captures them.
    pub async fn publish(&self, kind: EventKind) {
        let event = Event {
            event_id: uuid::Uuid::now_v7().simple().to_string(),
            at_ms: crate::now_ms(),
            source: self.source.to_owned(),
            kind,
        };
        let subject = event.kind.subject();
        let mut headers = telemetry::producer_headers(subject);
        headers.insert("Nats-Msg-Id", event.event_id.as_str());
        match serde_json::to_vec(&event) {
            Ok(body) => {
                if let Err(e) = self
                    .client
                    .publish_with_headers(subject, headers, body.into())
                    .await
                {
                    tracing::warn!(error = %e, subject, "event publish failed");
                }
            }
            Err(e) => tracing::error!(error = %e, "event encode failed"),
        }
    }
}

/// Headers for a JetStream publish to `subject` that must be stored once even
/// if retried, with the trace context of a PRODUCER span for it.
pub fn dedupe_headers(subject: &str, msg_id: &str) -> HeaderMap {
    let mut headers = telemetry::producer_headers(subject);
    headers.insert("Nats-Msg-Id", msg_id);
    headers
}
