//! The `events` scenario: agent events through the synchronizer (checked,
//! stored once per id, answered) against the same JetStream publish done
//! raw, then how fast the stored events can be read back through
//! `coord.sync.events.list` (all of them in pages, and one agent's).
//!
//! Only the synchronizer runs (in-process). Stored means acknowledged by
//! JetStream: the server's file store, which writes to the OS at once and
//! fsyncs on its own `sync_interval` (2 minutes unless the server sets
//! another, per message with `--fsync-always`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, stream};
use common::msg::{AgentEventPublish, AgentEventQuery, EventSchemaSet};
use common::AgentId;
use futures::{stream::FuturesUnordered, StreamExt};
use serde_json::json;

use super::ms;

/// Sizes of the `events` scenario.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct EventsArgs {
    /// Events published per round.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) events: usize,
    /// Publishes in flight at once.
    #[arg(long, default_value_t = 64)]
    pub(crate) event_concurrency: usize,
    /// Agents the events come from (round robin).
    #[arg(long, default_value_t = 16)]
    pub(crate) event_agents: usize,
}

struct Round {
    name: &'static str,
    n: usize,
    wall: Duration,
    latencies: Vec<Duration>,
}

impl Round {
    fn per_sec(&self) -> f64 {
        self.n as f64 / self.wall.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.latencies.len() as f64 * p).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[i - 1]
    }
}

/// Runs `n` operations with `c` in flight, timing each.
async fn timed<F, Fut>(n: usize, c: usize, limit: Duration, op: F) -> anyhow::Result<Round>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    let mut inflight = FuturesUnordered::new();
    let mut next = 0;
    while next < n || !inflight.is_empty() {
        while next < n && inflight.len() < c {
            let i = next;
            let fut = op(i);
            inflight.push(async move {
                let t = Instant::now();
                fut.await.map(|()| t.elapsed())
            });
            next += 1;
        }
        if let Some(done) = inflight.next().await {
            latencies.push(done?);
        }
        if started.elapsed() > limit {
            bail!("gave up after {limit:?}");
        }
    }
    latencies.sort_unstable();
    Ok(Round {
        name: "",
        n,
        wall: started.elapsed(),
        latencies,
    })
}

pub(crate) async fn run(
    nats: &async_nats::Client,
    url: &str,
    args: &EventsArgs,
    run_id: u64,
    limit: Duration,
) -> anyhow::Result<()> {
    if args.events == 0 || args.event_concurrency == 0 || args.event_agents == 0 {
        bail!("--events, --event-concurrency and --event-agents must be at least 1");
    }
    println!(
        "coord-bench events: {url}, {} events from {} agents, {} in flight; stored = acknowledged by JetStream (file store, fsync on the server's sync_interval: per message only if it is `always`, as with --fsync-always)",
        args.events, args.event_agents, args.event_concurrency
    );
    let sync = testkit::start_service("synchronizer", common::config::NatsConfig::new(url));
    testkit::wait_for_service(nats, "synchronizer").await;
    let client = common::Client::new(nats.clone()).with_timeout(limit);
    let js = jetstream::new(nats.clone());
    let agents: Vec<AgentId> = (0..args.event_agents)
        .map(|i| AgentId::new(format!("ev{run_id}-{i}")))
        .collect::<Result<_, _>>()?;
    let data = json!({"doc": "d-17", "pages": 12, "approved": true});
    let mut rounds = Vec::new();

    // The floor: the same stored, de-duplicated publish, straight to JetStream.
    let raw_name = format!("BENCH_EVENTS_{run_id}");
    let raw_subject = format!("bench.events.{run_id}");
    js.create_stream(stream::Config {
        name: raw_name.clone(),
        subjects: vec![format!("{raw_subject}.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .context("raw stream")?;
    let body = serde_json::to_vec(&json!({"data": data}))?;
    let mut raw = timed(args.events, args.event_concurrency, limit, |i| {
        let js = js.clone();
        let body = body.clone();
        let subject = format!("{raw_subject}.{}", i % args.event_agents);
        async move {
            let headers = common::nats::dedupe_headers(&subject, &format!("r{i}"));
            js.publish_with_headers(subject, headers, body.into())
                .await?
                .await?;
            Ok(())
        }
    })
    .await?;
    raw.name = "raw JetStream publish (same size, Nats-Msg-Id)";
    rounds.push(raw);

    let publish = |event_type: &'static str, tag: &'static str| {
        let client = client.clone();
        let agents = agents.clone();
        let data = data.clone();
        move |i: usize| {
            let client = client.clone();
            let agent = agents[i % agents.len()].clone();
            let body = AgentEventPublish {
                data: data.clone(),
                event_id: Some(format!("{tag}{i}")),
            };
            async move {
                client.publish_event(&agent, event_type, &body).await?;
                Ok(())
            }
        }
    };
    let mut plain = timed(
        args.events,
        args.event_concurrency,
        limit,
        publish("doc_indexed", "p"),
    )
    .await?;
    plain.name = "agent events, no schema";
    rounds.push(plain);

    client
        .event_schema_set(&EventSchemaSet {
            event_type: "approved".into(),
            schema: Some(json!({
                "type": "object",
                "required": ["doc", "approved"],
                "properties": {"doc": {"type": "string"}, "pages": {"type": "integer"}, "approved": {"type": "boolean"}}
            })),
        })
        .await?;
    let mut checked = timed(
        args.events,
        args.event_concurrency,
        limit,
        publish("approved", "s"),
    )
    .await?;
    checked.name = "agent events, checked against a schema";
    rounds.push(checked);

    println!();
    println!("| round | events | wall s | events/s stored | p50 ms | p99 ms | max ms |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rounds {
        println!(
            "| {} | {} | {:.2} | {:.0} | {} | {} | {} |",
            r.name,
            r.n,
            r.wall.as_secs_f64(),
            r.per_sec(),
            ms(r.pct(0.5)),
            ms(r.pct(0.99)),
            ms(r.latencies.last().copied().unwrap_or_default()),
        );
    }

    // Queryable: every stored event read back in pages, and one agent's.
    let total = 2 * args.events;
    let started = Instant::now();
    let mut listed = 0;
    let mut mine = 0;
    let mut pages = 0;
    let prefix = format!("ev{run_id}-");
    let mut q = AgentEventQuery {
        limit: Some(common::msg::MAX_EVENT_LIST_LIMIT),
        ..Default::default()
    };
    loop {
        let page = client.list_events(&q).await?;
        pages += 1;
        listed += page.events.len();
        mine += page
            .events
            .iter()
            .filter(|r| r.event.agent_id.as_str().starts_with(&prefix))
            .count();
        match page.next_seq {
            Some(n) => q.from_seq = Some(n),
            None => break,
        }
    }
    let all = started.elapsed();
    let started = Instant::now();
    let one = client
        .list_events(&AgentEventQuery {
            agent_id: Some(agents[0].clone()),
            limit: Some(common::msg::MAX_EVENT_LIST_LIMIT),
            ..Default::default()
        })
        .await?;
    let one_took = started.elapsed();
    let started = Instant::now();
    let matched = client
        .list_events(&AgentEventQuery {
            field: Some(common::msg::FieldMatch {
                path: "/pages".into(),
                equals: json!(13),
            }),
            ..Default::default()
        })
        .await?;
    let match_took = started.elapsed();
    println!();
    println!("| query | events | pages | ms | events/s read |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| every event, pages of {} | {listed} | {pages} | {} | {:.0} |",
        common::msg::MAX_EVENT_LIST_LIMIT,
        ms(all),
        listed as f64 / all.as_secs_f64().max(f64::MIN_POSITIVE)
    );
    println!(
        "| one agent's (filter subject) | {} | 1 | {} | {:.0} |",
        one.events.len(),
        ms(one_took),
        one.events.len() as f64 / one_took.as_secs_f64().max(f64::MIN_POSITIVE)
    );
    println!(
        "| a data match none meets (scan, first page) | {} | 1 | {} | - |",
        matched.events.len(),
        ms(match_took)
    );
    let _ = js.delete_stream(&raw_name).await;
    sync.stop().await?;
    if mine != total {
        bail!("listed {mine} of this run's events, {total} were stored");
    }
    Ok(())
}
