//! Concurrency keys: at most `limit` running tasks per key across every flow
//! and replica.
//!
//! Each key is one entry of the `coord_concurrency` bucket listing its holders
//! (`{flow}.{task}.{attempt}`); taking and giving back a slot are
//! compare-and-sets on it, so replicas never hand out more than the limit. A
//! slot is taken before placement and given back when the attempt ends (the
//! machine's `FreeSlot` effect) or when it never started. A replica that dies
//! in between leaves a holder behind: [`Slots::reconcile`] frees holders whose
//! attempt is not running once they are older than [`GRACE_MS`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use async_nats::jetstream::kv;
use common::msg::ConcurrencyLimit;
use common::nats::{self as bus, Step};
use common::{Error, FlowId};
use serde::{Deserialize, Serialize};

use crate::machine::{parse_slot_holder, Flow};

/// A holder this old whose attempt is not running is a leftover.
pub(crate) const GRACE_MS: u64 = 30_000;
/// How long a key that was found full is not asked again by this replica,
/// unless one of its own slots frees first.
const FULL_FOR_MS: u64 = 1_000;

/// One key's holders and when each took its slot.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct KeySlots {
    pub(crate) holders: BTreeMap<String, u64>,
}

pub(crate) struct Slots {
    kv: kv::Store,
    /// Keys found full, until when, and the flows waiting on each.
    full: Mutex<HashMap<String, (u64, HashSet<FlowId>)>>,
}

impl Slots {
    pub(crate) fn new(kv: kv::Store) -> Self {
        Slots {
            kv,
            full: Mutex::default(),
        }
    }

    /// Whether this replica recently found `key` full (so dispatch skips it).
    pub(crate) fn known_full(&self, key: &str, now_ms: u64) -> bool {
        self.full
            .lock()
            .map(|f| f.get(key).is_some_and(|(until, _)| *until > now_ms))
            .unwrap_or(false)
    }

    /// Takes a slot of `limit.key` for `holder`; `false` if the key is full.
    /// Taking a slot twice for the same holder is one slot.
    pub(crate) async fn acquire(
        &self,
        limit: &ConcurrencyLimit,
        holder: &str,
        flow: &FlowId,
        now_ms: u64,
    ) -> Result<bool, Error> {
        let max = limit.limit as usize;
        let (taken, _) = bus::cas_update::<KeySlots, bool, _>(&self.kv, &limit.key, |current| {
            let mut slots = current.unwrap_or_default();
            if slots.holders.contains_key(holder) {
                return Ok(Step::Keep(true));
            }
            if slots.holders.len() >= max {
                return Ok(Step::Keep(false));
            }
            slots.holders.insert(holder.to_owned(), now_ms);
            Ok(Step::Write(slots, true))
        })
        .await?;
        if !taken {
            if let Ok(mut full) = self.full.lock() {
                let e = full.entry(limit.key.clone()).or_default();
                e.0 = now_ms + FULL_FOR_MS;
                e.1.insert(flow.clone());
            }
        }
        Ok(taken)
    }

    /// Gives `holder`'s slot of `key` back (nothing if it holds none). Returns
    /// the flows of this replica that found the key full, to be ticked.
    pub(crate) async fn free(&self, key: &str, holder: &str) -> Vec<FlowId> {
        let freed = bus::cas_update::<KeySlots, bool, _>(&self.kv, key, |current| {
            let Some(mut slots) = current else {
                return Ok(Step::Keep(false));
            };
            if slots.holders.remove(holder).is_none() {
                return Ok(Step::Keep(false));
            }
            Ok(Step::Write(slots, true))
        })
        .await;
        if let Err(e) = &freed {
            tracing::warn!(key, holder, error = %e, "concurrency slot not freed (the sweep will)");
        }
        self.full
            .lock()
            .ok()
            .and_then(|mut f| f.remove(key))
            .map(|(_, waiting)| waiting.into_iter().collect())
            .unwrap_or_default()
    }

    /// The holders of `key` now.
    pub(crate) async fn holders(&self, key: &str) -> Result<BTreeMap<String, u64>, Error> {
        Ok(bus::get_json::<KeySlots>(&self.kv, key)
            .await?
            .map(|(s, _)| s.holders)
            .unwrap_or_default())
    }

    /// Frees every holder older than [`GRACE_MS`] whose attempt is not
    /// assigned or running (`load` reads a flow; `None` if it is gone).
    pub(crate) async fn reconcile<F, Fut>(&self, now_ms: u64, load: F) -> Result<usize, Error>
    where
        F: Fn(FlowId) -> Fut,
        Fut: std::future::Future<Output = Result<Option<Flow>, Error>>,
    {
        let keys = common::nats::keys(&self.kv).await?;
        // A flow that could not be read counts as live: nothing is freed on doubt.
        let mut flows: HashMap<FlowId, Result<Option<Flow>, Error>> = HashMap::new();
        let mut freed = 0;
        for key in keys {
            let old: Vec<String> = self
                .holders(&key)
                .await?
                .into_iter()
                .filter(|(_, since)| now_ms.saturating_sub(*since) > GRACE_MS)
                .map(|(h, _)| h)
                .collect();
            for holder in old {
                let live = match parse_slot_holder(&holder) {
                    Some((flow, task, attempt)) => {
                        if !flows.contains_key(&flow) {
                            let loaded = load(flow.clone()).await;
                            flows.insert(flow.clone(), loaded);
                        }
                        match flows.get(&flow) {
                            Some(Ok(Some(f))) => f
                                .tasks
                                .get(&task)
                                .is_some_and(|t| t.state.is_active() && t.attempt == attempt),
                            Some(Ok(None)) => false,
                            Some(Err(_)) | None => true,
                        }
                    }
                    None => false,
                };
                if !live {
                    tracing::info!(key, holder, "concurrency slot left behind, freed");
                    self.free(&key, &holder).await;
                    freed += 1;
                }
            }
        }
        Ok(freed)
    }
}
