//! Sliding windows in fixed memory: rings of time buckets at three resolutions.
//!
//! A value is added to the current bucket of each ring; buckets that time has
//! passed are cleared lazily when the ring advances, so memory is the same after
//! one message or a billion.

use common::msg::{WindowPeaks, WindowRates};

/// One ring of `len` buckets, each `width_ms` wide.
#[derive(Debug, Clone)]
pub struct Ring {
    width_ms: u64,
    slots: Vec<f64>,
    /// Absolute index (`t / width_ms`) of the newest bucket written.
    head: u64,
}

impl Ring {
    pub fn new(width_ms: u64, len: usize) -> Self {
        Ring {
            width_ms: width_ms.max(1),
            slots: vec![0.0; len.max(1)],
            head: 0,
        }
    }

    fn len(&self) -> u64 {
        self.slots.len() as u64
    }

    fn advance(&mut self, now_ms: u64) {
        let cur = now_ms / self.width_ms;
        if cur <= self.head {
            return;
        }
        let steps = (cur - self.head).min(self.len());
        for k in 0..steps {
            let i = ((cur - k) % self.len()) as usize;
            self.slots[i] = 0.0;
        }
        self.head = cur;
    }

    pub fn add(&mut self, now_ms: u64, v: f64) {
        self.advance(now_ms);
        let cur = now_ms / self.width_ms;
        // A late value (clock step back) older than the ring is dropped.
        if cur + self.len() > self.head {
            let i = (cur % self.len()) as usize;
            self.slots[i] += v;
        }
    }

    /// Keeps the larger of the bucket's value and `v` (for gauges).
    pub fn raise(&mut self, now_ms: u64, v: f64) {
        self.advance(now_ms);
        let cur = now_ms / self.width_ms;
        if cur + self.len() > self.head {
            let i = (cur % self.len()) as usize;
            self.slots[i] = self.slots[i].max(v);
        }
    }

    fn at(&self, abs: u64) -> f64 {
        if abs <= self.head && self.head - abs < self.len() {
            self.slots[(abs % self.len()) as usize]
        } else {
            0.0
        }
    }

    /// The last `n` buckets ending with the one holding `now_ms`, oldest first.
    pub fn buckets(&self, now_ms: u64, n: usize) -> Vec<f64> {
        let cur = now_ms / self.width_ms;
        let n = (n as u64).min(self.len()).min(cur + 1);
        (0..n).rev().map(|k| self.at(cur - k)).collect()
    }

    pub fn sum_last(&self, now_ms: u64, n: usize) -> f64 {
        self.buckets(now_ms, n).iter().sum()
    }
}

/// A series at 1 s (last minute), 10 s (last 15 minutes) and 1 min (last hour) resolution.
#[derive(Debug, Clone)]
pub struct Windows {
    sec: Ring,
    ten: Ring,
    min: Ring,
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            sec: Ring::new(1_000, 60),
            ten: Ring::new(10_000, 90),
            min: Ring::new(60_000, 60),
        }
    }
}

impl Windows {
    pub fn add(&mut self, now_ms: u64, v: f64) {
        self.sec.add(now_ms, v);
        self.ten.add(now_ms, v);
        self.min.add(now_ms, v);
    }

    /// Per-second rates over the last minute, 15 minutes and hour.
    pub fn rates(&self, now_ms: u64) -> WindowRates {
        WindowRates {
            last_1m: self.sec.sum_last(now_ms, 60) / 60.0,
            last_15m: self.ten.sum_last(now_ms, 90) / 900.0,
            last_1h: self.min.sum_last(now_ms, 60) / 3_600.0,
        }
    }

    /// Records a gauge reading: each bucket keeps the highest seen in it.
    pub fn observe(&mut self, now_ms: u64, v: f64) {
        self.sec.raise(now_ms, v);
        self.ten.raise(now_ms, v);
        self.min.raise(now_ms, v);
    }

    /// The highest gauge reading over the last minute, 15 minutes and hour.
    pub fn peaks(&self, now_ms: u64) -> WindowPeaks {
        let max = |r: &Ring, n| r.buckets(now_ms, n).into_iter().fold(0.0, f64::max);
        WindowPeaks {
            last_1m: max(&self.sec, 60),
            last_15m: max(&self.ten, 90),
            last_1h: max(&self.min, 60),
        }
    }

    /// The total over about the last `ms` (whole 10 s buckets, at most 15 minutes).
    pub fn sum_recent(&self, now_ms: u64, ms: u64) -> f64 {
        self.ten.sum_last(now_ms, ms.div_ceil(10_000) as usize)
    }

    /// Totals of the last `n` whole minutes, oldest first (the current minute last).
    pub fn minutes(&self, now_ms: u64, n: usize) -> Vec<f64> {
        self.min.buckets(now_ms, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_buckets_fall_out_of_the_window() {
        let mut r = Ring::new(1_000, 3);
        r.add(0, 1.0);
        r.add(1_000, 2.0);
        r.add(2_500, 3.0);
        assert_eq!(r.buckets(2_500, 3), vec![1.0, 2.0, 3.0]);
        r.add(3_000, 4.0);
        assert_eq!(r.buckets(3_000, 3), vec![2.0, 3.0, 4.0]);
        // A long silence clears everything.
        assert_eq!(r.sum_last(100_000, 3), 0.0);
        r.add(100_000, 1.0);
        assert_eq!(r.buckets(100_000, 3), vec![0.0, 0.0, 1.0]);
    }

    #[test]
    fn rates_are_per_second_over_each_window() {
        let mut w = Windows::default();
        for s in 0..120u64 {
            w.add(s * 1_000, 2.0);
        }
        let r = w.rates(119_999);
        assert!((r.last_1m - 2.0).abs() < 1e-9, "{r:?}");
        assert!((r.last_1h - 240.0 / 3_600.0).abs() < 1e-9, "{r:?}");
        // Nothing before the epoch of the clock: only the minutes that exist.
        assert_eq!(w.minutes(119_999, 3), vec![120.0, 120.0]);
    }

    #[test]
    fn a_gauge_keeps_its_peak_per_window() {
        let mut w = Windows::default();
        w.observe(0, 5.0);
        w.observe(500, 2.0);
        w.observe(120_000, 1.0);
        let p = w.peaks(120_000);
        assert_eq!(p.last_1m, 1.0, "the 5 is older than a minute");
        assert_eq!(p.last_15m, 5.0);
        assert_eq!(p.last_1h, 5.0);
    }
}
