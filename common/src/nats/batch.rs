//! Atomic batches: several entries of one KV bucket written in one step, all
//! or none, the last one's compare-and-set deciding for the whole batch.
//!
//! async-nats has no call for JetStream's atomic publish yet: a batch is
//! plain publishes to the bucket's subjects with `Nats-Batch-*` headers, and
//! the stream's ack of the committing message says whether it was stored.

use async_nats::jetstream::kv;
use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Deserialize;

use super::Written;
use crate::error::{Error, ErrorCode};

/// Most messages one atomic batch may hold (the server's limit).
pub const MAX_BATCH: usize = 1_000;

/// Lets a bucket take atomic batches; an existing bucket's stream is updated.
pub async fn allow_atomic_batches(
    js: &async_nats::jetstream::Context,
    kv: &kv::Store,
) -> Result<(), Error> {
    let name = &kv.stream_name;
    let mut stream = js
        .get_stream(name)
        .await
        .map_err(|e| Error::unavailable(name, e))?;
    let mut config = stream
        .info()
        .await
        .map_err(|e| Error::unavailable(name, e))?
        .config
        .clone();
    if config.allow_atomic_publish {
        return Ok(());
    }
    config.allow_atomic_publish = true;
    js.update_stream(config)
        .await
        .map_err(|e| Error::unavailable(name, e))?;
    Ok(())
}

/// Writes `entries` and then `commit` (key, value) to `kv` in one atomic
/// batch, if `commit`'s entry is still at revision `expected`. Nothing is
/// stored when that race is lost ([`Written::Lost`]); [`Written::Stored`]
/// carries `commit`'s new revision. At most [`MAX_BATCH`] entries in all.
pub async fn write_batch<K: AsRef<str>>(
    nats: &async_nats::Client,
    kv: &kv::Store,
    entries: impl IntoIterator<Item = (K, Bytes)>,
    commit: (&str, Bytes),
    expected: u64,
) -> Result<Written, Error> {
    let batch = uuid::Uuid::now_v7().simple().to_string();
    let subject = |k: &str| format!("{}{k}", kv.put_prefix.as_ref().unwrap_or(&kv.prefix));
    let headers = |n: usize| {
        let mut h = HeaderMap::new();
        h.insert("Nats-Batch-Id", batch.as_str());
        h.insert("Nats-Batch-Sequence", n.to_string().as_str());
        h
    };
    let mut n = 0;
    for (key, value) in entries {
        n += 1;
        let key = key.as_ref();
        nats.publish_with_headers(subject(key), headers(n), value)
            .await
            .map_err(|e| Error::unavailable(format_args!("kv write {key}"), e))?;
    }
    let (key, value) = commit;
    let mut h = headers(n + 1);
    h.insert("Nats-Batch-Commit", "1");
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        expected.to_string().as_str(),
    );
    let reply = nats
        .request_with_headers(subject(key), h, value)
        .await
        .map_err(|e| Error::unavailable(format_args!("kv write {key}"), e))?;
    commit_outcome(&reply.payload)
}

#[derive(Deserialize)]
struct Ack {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    error: Option<AckError>,
}

#[derive(Deserialize)]
struct AckError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

/// JetStream's "wrong last sequence" error: the committing entry moved on.
const WRONG_LAST_SEQUENCE: u64 = 10071;

/// What the stream's ack of a batch's commit says.
fn commit_outcome(payload: &[u8]) -> Result<Written, Error> {
    let ack: Ack = serde_json::from_slice(payload)
        .map_err(|e| Error::unavailable("batch commit: unreadable ack", e))?;
    match ack.error {
        None if ack.seq > 0 => Ok(Written::Stored(ack.seq)),
        None => Err(Error::new(
            ErrorCode::Unavailable,
            "batch commit: ack without a sequence",
        )),
        Some(e) if e.err_code == WRONG_LAST_SEQUENCE => Ok(Written::Lost),
        Some(e) => Err(Error::new(
            ErrorCode::Unavailable,
            format!("batch commit: {} ({})", e.description, e.err_code),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_race_is_lost_and_other_refusals_fail() {
        assert_eq!(
            commit_outcome(br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 5"}}"#).unwrap(),
            Written::Lost
        );
        let refused = commit_outcome(
            br#"{"error":{"code":400,"err_code":10174,"description":"atomic publish is disabled"}}"#,
        )
        .unwrap_err();
        assert_eq!(refused.code, ErrorCode::Unavailable);
        assert_eq!(
            commit_outcome(br#"{"stream":"KV_coord_flows","seq":42,"batch":"b","count":3}"#)
                .unwrap(),
            Written::Stored(42)
        );
    }
}
