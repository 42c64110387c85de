//! Health from what the services and the server say about themselves: the
//! `$SRV.PING` / `$SRV.STATS` answers of every replica, the JetStream stream and
//! consumer infos, and the NATS server's monitoring endpoint.

use std::collections::BTreeMap;

use common::msg::{ServiceHealth, StreamHealth, Verdict};
use serde_json::Value;

/// Services that must answer for the system to work.
pub const REQUIRED: [&str; 4] = ["orchestrator", "allocator", "synchronizer", "monitor"];
/// Failures (not refusals: see [`common::ErrorCode::is_failure`]) above this
/// share of the requests of the last [`HEALTH_WINDOW_MS`](super::HEALTH_WINDOW_MS)
/// degrade a service…
pub const ERROR_SHARE: f64 = 0.1;
/// …once it has served at least this many in that window.
pub const ERROR_MIN_REQUESTS: u64 = 20;
/// Undelivered messages on a consumer that degrade health.
pub const PENDING_DEGRADED: u64 = 10_000;

/// Folds every replica's PING and STATS answers into one entry per service name.
pub fn services(pings: &[Value], stats: &[Value]) -> Vec<ServiceHealth> {
    let mut by: BTreeMap<String, ServiceHealth> = BTreeMap::new();
    let mut time_ns: BTreeMap<String, f64> = BTreeMap::new();
    for p in pings {
        if let Some(name) = p.get("name").and_then(Value::as_str) {
            let s = by.entry(name.to_owned()).or_default();
            s.name = name.to_owned();
            s.replicas += 1;
        }
    }
    for st in stats {
        let Some(name) = st.get("name").and_then(Value::as_str) else {
            continue;
        };
        let s = by.entry(name.to_owned()).or_default();
        s.name = name.to_owned();
        for e in st
            .get("endpoints")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let requests = e.get("num_requests").and_then(Value::as_u64).unwrap_or(0);
            let failures = e.get("num_errors").and_then(Value::as_u64).unwrap_or(0);
            // Every error reply, refusals included; a service that does not
            // say has at least its failures.
            let errors = e
                .pointer("/data/error_replies")
                .and_then(Value::as_u64)
                .unwrap_or(failures);
            s.requests += requests;
            s.errors += errors;
            s.failures += failures;
            for (code, n) in e
                .pointer("/data/errors_by_code")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                *s.errors_by_code.entry(code.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
            *time_ns.entry(name.to_owned()).or_default() += e
                .get("processing_time")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            if errors > 0 {
                let endpoint = e.get("name").and_then(Value::as_str).unwrap_or("?");
                *s.errors_by_endpoint.entry(endpoint.to_owned()).or_default() += errors;
            }
        }
    }
    for (name, s) in by.iter_mut() {
        if s.requests > 0 {
            s.average_processing_ms =
                time_ns.get(name).copied().unwrap_or(0.0) / 1e6 / s.requests as f64;
        }
    }
    by.into_values().collect()
}

/// Fills in each service's requests and failures over the recent window
/// (`(requests, failures)` per service name, from
/// [`Monitor::recent_requests`](super::Monitor::recent_requests)).
pub fn with_recent(services: &mut [ServiceHealth], recent: &BTreeMap<String, (u64, u64)>) {
    for s in services {
        let (requests, failures) = recent.get(&s.name).copied().unwrap_or_default();
        s.recent_requests = requests;
        s.recent_failures = failures;
    }
}

/// Findings that leave the verdict alone: saturated resources (`(resource,
/// share used)`). A full pool is the system working at capacity; the requests
/// it refuses are refusals, not failures.
pub fn findings(saturated: &[(String, f64)]) -> Vec<String> {
    saturated
        .iter()
        .map(|(r, used)| {
            format!(
                "pool saturated: {r} is {:.0}% used; work waits for capacity",
                used * 100.0
            )
        })
        .collect()
}

/// The verdict and the reasons for it.
///
/// A service is judged by its failures over the recent window
/// ([`with_recent`]), never by refusals or by what it did long ago.
/// `jetstream` is `Err` when stream infos could not be read; `nats_server` is
/// `Some(Err)` when a monitoring URL is configured but did not answer.
pub fn verdict(
    services: &[ServiceHealth],
    streams: &Result<Vec<StreamHealth>, String>,
    nats_server: Option<&Result<Value, String>>,
) -> (Verdict, Vec<String>) {
    let mut worst = Verdict::Healthy;
    let mut reasons = Vec::new();
    let mut note = |v: Verdict, r: String, worst: &mut Verdict| {
        *worst = (*worst).max(v);
        reasons.push(r);
    };
    for name in REQUIRED {
        let replicas = services
            .iter()
            .find(|s| s.name == name)
            .map_or(0, |s| s.replicas);
        if replicas == 0 {
            note(
                Verdict::Unhealthy,
                format!("no {name} answers $SRV.PING"),
                &mut worst,
            );
        }
    }
    for s in services {
        if s.recent_requests >= ERROR_MIN_REQUESTS
            && s.recent_failures as f64 > ERROR_SHARE * s.recent_requests as f64
        {
            note(
                Verdict::Degraded,
                format!(
                    "{}: {} of {} requests in the last {} minutes failed",
                    s.name,
                    s.recent_failures,
                    s.recent_requests,
                    super::HEALTH_WINDOW_MS / 60_000
                ),
                &mut worst,
            );
        }
    }
    match streams {
        Err(e) => note(Verdict::Unhealthy, format!("JetStream: {e}"), &mut worst),
        Ok(streams) => {
            for st in streams {
                for (c, pending) in &st.consumer_pending {
                    if *pending >= PENDING_DEGRADED {
                        note(
                            Verdict::Degraded,
                            format!("consumer {}/{c} has {pending} messages pending", st.name),
                            &mut worst,
                        );
                    }
                }
            }
        }
    }
    if let Some(Err(e)) = nats_server {
        note(
            Verdict::Degraded,
            format!("NATS server monitoring: {e}"),
            &mut worst,
        );
    }
    (worst, reasons)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ping(name: &str) -> Value {
        json!({"name": name, "id": "x"})
    }

    #[test]
    fn replicas_and_errors_are_summed_per_service() {
        let pings = [ping("allocator"), ping("allocator"), ping("monitor")];
        let stats = [
            json!({"name": "allocator", "endpoints": [
                {"name": "allocator-allocate", "num_requests": 10, "num_errors": 1, "processing_time": 20_000_000,
                 "data": {"error_replies": 4, "errors_by_code": {"no_capacity": 3, "internal": 1}}}]}),
            json!({"name": "allocator", "endpoints": [
                {"name": "allocator-allocate", "num_requests": 30, "processing_time": 20_000_000,
                 "data": {"error_replies": 1, "errors_by_code": {"no_capacity": 1}}}]}),
        ];
        let s = services(&pings, &stats);
        let a = s.iter().find(|s| s.name == "allocator").unwrap();
        assert_eq!(
            (a.replicas, a.requests, a.errors, a.failures),
            (2, 40, 5, 1)
        );
        assert_eq!(a.errors_by_endpoint["allocator-allocate"], 5);
        assert_eq!(a.errors_by_code["no_capacity"], 4);
        assert!((a.average_processing_ms - 1.0).abs() < 1e-9);
    }

    #[test]
    fn verdicts_name_their_reasons() {
        let all: Vec<Value> = REQUIRED.iter().map(|n| ping(n)).collect();
        let ok = services(&all, &[]);
        assert_eq!(verdict(&ok, &Ok(vec![]), None), (Verdict::Healthy, vec![]));

        let (v, r) = verdict(&services(&all[1..], &[]), &Ok(vec![]), None);
        assert_eq!(v, Verdict::Unhealthy);
        assert_eq!(r, vec!["no orchestrator answers $SRV.PING".to_owned()]);

        let mut lagging = StreamHealth {
            name: "S".into(),
            ..Default::default()
        };
        lagging
            .consumer_pending
            .insert("c".into(), PENDING_DEGRADED);
        let (v, r) = verdict(&ok, &Ok(vec![lagging]), Some(&Err("refused".into())));
        assert_eq!(v, Verdict::Degraded);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(
            verdict(&ok, &Err("down".into()), None).0,
            Verdict::Unhealthy
        );
    }

    #[test]
    fn only_recent_failures_degrade_and_refusals_never_do() {
        let all: Vec<Value> = REQUIRED.iter().map(|n| ping(n)).collect();
        // 100 no_capacity refusals since start, no failure.
        let stats = [json!({"name": "allocator", "endpoints": [
            {"name": "allocator-allocate", "num_requests": 100, "num_errors": 0,
             "data": {"error_replies": 100, "errors_by_code": {"no_capacity": 100}}}]})];
        let mut s = services(&all, &stats);
        let recent = BTreeMap::from([("allocator".to_owned(), (100, 0))]);
        with_recent(&mut s, &recent);
        assert_eq!(verdict(&s, &Ok(vec![]), None).0, Verdict::Healthy);

        // Failures long ago (outside the window) count for nothing either.
        with_recent(&mut s, &BTreeMap::new());
        assert_eq!(verdict(&s, &Ok(vec![]), None).0, Verdict::Healthy);

        let recent = BTreeMap::from([("allocator".to_owned(), (40, 5))]);
        with_recent(&mut s, &recent);
        let (v, r) = verdict(&s, &Ok(vec![]), None);
        assert_eq!(v, Verdict::Degraded);
        assert!(r[0].contains("5 of 40"), "{r:?}");

        assert_eq!(
            findings(&[("cpu".to_owned(), 1.0)]),
            vec!["pool saturated: cpu is 100% used; work waits for capacity".to_owned()]
        );
    }
}
