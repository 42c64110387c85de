//! Message schemas: every JSON document that crosses the bus.
//!
//! Documents people write (flow specs, allocation requests) reject unknown fields,
//! so a typo such as `dependson` is an error rather than a silently dropped
//! dependency. Messages between programs (replies, events, reports, heartbeats)
//! ignore unknown fields, so an old reader accepts a new writer. New fields are
//! always added with a default. Times are milliseconds since the Unix epoch
//! (`*_ms`), resource amounts are plain non-negative numbers in the resource's own
//! unit.

pub mod agent;
pub mod agent_event;
pub mod alloc;
pub mod event;
pub mod flow;
pub mod monitor;
pub mod plan;
pub mod state;
pub mod trigger;

pub use agent::*;
pub use agent_event::*;
pub use alloc::*;
pub use event::*;
pub use flow::*;
pub use monitor::*;
pub use plan::*;
pub use state::*;
pub use trigger::*;

#[cfg(test)]
mod tests;
