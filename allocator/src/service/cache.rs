//! A replica's view of a KV bucket, kept current by a watch.
//!
//! Revisions decide which copy is newer, so the initial load, the watch and the
//! replica's own writes can arrive in any order. The view may lag; every write
//! made from it is a compare-and-set, so lag costs a retry, never correctness.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use common::{AgentId, Error};
use futures::StreamExt;
use serde::de::DeserializeOwned;

/// Values by agent id with the KV revision they were read at. Shared, so a
/// snapshot of every agent costs a pointer per agent, not a copy of each
/// record's allocations; and kept in a vector, so a placement can look
/// through the agents from any position ([`Cache::scan`]) without a
/// snapshot at all.
pub(crate) struct Cache<T>(Arc<RwLock<Entries<T>>>);

/// The rows, and where each agent's is.
struct Entries<T> {
    rows: Vec<(Arc<T>, u64)>,
    ids: Vec<AgentId>,
    at: HashMap<AgentId, usize>,
}

impl<T> Default for Entries<T> {
    fn default() -> Self {
        Entries {
            rows: Vec::new(),
            ids: Vec::new(),
            at: HashMap::new(),
        }
    }
}

impl<T> Entries<T> {
    fn get(&self, id: &AgentId) -> Option<&(Arc<T>, u64)> {
        self.at.get(id).map(|&i| &self.rows[i])
    }

    fn insert(&mut self, id: AgentId, row: (Arc<T>, u64)) {
        match self.at.get(&id) {
            Some(&i) => self.rows[i] = row,
            None => {
                self.at.insert(id.clone(), self.rows.len());
                self.rows.push(row);
                self.ids.push(id);
            }
        }
    }

    fn remove(&mut self, id: &AgentId) {
        let Some(i) = self.at.remove(id) else {
            return;
        };
        self.rows.swap_remove(i);
        self.ids.swap_remove(i);
        if let Some(moved) = self.ids.get(i) {
            self.at.insert(moved.clone(), i);
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

impl<T: Clone + DeserializeOwned + Send + Sync + 'static> Cache<T> {
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
            kv::Operation::Put => {
                if let Ok(v) = serde_json::from_slice::<T>(&entry.value) {
                    self.remember(id, v, entry.revision);
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => self.forget(&id),
        }
    }

    /// Keeps `value` unless a newer revision is already known.
    pub(crate) fn remember(&self, id: AgentId, value: T, revision: u64) {
        if let Ok(mut c) = self.0.write() {
            if c.get(&id).is_none_or(|(_, rev)| *rev < revision) {
                c.insert(id, (Arc::new(value), revision));
            }
        }
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
}
