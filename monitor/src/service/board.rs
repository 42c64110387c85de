//! The flows bucket as the dashboard reads it, kept current by a watch: each
//! write is taken once as it happens (a reference to its bytes, nothing
//! parsed), and a page view parses only the flows it shows, instead of
//! reading the whole bucket over the bus per view.
//!
//! Until the watch has caught up with the bucket, after it broke, or when
//! the bucket outgrows [`MAX_BYTES`], the board says so and the views read
//! the bucket directly, as before (at most `probe::MAX_RECORDS` records).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;

/// Most bytes of flow records held; past it the board stands down.
pub(super) const MAX_BYTES: usize = 256 * 1024 * 1024;
/// Wait before watching again after the watch broke or the bucket was missing.
const RETRY: Duration = Duration::from_secs(1);
/// Wait before trying again once the bucket was too large to hold: reading
/// it whole costs the server, so not often.
const OVERSIZE_RETRY: Duration = Duration::from_secs(300);

/// What the overview filters and sorts on, read once per write of a flow.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(super) struct Head {
    #[serde(default)]
    pub(super) name: Option<String>,
    #[serde(default)]
    pub(super) state: String,
    #[serde(default)]
    pub(super) created_at_ms: u64,
}

struct Record {
    bytes: Bytes,
    head: OnceLock<Head>,
}

#[derive(Default)]
struct Records {
    /// `{flow}` and its pages `{flow}.p{n}`, as stored.
    by_key: HashMap<String, Record>,
    bytes: usize,
}

impl Records {
    fn apply(&mut self, key: &str, value: Option<Bytes>) {
        if let Some(old) = self.by_key.remove(key) {
            self.bytes -= old.bytes.len();
        }
        if let Some(bytes) = value {
            self.bytes += bytes.len();
            let head = OnceLock::new();
            self.by_key.insert(key.to_owned(), Record { bytes, head });
        }
    }
}

#[derive(Default)]
pub(super) struct Board {
    inner: Mutex<Option<Records>>,
}

impl Board {
    /// Every flow's id and head; `None` while the board cannot answer.
    pub(super) fn heads(&self) -> Option<Vec<(String, Head)>> {
        let guard = self.inner.lock().ok()?;
        let records = guard.as_ref()?;
        Some(
            records
                .by_key
                .iter()
                .filter(|(k, _)| !k.contains('.'))
                .map(|(k, r)| {
                    let head = r
                        .head
                        .get_or_init(|| serde_json::from_slice(&r.bytes).unwrap_or_default());
                    (k.clone(), head.clone())
                })
                .collect(),
        )
    }

    /// The records of `ids` with their pages' tasks folded in; `None` while
    /// the board cannot answer.
    pub(super) fn records(&self, ids: &[String]) -> Option<Vec<(String, Value)>> {
        let (flows, pages) = {
            let guard = self.inner.lock().ok()?;
            let records = guard.as_ref()?;
            let mut flows = Vec::new();
            let mut pages: BTreeMap<&str, Vec<Bytes>> = BTreeMap::new();
            for id in ids {
                if let Some(r) = records.by_key.get(id) {
                    flows.push((id.clone(), r.bytes.clone()));
                    pages.insert(id, Vec::new());
                }
            }
            for (k, r) in &records.by_key {
                if let Some((flow, _)) = k.split_once('.') {
                    if let Some(p) = pages.get_mut(flow) {
                        p.push(r.bytes.clone());
                    }
                }
            }
            let pages: HashMap<String, Vec<Bytes>> =
                pages.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            (flows, pages)
        };
        // Parsed outside the lock: the watch keeps applying writes meanwhile.
        Some(
            flows
                .into_iter()
                .map(|(id, bytes)| {
                    let mut flow: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    if let Some(Value::Object(tasks)) = flow.get_mut("tasks") {
                        for page in pages.get(&id).into_iter().flatten() {
                            let page: Value = serde_json::from_slice(page).unwrap_or(Value::Null);
                            if let Some(Value::Object(more)) = page.get("tasks") {
                                tasks.extend(more.clone());
                            }
                        }
                    }
                    (id, flow)
                })
                .collect(),
        )
    }

    fn set(&self, records: Option<Records>) {
        if let Ok(mut g) = self.inner.lock() {
            *g = records;
        }
    }

    /// Applies one write to the live records; false once they outgrew
    /// [`MAX_BYTES`] (the board then stands down).
    fn apply_live(&self, key: &str, value: Option<Bytes>) -> bool {
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        let Some(records) = g.as_mut() else {
            return false;
        };
        records.apply(key, value);
        if records.bytes > MAX_BYTES {
            *g = None;
            return false;
        }
        true
    }
}

/// Keeps `board` current with the flows bucket until the task is aborted.
pub(super) async fn follow(js: jetstream::Context, board: std::sync::Arc<Board>) {
    loop {
        let wait = match watch_once(&js, &board).await {
            Ok(()) => {
                tracing::debug!("flows watch ended; watching again");
                RETRY
            }
            Err(Stop::Oversize) => {
                tracing::info!(
                    max_bytes = MAX_BYTES,
                    "the flows bucket is too large to hold; dashboard views read it directly"
                );
                OVERSIZE_RETRY
            }
            Err(Stop::Failed(e)) => {
                tracing::debug!(error = %e, "flows watch failed; views read the bucket");
                RETRY
            }
        };
        board.set(None);
        tokio::time::sleep(wait).await;
    }
}

/// Why a watch ended.
enum Stop {
    Oversize,
    Failed(String),
}

/// One watch: the bucket's current records gathered aside, then served and
/// kept current until the watch ends.
async fn watch_once(js: &jetstream::Context, board: &Board) -> Result<(), Stop> {
    let failed = |e: &dyn std::fmt::Display| Stop::Failed(e.to_string());
    let store = js
        .get_key_value(common::nats::KV_FLOWS)
        .await
        .map_err(|e| failed(&e))?;
    let status = store.status().await.map_err(|e| failed(&e))?;
    let empty = status.values() == 0;
    if status.info.state.bytes > MAX_BYTES as u64 {
        return Err(Stop::Oversize);
    }
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| failed(&e))?;
    let mut pending = (!empty).then(Records::default);
    if empty {
        board.set(Some(Records::default()));
    }
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| failed(&e))?;
        let value = (entry.operation == kv::Operation::Put).then_some(entry.value);
        match &mut pending {
            Some(records) => {
                records.apply(&entry.key, value);
                if records.bytes > MAX_BYTES {
                    return Err(Stop::Oversize);
                }
                if entry.delta == 0 {
                    board.set(pending.take());
                }
            }
            None => {
                if !board.apply_live(&entry.key, value) {
                    return Err(Stop::Oversize);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(entries: &[(&str, &str)]) -> Board {
        let mut r = Records::default();
        for (k, v) in entries {
            r.apply(k, Some(Bytes::from(v.to_string())));
        }
        let b = Board::default();
        b.set(Some(r));
        b
    }

    #[test]
    fn a_flow_reads_with_its_pages_and_a_delete_removes_it() {
        let b = board(&[
            (
                "f1",
                r#"{"name":"one","state":"running","created_at_ms":5,"tasks":{"a":{"state":"running"}}}"#,
            ),
            ("f1.p1", r#"{"tasks":{"b":{"state":"ready"}}}"#),
            (
                "f2",
                r#"{"state":"succeeded","created_at_ms":9,"tasks":{}}"#,
            ),
        ]);
        let mut heads = b.heads().unwrap();
        heads.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(heads.len(), 2, "pages are not flows");
        assert_eq!(heads[0].1.name.as_deref(), Some("one"));
        assert_eq!(
            (heads[1].1.state.as_str(), heads[1].1.created_at_ms),
            ("succeeded", 9)
        );
        let f1 = b.records(&["f1".into()]).unwrap();
        let tasks = f1[0].1["tasks"].as_object().unwrap();
        assert_eq!(tasks.len(), 2, "the page's task folded in: {tasks:?}");
        assert!(b.apply_live("f1", None));
        assert!(b.records(&["f1".into()]).unwrap().is_empty());
        assert_eq!(b.heads().unwrap().len(), 1);
    }

    #[test]
    fn a_board_past_its_size_stands_down() {
        let b = board(&[]);
        let big = Bytes::from(vec![b' '; MAX_BYTES / 2 + 1]);
        assert!(b.apply_live("f1", Some(big.clone())));
        assert!(!b.apply_live("f2", Some(big)));
        assert!(b.heads().is_none() && b.records(&[]).is_none());
    }

    #[test]
    fn a_rewrite_is_parsed_afresh() {
        let b = board(&[("f1", r#"{"state":"running"}"#)]);
        assert_eq!(b.heads().unwrap()[0].1.state, "running");
        assert!(b.apply_live("f1", Some(Bytes::from_static(br#"{"state":"paused"}"#))));
        assert_eq!(b.heads().unwrap()[0].1.state, "paused");
    }
}
