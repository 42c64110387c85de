//! Flows in KV.
//!
//! A flow of up to [`PAGE_TASKS`] tasks is one entry, so every step is one
//! compare-and-set. A larger flow would outgrow the server's `max_payload`:
//! its tasks are split by ranges of their ids over page entries `{flow}.p{n}`
//! beside the flow's own entry (the header), and a step writes the pages it
//! changed and the header in one atomic batch whose commit is the header's
//! compare-and-set. Writers therefore serialise on the header alone, and a
//! batch that loses the race stores nothing.
//!
//! A reader takes the header, then the pages. A page written after the header
//! it read carries a step the header does not name: the read is torn and is
//! made again.
//!
//! The header holds the flow and what the store keeps beside it ([`Kept`]):
//! the pages' layout and the outbox of events (`crate::outbox`). Neither is
//! the state machine's: a [`Flow`] knows nothing of how it is stored.

use std::ops::Bound;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use common::nats::Written;
use common::{Error, ErrorCode, FlowId, TaskId};
use futures::StreamExt;
use serde::{Deserialize, Serialize, Serializer};

use crate::machine::{Flow, Task, Touched};
use crate::outbox::Staged;

/// Tasks per page, and the most a flow keeps in its own entry (about 0.5 MB
/// at a full attempt history, under NATS's default 1 MB `max_payload`).
pub const PAGE_TASKS: usize = 1_000;
/// One atomic batch holds the pages and the header.
pub const MAX_PAGES: usize = common::nats::MAX_BATCH - 1;
/// Torn reads tried again before giving up.
const READ_ATTEMPTS: usize = 20;
/// Pages fetched at once.
const READ_AHEAD: usize = 16;

/// A large flow's tasks live in `count` page entries beside the flow's entry
/// (its header). Every write stamps the pages it changes with a new `step`
/// and records it here, so a reader can tell a page written after the header
/// it read (a torn read) and read again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pages {
    pub count: u32,
    /// The step of the header's last write.
    pub step: u64,
    /// The step each page was last written at.
    pub steps: Vec<u64>,
    /// Page `i + 1` holds the ids from `bounds[i]` up to the next bound.
    #[serde(default)]
    pub bounds: Vec<TaskId>,
}

/// What the store keeps in a flow's header beside the flow.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Kept {
    /// How the tasks are spread over entries; `None` while they fit in the
    /// flow's own entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<Pages>,
    /// Events committed with a step and not yet known to be in the events
    /// stream (`crate::outbox`). Always written, even when empty, and only
    /// `writer` after it: [`before_outbox`] tells a step that changed only
    /// the outbox by the encoding before it.
    #[serde(default)]
    pub outbox: Vec<Staged>,
    /// The replica whose step wrote this (its tag): the others hand it the
    /// flow's reports (`service::forward`). A step that would change only
    /// this is not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<u32>,
}

/// A header as written: the flow's fields, then the store's.
#[derive(Serialize)]
struct Header<'a> {
    #[serde(flatten)]
    flow: &'a Flow,
    #[serde(flatten)]
    kept: &'a Kept,
}

/// A flow's stored encoding: its header, for a paged flow the tasks part of
/// each page (what tells whether a step changed the page), and what the
/// store keeps in the header.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub header: Bytes,
    pub pages: Vec<Bytes>,
    pub kept: Kept,
}

/// Whether a flow is large enough for its reads and status to be worth
/// care (paged, or about to be).
pub fn large(flow: &Flow) -> bool {
    flow.tasks.len() > PAGE_TASKS
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
pub fn lay_out(flow: &Flow) -> Option<Pages> {
    let step = uuid::Uuid::now_v7().as_u64_pair().1 >> 1;
    split_pages(flow, None, step)
}

/// Pages are ranges of task ids, about equal in size: tasks that run
/// together are mostly neighbours by id (they are dispatched in id order
/// within a priority and rank), so a step changes few pages.
fn split_pages(flow: &Flow, before: Option<Pages>, step: u64) -> Option<Pages> {
    let n = flow.tasks.len();
    let count = page_count(n);
    if count == 0 {
        return before;
    }
    let per_page = n.div_ceil(count as usize);
    let bounds = flow
        .tasks
        .keys()
        .skip(per_page)
        .step_by(per_page)
        .cloned()
        .collect::<Vec<_>>();
    let count = bounds.len() as u32 + 1;
    let steps = before
        .map(|mut p| {
            p.steps.resize(count as usize, step);
            p.steps
        })
        .unwrap_or_else(|| vec![step; count as usize]);
    Some(Pages {
        count,
        step,
        steps,
        bounds,
    })
}

/// Most tasks a page may hold before the flow is laid out again: twice what
/// a layout gives it (a page fills unevenly as `flow.modify` adds tasks).
fn page_limit(flow: &Flow) -> usize {
    2 * PAGE_TASKS.max(flow.tasks.len().div_ceil(MAX_PAGES))
}

/// A flow grown by `flow.modify` past one entry gets pages. Returns whether
/// the layout changed.
fn grow(flow: &Flow, kept: &mut Kept) -> bool {
    if kept.pages.is_none() && page_count(flow.tasks.len()) > 0 {
        kept.pages = lay_out(flow);
        return true;
    }
    false
}

fn page_of(task: &TaskId, pages: &Pages) -> usize {
    pages.bounds.partition_point(|b| b <= task)
}

/// The ids page `i` holds.
fn page_range(pages: &Pages, i: usize) -> (Bound<&TaskId>, Bound<&TaskId>) {
    let lo = i
        .checked_sub(1)
        .and_then(|j| pages.bounds.get(j))
        .map_or(Bound::Unbounded, Bound::Included);
    let hi = pages
        .bounds
        .get(i)
        .map_or(Bound::Unbounded, Bound::Excluded);
    (lo, hi)
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
    Error::internal_from("flow encode", e)
}

/// Encodes the flow and says which pages differ from `before` (all of them
/// without it). Only pages holding tasks handed out for change since `before`
/// (see [`crate::machine::Tasks`]) are encoded again. Changed pages get a new
/// step, recorded in the header, so it must be called once per write.
pub fn encode(
    flow: &mut Flow,
    mut kept: Kept,
    before: Option<&Encoded>,
) -> Result<(Encoded, Vec<usize>), Error> {
    let mut grown = grow(flow, &mut kept);
    let touched = flow.tasks.take_touched();
    loop {
        let (header, pages, dirty, overfull) =
            encode_pages(flow, &mut kept, before, grown, &touched)?;
        if !overfull {
            let encoded = Encoded {
                header,
                pages,
                kept,
            };
            return Ok((encoded, dirty));
        }
        // A page outgrew its share: split the ids again, write every page.
        let step = kept.pages.as_ref().map_or(0, |p| p.step);
        kept.pages = split_pages(flow, kept.pages.take(), step);
        grown = true;
    }
}

fn header(flow: &Flow, kept: &Kept) -> Result<Bytes, Error> {
    let header = serde_json::to_vec(&Header { flow, kept }).map_err(encode_err)?;
    Ok(header.into())
}

/// The header and pages of one try at [`encode`], the pages that changed,
/// and whether some page holds too many tasks.
type Try = (Bytes, Vec<Bytes>, Vec<usize>, bool);

/// One try at [`encode`].
fn encode_pages(
    flow: &mut Flow,
    kept: &mut Kept,
    before: Option<&Encoded>,
    grown: bool,
    touched: &Touched,
) -> Result<Try, Error> {
    let Some(layout) = kept.pages.as_ref() else {
        return Ok((header(flow, kept)?, Vec::new(), Vec::new(), false));
    };
    let n = layout.count as usize;
    let reuse = before.filter(|b| !grown && b.pages.len() == n);
    let mut redo = vec![reuse.is_none(); n];
    match (reuse, touched) {
        (None, _) | (_, Touched::All) => redo.fill(true),
        (Some(_), Touched::None) => {}
        (Some(_), Touched::Some(ids)) => ids.iter().for_each(|id| redo[page_of(id, layout)] = true),
    }
    let limit = page_limit(flow);
    let mut pages = Vec::with_capacity(n);
    let mut page = Vec::new();
    for (i, redo) in redo.iter().enumerate() {
        pages.push(match reuse {
            Some(b) if !redo => b.pages[i].clone(),
            _ => {
                page.clear();
                page.extend(flow.tasks.range::<TaskId, _>(page_range(layout, i)));
                if page.len() > limit {
                    return Ok((Bytes::new(), Vec::new(), Vec::new(), true));
                }
                Bytes::from(serde_json::to_vec(&TasksRef(&page)).map_err(encode_err)?)
            }
        });
    }
    drop(page);
    // Kept pages are `before`'s own: only those encoded again can differ.
    let dirty: Vec<usize> = (0..n)
        .filter(|&i| redo[i] && before.and_then(|b| b.pages.get(i)) != Some(&pages[i]))
        .collect();
    if let Some(p) = kept.pages.as_mut().filter(|_| !dirty.is_empty()) {
        p.step += 1;
        for &i in &dirty {
            p.steps[i] = p.step;
        }
    }
    let tasks = std::mem::take(&mut flow.tasks);
    let header = header(flow, kept);
    flow.tasks = tasks;
    Ok((header?, pages, dirty, false))
}

/// The part of a flow's header before its outbox ([`Kept::outbox`], last but
/// for the writer's tag): what tells whether a step changed the flow, since
/// publishing and dropping events changes only the outbox. The outbox holds events alone,
/// whose strings escape their quotes, so the last match is the field's key; a
/// header written before the field existed may match inside a task's input,
/// which costs at most one write nothing else asked for.
pub fn before_outbox(header: &[u8]) -> &[u8] {
    const KEY: &[u8] = b",\"outbox\":[";
    header
        .windows(KEY.len())
        .rposition(|w| w == KEY)
        .map_or(header, |at| &header[..at])
}

/// What a flow's header says of who steps it, read without its tasks.
#[derive(Debug, Deserialize)]
pub struct Peek {
    pub state: common::msg::FlowState,
    /// The replica whose step wrote it ([`Kept::writer`]).
    #[serde(default)]
    pub writer: Option<u32>,
}

/// Reads a flow's header only: what a replica that does not step the flow
/// needs to hand its reports on (a large flow's tasks are in its pages).
pub async fn peek(kv: &kv::Store, flow: &FlowId) -> Result<Option<Peek>, Error> {
    Ok(common::nats::get_json_raw::<Peek>(kv, flow.as_str())
        .await?
        .map(|(peek, _, _)| peek))
}

/// Reads a flow, pages and all.
pub async fn read(kv: &kv::Store, flow: &FlowId) -> Result<Option<Stored>, Error> {
    for _ in 0..READ_ATTEMPTS {
        let Some((mut f, revision, header)) =
            common::nats::get_json_raw::<Flow>(kv, flow.as_str()).await?
        else {
            // A replica behind the leader may not have the flow yet: a report
            // refused as "no flow" then would leave its task running for good.
            if common::nats::absent_at_leader(kv, flow.as_str()).await? {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let kept: Kept = serde_json::from_slice(&header)
            .map_err(|e| Error::internal_from(format_args!("stored flow {flow} unreadable"), e))?;
        let Some(pages) = kept.pages.clone() else {
            return Ok(Some((
                f,
                revision,
                Encoded {
                    header,
                    pages: Vec::new(),
                    kept,
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
            // As stored: nothing to write back.
            f.tasks.take_touched();
            return Ok(Some((
                f,
                revision,
                Encoded {
                    header,
                    pages: parts,
                    kept,
                },
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(Error::new(
        ErrorCode::Unavailable,
        format!(
            "flow {flow}: its pages kept changing, or its replicas disagreed, while being read"
        ),
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
        .map_err(|e| Error::unavailable(format_args!("kv read {key}"), e))?
    else {
        return Ok(None);
    };
    let parsed: PageIn = serde_json::from_slice(&value)
        .map_err(|e| Error::internal_from(format_args!("stored page {key} unreadable"), e))?;
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
    if let Some(p) = &enc.kept.pages {
        if kv
            .get(flow.id.as_str())
            .await
            .map_err(|e| WriteError::Failed(Error::unavailable("kv read", e)))?
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
                async move {
                    kv.put(&key, value)
                        .await
                        .map_err(|e| Error::unavailable(format_args!("kv write {key}"), e))
                }
            })
            .buffer_unordered(READ_AHEAD)
            .collect()
            .await;
        for w in written {
            w.map_err(WriteError::Failed)?;
        }
    }
    let header = enc.header.clone();
    match common::nats::write_at(kv, flow.id.as_str(), header, None).await {
        Ok(written) => written_or_conflict(written).map(|rev| (rev, enc)),
        Err(e) => Err(WriteError::Failed(e)),
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
    let written = match enc.kept.pages.as_ref().filter(|_| !dirty.is_empty()) {
        None => common::nats::write_at(kv, key, enc.header.clone(), Some(revision)).await,
        Some(pages) => {
            let changed: Vec<(String, Bytes)> = dirty
                .iter()
                .map(|&i| {
                    (
                        page_key(&flow.id, i),
                        page_value(pages.steps[i], &enc.pages[i]),
                    )
                })
                .collect();
            let commit = (key, enc.header.clone());
            common::nats::write_batch(nats, kv, changed, commit, revision).await
        }
    };
    written_or_conflict(written.map_err(WriteError::Failed)?)
}

fn written_or_conflict(written: Written) -> Result<u64, WriteError> {
    match written {
        Written::Stored(rev) => Ok(rev),
        Written::Lost => Err(WriteError::Conflict),
    }
}

#[cfg(test)]
mod tests;
