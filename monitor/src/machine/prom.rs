//! Prometheus text exposition (format 0.0.4) of the monitor's metrics, and a
//! strict reader of that format used to check it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

use common::msg::{SystemMetrics, Verdict};

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(
            self.0,
            "# HELP {name} {}",
            help.replace('\\', "\\\\").replace('\n', "\\n")
        );
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            let body: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.0, "{{{}}}", body.join(","));
        }
        let _ = writeln!(self.0, " {}", number(v));
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], v);
    }
}

/// The exposition of `m`, the anomalies detected so far, and the last health verdict.
pub fn render(m: &SystemMetrics, anomalies_total: u64, verdict: Option<Verdict>) -> String {
    let mut o = Out(String::new());
    o.one(
        "coord_messages_total",
        "counter",
        "Messages on coord.> since the monitor started (requests as the services counted them).",
        m.messages_total as f64,
    );
    o.one(
        "coord_bytes_total",
        "counter",
        "Payload bytes of the coord.> messages other than requests since the monitor started.",
        m.bytes_total as f64,
    );
    o.family(
        "coord_subject_messages_total",
        "counter",
        "Messages per subject family (agent ids collapsed).",
    );
    for (f, n) in &m.messages_by_subject {
        o.sample("coord_subject_messages_total", &[("family", f)], *n as f64);
    }
    o.family(
        "coord_agent_events_total",
        "counter",
        "Agent events accepted per type since the monitor started (64 types, the rest as (other)).",
    );
    for (t, n) in &m.agent_events_by_type {
        o.sample("coord_agent_events_total", &[("type", t)], *n as f64);
    }
    o.family(
        "coord_subject_message_rate",
        "gauge",
        "Messages per second per subject family over a sliding window.",
    );
    for (f, r) in &m.message_rates {
        for (w, v) in [("1m", r.last_1m), ("15m", r.last_15m), ("1h", r.last_1h)] {
            o.sample(
                "coord_subject_message_rate",
                &[("family", f), ("window", w)],
                v,
            );
        }
    }
    o.family(
        "coord_task_rate",
        "gauge",
        "Tasks per second by outcome over a sliding window.",
    );
    for (k, r) in &m.task_rates {
        for (w, v) in [("1m", r.last_1m), ("15m", r.last_15m), ("1h", r.last_1h)] {
            o.sample("coord_task_rate", &[("outcome", k), ("window", w)], v);
        }
    }
    o.family(
        "coord_task_latency_ms",
        "gauge",
        "Task latency percentiles over the last hour, in milliseconds.",
    );
    for (k, l) in &m.latency {
        for (q, v) in [
            ("0.5", l.p50_ms),
            ("0.9", l.p90_ms),
            ("0.99", l.p99_ms),
            ("1", l.max_ms),
        ] {
            o.sample(
                "coord_task_latency_ms",
                &[("measure", k), ("quantile", q)],
                v as f64,
            );
        }
    }
    o.family(
        "coord_task_latency_samples",
        "gauge",
        "Task latency samples over the last hour.",
    );
    for (k, l) in &m.latency {
        o.sample(
            "coord_task_latency_samples",
            &[("measure", k)],
            l.count as f64,
        );
    }
    o.one(
        "coord_flows_created_total",
        "counter",
        "Flows created.",
        m.flows_created as f64,
    );
    o.one(
        "coord_flows_completed_total",
        "counter",
        "Flows that reached a final state (again, after a re-run).",
        m.flows_completed as f64,
    );
    o.one(
        "coord_flows_rerun_total",
        "counter",
        "Re-runs of a flow's tasks.",
        m.flows_rerun as f64,
    );
    o.family(
        "coord_tasks_total",
        "counter",
        "Task transitions by target state.",
    );
    for (k, v) in [
        ("assigned", m.tasks_assigned),
        ("succeeded", m.tasks_completed),
        ("failed", m.tasks_failed),
    ] {
        o.sample("coord_tasks_total", &[("state", k)], v as f64);
    }
    o.one(
        "coord_agents_online",
        "gauge",
        "Agents registered and not lost or deregistered.",
        m.agents_online as f64,
    );
    o.one(
        "coord_agents_lost_total",
        "counter",
        "Agents declared lost.",
        m.agents_lost as f64,
    );
    o.one(
        "coord_allocation_failures_total",
        "counter",
        "Allocation requests answered with an error.",
        m.allocation_failures as f64,
    );
    o.one(
        "coord_state_conflicts_total",
        "counter",
        "State writes from a stale revision.",
        m.state_conflicts as f64,
    );
    o.one(
        "coord_sync_points_total",
        "counter",
        "Sync points initiated.",
        m.sync_points as f64,
    );
    o.one(
        "coord_tasks_tracked",
        "gauge",
        "Task attempts being timed by the monitor.",
        m.tasks_tracked as f64,
    );
    o.one(
        "coord_queue_depth",
        "gauge",
        "Assignments stored for agents and not yet delivered.",
        m.queue_depth as f64,
    );
    o.family(
        "coord_agent_queue_depth",
        "gauge",
        "Assignments waiting for one agent (agents with any waiting).",
    );
    for (agent, n) in &m.queue_depth_by_agent {
        o.sample("coord_agent_queue_depth", &[("agent", agent)], *n as f64);
    }
    o.one(
        "coord_anomalies_total",
        "counter",
        "Anomalies detected.",
        anomalies_total as f64,
    );
    if let Some(v) = verdict {
        o.family(
            "coord_health",
            "gauge",
            "1 for the current health verdict, 0 for the others.",
        );
        for (name, x) in [
            ("healthy", Verdict::Healthy),
            ("degraded", Verdict::Degraded),
            ("unhealthy", Verdict::Unhealthy),
        ] {
            o.sample(
                "coord_health",
                &[("verdict", name)],
                if v == x { 1.0 } else { 0.0 },
            );
        }
    }
    o.0
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// One sample: metric name and labels, sorted.
pub type SampleKey = (String, BTreeMap<String, String>);

/// Reads an exposition strictly: every sample belongs to a family declared by
/// `# TYPE` before it, families are contiguous and declared once, names and
/// label names are valid, label values are properly quoted and escaped, values
/// are numbers, and no sample repeats.
pub fn parse(text: &str) -> Result<BTreeMap<SampleKey, f64>, String> {
    let mut out = BTreeMap::new();
    let mut declared: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name) {
                        return Err(at("bad metric name"));
                    }
                    if !matches!(
                        kind,
                        "counter" | "gauge" | "summary" | "histogram" | "untyped"
                    ) {
                        return Err(at("bad type"));
                    }
                    if !declared.insert(name.to_owned()) {
                        return Err(at("family declared twice"));
                    }
                    current = Some(name.to_owned());
                }
                (Some("HELP"), Some(name), _) if valid_name(name) => {}
                _ => return Err(at("bad comment")),
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(p) => line.split_at(p),
            None => return Err(at("no value")),
        };
        if !valid_name(name) {
            return Err(at("bad metric name"));
        }
        let family = current
            .as_deref()
            .ok_or_else(|| at("sample before any TYPE"))?;
        if name != family
            && !["_sum", "_count", "_bucket"]
                .iter()
                .any(|s| name == format!("{family}{s}"))
        {
            return Err(at("sample outside its family"));
        }
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut end = None;
            loop {
                let start = match chars.peek() {
                    Some((_, '}')) => {
                        end = chars.next().map(|(p, _)| p);
                        break;
                    }
                    Some((p, _)) => *p,
                    None => break,
                };
                let eq = body[start..]
                    .find('=')
                    .ok_or_else(|| at("label without ="))?
                    + start;
                let lname = &body[start..eq];
                if !valid_name(lname) || lname.contains(':') {
                    return Err(at("bad label name"));
                }
                while chars.peek().is_some_and(|(p, _)| *p <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(at("label value not quoted"));
                }
                let mut value = String::new();
                loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => return Err(at("bad escape")),
                        },
                        Some((_, '"')) => break,
                        Some((_, '\n')) | None => return Err(at("unterminated label value")),
                        Some((_, c)) => value.push(c),
                    }
                }
                if labels.insert(lname.to_owned(), value).is_some() {
                    return Err(at("label repeated"));
                }
                match chars.peek() {
                    Some((_, ',')) => {
                        chars.next();
                    }
                    Some((_, '}')) => {}
                    _ => return Err(at("expected , or }")),
                }
            }
            let end = end.ok_or_else(|| at("unterminated labels"))?;
            rest = &body[end + 1..];
        }
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| at("no space before value"))?;
        let value = value.split(' ').next().unwrap_or("");
        let v = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            s => s.parse::<f64>().map_err(|_| at("value is not a number"))?,
        };
        if out.insert((name.to_owned(), labels), v).is_some() {
            return Err(at("sample repeated"));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::msg::{LatencySummary, WindowRates};

    #[test]
    fn the_rendering_reads_back_strictly() {
        let mut m = SystemMetrics {
            messages_total: 7,
            ..Default::default()
        };
        m.messages_by_subject
            .insert("coord.weird\"fam\\ily\nx".into(), 3);
        m.message_rates.insert(
            "coord.a".into(),
            WindowRates {
                last_1m: 0.5,
                ..Default::default()
            },
        );
        m.latency.insert(
            "run_time".into(),
            LatencySummary {
                count: 2,
                p50_ms: 10,
                p90_ms: 20,
                p99_ms: 30,
                max_ms: 31,
            },
        );
        let text = render(&m, 4, Some(Verdict::Degraded));
        let parsed = parse(&text).unwrap();
        let get = |name: &str, labels: &[(&str, &str)]| {
            let l = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            parsed[&(name.to_owned(), l)]
        };
        assert_eq!(get("coord_messages_total", &[]), 7.0);
        assert_eq!(
            get(
                "coord_subject_messages_total",
                &[("family", "coord.weird\"fam\\ily\nx")]
            ),
            3.0
        );
        assert_eq!(
            get(
                "coord_subject_message_rate",
                &[("family", "coord.a"), ("window", "1m")]
            ),
            0.5
        );
        assert_eq!(
            get(
                "coord_task_latency_ms",
                &[("measure", "run_time"), ("quantile", "0.99")]
            ),
            30.0
        );
        assert_eq!(get("coord_anomalies_total", &[]), 4.0);
        assert_eq!(get("coord_health", &[("verdict", "degraded")]), 1.0);
    }

    #[test]
    fn the_reader_rejects_malformed_text() {
        for bad in [
            "x 1",
            "# TYPE x counter\ny 1",
            "# TYPE x counter\nx{a=\"1} 1",
            "# TYPE x counter\nx{a=1} 1",
            "# TYPE x counter\nx one",
            "# TYPE x counter\nx 1\nx 2",
            "# TYPE x counter\n# TYPE x counter",
            "# TYPE 1x counter",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
