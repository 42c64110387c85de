//! A hybrid logical clock: readings that follow wall-clock time closely yet
//! never run backwards and always order cause before effect, even when the
//! writers' clocks disagree. Last-writer-wins compares these readings, and the
//! node id inside them makes every comparison decisive.

use common::msg::Hlc;

/// One node's clock. The adapter owns it and passes the wall clock in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clock {
    last: Hlc,
}

impl Clock {
    pub fn new(node: impl Into<String>) -> Self {
        Clock {
            last: Hlc {
                physical_ms: 0,
                logical: 0,
                node: node.into(),
            },
        }
    }

    /// A reading for a local event at wall-clock time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        if now_ms > self.last.physical_ms {
            self.last.physical_ms = now_ms;
            self.last.logical = 0;
        } else {
            self.last.logical = self.last.logical.saturating_add(1);
        }
        self.last.clone()
    }

    /// Takes in a reading from elsewhere, so this clock's next readings come after it.
    pub fn observe(&mut self, remote: &Hlc, now_ms: u64) -> Hlc {
        let physical = now_ms.max(self.last.physical_ms).max(remote.physical_ms);
        let logical = match (
            physical == self.last.physical_ms,
            physical == remote.physical_ms,
        ) {
            (true, true) => self.last.logical.max(remote.logical).saturating_add(1),
            (true, false) => self.last.logical.saturating_add(1),
            (false, true) => remote.logical.saturating_add(1),
            (false, false) => 0,
        };
        self.last.physical_ms = physical;
        self.last.logical = logical;
        self.last.clone()
    }
}

/// Whether a write stamped `ours` beats the stored one stamped `theirs`.
/// A document written without a clock loses to any clocked write.
pub fn later(ours: &Hlc, theirs: Option<&Hlc>) -> bool {
    theirs.is_none_or(|t| ours > t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(p: u64, l: u32, n: &str) -> Hlc {
        Hlc {
            physical_ms: p,
            logical: l,
            node: n.into(),
        }
    }

    #[test]
    fn ticks_never_go_backwards() {
        let mut c = Clock::new("a");
        let r1 = c.tick(100);
        let r2 = c.tick(100);
        let r3 = c.tick(90); // the wall clock stepped back
        let r4 = c.tick(200);
        assert!(r1 < r2 && r2 < r3 && r3 < r4);
        assert_eq!(r3, h(100, 2, "a"));
        assert_eq!(r4, h(200, 0, "a"));
    }

    #[test]
    fn observing_a_clock_ahead_moves_past_it() {
        let mut c = Clock::new("a");
        c.tick(100);
        let remote = h(500, 7, "b");
        let seen = c.observe(&remote, 120);
        assert_eq!(seen, h(500, 8, "a"));
        assert!(c.tick(130) > remote);
    }

    #[test]
    fn node_ids_break_ties_and_unclocked_documents_lose() {
        assert!(later(&h(5, 0, "b"), Some(&h(5, 0, "a"))));
        assert!(!later(&h(5, 0, "a"), Some(&h(5, 0, "b"))));
        assert!(later(&h(0, 0, ""), None));
    }
}
