//! The allocator: agents register capacity; tasks and clients allocate from it.
//!
//! [`machine`] is the pure capacity ledger and placement policy; [`service`] is
//! the NATS adapter that keeps agents in JetStream KV and books every allocation
//! with a compare-and-set, so no number of replicas can over-allocate an agent.

pub mod machine;
pub mod service;

pub use service::{run, Config};
