//! A flow's wake-up for its next timer (a deadline, a back-off's end), so
//! timers fire when due rather than at the next sweep.

/// The wake-up a flow's actor has set, if any.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Alarm {
    at: Option<u64>,
}

impl Alarm {
    /// Given the flow's next timer after `now_ms`, the time of a wake-up to
    /// set, unless one is set for then or sooner already. A wake-up set
    /// earlier for a later time still fires: a step with nothing due.
    pub fn set(&mut self, next_due: Option<u64>, now_ms: u64) -> Option<u64> {
        if self.at.is_some_and(|at| at <= now_ms) {
            // Fired, or its command is on its way.
            self.at = None;
        }
        let due = next_due.filter(|due| *due > now_ms)?;
        if self.at.is_some_and(|at| at <= due) {
            return None;
        }
        self.at = Some(due);
        Some(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_wake_up_for_the_soonest_timer_and_another_once_it_passed() {
        let mut alarm = Alarm::default();
        assert_eq!(alarm.set(Some(100), 0), Some(100));
        assert_eq!(alarm.set(Some(100), 10), None, "set already");
        assert_eq!(alarm.set(Some(150), 10), None, "a sooner one is set");
        assert_eq!(alarm.set(Some(50), 10), Some(50), "sooner than the one set");
        assert_eq!(alarm.set(Some(100), 50), Some(100), "the last one fired");
        assert_eq!(alarm.set(Some(100), 100), None, "nothing after now");
        assert_eq!(alarm.set(None, 100), None);
    }
}
