//! Cross-service tests against a real nats-server (one per test).

mod compose;
mod errors;
mod flow;
mod services;
mod state;
