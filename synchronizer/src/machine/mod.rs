//! The synchronizer's pure core: document checks, the hybrid logical clock,
//! the three-way merge, conflict resolution, agreement on shared keys,
//! consistency rules, diffs and sync point bookkeeping.
//!
//! Nothing here does IO, reads a clock or makes an id: the adapter in
//! `service` passes time, ids and stored documents in, and stores what comes
//! out. That keeps every decision unit- and property-testable.

pub mod agree;
pub mod diff;
pub mod events;
pub mod hlc;
pub mod merge;
pub mod pointer;
pub mod resolve;
pub mod rules;
pub mod syncpoint;

use common::{Error, ErrorCode};
use serde_json::Value;

/// Largest state document accepted, in bytes of JSON.
pub const MAX_DOC_BYTES: usize = 512 * 1024;
/// Deepest nesting accepted (deeply nested JSON is a parser hazard for every reader).
pub const MAX_DEPTH: usize = 64;

/// Refuses documents that every agent reading them would struggle with.
pub fn check_doc(doc: &Value) -> Result<(), Error> {
    let size = serde_json::to_vec(doc)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > MAX_DOC_BYTES {
        return Err(Error::new(
            ErrorCode::PayloadTooLarge,
            format!("state document is {size} bytes, at most {MAX_DOC_BYTES} allowed"),
        ));
    }
    if depth(doc) > MAX_DEPTH {
        return Err(Error::new(
            ErrorCode::ValidationFailed,
            format!("state document nests deeper than {MAX_DEPTH}"),
        ));
    }
    Ok(())
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ordinary_documents_pass() {
        assert!(check_doc(&json!({"plan": {"id": 3, "steps": [1, 2]}})).is_ok());
    }

    #[test]
    fn huge_and_deep_documents_are_refused() {
        let big = json!({"blob": "x".repeat(MAX_DOC_BYTES)});
        assert_eq!(
            check_doc(&big).unwrap_err().code,
            ErrorCode::PayloadTooLarge
        );
        let mut deep = json!(1);
        for _ in 0..=MAX_DEPTH {
            deep = json!([deep]);
        }
        assert_eq!(
            check_doc(&deep).unwrap_err().code,
            ErrorCode::ValidationFailed
        );
    }
}
