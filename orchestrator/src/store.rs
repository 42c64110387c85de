//! Flows in KV.
//!
//! A flow of up to [`PAGE_TASKS`] tasks is one entry, so every step is one
//! compare-and-set. A larger flow would outgrow the server's `max_payload`:
//! its tasks are spread by a hash of their id over page entries
//! `{flow}.p{n}` beside the flow's own entry (the header), and a step writes
//! the pages it changed and the header in one atomic batch whose commit is
//! the header's compare-and-set. Writers therefore serialise on the header
//! alone, and a batch that loses the race stores nothing.
//!
//! A reader takes the header, then the pages. A page written after the header
//! it read carries a step the header does not name: the read is torn and is
//! made again.

use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::HeaderMap;
use bytes::Bytes;
use common::{Error, ErrorCode, FlowId, TaskId};
use futures::StreamExt;
use serde::{Deserialize, Serialize, Serializer};

use crate::machine::{Flow, Pages, Task};

/// Tasks per page, and the most a flow keeps in its own entry (about 0.5 MB
/// at a full attempt history, under NATS's default 1 MB `max_payload`).
pub const PAGE_TASKS: usize = 1_000;
/// One atomic batch holds at most 1,000 messages: the pages and the header.
pub const MAX_PAGES: usize = 999;
/// Torn reads tried again before giving up.
const READ_ATTEMPTS: usize = 20;
/// Pages fetched at once.
const READ_AHEAD: usize = 16;

/// A flow's stored encoding: its header and, for a paged flow, the tasks part
/// of each page (what tells whether a step changed the page).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub header: Bytes,
    pub pages: Vec<Bytes>,
}

/// The flow as last written or read: the value, its revision and its encoding.
pub type Stored = (Flow, u64, Encoded);

/// A write that did not happen.
#[derive(Debug)]
pub enum WriteError {
    /// Someone else wrote the flow since the revision the step started from.
    Conflict,
    Failed(Error),
}

/// How many pages a new flow of `tasks` tasks gets (0: none, one entry).
pub fn page_count(tasks: usize) -> u32 {
    if tasks <= PAGE_TASKS {
        0
    } else {
        tasks.div_ceil(PAGE_TASKS).min(MAX_PAGES) as u32
    }
}

/// Lays a new flow out: pages for a large one, stamped with a fresh step so
/// pages left by another create of the same id never pass for this flow's.
pub fn lay_out(flow: &mut Flow) {
    let count = page_count(flow.tasks.len());
    flow.pages = (count > 0).then(|| {
        let step = uuid::Uuid::now_v7().as_u64_pair().1 >> 1;
        Pages {
            count,
            step,
            steps: vec![step; count as usize],
        }
    });
}

/// A flow grown by `flow.modify` gets pages, or more of them, once its pages
/// hold twice what they were meant to. Every page is then written again
/// (their encodings no longer match), in the same atomic batch as ever.
fn grow(flow: &mut Flow) {
    let wanted = page_count(flow.tasks.len());
    match &mut flow.pages {
        None if wanted > 0 => lay_out(flow),
        Some(p) if wanted >= p.count.saturating_mul(2) && p.count < MAX_PAGES as u32 => {
            p.count = wanted;
            p.steps.resize(wanted as usize, 0);
        }
        _ => {}
    }
}

fn page_of(task: &TaskId, count: u32) -> usize {
    // FNV-1a: stable across processes and releases, unlike the std hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task.as_str().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(count)) as usize
}

fn page_key(flow: &FlowId, page: usize) -> String {
    format!("{flow}.p{page}")
}

struct TasksRef<'a>(&'a [(&'a TaskId, &'a Task)]);

impl Serialize for TasksRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().copied())
    }
}

#[derive(Deserialize)]
struct PageIn {
    step: u64,
    tasks: std::collections::BTreeMap<TaskId, Task>,
}

fn page_value(step: u64, tasks: &[u8]) -> Bytes {
    let mut v = format!("{{\"step\":{step},\"tasks\":").into_bytes();
    v.extend_from_slice(tasks);
    v.push(b'}');
    v.into()
}

/// The tasks part of a page value written by [`page_value`].
fn tasks_part(value: &Bytes) -> Option<Bytes> {
    let at = value.windows(8).position(|w| w == b"\"tasks\":")? + 8;
    (value.last() == Some(&b'}')).then(|| value.slice(at..value.len() - 1))
}

fn encode_err(e: serde_json::Error) -> Error {
    Error::internal(format!("flow encode: {e}"))
}

/// Encodes the flow and says which pages differ from `before` (all of them
/// without it). Changed pages get a new step, recorded in the header, so it
/// must be called once per write.
pub fn encode(flow: &mut Flow, before: Option<&Encoded>) -> Result<(Encoded, Vec<usize>), Error> {
    grow(flow);
    let Some(count) = flow.pages.as_ref().map(|p| p.count) else {
        let header = serde_json::to_vec(flow).map_err(encode_err)?.into();
        return Ok((
            Encoded {
                header,
                pages: Vec::new(),
            },
            Vec::new(),
        ));
    };
    let mut split: Vec<Vec<(&TaskId, &Task)>> = vec![Vec::new(); count as usize];
    for (id, t) in &flow.tasks {
        split[page_of(id, count)].push((id, t));
    }
    let pages = split
        .iter()
        .map(|p| serde_json::to_vec(&TasksRef(p)).map(Bytes::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(encode_err)?;
    drop(split);
    let dirty: Vec<usize> = (0..pages.len())
        .filter(|&i| before.and_then(|b| b.pages.get(i)) != Some(&pages[i]))
        .collect();
    if let Some(p) = flow.pages.as_mut().filter(|_| !dirty.is_empty()) {
        p.step += 1;
        for &i in &dirty {
            p.steps[i] = p.step;
        }
    }
    let tasks = std::mem::take(&mut flow.tasks);
    let header = serde_json::to_vec(flow).map_err(encode_err);
    flow.tasks = tasks;
    Ok((
        Encoded {
            header: header?.into(),
            pages,
        },
        dirty,
    ))
}

/// Reads a flow, pages and all.
pub async fn read(kv: &kv::Store, flow: &FlowId) -> Result<Option<Stored>, Error> {
    for _ in 0..READ_ATTEMPTS {
        let Some((mut f, revision, header)) =
            common::nats::get_json_raw::<Flow>(kv, flow.as_str()).await?
        else {
            return Ok(None);
        };
        let Some(pages) = f.pages.clone() else {
            return Ok(Some((
                f,
                revision,
                Encoded {
                    header,
                    pages: Vec::new(),
                },
            )));
        };
        let read: Vec<Result<Option<(PageIn, Bytes)>, Error>> =
            futures::stream::iter(0..pages.count as usize)
                .map(|i| read_page(kv, flow, i))
                .buffered(READ_AHEAD)
                .collect()
                .await;
        let mut parts = Vec::with_capacity(read.len());
        let mut torn = false;
        for (i, page) in read.into_iter().enumerate() {
            match page? {
                Some((page, part)) if page.step == pages.steps[i] => {
                    f.tasks.extend(page.tasks);
                    parts.push(part);
                }
                _ => {
                    torn = true;
                    break;
                }
            }
        }
        if !torn {
            return Ok(Some((
                f,
                revision,
                Encoded {
                    header,
                    pages: parts,
                },
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(Error::new(
        ErrorCode::Unavailable,
        format!("flow {flow}: its pages kept changing while being read"),
    ))
}

async fn read_page(
    kv: &kv::Store,
    flow: &FlowId,
    page: usize,
) -> Result<Option<(PageIn, Bytes)>, Error> {
    let key = page_key(flow, page);
    let Some(value) = kv
        .get(&key)
        .await
        .map_err(|e| Error::new(ErrorCode::Unavailable, format!("kv read {key}: {e}")))?
    else {
        return Ok(None);
    };
    let parsed: PageIn = serde_json::from_slice(&value)
        .map_err(|e| Error::internal(format!("stored page {key} unreadable: {e}")))?;
    let part = tasks_part(&value)
        .ok_or_else(|| Error::internal(format!("stored page {key} has an unknown layout")))?;
    Ok(Some((parsed, part)))
}

/// Stores a new flow; `Conflict` when the id is taken.
/// `enc` is the flow's [`encode`]ing.
pub async fn create(
    kv: &kv::Store,
    flow: &Flow,
    enc: Encoded,
) -> Result<(u64, Encoded), WriteError> {
    if let Some(p) = &flow.pages {
        if kv
            .get(flow.id.as_str())
            .await
            .map_err(|e| WriteError::Failed(unavailable(e)))?
            .is_some()
        {
            return Err(WriteError::Conflict);
        }
        // Pages first: a create cut short leaves pages no header names.
        let pages: Vec<(String, Bytes)> = enc
            .pages
            .iter()
            .enumerate()
            .map(|(i, part)| (page_key(&flow.id, i), page_value(p.steps[i], part)))
            .collect();
        let written: Vec<_> = futures::stream::iter(pages)
            .map(|(key, value)| {
                let kv = kv.clone();
                async move { kv.put(key, value).await.map_err(unavailable) }
            })
            .buffer_unordered(READ_AHEAD)
            .collect()
            .await;
        for w in written {
            w.map_err(WriteError::Failed)?;
        }
    }
    match kv.create(flow.id.as_str(), enc.header.clone()).await {
        Ok(rev) => Ok((rev, enc)),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(WriteError::Conflict),
        Err(e) => Err(WriteError::Failed(unavailable(e))),
    }
}

/// Writes a step: the changed pages and the header, if the header is still
/// at `revision`. Returns the new revision.
pub async fn write(
    kv: &kv::Store,
    nats: &async_nats::Client,
    flow: &Flow,
    enc: &Encoded,
    dirty: &[usize],
    revision: u64,
) -> Result<u64, WriteError> {
    let key = flow.id.as_str();
    let Some(pages) = flow.pages.as_ref().filter(|_| !dirty.is_empty()) else {
        return match kv.update(key, enc.header.clone(), revision).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                Err(WriteError::Conflict)
            }
            Err(e) => Err(WriteError::Failed(unavailable(e))),
        };
    };
    let batch = uuid::Uuid::now_v7().simple().to_string();
    let subject = |k: &str| format!("{}{k}", kv.put_prefix.as_ref().unwrap_or(&kv.prefix));
    for (n, &i) in dirty.iter().enumerate() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Batch-Id", batch.as_str());
        h.insert("Nats-Batch-Sequence", (n + 1).to_string().as_str());
        nats.publish_with_headers(
            subject(&page_key(&flow.id, i)),
            h,
            page_value(pages.steps[i], &enc.pages[i]),
        )
        .await
        .map_err(|e| WriteError::Failed(unavailable(e)))?;
    }
    let mut h = HeaderMap::new();
    h.insert("Nats-Batch-Id", batch.as_str());
    h.insert(
        "Nats-Batch-Sequence",
        (dirty.len() + 1).to_string().as_str(),
    );
    h.insert("Nats-Batch-Commit", "1");
    h.insert(
        "Nats-Expected-Last-Subject-Sequence",
        revision.to_string().as_str(),
    );
    let reply = nats
        .request_with_headers(subject(key), h, enc.header.clone())
        .await
        .map_err(|e| WriteError::Failed(unavailable(e)))?;
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

/// JetStream's "wrong last sequence" error: the header moved on.
const WRONG_LAST_SEQUENCE: u64 = 10071;

fn commit_outcome(payload: &[u8]) -> Result<u64, WriteError> {
    let ack: Ack = serde_json::from_slice(payload).map_err(|e| {
        WriteError::Failed(Error::new(
            ErrorCode::Unavailable,
            format!("batch commit: unreadable ack: {e}"),
        ))
    })?;
    match ack.error {
        None if ack.seq > 0 => Ok(ack.seq),
        None => Err(WriteError::Failed(Error::new(
            ErrorCode::Unavailable,
            "batch commit: ack without a sequence",
        ))),
        Some(e) if e.err_code == WRONG_LAST_SEQUENCE => Err(WriteError::Conflict),
        Some(e) => Err(WriteError::Failed(Error::new(
            ErrorCode::Unavailable,
            format!("batch commit: {} ({})", e.description, e.err_code),
        ))),
    }
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::Unavailable, format!("kv write: {e}"))
}

/// Lets the flows bucket take atomic batches (an existing bucket is updated).
pub async fn allow_batches(
    js: &async_nats::jetstream::Context,
    kv: &kv::Store,
) -> Result<(), Error> {
    let mut stream = js
        .get_stream(&kv.stream_name)
        .await
        .map_err(|e| Error::new(ErrorCode::Unavailable, format!("flows stream: {e}")))?;
    let mut config = stream
        .info()
        .await
        .map_err(|e| Error::new(ErrorCode::Unavailable, format!("flows stream: {e}")))?
        .config
        .clone();
    if config.allow_atomic_publish {
        return Ok(());
    }
    config.allow_atomic_publish = true;
    js.update_stream(config)
        .await
        .map_err(|e| Error::new(ErrorCode::Unavailable, format!("flows stream: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_flows_stay_in_one_entry_and_large_ones_fit_one_batch() {
        assert_eq!(page_count(PAGE_TASKS), 0);
        assert_eq!(page_count(PAGE_TASKS + 1), 2);
        assert_eq!(page_count(100_000), 100);
        assert_eq!(page_count(10_000_000), MAX_PAGES as u32);
    }

    fn flow(n: usize) -> Flow {
        let spec = common::msg::FlowSpec::new(
            "f",
            (0..n)
                .map(|i| common::msg::TaskSpec::new(TaskId::new(format!("t{i}")).unwrap()))
                .collect(),
        );
        Flow::new(FlowId::new("f").unwrap(), spec, 1).0
    }

    #[test]
    fn only_changed_pages_are_written_and_a_grown_flow_is_paged_again() {
        let mut f = flow(5 * PAGE_TASKS);
        lay_out(&mut f);
        let (first, dirty) = encode(&mut f, None).unwrap();
        assert_eq!(dirty, (0..5).collect::<Vec<_>>());
        let step = f.pages.as_ref().unwrap().step;
        let (same, dirty) = encode(&mut f, Some(&first)).unwrap();
        assert!(dirty.is_empty());
        assert_eq!(same, first, "nothing changed, nothing re-stamped");
        let t = TaskId::new("t7").unwrap();
        f.tasks.get_mut(&t).unwrap().attempt = 9;
        let (_, dirty) = encode(&mut f, Some(&first)).unwrap();
        assert_eq!(dirty, vec![page_of(&t, 5)]);
        let p = f.pages.as_ref().unwrap();
        assert_eq!((p.step, p.steps[dirty[0]]), (step + 1, step + 1));

        // An unpaged flow grown past a page, and a paged one past twice its pages.
        let mut small = flow(3 * PAGE_TASKS);
        let (enc, dirty) = encode(&mut small, None).unwrap();
        assert_eq!((enc.pages.len(), dirty.len()), (3, 3));
        let mut big = flow(12 * PAGE_TASKS);
        big.pages = Some(Pages {
            count: 5,
            step: 1,
            steps: vec![1; 5],
        });
        let (enc, _) = encode(&mut big, None).unwrap();
        assert_eq!(enc.pages.len(), 12);
    }

    #[test]
    fn the_tasks_part_is_found_again_in_a_page_value() {
        let v = page_value(7, br#"{"a":{"x":"\"tasks\":"}}"#);
        assert_eq!(
            tasks_part(&v).unwrap(),
            Bytes::from_static(br#"{"a":{"x":"\"tasks\":"}}"#)
        );
    }

    #[test]
    fn a_lost_race_is_a_conflict_and_other_refusals_are_not() {
        assert!(matches!(
            commit_outcome(br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 5"}}"#),
            Err(WriteError::Conflict)
        ));
        assert!(matches!(
            commit_outcome(br#"{"error":{"code":400,"err_code":10174,"description":"atomic publish is disabled"}}"#),
            Err(WriteError::Failed(_))
        ));
        assert_eq!(
            commit_outcome(br#"{"stream":"KV_coord_flows","seq":42,"batch":"b","count":3}"#)
                .unwrap(),
            42
        );
    }
}
