//! The monitor: watches all coordination traffic and answers questions about it.
//!
//! [`machine`] holds everything derived from the traffic (windows, latency
//! histograms, anomaly detectors, analysis, validation and health rules), pure
//! and bounded; [`service`] feeds it from every one-way subject and from the
//! services' own request counts (it subscribes to no request subject, so a
//! request to a service that is down still fails at once), probes the other
//! services and JetStream, and serves it over NATS and HTTP.

pub mod machine;
pub mod service;

pub use service::{run, Config};
