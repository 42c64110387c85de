//! Cross-service tests against a real nats-server (one per test).

// Test helpers fail fast, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod allocator;
mod compose;
mod errors;
mod flow;
mod monitor;
mod orchestrator;
mod services;
mod state;
mod sync;
mod traces;
