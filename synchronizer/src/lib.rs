//! The synchronizer: versioned agent state documents.
//!
//! Each agent's state is a JSON document in the `coord_state` KV bucket (with
//! history). A put names the revision it was made from; the write is a
//! compare-and-set on exactly that revision, so a stale writer gets a `conflict`
//! carrying the current document instead of silently overwriting it.

pub mod machine;
pub mod service;

pub use service::{run, Config};
