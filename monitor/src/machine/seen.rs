//! Event ids seen lately. Events are published at least once: a replica that
//! died between storing a step and publishing its events leaves them to be
//! published again by another, under the same id. The events stream stores a
//! repeat once (its duplicate window), but the monitor reads the subjects, so
//! it drops an id it has seen within the same window itself.

use std::collections::{HashSet, VecDeque};

/// How long an id is remembered: the events stream's duplicate window.
pub const WINDOW_MS: u64 = 120_000;
/// Most ids remembered; past it the oldest are forgotten early.
pub const MAX_IDS: usize = 200_000;

#[derive(Debug, Clone, Default)]
pub struct Seen {
    ids: HashSet<String>,
    order: VecDeque<(u64, String)>,
}

impl Seen {
    /// Whether `id` is new (and remembers it); `false` for a repeat.
    pub fn first(&mut self, id: &str, now_ms: u64) -> bool {
        while let Some((at, _)) = self.order.front() {
            if now_ms.saturating_sub(*at) < WINDOW_MS && self.order.len() < MAX_IDS {
                break;
            }
            if let Some((_, old)) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        if id.is_empty() || self.ids.contains(id) {
            return id.is_empty();
        }
        self.ids.insert(id.to_owned());
        self.order.push_back((now_ms, id.to_owned()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeat_within_the_window_is_dropped_and_memory_is_capped() {
        let mut s = Seen::default();
        assert!(s.first("f.1", 0));
        assert!(!s.first("f.1", 1_000));
        assert!(s.first("f.2", 1_000));
        assert!(s.first("f.1", WINDOW_MS), "forgotten after the window");
        for i in 0..MAX_IDS + 10 {
            s.first(&format!("x{i}"), WINDOW_MS);
        }
        assert!(s.order.len() <= MAX_IDS && s.ids.len() == s.order.len());
    }
}
