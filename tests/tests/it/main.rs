//! Cross-service tests against a real nats-server (one per test).

// Test helpers fail fast, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod agent_events;
mod agent_flows;
mod agent_scale;
mod ahead;
mod allocator;
mod allocator_quota;
mod bench;
mod blip;
mod cdp;
mod cluster;
mod compose;
mod contract;
mod corpus;
mod cost;
mod dashboard;
mod early_reports;
mod errors;
mod events;
mod flow;
mod hand_on;
mod isolation;
mod kit;
mod kv;
mod large_flows;
mod model;
mod monitor;
mod monitor_traffic;
mod observability;
mod orchestrator;
mod reconcile;
mod reconnect;
mod report_arrays;
mod services;
mod stalls;
mod startup;
mod state;
mod sweep;
mod sync;
mod traces;
