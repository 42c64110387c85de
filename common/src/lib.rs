//! The coordkit wire protocol and the plumbing every service shares.
//!
//! Everything that crosses the bus is defined here and nowhere else: subjects
//! ([`subject`]), validated ids ([`id`]), message schemas ([`msg`]), the one error
//! type with its stable codes ([`error`]). The rest is shared plumbing: config from
//! flags and environment ([`config`]), the NATS connection and JetStream resources
//! ([`nats`]), micro-service endpoints ([`service`]), the typed client ([`client`]),
//! telemetry with trace context in NATS headers ([`telemetry`]) and shutdown.

pub mod client;
pub mod config;
pub mod error;
pub mod id;
pub mod msg;
pub mod nats;
pub mod service;
pub mod shutdown;
pub mod subject;
pub mod telemetry;

pub use client::Client;
pub use error::{Error, ErrorCode};
pub use id::{AgentId, AllocationId, FlowId, IdError, ReservationId, ScopeId, SyncPointId, TaskId};

/// Wall-clock milliseconds since the Unix epoch: the one time unit on the wire.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
