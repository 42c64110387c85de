//! A replica's view of a KV bucket, kept current by a watch.
//!
//! Revisions decide which copy is newer, so the initial load, the watch and the
//! replica's own writes can arrive in any order. The view may lag; every write
//! made from it is a compare-and-set, so lag costs a retry, never correctness.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use common::{AgentId, AllocationId, Error};
use futures::StreamExt;
use serde::de::DeserializeOwned;

/// Values by agent id with the KV revision they were read at. Shared, so a
/// snapshot of every agent costs a pointer per agent, not a copy of each
/// record's allocations; and kept in a vector, so a placement can look
/// through the agents from any position ([`Cache::scan`]) without a
/// snapshot at all.
pub(crate) struct Cache<T>(Arc<RwLock<Entries<T>>>);

/// What a value holds that must be found without looking through every
/// value: an agent record's allocations, so that a retried request, a
/// renewal or a release finds its allocation in one lookup whatever the
/// number of agents.
pub(crate) trait Holds {
    /// The keys held, in ascending order (so two values compare in one walk).
    fn held(&self) -> impl Iterator<Item = &AllocationId>;
}

impl Holds for crate::machine::AgentRecord {
    fn held(&self) -> impl Iterator<Item = &AllocationId> {
        self.allocations.keys()
    }
}

impl Holds for u64 {
    fn held(&self) -> impl Iterator<Item = &AllocationId> {
        std::iter::empty()
    }
}

/// The rows, where each agent's is, and which agent holds each key.
struct Entries<T> {
    rows: Vec<(Arc<T>, u64)>,
    ids: Vec<AgentId>,
    at: HashMap<AgentId, usize>,
    holder: HashMap<AllocationId, AgentId>,
    /// This replica's writes in flight ([`Cache::expect`]): the body sent
    /// and the value it encodes.
    sent: HashMap<AgentId, (Bytes, Arc<T>)>,
}

impl<T> Default for Entries<T> {
    fn default() -> Self {
        Entries {
            rows: Vec::new(),
            ids: Vec::new(),
            at: HashMap::new(),
            holder: HashMap::new(),
            sent: HashMap::new(),
        }
    }
}

impl<T: Holds> Entries<T> {
    fn get(&self, id: &AgentId) -> Option<&(Arc<T>, u64)> {
        self.at.get(id).map(|&i| &self.rows[i])
    }

    fn insert(&mut self, id: AgentId, row: (Arc<T>, u64)) {
        match self.at.get(&id) {
            Some(&i) => {
                let old = std::mem::replace(&mut self.rows[i], row);
                self.rehold(&id, Some(&old.0), i);
            }
            None => {
                let i = self.rows.len();
                self.at.insert(id.clone(), i);
                self.rows.push(row);
                self.ids.push(id.clone());
                self.rehold(&id, None, i);
            }
        }
    }

    /// Brings the holders up to date with row `i` of `id`, which was `old`:
    /// one ordered walk over both.
    fn rehold(&mut self, id: &AgentId, old: Option<&Arc<T>>, i: usize) {
        let new = self.rows[i].0.clone();
        let mut was = old.into_iter().flat_map(|o| o.held()).peekable();
        let mut now = new.held().peekable();
        loop {
            let order = match (was.peek(), now.peek()) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some(w), Some(n)) => w.cmp(n),
            };
            match order {
                Ordering::Equal => {
                    was.next();
                    now.next();
                }
                Ordering::Less => {
                    if let Some(w) = was.next() {
                        if self.holder.get(w) == Some(id) {
                            self.holder.remove(w);
                        }
                    }
                }
                Ordering::Greater => {
                    if let Some(n) = now.next() {
                        self.holder.insert(n.clone(), id.clone());
                    }
                }
            }
        }
    }

    fn remove(&mut self, id: &AgentId) {
        let Some(i) = self.at.remove(id) else {
            return;
        };
        let (gone, _) = self.rows.swap_remove(i);
        self.ids.swap_remove(i);
        if let Some(moved) = self.ids.get(i) {
            self.at.insert(moved.clone(), i);
        }
        for k in gone.held() {
            if self.holder.get(k) == Some(id) {
                self.holder.remove(k);
            }
        }
    }
}

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Cache(Arc::default())
    }
}

impl<T> Clone for Cache<T> {
    fn clone(&self) -> Self {
        Cache(self.0.clone())
    }
}

impl<T: Holds + Clone + DeserializeOwned + Send + Sync + 'static> Cache<T> {
    /// Loads every key and keeps the view current from a KV watch. Returns once
    /// the initial state is loaded, so the first request sees every agent.
    pub(crate) async fn start(
        self,
        store: kv::Store,
    ) -> Result<tokio::task::JoinHandle<()>, Error> {
        // Watch first, then load: a change made in between is caught by the watch,
        // and revisions decide which copy is newer.
        let mut watch = store
            .watch_all()
            .await
            .map_err(|e| Error::unavailable("kv watch", e))?;
        let mut keys = store
            .keys()
            .await
            .map_err(|e| Error::unavailable("kv keys", e))?;
        // Stopped at the first error: polled again after one, a key listing
        // whose connection went away panics (async-nats 0.51).
        while let Some(Ok(k)) = keys.next().await {
            if let Ok(Some(entry)) = store.entry(&k).await {
                self.apply(entry);
            }
        }
        Ok(tokio::spawn(async move {
            loop {
                while let Some(Ok(entry)) = watch.next().await {
                    self.apply(entry);
                }
                // The watch ended or failed (e.g. the server restarted):
                // re-create it.
                tokio::time::sleep(Duration::from_millis(500)).await;
                match store.watch_with_history(">").await {
                    Ok(w) => watch = w,
                    Err(e) => tracing::warn!(error = %e, "kv watch not re-created yet"),
                }
            }
        }))
    }

    pub(crate) fn apply(&self, entry: kv::Entry) {
        let Ok(id) = AgentId::new(entry.key.clone()) else {
            return;
        };
        match entry.operation {
            kv::Operation::Put => self.put(id, &entry.value, entry.revision),
            kv::Operation::Delete | kv::Operation::Purge => self.forget(&id),
        }
    }

    /// A value of `id` read or watched: `body` at `revision`.
    fn put(&self, id: AgentId, body: &[u8], revision: u64) {
        // This replica's own writes come back on the watch, after it
        // remembered them or before: not parsed again (an agent record
        // holding thousands of allocations is costly to parse).
        if self.known_at(&id, revision) {
            return;
        }
        if let Some(v) = self.sent_as(&id, body) {
            self.keep(id, v, revision);
            return;
        }
        if let Ok(v) = serde_json::from_slice::<T>(body) {
            self.remember(id, v, revision);
        }
    }

    /// Whether `id` is known at `revision` or later.
    fn known_at(&self, id: &AgentId, revision: u64) -> bool {
        self.0
            .read()
            .is_ok_and(|c| c.get(id).is_some_and(|(_, rev)| *rev >= revision))
    }

    /// Keeps `value` unless a newer revision is already known.
    pub(crate) fn remember(&self, id: AgentId, value: T, revision: u64) {
        self.keep(id, Arc::new(value), revision);
    }

    /// [`Self::remember`] for a value already shared.
    pub(crate) fn keep(&self, id: AgentId, value: Arc<T>, revision: u64) {
        if let Ok(mut c) = self.0.write() {
            if c.get(&id).is_none_or(|(_, rev)| *rev < revision) {
                c.insert(id, (value, revision));
            }
        }
    }

    /// Notes a write of `value` as `body` to `id` about to be sent: the
    /// watch may bring it back before the write's acknowledgement, and then
    /// takes `value` instead of parsing the body. Until [`Self::sent`].
    pub(crate) fn expect(&self, id: &AgentId, body: Bytes, value: Arc<T>) {
        if let Ok(mut c) = self.0.write() {
            c.sent.insert(id.clone(), (body, value));
        }
    }

    /// The write to `id` noted by [`Self::expect`] is answered.
    pub(crate) fn sent(&self, id: &AgentId) {
        if let Ok(mut c) = self.0.write() {
            c.sent.remove(id);
        }
    }

    /// The value of this replica's write in flight to `id`, if its body is
    /// `body`.
    fn sent_as(&self, id: &AgentId, body: &[u8]) -> Option<Arc<T>> {
        let c = self.0.read().ok()?;
        let (sent, value) = c.sent.get(id)?;
        (sent.as_ref() == body).then(|| value.clone())
    }

    pub(crate) fn get(&self, id: &AgentId) -> Option<(T, u64)> {
        self.0
            .read()
            .ok()
            .and_then(|c| c.get(id).map(|(v, rev)| (T::clone(v), *rev)))
    }

    /// What `f` makes of the value of `id`, without copying it.
    pub(crate) fn peek<R>(&self, id: &AgentId, f: impl FnOnce(&T) -> R) -> Option<R> {
        self.0
            .read()
            .ok()
            .and_then(|c| c.get(id).map(|(v, _)| f(v)))
    }

    /// Forgets `id`.
    pub(crate) fn forget(&self, id: &AgentId) {
        if let Ok(mut c) = self.0.write() {
            c.remove(id);
        }
    }

    /// Keeps only the ids `keep` says to.
    pub(crate) fn retain(&self, keep: impl Fn(&AgentId) -> bool) {
        if let Ok(mut c) = self.0.write() {
            let gone: Vec<AgentId> = c.ids.iter().filter(|id| !keep(id)).cloned().collect();
            for id in gone {
                c.remove(&id);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<(Arc<T>, u64)> {
        self.0.read().map(|c| c.rows.clone()).unwrap_or_default()
    }

    /// What `f` makes of every value with its revision, under the read lock
    /// (so `f` must be quick and must not wait): in no set order, but the
    /// same order for every caller until a value comes or goes.
    pub(crate) fn scan<R>(&self, f: impl FnOnce(&[(Arc<T>, u64)]) -> R) -> R {
        match self.0.read() {
            Ok(c) => f(&c.rows),
            Err(_) => f(&[]),
        }
    }

    /// The value that holds `key`, with its revision, without copying it.
    pub(crate) fn holding(&self, key: &AllocationId) -> Option<(Arc<T>, u64)> {
        let c = self.0.read().ok()?;
        c.holder.get(key).and_then(|id| c.get(id)).cloned()
    }

    /// How many values there are.
    pub(crate) fn len(&self) -> usize {
        self.0.read().map(|c| c.rows.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> AgentId {
        AgentId::new(s).unwrap()
    }

    #[test]
    fn rows_stay_found_by_id_as_values_come_and_go() {
        let c: Cache<u64> = Cache::default();
        for (i, a) in ["a", "b", "c", "d"].iter().enumerate() {
            c.remember(id(a), i as u64, 1);
        }
        c.forget(&id("b"));
        c.remember(id("c"), 30, 2);
        c.remember(id("c"), 99, 1);
        c.retain(|a| a.as_str() != "a");
        assert_eq!(c.get(&id("a")), None);
        assert_eq!(c.get(&id("b")), None);
        assert_eq!(c.get(&id("c")), Some((30, 2)));
        assert_eq!(c.get(&id("d")), Some((3, 1)));
        assert_eq!(c.len(), 2);
        let mut seen: Vec<u64> = c.scan(|rows| rows.iter().map(|(v, _)| **v).collect());
        seen.sort_unstable();
        assert_eq!(seen, [3, 30]);
    }

    #[test]
    fn a_write_of_this_replica_watched_before_its_answer_is_not_parsed() {
        let c: Cache<u64> = Cache::default();
        // The value noted with the body stands for it: had the body been
        // parsed, 7 would be kept, not 70.
        c.expect(&id("a"), Bytes::from_static(b"7"), Arc::new(70));
        c.put(id("a"), b"7", 3);
        assert_eq!(c.get(&id("a")), Some((70, 3)));
        // Another body (another replica's write) is parsed.
        c.put(id("a"), b"8", 4);
        assert_eq!(c.get(&id("a")), Some((8, 4)));
        // Once answered, the note is gone.
        c.sent(&id("a"));
        c.put(id("a"), b"7", 5);
        assert_eq!(c.get(&id("a")), Some((7, 5)));
    }

    #[test]
    fn a_held_key_is_found_as_it_moves_and_goes() {
        use crate::machine::AgentRecord;
        let c: Cache<AgentRecord> = Cache::default();
        let key = |s: &str| AllocationId::new(s).unwrap();
        let record = |agent: &str, keys: &[&str]| {
            let mut r: AgentRecord = serde_json::from_value(
                serde_json::json!({"agent_id": agent, "capacity": {"cpu": 4}}),
            )
            .unwrap();
            for k in keys {
                let a: common::msg::Allocation = serde_json::from_value(serde_json::json!({
                    "allocation_id": k, "agent_id": agent, "owner": "o", "resources": {"cpu": 1}
                }))
                .unwrap();
                r.allocations.insert(key(k), a);
            }
            r
        };
        let holder = |k: &str| c.holding(&key(k)).map(|(r, _)| r.agent_id.to_string());
        c.remember(id("a"), record("a", &["k1", "k2"]), 1);
        c.remember(id("b"), record("b", &["k3"]), 1);
        assert_eq!(holder("k2").as_deref(), Some("a"));
        // k2 moves to b; b's write is seen before a's.
        c.remember(id("b"), record("b", &["k2", "k3"]), 2);
        c.remember(id("a"), record("a", &["k1"]), 2);
        assert_eq!(holder("k2").as_deref(), Some("b"));
        c.remember(id("a"), record("a", &["k0", "k1"]), 3);
        assert_eq!(holder("k0").as_deref(), Some("a"));
        c.forget(&id("b"));
        assert_eq!(holder("k2"), None);
        assert_eq!(holder("k3"), None);
        assert_eq!(holder("k1").as_deref(), Some("a"));
    }
}
