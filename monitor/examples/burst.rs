//! Memory and ingest rate of the monitor's core over a burst of messages.
//!
//! Feeds `--messages` (default 1,000,000) messages through
//! [`monitor::machine::Monitor::observe`]: a third are task transition events
//! for ever new tasks (ready → assigned → running → succeeded, some never
//! finishing), the rest heartbeats and reports of 1,000 agents. Prints the
//! resident set size after the first tenth and at the end, and the rate.
//!
//! `cargo run --release -p monitor --example burst`

// A measurement tool: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use common::msg::{Event, EventKind, TaskState};
use common::{AgentId, FlowId, TaskId};
use monitor::machine::{Monitor, Settings};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn message(i: u64) -> (String, Vec<u8>) {
    let agent = format!("w{}", i % 1_000);
    match i % 3 {
        0 => {
            // Task n goes through 4 transitions over 4 consecutive event slots;
            // every 50th never finishes (it stays tracked until evicted).
            let n = i / 12;
            let step = (i / 3) % 4;
            let to = match step {
                0 => TaskState::Ready,
                1 => TaskState::Assigned,
                2 => TaskState::Running,
                _ if n % 50 == 0 => TaskState::Running,
                _ => TaskState::Succeeded,
            };
            let kind = EventKind::TaskTransition {
                flow_id: FlowId::new(format!("f{}", n / 10)).unwrap(),
                task_id: TaskId::new(format!("t{n}")).unwrap(),
                from: TaskState::Blocked,
                to,
                attempt: 1,
                agent_id: Some(AgentId::new(&agent).unwrap()),
                reason: None,
                timeout_ms: None,
                task_kind: None,
            };
            let ev = Event {
                event_id: format!("e{i}"),
                at_ms: i / 10,
                source: "burst".into(),
                kind,
            };
            (ev.kind.subject().to_owned(), serde_json::to_vec(&ev).unwrap())
        }
        1 => (
            format!("coord.agents.{agent}.heartbeat"),
            format!(r#"{{"agent_id":"{agent}"}}"#).into_bytes(),
        ),
        _ => (
            format!("coord.agents.{agent}.report"),
            format!(r#"{{"agent_id":"{agent}","flow_id":"f","task_id":"t","attempt":1,"status":"running"}}"#)
                .into_bytes(),
        ),
    }
}

fn main() {
    let total: u64 = std::env::args()
        .skip_while(|a| a != "--messages")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut m = Monitor::new(0, "burst", Settings::default());
    let started = Instant::now();
    let mut at_tenth = 0;
    let mut gen_time = std::time::Duration::ZERO;
    for i in 0..total {
        let g = Instant::now();
        let (subject, payload) = message(i);
        gen_time += g.elapsed();
        // Ten messages per simulated millisecond: 1M messages span ~100 s of windows.
        m.observe(&subject, &payload, i / 10);
        if i % 10_000 == 0 {
            m.tick(i / 10);
        }
        if i + 1 == total / 10 {
            at_tenth = rss_kib();
        }
    }
    let elapsed = started.elapsed();
    let observe = elapsed.saturating_sub(gen_time);
    let end = rss_kib();
    let x = m.metrics(total / 10);
    println!("messages:            {total}");
    println!("tasks tracked (cap): {}", x.tasks_tracked);
    println!("RSS after 10%:       {} MiB", at_tenth / 1024);
    println!("RSS at the end:      {} MiB", end / 1024);
    println!(
        "ingest (observe only): {:.0} messages/s ({:.2} s; generating the JSON took {:.2} s more)",
        total as f64 / observe.as_secs_f64(),
        observe.as_secs_f64(),
        gen_time.as_secs_f64()
    );
}
