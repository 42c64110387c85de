//! The `dispatch` and `baseline` scenarios: the raw JetStream round, then
//! the system's rounds (pipelined and one at a time) against the same server,
//! printed as one table with every figure as a ratio of the baseline's.

use std::time::{Duration, Instant};

use anyhow::Context;
use common::FlowId;

use super::{
    baseline, completion_events, completions, dispatch_pipelined, flow_spec, ms, round, Args,
    Round, Scenario, System,
};

pub(crate) fn setting_name(fsync: bool) -> &'static str {
    if fsync {
        "fsync always (`sync_interval: always`, the shipped setting)"
    } else {
        "page cache (the server's default background flush)"
    }
}

/// The baseline, then (for `dispatch`) the system's rounds, against the
/// server at `url`; prints their table, `--repeat` times, then the medians.
pub(crate) async fn dispatch_on(args: &Args, url: &str) -> anyhow::Result<()> {
    let nats = async_nats::connect(url)
        .await
        .with_context(|| format!("failed to connect to {url}"))?;
    println!(
        "coord-bench: {url}, {} agents, {} orchestrator replica(s), {} tasks in {} flows, {} serial",
        args.agents, args.orchestrators, args.tasks, args.flows, args.serial
    );
    let times = args.repeat.max(1);
    let mut runs = Vec::with_capacity(times);
    for n in 1..=times {
        if times > 1 {
            println!("\nrun {n} of {times}");
        }
        let rounds = rounds_on(&nats, args, url).await?;
        print_table(&rounds);
        runs.push(rounds);
    }
    if times > 1 && args.scenario == Scenario::Dispatch {
        print_medians(&runs);
    }
    Ok(())
}

/// One run: the baseline's two rounds, then (for `dispatch`) the system's
/// two, on services started for it and stopped after.
async fn rounds_on(
    nats: &async_nats::Client,
    args: &Args,
    url: &str,
) -> anyhow::Result<Vec<Round>> {
    let run_id = common::now_ms();
    let limit = Duration::from_secs(args.timeout_s);
    let mut rounds = Vec::new();
    let (base_pipe, base_serial) = baseline(nats, args, run_id, limit).await?;
    rounds.push(base_pipe);
    rounds.push(base_serial);

    if args.scenario == Scenario::Dispatch {
        let system = System::start(
            nats,
            url,
            args.orchestrators,
            args.agents,
            "",
            Duration::ZERO,
            limit,
        )
        .await?;
        let tag = format!("{run_id}-p");
        let js = async_nats::jetstream::new(nats.clone());
        let before = stored(&js).await?;
        let pipe = dispatch_pipelined(nats, args.tasks, args.flows, &tag, limit).await?;
        let after = stored(&js).await?;
        rounds.push(pipe);
        print_stored(&before, &after, args.tasks);
        let serial = dispatch_serial(nats, args, limit).await?;
        rounds.push(serial);
        system.stop(nats).await;
    }
    Ok(rounds)
}

/// The median, lowest and highest of each figure over the runs, the
/// ratios each taken within its own run.
fn print_medians(runs: &[Vec<Round>]) {
    let figure = |f: Figure| {
        let mut v: Vec<f64> = runs.iter().map(|r| f(r)).collect();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 0 {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        };
        (median, v[0], v[v.len() - 1])
    };
    fn p50(r: &Round) -> f64 {
        r.pct(0.50).as_secs_f64() * 1e3
    }
    type Figure = fn(&[Round]) -> f64;
    let rows: [(&str, Figure); 6] = [
        ("raw round, pipelined, tasks/s", |r| r[0].per_sec()),
        ("coordkit, pipelined, tasks/s", |r| r[2].per_sec()),
        ("pipelined, % of raw", |r| {
            100.0 * r[2].per_sec() / r[0].per_sec()
        }),
        ("raw round, one at a time, p50 ms", |r| p50(&r[1])),
        ("coordkit, one at a time, p50 ms", |r| p50(&r[3])),
        ("one at a time, p50 × raw", |r| {
            p50(&r[3]) / p50(&r[1]).max(1e-9)
        }),
    ];
    println!(
        "\n{} runs: the median of each figure, and its range\n",
        runs.len()
    );
    println!("| figure | median | lowest | highest |");
    println!("| --- | ---: | ---: | ---: |");
    for (name, f) in &rows {
        let (median, low, high) = figure(*f);
        println!("| {name} | {median:.2} | {low:.2} | {high:.2} |");
    }
}

/// Every stream's last sequence number (messages it ever stored) and
/// whether its writes wait for the disk.
async fn stored(
    js: &async_nats::jetstream::Context,
) -> anyhow::Result<std::collections::BTreeMap<String, (u64, bool)>> {
    use async_nats::jetstream::stream::{PersistenceMode, StorageType};
    use futures::StreamExt;
    let mut out = std::collections::BTreeMap::new();
    let mut streams = js.streams();
    while let Some(info) = streams.next().await {
        let info = info.context("failed to list streams")?;
        let durable = info.config.storage == StorageType::File
            && info.config.persist_mode != Some(PersistenceMode::Async);
        out.insert(info.config.name, (info.state.last_sequence, durable));
    }
    Ok(out)
}

/// The pipelined round's stored messages per task, by stream: the cost
/// model at this server's setting, where writes that wait together are
/// stored together.
fn print_stored(
    before: &std::collections::BTreeMap<String, (u64, bool)>,
    after: &std::collections::BTreeMap<String, (u64, bool)>,
    tasks: usize,
) {
    let per = |n: u64| n as f64 / tasks.max(1) as f64;
    let (mut all, mut disk) = (0, 0);
    let mut parts = Vec::new();
    for (name, (last, durable)) in after {
        let n = last - before.get(name).map_or(0, |(seq, _)| *seq);
        if n == 0 || name.starts_with("BENCH") {
            continue;
        }
        all += n;
        if *durable {
            disk += n;
        }
        let mark = if *durable { "" } else { " (async)" };
        parts.push(format!("{name} {:.2}{mark}", per(n)));
    }
    println!(
        "pipelined round, stored per task: {:.2} on the disk's path, {:.2} in all ({})",
        per(disk),
        per(all),
        parts.join(", ")
    );
}

fn print_table(rounds: &[Round]) {
    println!();
    println!("| round | tasks | wall s | tasks/s | p50 ms | p90 ms | p99 ms | max ms | tasks/s vs baseline | p99 vs baseline |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let base = |serial: bool| rounds.get(usize::from(serial));
    for (i, r) in rounds.iter().enumerate() {
        let serial = r.name.contains("one at a time");
        let (rate, p99) = match base(serial) {
            Some(b) if i >= 2 => (
                format!("{:.1} %", 100.0 * r.per_sec() / b.per_sec()),
                format!(
                    "{:.1}×",
                    r.pct(0.99).as_secs_f64() / b.pct(0.99).as_secs_f64().max(1e-9)
                ),
            ),
            _ => ("(baseline)".to_owned(), "(baseline)".to_owned()),
        };
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.tasks,
            r.wall.as_secs_f64(),
            r.per_sec(),
            ms(r.pct(0.50)),
            ms(r.pct(0.90)),
            ms(r.pct(0.99)),
            ms(r.pct(1.0)),
            rate,
            p99
        );
    }
}

async fn dispatch_serial(
    nats: &async_nats::Client,
    args: &Args,
    limit: Duration,
) -> anyhow::Result<Round> {
    let client = common::Client::new(nats.clone()).with_timeout(Duration::from_secs(30));
    let mut events = completion_events(nats).await?;
    let mut latencies = Vec::with_capacity(args.serial);
    let started = Instant::now();
    for _ in 0..args.serial {
        // The id is the service's to choose, as most clients leave it: a
        // flow so created has its first task sent ahead of its creation's
        // write (a named one waits for it, as the name may be taken).
        let mut spec = flow_spec(&FlowId::new("unnamed")?, 1)?;
        spec.id = None;
        let t = Instant::now();
        let created = client
            .create_flow(&spec)
            .await
            .map_err(|e| anyhow::anyhow!("flow create failed: {e}"))?;
        // Only this flow's completion counts (another's may come meanwhile);
        // one that came before the reply waits in the subscription.
        let id = created.flow_id;
        let done = completions(&mut events, 1, &|f| *f == id, t + limit).await?;
        let at = done
            .into_values()
            .next()
            .ok_or_else(|| anyhow::anyhow!("flow {id} done without a completion"))?;
        latencies.push(at.duration_since(t));
    }
    Ok(round(
        "dispatch, one at a time (1-task flows)",
        started.elapsed(),
        latencies,
    ))
}

/// An orchestrator's settings as deployed, with those of the deployed
/// service's environment the bench honours too, for an A/B:
/// `ORCHESTRATOR_KEEP_ALLOCATION_MS` (0 turns handing on off).
pub(crate) fn orchestrator_config(nats: common::config::NatsConfig) -> orchestrator::Config {
    let mut cfg = orchestrator::Config::new(nats);
    let keep = std::env::var("ORCHESTRATOR_KEEP_ALLOCATION_MS").ok();
    if let Some(ms) = keep.and_then(|v| v.parse().ok()) {
        cfg.keep_allocation_ms = ms;
    }
    cfg
}
