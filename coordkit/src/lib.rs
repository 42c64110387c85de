//! coordkit for Rust programs: the typed client for every service and the
//! agent runtime.
//!
//! ```no_run
//! # async fn demo() -> Result<(), coordkit::Error> {
//! use coordkit::{agent, AgentId};
//! let nats = async_nats::connect("nats://127.0.0.1:4222")
//!     .await
//!     .map_err(|e| coordkit::Error::unavailable("connect to nats", e))?;
//! let opts = agent::AgentOptions::new(AgentId::new("worker-1")?).capacity("cpu", 4.0);
//! agent::run(nats, opts, |task| async move { Ok(task.input) }, tokio::signal::ctrl_c()).await
//! # }
//! ```

pub mod agent;
pub mod cli;
pub mod demo;

pub use common::msg;
pub use common::{AgentId, AllocationId, Client, Error, ErrorCode, FlowId, TaskId};
