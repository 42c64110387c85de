//! Performance analysis: trends of the windowed series, the slowest agents,
//! kinds and flows, and the bottleneck resource.

use std::collections::BTreeMap;

use common::msg::{Bottleneck, CapacityStatus, Slowest, Trend};
use hdrhistogram::Histogram;
use serde_json::Value;

use super::latency;

/// Minutes the trend slope is fitted over.
pub const TREND_MINUTES: usize = 15;
/// Entries in each "slowest" list.
pub const TOP: usize = 10;
/// Flows read for the per-kind ranking.
pub const MAX_FLOWS_SCANNED: usize = 2_000;

/// Least-squares slope of `ys` against their index.
pub fn slope(ys: &[f64]) -> f64 {
    let n = ys.len() as f64;
    if ys.len() < 2 {
        return 0.0;
    }
    let mean_x = (n - 1.0) / 2.0;
    let mean_y = ys.iter().sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for (i, y) in ys.iter().enumerate() {
        let dx = i as f64 - mean_x;
        num += dx * (y - mean_y);
        den += dx * dx;
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

/// The trend of a series given its last minute totals (oldest first, current last).
///
/// The current minute is still filling, so "current" is the last *whole* minute
/// and "previous" the one before it.
pub fn trend(series: &str, minutes: &[f64]) -> Trend {
    let whole = &minutes[..minutes.len().saturating_sub(1)];
    let per_sec: Vec<f64> = whole.iter().map(|m| m / 60.0).collect();
    let current = per_sec.last().copied().unwrap_or(0.0);
    let previous = per_sec
        .len()
        .checked_sub(2)
        .and_then(|i| per_sec.get(i))
        .copied()
        .unwrap_or(0.0);
    let slope_per_min = slope(&per_sec);
    let change = (previous > 0.0).then(|| (current - previous) / previous);
    // Flat unless the fitted line moves by more than 5% of the mean over the window.
    let mean = per_sec.iter().sum::<f64>() / per_sec.len().max(1) as f64;
    let moved = slope_per_min * per_sec.len() as f64;
    let direction = if mean == 0.0 || moved.abs() <= 0.05 * mean {
        "flat"
    } else if moved > 0.0 {
        "rising"
    } else {
        "falling"
    };
    Trend {
        series: series.to_owned(),
        slope_per_min,
        current,
        previous,
        change,
        direction: direction.to_owned(),
    }
}

/// Slowest first by p99, then by p50; at most [`TOP`].
pub fn rank<'a>(
    groups: impl Iterator<Item = (&'a str, u64, Option<&'a Histogram<u32>>)>,
) -> Vec<Slowest> {
    let mut out: Vec<Slowest> = groups
        .filter_map(|(name, runs, h)| {
            let s = latency::summarise(h?);
            (s.count > 0).then(|| Slowest {
                name: name.to_owned(),
                runs,
                p50_ms: s.p50_ms,
                p99_ms: s.p99_ms,
            })
        })
        .collect();
    out.sort_by(|a, b| (b.p99_ms, b.p50_ms, &a.name).cmp(&(a.p99_ms, a.p50_ms, &b.name)));
    out.truncate(TOP);
    out
}

/// The pool resource with the highest share in use.
pub fn bottleneck(cap: &CapacityStatus) -> Option<Bottleneck> {
    cap.pool
        .iter()
        .filter(|(_, c)| c.capacity > 0.0)
        .map(|(r, c)| Bottleneck {
            resource: r.clone(),
            utilisation: ((c.allocated + c.reserved) / c.capacity).clamp(0.0, 1.0),
            free: c.free,
        })
        .max_by(|a, b| a.utilisation.total_cmp(&b.utilisation))
}

/// Run times per task kind from stored flows (the attempt history of each task),
/// over attempts that ended at or after `since_ms`.
///
/// Kinds are not in the transition events, so they are read from the flows the
/// orchestrator stores; records are plain JSON so the monitor does not depend on
/// the orchestrator's types.
pub fn slowest_kinds(flows: &[Value], since_ms: u64) -> Vec<Slowest> {
    let mut by_kind: BTreeMap<String, (u64, Option<Histogram<u32>>)> = BTreeMap::new();
    for flow in flows {
        let Some(tasks) = flow.get("tasks").and_then(Value::as_object) else {
            continue;
        };
        for task in tasks.values() {
            let kind = task
                .pointer("/spec/kind")
                .and_then(Value::as_str)
                .filter(|k| !k.is_empty())
                .unwrap_or("(none)");
            let Some(history) = task.get("history").and_then(Value::as_array) else {
                continue;
            };
            for rec in history {
                let started = rec.get("started_ms").and_then(Value::as_u64);
                let ended = rec.get("ended_ms").and_then(Value::as_u64);
                if let (Some(s), Some(e)) = (started, ended) {
                    if e < since_ms {
                        continue;
                    }
                    if by_kind.len() >= super::MAX_RANKED && !by_kind.contains_key(kind) {
                        continue;
                    }
                    let entry = by_kind.entry(kind.to_owned()).or_default();
                    entry.0 += 1;
                    if entry.1.is_none() {
                        entry.1 = latency::interval_histogram();
                    }
                    if let Some(h) = &mut entry.1 {
                        h.saturating_record(e.saturating_sub(s).clamp(1, latency::MAX_LATENCY_MS));
                    }
                }
            }
        }
    }
    rank(
        by_kind
            .iter()
            .map(|(k, (n, h))| (k.as_str(), *n, h.as_ref())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::msg::ResourceCapacity;
    use serde_json::json;

    #[test]
    fn slope_and_direction_of_a_rising_series() {
        assert!((slope(&[1.0, 2.0, 3.0, 4.0]) - 1.0).abs() < 1e-9);
        assert_eq!(slope(&[5.0]), 0.0);
        let minutes: Vec<f64> = (0..16).map(|i| 60.0 * i as f64).collect();
        let t = trend("x", &minutes);
        assert_eq!(t.direction, "rising");
        assert!((t.current - 14.0).abs() < 1e-9 && (t.previous - 13.0).abs() < 1e-9);
        assert!((t.change.unwrap() - 1.0 / 13.0).abs() < 1e-9);
        let flat = trend("y", &[60.0; 16]);
        assert_eq!(flat.direction, "flat");
        assert_eq!(trend("z", &[0.0; 16]).change, None);
    }

    #[test]
    fn bottleneck_is_the_most_used_resource() {
        let mut cap = CapacityStatus::default();
        let rc = |capacity: f64, allocated: f64| ResourceCapacity {
            capacity,
            allocated,
            reserved: 0.0,
            free: capacity - allocated,
        };
        cap.pool.insert("cpu".into(), rc(8.0, 2.0));
        cap.pool.insert("gpu".into(), rc(2.0, 2.0));
        let b = bottleneck(&cap).unwrap();
        assert_eq!(b.resource, "gpu");
        assert_eq!(b.utilisation, 1.0);
        assert_eq!(bottleneck(&CapacityStatus::default()), None);
    }

    #[test]
    fn kinds_are_ranked_from_task_histories() {
        let flows = vec![
            json!({"tasks": {
                "a": {"spec": {"kind": "fast"}, "history": [{"started_ms": 100, "ended_ms": 110}]},
                "b": {"spec": {"kind": "slow"}, "history": [{"started_ms": 100, "ended_ms": 900},
                                                          {"started_ms": 1000, "ended_ms": 1500}]},
                "c": {"spec": {"kind": "old"}, "history": [{"started_ms": 0, "ended_ms": 50}]},
                "d": {"spec": {}, "state": "ready"}
            }}),
            json!("garbage"),
        ];
        let r = slowest_kinds(&flows, 60);
        assert_eq!(
            r.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["slow", "fast"]
        );
        assert_eq!(r[0].runs, 2);
        assert!(r[0].p99_ms >= 795, "{r:?}");
    }
}
