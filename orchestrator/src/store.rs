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

use std::ops::Bound;
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use common::nats::Written;
use common::{Error, ErrorCode, FlowId, TaskId};
use futures::StreamExt;
use serde::{Deserialize, Serialize, Serializer};

use crate::machine::{Flow, Pages, Task, Touched};

/// Tasks per page, and the most a flow keeps in its own entry (about 0.5 MB
/// at a full attempt history, under NATS's default 1 MB `max_payload`).
pub const PAGE_TASKS: usize = 1_000;
/// One atomic batch holds the pages and the header.
pub const MAX_PAGES: usize = common::nats::MAX_BATCH - 1;
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
    let step = uuid::Uuid::now_v7().as_u64_pair().1 >> 1;
    flow.pages = None;
    split_pages(flow, step);
}

/// Pages are ranges of task ids, about equal in size: tasks that run
/// together are mostly neighbours by id (they are dispatched in id order
/// within a priority and rank), so a step changes few pages.
fn split_pages(flow: &mut Flow, step: u64) {
    let n = flow.tasks.len();
    let count = page_count(n);
    if count == 0 {
        return;
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
    let steps = flow
        .pages
        .take()
        .map(|mut p| {
            p.steps.resize(count as usize, step);
            p.steps
        })
        .unwrap_or_else(|| vec![step; count as usize]);
    flow.pages = Some(Pages {
        count,
        step,
        steps,
        bounds,
    });
}

/// Most tasks a page may hold before the flow is laid out again: twice what
/// a layout gives it (a page fills unevenly as `flow.modify` adds tasks).
fn page_limit(flow: &Flow) -> usize {
    2 * PAGE_TASKS.max(flow.tasks.len().div_ceil(MAX_PAGES))
}

/// A flow grown by `flow.modify` past one entry gets pages. Returns whether
/// the layout changed.
fn grow(flow: &mut Flow) -> bool {
    if flow.pages.is_none() && page_count(flow.tasks.len()) > 0 {
        lay_out(flow);
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
pub fn encode(flow: &mut Flow, before: Option<&Encoded>) -> Result<(Encoded, Vec<usize>), Error> {
    let mut grown = grow(flow);
    let touched = flow.tasks.take_touched();
    loop {
        let (encoded, dirty, overfull) = encode_pages(flow, before, grown, &touched)?;
        if !overfull {
            return Ok((encoded, dirty));
        }
        // A page outgrew its share: split the ids again, write every page.
        let step = flow.pages.as_ref().map_or(0, |p| p.step);
        split_pages(flow, step);
        grown = true;
    }
}

/// One try at [`encode`]; also says whether some page holds too many tasks.
fn encode_pages(
    flow: &mut Flow,
    before: Option<&Encoded>,
    grown: bool,
    touched: &Touched,
) -> Result<(Encoded, Vec<usize>, bool), Error> {
    let Some(layout) = flow.pages.as_ref() else {
        let header = serde_json::to_vec(flow).map_err(encode_err)?.into();
        return Ok((
            Encoded {
                header,
                pages: Vec::new(),
            },
            Vec::new(),
            false,
        ));
    };
    let n = layout.count as usize;
    let kept = before.filter(|b| !grown && b.pages.len() == n);
    let mut redo = vec![kept.is_none(); n];
    match (kept, touched) {
        (None, _) | (_, Touched::All) => redo.fill(true),
        (Some(_), Touched::None) => {}
        (Some(_), Touched::Some(ids)) => ids.iter().for_each(|id| redo[page_of(id, layout)] = true),
    }
    let limit = page_limit(flow);
    let mut pages = Vec::with_capacity(n);
    let mut page = Vec::new();
    for (i, redo) in redo.iter().enumerate() {
        pages.push(match kept {
            Some(b) if !redo => b.pages[i].clone(),
            _ => {
                page.clear();
                page.extend(flow.tasks.range::<TaskId, _>(page_range(layout, i)));
                if page.len() > limit {
                    return Ok((Encoded::default(), Vec::new(), true));
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
        false,
    ))
}

/// The part of a flow's header before its outbox ([`Flow::outbox`], the last
/// field): what tells whether a step changed the flow, since publishing and
/// dropping events changes only the outbox. The outbox holds events alone,
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
            // As stored: nothing to write back.
            f.tasks.take_touched();
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
    if let Some(p) = &flow.pages {
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
    let written = match flow.pages.as_ref().filter(|_| !dirty.is_empty()) {
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
        Flow::independent(n)
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
        assert_eq!(dirty, vec![page_of(&t, f.pages.as_ref().unwrap())]);
        let p = f.pages.as_ref().unwrap();
        assert_eq!((p.step, p.steps[dirty[0]]), (step + 1, step + 1));

        // An unpaged flow grown past a page, and a page grown past its share.
        let mut small = flow(3 * PAGE_TASKS);
        let (enc, dirty) = encode(&mut small, None).unwrap();
        assert_eq!((enc.pages.len(), dirty.len()), (3, 3));
        let mut big = flow(12 * PAGE_TASKS);
        big.pages = Some(Pages {
            count: 2,
            step: 1,
            steps: vec![1; 2],
            bounds: vec![TaskId::new("t5").unwrap()],
        });
        let (enc, _) = encode(&mut big, None).unwrap();
        assert_eq!(enc.pages.len(), 12);
    }

    #[test]
    fn the_outbox_is_left_out_of_the_comparison_and_task_inputs_do_not_fool_it() {
        let mut f = flow(2);
        f.tasks
            .get_mut(&TaskId::new("t0").unwrap())
            .unwrap()
            .spec
            .input = serde_json::json!({"x": 1, "outbox": [1]});
        let (plain, _) = encode(&mut f, None).unwrap();
        f.outbox.push(crate::machine::Staged {
            at_ms: 5,
            events: vec![crate::machine::Numbered {
                n: 0,
                kind: common::msg::EventKind::FlowPaused {
                    flow_id: f.id.clone(),
                },
            }],
        });
        let (with_events, _) = encode(&mut f, None).unwrap();
        assert_ne!(plain.header, with_events.header);
        assert_eq!(
            before_outbox(&plain.header),
            before_outbox(&with_events.header)
        );
        assert!(
            before_outbox(&plain.header).ends_with(b"}}"),
            "cut at the field, not the input"
        );
    }

    #[test]
    fn the_tasks_part_is_found_again_in_a_page_value() {
        let v = page_value(7, br#"{"a":{"x":"\"tasks\":"}}"#);
        assert_eq!(
            tasks_part(&v).unwrap(),
            Bytes::from_static(br#"{"a":{"x":"\"tasks\":"}}"#)
        );
    }
}
