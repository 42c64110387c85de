//! Anomaly detection on a series sampled once per detection interval.
//!
//! The baseline is the median of the recent samples and the spread their median
//! absolute deviation (MAD), so one earlier spike does not widen the band the
//! way a standard deviation would; an EWMA of the samples is what is reported as
//! "expected". A sample is anomalous when its robust z-score passes the entry
//! threshold *and* it differs from the median by a floor in absolute and
//! relative terms (small integer counts are noisy). Hysteresis: once entered, the
//! detector stays in the anomalous state until the z-score falls below the exit
//! threshold, so one spike is reported once, however long it lasts.

use std::collections::VecDeque;

/// Which side of the baseline counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Samples before the first verdict.
    pub warmup: usize,
    /// Samples the baseline is computed over.
    pub history: usize,
    pub enter_z: f64,
    pub exit_z: f64,
    /// Least absolute difference from the median that can be anomalous.
    pub min_delta: f64,
    /// Least difference relative to the median (0.5 = half the median).
    pub min_ratio: f64,
    pub ewma_alpha: f64,
    /// A sample at or below this share of the median is anomalous whatever the
    /// spread (a series collapsing to nothing on a noisy host); 0 turns it off.
    /// Only judged once the median is at least twice `min_delta`.
    pub collapse_ratio: f64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            warmup: 8,
            history: 60,
            enter_z: 3.5,
            exit_z: 1.5,
            min_delta: 1.0,
            min_ratio: 0.5,
            ewma_alpha: 0.2,
            collapse_ratio: 0.0,
        }
    }
}

/// An anomalous sample, as the detector saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct Signal {
    pub value: f64,
    pub expected: f64,
    pub median: f64,
    pub z: f64,
}

#[derive(Debug, Clone)]
pub struct Detector {
    tuning: Tuning,
    direction: Direction,
    history: VecDeque<f64>,
    ewma: Option<f64>,
    active: bool,
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

impl Detector {
    pub fn new(direction: Direction, tuning: Tuning) -> Self {
        Detector {
            tuning,
            direction,
            history: VecDeque::with_capacity(tuning.history),
            ewma: None,
            active: false,
        }
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Feeds one sample; returns a signal when it starts an anomaly.
    pub fn observe(&mut self, x: f64) -> Option<Signal> {
        if !x.is_finite() {
            return None;
        }
        let t = self.tuning;
        let verdict = if self.history.len() >= t.warmup {
            let s = sorted(self.history.iter().copied());
            let med = median(&s);
            let mad = median(&sorted(s.iter().map(|v| (v - med).abs())));
            // A flat history has MAD 0; a floor keeps z finite and meaningful.
            let scale = (1.4826 * mad).max(0.05 * med.abs()).max(1e-9);
            let signed = match self.direction {
                Direction::Up => x - med,
                Direction::Down => med - x,
            };
            let z = signed / scale;
            let big_enough = signed >= t.min_delta && signed >= t.min_ratio * med.abs();
            let collapsed = self.direction == Direction::Down
                && t.collapse_ratio > 0.0
                && med >= 2.0 * t.min_delta
                && x <= t.collapse_ratio * med;
            Some((z, big_enough, collapsed, med))
        } else {
            None
        };
        let expected = self.ewma.unwrap_or(x);
        let mut signal = None;
        if let Some((z, big_enough, collapsed, med)) = verdict {
            if self.active {
                if z < t.exit_z && !collapsed {
                    self.active = false;
                }
            } else if (z >= t.enter_z && big_enough) || collapsed {
                self.active = true;
                signal = Some(Signal {
                    value: x,
                    expected,
                    median: med,
                    z,
                });
            }
        }
        // Anomalous samples stay out of the baseline while the anomaly lasts, so a
        // long outage does not become the new normal and end the anomaly by itself.
        if !self.active {
            if self.history.len() == t.history {
                self.history.pop_front();
            }
            self.history.push_back(x);
            self.ewma = Some(match self.ewma {
                Some(e) => e + t.ewma_alpha * (x - e),
                None => x,
            });
        }
        signal
    }
}

/// On/off state with hysteresis for threshold rules (saturation, lag).
#[derive(Debug, Clone, Default)]
pub struct Latch {
    on: bool,
}

impl Latch {
    /// Whether the condition holds (fired and not yet cleared).
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Returns true when the condition becomes true; it must fall to `clear`
    /// before it can fire again.
    pub fn update(&mut self, fire: bool, clear: bool) -> bool {
        if self.on {
            if clear {
                self.on = false;
            }
            false
        } else if fire {
            self.on = true;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady(i: usize) -> f64 {
        // 10 ± 2, deterministic.
        10.0 + [0.0, 1.0, -1.0, 2.0, -2.0, 1.0, 0.0, -1.0][i % 8]
    }

    #[test]
    fn a_steady_series_raises_nothing() {
        let mut d = Detector::new(Direction::Down, Tuning::default());
        for i in 0..500 {
            assert_eq!(d.observe(steady(i)), None, "sample {i}");
        }
        let mut u = Detector::new(Direction::Up, Tuning::default());
        for i in 0..500 {
            assert_eq!(u.observe(steady(i)), None, "sample {i}");
        }
    }

    #[test]
    fn one_drop_is_one_anomaly_however_long_it_lasts() {
        let mut d = Detector::new(Direction::Down, Tuning::default());
        let mut fired = 0;
        for i in 0..50 {
            fired += d.observe(steady(i)).iter().count();
        }
        assert_eq!(fired, 0);
        let first = d.observe(0.0).unwrap();
        assert!(first.z > 3.5 && first.median >= 9.0, "{first:?}");
        for _ in 0..30 {
            assert_eq!(d.observe(0.0), None);
        }
        assert!(d.is_active());
        // Recovery ends it; a second drop is a second anomaly.
        for i in 0..5 {
            assert_eq!(d.observe(steady(i)), None);
        }
        assert!(!d.is_active());
        assert!(d.observe(1.0).is_some());
    }

    #[test]
    fn nothing_is_judged_during_warm_up() {
        let mut d = Detector::new(Direction::Up, Tuning::default());
        for x in [1.0, 1.0, 1.0, 500.0, 1.0, 1.0, 1.0] {
            assert_eq!(d.observe(x), None);
        }
    }

    #[test]
    fn small_noisy_counts_need_a_real_difference() {
        let t = Tuning {
            min_delta: 3.0,
            ..Default::default()
        };
        let mut strict = Detector::new(Direction::Up, t);
        for _ in 0..20 {
            strict.observe(0.0);
        }
        // One failure where there were none has an enormous z-score, but is noise.
        assert_eq!(strict.observe(1.0), None);
        assert!(strict.observe(5.0).is_some());
    }

    #[test]
    fn a_noisy_series_collapsing_to_nothing_is_one_anomaly() {
        let t = Tuning {
            min_delta: 3.0,
            collapse_ratio: 0.1,
            ..Default::default()
        };
        let mut d = Detector::new(Direction::Down, t);
        let noisy = [12.0, 4.0, 20.0, 8.0, 16.0, 2.0, 14.0, 10.0, 18.0, 6.0];
        for i in 0..60 {
            assert_eq!(d.observe(noisy[i % noisy.len()]), None, "sample {i}");
        }
        let s = d.observe(0.0).unwrap();
        assert!(
            s.z < 3.5,
            "the z-score alone would not have caught it: {s:?}"
        );
        for _ in 0..20 {
            assert_eq!(d.observe(0.0), None);
        }
        assert!(d.is_active());
        assert_eq!(d.observe(12.0), None);
        assert!(!d.is_active());
    }

    #[test]
    fn latch_fires_once_until_cleared() {
        let mut l = Latch::default();
        assert!(l.update(true, false));
        assert!(!l.update(true, false));
        assert!(!l.update(false, true));
        assert!(l.update(true, false));
    }
}
