//! The monitor's answers as text: the performance analysis and the health
//! verdict with its per-service table.

use super::{table, wire_name};

pub(super) fn analysis_text(a: &common::msg::PerformanceAnalysis) -> String {
    let mut out = match &a.bottleneck {
        Some(b) => format!(
            "bottleneck: {} at {:.0}% ({} free)",
            b.resource,
            b.utilisation * 100.0,
            b.free
        ),
        None => "bottleneck: none known".to_owned(),
    };
    let trends = a
        .trends
        .iter()
        .map(|t| {
            vec![
                t.series.clone(),
                t.direction.clone(),
                format!("{:.2}", t.current),
                format!("{:.2}", t.previous),
                t.change
                    .map(|c| format!("{:+.0}%", c * 100.0))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str("\n\ntrends (per second, this minute and the one before)\n");
    out.push_str(&table(
        &["series", "direction", "now", "before", "change"],
        trends,
    ));
    for (what, list) in [
        ("agents", &a.slowest_agents),
        ("task kinds", &a.slowest_kinds),
        ("flows", &a.slowest_flows),
    ] {
        let rows = list
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.runs.to_string(),
                    s.p50_ms.to_string(),
                    s.p99_ms.to_string(),
                ]
            })
            .collect();
        out.push_str(&format!("\n\nslowest {what} (last hour)\n"));
        out.push_str(&table(&["name", "runs", "p50 ms", "p99 ms"], rows));
    }
    for note in &a.notes {
        out.push_str(&format!("\nnote: {note}"));
    }
    out
}

pub(super) fn health_text(h: &common::msg::HealthStatus) -> String {
    let rows = h
        .services
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.replicas.to_string(),
                s.requests.to_string(),
                s.errors.to_string(),
                s.failures.to_string(),
                format!("{}/{}", s.recent_failures, s.recent_requests),
                format!("{:.2}", s.average_processing_ms),
            ]
        })
        .collect();
    let findings: String = h.findings.iter().map(|f| format!("note: {f}\n")).collect();
    format!(
        "{}{}\n{findings}{}",
        wire_name(&h.verdict),
        if h.reasons.is_empty() {
            String::new()
        } else {
            format!(": {}", h.reasons.join("; "))
        },
        table(
            &[
                "service",
                "replicas",
                "requests",
                "errors",
                "failures",
                "failed/5 min",
                "avg ms"
            ],
            rows
        )
    )
}
