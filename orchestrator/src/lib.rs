//! The orchestrator: task flows (DAGs of tasks) run on external agents.
//!
//! [`machine`] is the pure flow state machine; [`service`] is the NATS adapter
//! that stores flows in JetStream KV with compare-and-set, places tasks through
//! the allocator, assigns them on each agent's durable subject and consumes the
//! agents' reports.

#[cfg(feature = "failpoints")]
pub mod failpoints;
mod held;
pub mod machine;
pub mod outbox;
#[cfg(test)]
mod props;
pub mod service;
mod slots;
pub mod store;

pub use service::{run, Config};
