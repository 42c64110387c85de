//! Latency distributions in fixed memory: one HDR histogram per minute of the
//! last hour, merged on query.

use common::msg::LatencySummary;
use hdrhistogram::Histogram;

/// Largest latency recorded exactly; longer ones are clamped to it.
pub const MAX_LATENCY_MS: u64 = 24 * 3_600 * 1_000;
const MINUTES: usize = 60;

fn histogram() -> Option<Histogram<u32>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_MS, 2).ok()
}

/// A latency measure over the last hour, at one-minute resolution.
#[derive(Debug, Clone, Default)]
pub struct Latency {
    /// `(minute, histogram)`; a slot is reused once its minute leaves the hour.
    slots: Vec<Option<(u64, Histogram<u32>)>>,
}

impl Latency {
    pub fn record(&mut self, now_ms: u64, ms: u64) {
        if self.slots.is_empty() {
            self.slots = vec![None; MINUTES];
        }
        let minute = now_ms / 60_000;
        let slot = &mut self.slots[(minute % MINUTES as u64) as usize];
        if slot.as_ref().is_none_or(|(m, _)| *m != minute) {
            *slot = histogram().map(|h| (minute, h));
        }
        if let Some((_, h)) = slot {
            h.saturating_record(ms.clamp(1, MAX_LATENCY_MS));
        }
    }

    /// The merged distribution of the last `minutes` minutes.
    pub fn merged(&self, now_ms: u64, minutes: u64) -> Option<Histogram<u32>> {
        let now_min = now_ms / 60_000;
        let mut out = histogram()?;
        for (m, h) in self.slots.iter().flatten() {
            if *m <= now_min && now_min - m < minutes {
                out.add(h).ok()?;
            }
        }
        Some(out)
    }

    pub fn summary(&self, now_ms: u64, minutes: u64) -> LatencySummary {
        self.merged(now_ms, minutes)
            .map(|h| summarise(&h))
            .unwrap_or_default()
    }
}

pub fn summarise(h: &Histogram<u32>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    LatencySummary {
        count: h.len(),
        p50_ms: h.value_at_quantile(0.5),
        p90_ms: h.value_at_quantile(0.9),
        p99_ms: h.value_at_quantile(0.99),
        max_ms: h.max(),
    }
}

/// Upper bounds of the exported histogram buckets, in seconds: from a fast
/// local hop to an hour-long task.
pub const BUCKETS_SECONDS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// A cumulative histogram since the monitor started, with fixed buckets, as
/// Prometheus reads it (`rate()` and `histogram_quantile()` over any window).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Buckets {
    /// Observations per bucket of [`BUCKETS_SECONDS`], and one past the last.
    pub counts: [u64; BUCKETS_SECONDS.len() + 1],
    pub sum_seconds: f64,
    pub count: u64,
}

impl Buckets {
    pub fn record(&mut self, ms: u64) {
        let s = ms as f64 / 1_000.0;
        let i = BUCKETS_SECONDS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(BUCKETS_SECONDS.len());
        self.counts[i] += 1;
        self.sum_seconds += s;
        self.count += 1;
    }
}

/// A histogram for one detection interval (reset by the caller).
pub fn interval_histogram() -> Option<Histogram<u32>> {
    histogram()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_cover_the_last_hour_only() {
        let mut l = Latency::default();
        for ms in 1..=100 {
            l.record(0, ms);
        }
        let s = l.summary(0, 60);
        assert_eq!(s.count, 100);
        assert!((49..=51).contains(&s.p50_ms), "{s:?}");
        assert!((98..=100).contains(&s.p99_ms), "{s:?}");
        l.record(61 * 60_000, 5_000);
        let s = l.summary(61 * 60_000, 60);
        assert_eq!(s.count, 1);
        assert!(s.p50_ms >= 4_950, "{s:?}");
    }

    #[test]
    fn buckets_take_each_value_once_at_its_upper_bound() {
        let mut b = Buckets::default();
        for ms in [5, 6, 1_000, 10_000_000] {
            b.record(ms);
        }
        assert_eq!(b.count, 4);
        assert_eq!(b.counts[0], 1, "5 ms is within 0.005 s");
        assert_eq!(b.counts[1], 1);
        assert_eq!(b.counts[7], 1, "1 s is within 1 s");
        assert_eq!(b.counts[BUCKETS_SECONDS.len()], 1, "past the last bound");
        assert!((b.sum_seconds - 10_001.011).abs() < 1e-6);
    }
}
