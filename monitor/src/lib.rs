//! The monitor: watches all coordination traffic and answers questions about it.
//!
//! [`machine`] holds the bounded counters (pure); [`service`] subscribes to
//! `coord.>` and serves them.

pub mod machine;
pub mod service;

pub use service::{run, Config};
