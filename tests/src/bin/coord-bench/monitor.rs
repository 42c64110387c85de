//! The monitor's ingest over NATS: a child process runs only the monitor
//! while the driver publishes at rising rates and reads what it counted.

use super::*;

/// Set in the child process that runs only the monitor, to the server's URL.
pub(crate) const MONITOR_CHILD: &str = "COORD_BENCH_MONITOR_CHILD";

/// The child: the monitor, alone, until the driver kills it.
pub(crate) async fn monitor_child(url: String) -> anyhow::Result<()> {
    let mut cfg = monitor::Config::new(NatsConfig::new(url));
    cfg.http_addr = "127.0.0.1:0".into();
    monitor::run(cfg, std::future::pending::<()>()).await
}

/// Kills the monitor's process when the run ends, however it ends.
pub(crate) struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident and peak resident memory of a process, in KiB.
pub(crate) fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Message `i` of the monitor's diet: a third task transition events of ever
/// new tasks (ready → assigned → running → succeeded; every 50th never
/// finishes), the rest heartbeats and `started` reports of 1,000 agents.
pub(crate) fn ingest_message(run_id: u64, i: u64) -> anyhow::Result<(String, Vec<u8>)> {
    use common::msg::{AgentReport, Heartbeat, ReportKind, TaskState};
    let agent = AgentId::new(format!("ingest-{}", i % 1_000))?;
    let n = i / 12;
    let flow_id = FlowId::new(format!("ingest-{run_id}-{}", n / 10))?;
    let task_id = TaskId::new(format!("t{n}"))?;
    Ok(match i % 3 {
        0 => {
            let (from, to) = match (i / 3) % 4 {
                0 => (TaskState::Blocked, TaskState::Ready),
                1 => (TaskState::Ready, TaskState::Assigned),
                2 => (TaskState::Assigned, TaskState::Running),
                _ if n % 50 == 0 => (TaskState::Running, TaskState::Running),
                _ => (TaskState::Running, TaskState::Succeeded),
            };
            let event = Event {
                event_id: format!("ingest-{run_id}-{i}"),
                at_ms: common::now_ms(),
                source: "coord-bench".into(),
                kind: EventKind::TaskTransition {
                    flow_id,
                    task_id,
                    from,
                    to,
                    attempt: 1,
                    agent_id: Some(agent),
                    reason: None,
                    timeout_ms: None,
                    task_kind: None,
                },
            };
            (event.kind.subject().to_owned(), serde_json::to_vec(&event)?)
        }
        1 => {
            let beat = Heartbeat {
                agent_id: agent.clone(),
                at_ms: common::now_ms(),
                running: 1,
            };
            (subject::heartbeat(&agent), serde_json::to_vec(&beat)?)
        }
        _ => {
            let report = AgentReport {
                flow_id,
                task_id,
                attempt: 1,
                agent_id: agent.clone(),
                kind: ReportKind::Started,
                at_ms: common::now_ms(),
            };
            (subject::report(&agent), serde_json::to_vec(&report)?)
        }
    })
}

/// The messages of ours the monitor has counted, from its metrics.
pub(crate) async fn monitor_counted(
    client: &common::Client,
    families: &HashSet<String>,
) -> Option<u64> {
    let m = client.metrics().await.ok()?;
    Some(
        m.messages_by_subject
            .iter()
            .filter(|(f, _)| families.contains(*f))
            .map(|(_, n)| n)
            .sum(),
    )
}

/// Steps of sustained traffic at the monitor: per step, what was published,
/// what the monitor and a plain subscriber counted, and the monitor's memory.
pub(crate) async fn monitor_ingest(url: &str, args: &Args) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let run_id = common::now_ms();
    let exe = std::env::current_exe().context("failed to find coord-bench itself")?;
    let mut command = std::process::Command::new(exe);
    command
        .env(MONITOR_CHILD, url)
        .env("RUST_LOG", "error")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let child = testkit::spawn_tied(command).context("failed to start the monitor's process")?;
    let child = ChildGuard(child);
    let pid = child.0.id();
    let publisher = async_nats::connect(url).await?;
    testkit::wait_for_service(&publisher, "monitor").await;
    let client = common::Client::new(publisher.clone()).with_timeout(Duration::from_secs(30));

    // Enough messages to see every subject the diet uses (a task's last
    // transition is `succeeded` except for every 50th).
    let families: HashSet<String> = (0..1_200)
        .map(|i| ingest_message(run_id, i).map(|(s, _)| subject::family(&s)))
        .collect::<anyhow::Result<_>>()?;
    // The bus's own limit for the same pattern: a plain subscriber to
    // everything, on a connection of its own, counting our messages.
    let listener = async_nats::connect(url).await?;
    let mut all = listener.subscribe(subject::ALL).await?;
    listener.flush().await?;
    let plain = Arc::new(AtomicU64::new(0));
    let counter = plain.clone();
    let fams = families.clone();
    let plain_task = tokio::spawn(async move {
        while let Some(msg) = all.next().await {
            if fams.contains(&subject::family(&msg.subject)) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    let (rss, _) = memory_kib(pid);
    println!(
        "coord-bench monitor: {url}, monitor pid {pid} ({} MiB at rest), {} s per step",
        rss / 1024,
        args.monitor_seconds
    );
    println!();
    println!("| offered msg/s | published | sent msg/s | counted by the monitor | kept | plain subscriber kept | monitor RSS MiB after | monitor peak RSS MiB |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut next = 0u64;
    let mut sustained = None;
    for &rate in &args.monitor_rates {
        let before = monitor_counted(&client, &families)
            .await
            .context("the monitor did not answer a metrics request")?;
        let plain_before = plain.load(Ordering::Relaxed);
        let total = rate * args.monitor_seconds;
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut sent = 0u64;
        while sent < total {
            tick.tick().await;
            let due = ((started.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
            while sent < due {
                let (s, body) = ingest_message(run_id, next)?;
                publisher.publish(s, body.into()).await?;
                sent += 1;
                next += 1;
            }
        }
        publisher.flush().await?;
        let wall = started.elapsed();
        // Wait until the monitor's count stops moving (or has everything).
        let mut counted = before;
        let settle = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = monitor_counted(&client, &families).await.unwrap_or(counted);
            let done = now - before >= total
                || (now == counted && settle.elapsed() > Duration::from_secs(2));
            counted = now;
            if done || settle.elapsed() > Duration::from_secs(30) {
                break;
            }
        }
        let counted = counted - before;
        let plain_counted = plain.load(Ordering::Relaxed) - plain_before;
        let (rss, peak) = memory_kib(pid);
        let kept = 100.0 * counted as f64 / total as f64;
        if counted >= total {
            sustained = Some(total as f64 / wall.as_secs_f64());
        }
        println!(
            "| {rate} | {total} | {:.0} | {counted} | {kept:.2} % | {:.2} % | {} | {} |",
            total as f64 / wall.as_secs_f64(),
            100.0 * plain_counted as f64 / total as f64,
            rss / 1024,
            peak / 1024,
        );
    }
    println!();
    println!("messages published in all: {next}");
    match sustained {
        Some(r) => println!("highest rate the monitor counted in full: {r:.0} msg/s"),
        None => println!("the monitor lost messages at every rate"),
    }
    plain_task.abort();
    drop(child);
    Ok(())
}
