//! The Prometheus exposition of the monitor's metrics (text format 0.0.4),
//! written by `prometheus-client` from one [`Exposition`] snapshot.
//!
//! Conventions: base units (`_seconds`, `_bytes`), counters end in `_total`
//! and count since the monitor started (`rate()` makes them rates), latencies
//! are histograms with fixed buckets, and every label takes values from a
//! bounded set — states, kinds, error codes, services, endpoints, subject
//! families with their ids collapsed, resource names — never a flow, task or
//! agent id: per-flow and per-agent detail is the JSON API's.

use std::collections::BTreeMap;

use common::msg::Verdict;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::latency::{Buckets, BUCKETS_SECONDS};
use super::Exposition;

/// The `Content-Type` of [`render`]'s output.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What the adapter knows beyond the machine: the last health verdict, the
/// replicas each service had then, and the monitor's own NATS connection.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub verdict: Option<Verdict>,
    pub replicas: BTreeMap<String, u64>,
    pub nats_connected: bool,
    pub version: String,
}

#[derive(Debug)]
struct Snapshot {
    e: Exposition,
    s: Status,
}

type Labels = Vec<(&'static str, String)>;

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in samples {
        if labels.is_empty() {
            m.encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        } else {
            m.encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: impl IntoIterator<Item = (Labels, V)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in samples {
        if labels.is_empty() {
            m.encode_gauge(&v)?;
        } else {
            m.encode_family(&labels)?.encode_gauge(&v)?;
        }
    }
    Ok(())
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    b: &Buckets,
) -> Result<(), std::fmt::Error> {
    let buckets: Vec<(f64, u64)> = BUCKETS_SECONDS
        .iter()
        .copied()
        .chain([f64::INFINITY])
        .zip(b.counts.iter().copied())
        .collect();
    enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(b.sum_seconds, b.count, &buckets, None)
}

fn one<V>(v: V) -> [(Labels, V); 1] {
    [(Vec::new(), v)]
}

fn by<'a, V: Copy + 'a, K: ToString + 'a>(
    label: &'static str,
    m: impl IntoIterator<Item = (&'a K, &'a V)> + 'a,
) -> impl Iterator<Item = (Labels, V)> + 'a {
    m.into_iter()
        .map(move |(k, v)| (vec![(label, k.to_string())], *v))
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (e, s, m) = (&self.e, &self.s, &self.e.metrics);
        let enc = &mut enc;
        enc.encode_descriptor(
            "coord_build",
            "The monitor's build; always 1.",
            None,
            MetricType::Info,
        )?
        .encode_info(&vec![("version", s.version.clone())])?;
        gauge(
            enc,
            "coord_nats_connected",
            "1 while the monitor is connected to NATS.",
            None,
            one(u64::from(s.nats_connected)),
        )?;
        counter(
            enc,
            "coord_messages",
            "Messages on coord.> since the monitor started (requests as the services counted them).",
            None,
            one(m.messages_total),
        )?;
        counter(
            enc,
            "coord_message",
            "Payload bytes of the coord.> messages other than requests since the monitor started.",
            Some(&Unit::Bytes),
            one(m.bytes_total),
        )?;
        counter(
            enc,
            "coord_subject_messages",
            "Messages per subject family (agent, flow and scope ids collapsed to *).",
            None,
            by("family", &m.messages_by_subject),
        )?;
        counter(
            enc,
            "coord_agent_events",
            "Agent events accepted per type (64 types, the rest as (other)).",
            None,
            by("type", &m.agent_events_by_type),
        )?;
        counter(
            enc,
            "coord_requests",
            "Requests each service endpoint took, from every replica's $SRV.STATS.",
            None,
            e.endpoints.iter().map(|((svc, ep), c)| {
                (
                    vec![("service", svc.clone()), ("endpoint", ep.clone())],
                    c.requests,
                )
            }),
        )?;
        counter(
            enc,
            "coord_request_errors",
            "Error replies per service endpoint and error code; internal, unavailable, timeout and unknown are failures, the other codes refusals or bad input.",
            None,
            e.endpoints.iter().flat_map(|((svc, ep), c)| {
                c.errors_by_code.iter().map(move |(code, n)| {
                    (
                        vec![
                            ("service", svc.clone()),
                            ("endpoint", ep.clone()),
                            ("code", (*code).to_owned()),
                        ],
                        *n,
                    )
                })
            }),
        )?;
        counter(
            enc,
            "coord_request_failures",
            "Failures per service endpoint ($SRV.STATS num_errors): the service could not do what it should have.",
            None,
            e.endpoints.iter().map(|((svc, ep), c)| {
                (
                    vec![("service", svc.clone()), ("endpoint", ep.clone())],
                    c.failures,
                )
            }),
        )?;
        gauge(
            enc,
            "coord_service_replicas",
            "Instances of each service that answered $SRV.PING at the last health check.",
            None,
            by("service", &s.replicas),
        )?;
        histogram(
            enc,
            "coord_task_queue_wait",
            "Time from a task's assignment to its start.",
            &e.queue_wait,
        )?;
        histogram(
            enc,
            "coord_task_run",
            "Time from a task's start to its final state.",
            &e.run_time,
        )?;
        histogram(
            enc,
            "coord_task_end_to_end",
            "Time from a task becoming ready to its final state.",
            &e.end_to_end,
        )?;
        counter(
            enc,
            "coord_task_transitions",
            "Task transitions by the state entered.",
            None,
            by("state", &e.transitions),
        )?;
        gauge(
            enc,
            "coord_tasks",
            "Tasks not yet final, by state (those the monitor has seen move).",
            None,
            by("state", &e.tasks),
        )?;
        counter(
            enc,
            "coord_flows_created",
            "Flows created.",
            None,
            one(m.flows_created),
        )?;
        counter(
            enc,
            "coord_flows_completed",
            "Flows that reached a final state (again, after a re-run), by that state.",
            None,
            by("state", &e.flows_completed),
        )?;
        counter(
            enc,
            "coord_flow_reruns",
            "Re-runs of a flow's tasks.",
            None,
            one(m.flows_rerun),
        )?;
        gauge(
            enc,
            "coord_flows",
            "Flows created and not yet final, by state (those the monitor saw created).",
            None,
            by("state", &e.flows),
        )?;
        gauge(
            enc,
            "coord_agents",
            "Agents by status (active, draining, lost, left), as the allocator last reported.",
            None,
            by("state", &e.agents),
        )?;
        counter(
            enc,
            "coord_agents_lost",
            "Agents declared lost.",
            None,
            one(m.agents_lost),
        )?;
        counter(
            enc,
            "coord_state_conflicts",
            "State writes from a stale revision.",
            None,
            one(m.state_conflicts),
        )?;
        counter(
            enc,
            "coord_sync_points",
            "Sync points initiated.",
            None,
            one(m.sync_points),
        )?;
        gauge(
            enc,
            "coord_tasks_tracked",
            "Task attempts being timed by the monitor.",
            None,
            one(m.tasks_tracked as u64),
        )?;
        gauge(
            enc,
            "coord_queue_depth",
            "Assignments sent to agents and not yet started.",
            None,
            one(m.queue_depth),
        )?;
        gauge(
            enc,
            "coord_pool_used_ratio",
            "Share of each pool resource allocated or reserved, 0 to 1.",
            None,
            by("resource", &e.pool_used),
        )?;
        counter(
            enc,
            "coord_anomalies",
            "Anomalies detected, by kind.",
            None,
            by("kind", &e.anomalies),
        )?;
        if let Some(v) = s.verdict {
            gauge(
                enc,
                "coord_health",
                "1 for the current health verdict, 0 for the others.",
                None,
                [
                    ("healthy", Verdict::Healthy),
                    ("degraded", Verdict::Degraded),
                    ("unhealthy", Verdict::Unhealthy),
                ]
                .map(|(name, x)| (vec![("verdict", name.to_owned())], u64::from(v == x))),
            )?;
        }
        Ok(())
    }
}

/// The exposition of `e` and `s`.
pub fn render(e: Exposition, s: Status) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot { e, s }));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample written exactly as `series` (name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn the_rendering_follows_the_conventions() {
        let mut e = Exposition::default();
        e.metrics.messages_total = 7;
        e.metrics
            .messages_by_subject
            .insert("coord.weird\"fam\\ily\nx".into(), 3);
        e.run_time.record(1_500);
        e.transitions.insert("succeeded", 2);
        let mut c = super::super::requests::Counts {
            requests: 9,
            failures: 1,
            ..Default::default()
        };
        c.errors_by_code.insert("no_capacity", 4);
        e.endpoints
            .insert(("allocator".into(), "allocator-allocate".into()), c);
        let text = render(
            e,
            Status {
                verdict: Some(Verdict::Degraded),
                version: "1.2.3".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(sample(&text, "coord_messages_total"), Some(7.0));
        assert_eq!(
            sample(
                &text,
                r#"coord_subject_messages_total{family="coord.weird\"fam\\ily\nx"}"#
            ),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, r#"coord_task_run_seconds_bucket{le="2.5"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"coord_task_run_seconds_bucket{le="1"}"#),
            Some(0.0),
            "{text}"
        );
        assert_eq!(sample(&text, "coord_task_run_seconds_sum"), Some(1.5));
        assert_eq!(
            sample(
                &text,
                r#"coord_request_errors_total{service="allocator",endpoint="allocator-allocate",code="no_capacity"}"#
            ),
            Some(4.0)
        );
        assert_eq!(
            sample(&text, r#"coord_build_info{version="1.2.3"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"coord_health{verdict="degraded"}"#),
            Some(1.0)
        );
        assert!(!text.contains("quantile"), "{text}");
        assert!(!text.contains("_ms"), "{text}");
    }
}
