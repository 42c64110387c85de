//! KV entries listed, read as JSON and written by compare-and-set.
//!
//! [`write_at`] is the one conditional write ([`delete_at`] the one
//! conditional delete): every service's loop over a KV entry (a plain
//! [`cas_update`], or one that keeps a cache or groups changes) tells a lost
//! race from a failure through it, and pauses with [`lost_race_pause`] when
//! races keep being lost.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};

use crate::error::{Error, ErrorCode};

/// How many times a compare-and-set is retried from fresh state before giving up.
pub const CAS_ATTEMPTS: usize = 64;

/// Every key of `kv` with a value (deleted ones left out). A failure ends
/// the listing: polled again after one, a listing whose connection went away
/// panics (async-nats 0.51).
pub async fn keys(kv: &kv::Store) -> Result<Vec<String>, Error> {
    use futures::TryStreamExt;
    kv.keys()
        .await
        .map_err(|e| Error::unavailable("kv keys", e))?
        .try_collect()
        .await
        .map_err(|e| Error::unavailable("kv keys", e))
}

/// Reads a JSON value and its revision; `None` when the key is absent or deleted.
pub async fn get_json<T: DeserializeOwned>(
    kv: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64)>, Error> {
    Ok(get_json_raw(kv, key)
        .await?
        .map(|(value, revision, _)| (value, revision)))
}

/// [`get_json`] that also returns the stored bytes, for callers that tell a
/// change by comparing encodings instead of keeping a copy of the value.
pub async fn get_json_raw<T: DeserializeOwned>(
    kv: &kv::Store,
    key: &str,
) -> Result<Option<(T, u64, bytes::Bytes)>, Error> {
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| Error::unavailable(format_args!("kv read {key}"), e))?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            let value = serde_json::from_slice(&e.value).map_err(|err| {
                Error::internal_from(format_args!("stored value {key} unreadable"), err)
            })?;
            Ok(Some((value, e.revision, e.value)))
        }
        _ => Ok(None),
    }
}

/// Whether `key` is absent from `kv` (never written, deleted or purged), as
/// the bucket's stream leader says. A KV read is a direct get, which any
/// replica may answer: one that has not caught up (a node just back in a
/// cluster) answers "not found" for a key written meanwhile. Before treating
/// "not found" as final, ask the leader.
pub async fn absent_at_leader(kv: &kv::Store, key: &str) -> Result<bool, Error> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = format!("{}{key}", kv.prefix);
    match kv.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(msg) => {
            let op = msg
                .headers
                .get("KV-Operation")
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default();
            Ok(op == "DEL" || op == "PURGE")
        }
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(true),
        Err(e) => Err(Error::unavailable(
            format_args!("kv read {key} at the leader"),
            e,
        )),
    }
}

/// What a conditional write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Stored; the entry's new revision.
    Stored(u64),
    /// Someone else wrote (or created) the entry first: nothing was stored,
    /// re-read and decide again.
    Lost,
}

/// Writes `body` to `key` if the entry is still as the caller read it: at
/// revision `expected`, or absent (never written or deleted) when `expected`
/// is `None`. Losing that race is [`Written::Lost`]; any other failure is
/// `unavailable`.
pub async fn write_at(
    kv: &kv::Store,
    key: &str,
    body: Bytes,
    expected: Option<u64>,
) -> Result<Written, Error> {
    match expected {
        Some(rev) => match kv.update(key, body, rev).await {
            Ok(rev) => Ok(Written::Stored(rev)),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(Written::Lost),
            Err(e) => Err(Error::unavailable(format_args!("kv write {key}"), e)),
        },
        None => match kv.create(key, body).await {
            Ok(rev) => Ok(Written::Stored(rev)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Written::Lost),
            Err(e) => Err(Error::unavailable(format_args!("kv create {key}"), e)),
        },
    }
}

/// Deletes `key` if the entry is still at revision `expected`: `false` when
/// someone else wrote it first (nothing deleted), any other failure is
/// `unavailable`.
pub async fn delete_at(kv: &kv::Store, key: &str, expected: u64) -> Result<bool, Error> {
    match kv.delete_expect_revision(key, Some(expected)).await {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(false),
        Err(e) => Err(Error::unavailable(format_args!("kv delete {key}"), e)),
    }
}

/// The outcome of one step of [`cas_update`].
pub enum Step<T, R> {
    /// Write this value, then return `R`.
    Write(T, R),
    /// Leave the entry as it is and return `R`.
    Keep(R),
}

/// Compare-and-set loop: reads the entry, lets `f` decide, writes against the
/// revision it read, and on losing the race starts over from fresh state.
/// Returns `f`'s result and the revision now stored.
pub async fn cas_update<T, R, F>(kv: &kv::Store, key: &str, mut f: F) -> Result<(R, u64), Error>
where
    T: Serialize + DeserializeOwned,
    F: FnMut(Option<T>) -> Result<Step<T, R>, Error>,
{
    for attempt in 0..CAS_ATTEMPTS {
        let current = get_json::<T>(kv, key).await?;
        let revision = current.as_ref().map(|(_, r)| *r);
        match f(current.map(|(v, _)| v))? {
            Step::Keep(r) => return Ok((r, revision.unwrap_or(0))),
            Step::Write(value, r) => {
                let body = serde_json::to_vec(&value)
                    .map_err(|e| Error::internal_from(format_args!("encode {key}"), e))?;
                match write_at(kv, key, body.into(), revision).await? {
                    Written::Stored(rev) => return Ok((r, rev)),
                    Written::Lost => {
                        tracing::debug!(key, attempt, "compare-and-set lost, retrying");
                        lost_race_pause(attempt).await;
                    }
                }
            }
        }
    }
    Err(contention(key))
}

/// What a compare-and-set loop on `key` answers when it has lost
/// [`CAS_ATTEMPTS`] races in a row: `conflict`, to be retried later.
pub fn contention(key: &str) -> Error {
    Error::new(
        ErrorCode::Conflict,
        format!("{key}: too much contention, gave up"),
    )
}

/// The pause before trying again after the `attempt`th lost compare-and-set
/// (counting from 0): none for the first few, then a few spread-out
/// milliseconds so writers that keep colliding fall out of step.
pub async fn lost_race_pause(attempt: usize) {
    if attempt > 4 {
        tokio::time::sleep(Duration::from_millis(1 + spread_ms(attempt))).await;
    }
}

/// A small, spread-out back-off without pulling in a random number generator.
fn spread_ms(attempt: usize) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as u64;
    nanos % (attempt as u64 * 2).min(50)
}
