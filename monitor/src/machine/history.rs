//! The dashboard's charts over the last hour, kept by the monitor so that a
//! reload (or a second tab) shows them whole: one point per step in a
//! bounded ring, each made from the running totals and latencies it is shown.

use std::collections::VecDeque;

use serde::Serialize;

/// Time between two points, unless configured.
pub const STEP_MS: u64 = 10_000;
/// Points kept: an hour at the default step.
pub const POINTS: usize = 360;

/// One point of the charts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    pub at_ms: u64,
    /// Tasks that succeeded, and that failed, per second since the point before.
    pub succeeded_per_s: f64,
    pub failed_per_s: f64,
    /// p90 of run time and of queue wait of the tasks that finished in this
    /// minute and the one before, in ms.
    pub run_time_p90_ms: u64,
    pub queue_wait_p90_ms: u64,
    pub agents_online: usize,
}

/// What one point is made from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub succeeded_total: u64,
    pub failed_total: u64,
    pub run_time_p90_ms: u64,
    pub queue_wait_p90_ms: u64,
    pub agents_online: usize,
}

#[derive(Debug, Clone, Default)]
pub struct History {
    points: VecDeque<Point>,
    /// The last sample's time and totals: rates are taken against it.
    last: Option<(u64, u64, u64)>,
}

impl History {
    /// Adds the point for `now_ms` (the first sample only sets the baseline;
    /// a clock that went back is skipped).
    pub fn record(&mut self, now_ms: u64, s: Sample) {
        if let Some((at, succeeded, failed)) = self.last {
            if now_ms <= at {
                return;
            }
            let secs = (now_ms - at) as f64 / 1000.0;
            if self.points.len() >= POINTS {
                self.points.pop_front();
            }
            self.points.push_back(Point {
                at_ms: now_ms,
                succeeded_per_s: s.succeeded_total.saturating_sub(succeeded) as f64 / secs,
                failed_per_s: s.failed_total.saturating_sub(failed) as f64 / secs,
                run_time_p90_ms: s.run_time_p90_ms,
                queue_wait_p90_ms: s.queue_wait_p90_ms,
                agents_online: s.agents_online,
            });
        }
        self.last = Some((now_ms, s.succeeded_total, s.failed_total));
    }

    /// Oldest first.
    pub fn points(&self) -> impl Iterator<Item = &Point> {
        self.points.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(succeeded_total: u64, failed_total: u64) -> Sample {
        Sample {
            succeeded_total,
            failed_total,
            ..Sample::default()
        }
    }

    #[test]
    fn rates_are_per_second_between_points_and_the_ring_is_bounded() {
        let mut h = History::default();
        h.record(0, sample(5, 0));
        assert_eq!(h.points().count(), 0, "the first sample is the baseline");
        h.record(STEP_MS, sample(25, 1));
        let p = h.points().next().unwrap();
        assert_eq!((p.succeeded_per_s, p.failed_per_s), (2.0, 0.1));
        h.record(STEP_MS, sample(30, 1));
        assert_eq!(h.points().count(), 1, "no point for a time already seen");
        for i in 2..(POINTS as u64 + 10) {
            h.record(i * STEP_MS, sample(25 + i, 1));
        }
        assert_eq!(h.points().count(), POINTS);
        assert_eq!(h.points().last().unwrap().succeeded_per_s, 0.1);
    }
}
