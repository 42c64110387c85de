//! The `baseline` round: the raw JetStream pattern a task needs at least
//! once, which every coordkit figure is compared with.

use std::collections::HashSet;
use std::future::IntoFuture;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use futures::{stream::FuturesUnordered, StreamExt};
use tokio::sync::Mutex;

use super::{round, Args, Round};

/// The raw pattern: publish to a work-queue stream, one pull consumer per worker
/// (as each agent has its own durable consumer), ack, completion on a core subject.
pub(crate) async fn baseline(
    nats: &async_nats::Client,
    args: &Args,
    run_id: u64,
    limit: Duration,
) -> anyhow::Result<(Round, Round)> {
    let js = jetstream::new(nats.clone());
    let name = format!("BENCH_BASELINE_{run_id}");
    let prefix = format!("bench.{run_id}.work");
    let done_subject = format!("bench.{run_id}.done");
    let stream = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![format!("{prefix}.*")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("failed to create the baseline stream")?;
    let mut workers = Vec::new();
    for i in 0..args.agents {
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                durable_name: Some(format!("w{i}")),
                filter_subject: format!("{prefix}.{i}"),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await
            .context("failed to create a baseline consumer")?;
        let mut messages = consumer.messages().await?;
        let (nats, done) = (nats.clone(), done_subject.clone());
        workers.push(tokio::spawn(async move {
            while let Some(Ok(msg)) = messages.next().await {
                if msg.ack().await.is_err() {
                    break;
                }
                if nats
                    .publish(done.clone(), msg.payload.clone())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }));
    }
    let mut done = nats.subscribe(done_subject).await?;
    nats.flush().await?;

    // Pipelined: every message published at once (publish acks awaited concurrently).
    let n = args.tasks;
    let sent: Mutex<Vec<Option<Instant>>> = Mutex::new(vec![None; n]);
    let started = Instant::now();
    let publishing = async {
        let mut acks = FuturesUnordered::new();
        for i in 0..n {
            sent.lock().await[i] = Some(Instant::now());
            let subject = format!("{prefix}.{}", i % args.agents);
            acks.push(
                js.publish(subject, i.to_string().into())
                    .await?
                    .into_future(),
            );
            while acks.len() >= 1024 {
                if let Some(r) = acks.next().await {
                    r?;
                }
            }
        }
        while let Some(r) = acks.next().await {
            r?;
        }
        anyhow::Ok(())
    };
    let collecting = async {
        let mut latencies = Vec::with_capacity(n);
        let mut seen = HashSet::new();
        while seen.len() < n {
            let msg = tokio::time::timeout(limit.saturating_sub(started.elapsed()), done.next())
                .await
                .context("baseline round timed out")?
                .context("completion subscription ended")?;
            let i: usize = std::str::from_utf8(&msg.payload)?.parse()?;
            if seen.insert(i) {
                if let Some(Some(t)) = sent.lock().await.get(i) {
                    latencies.push(t.elapsed());
                }
            }
        }
        anyhow::Ok(latencies)
    };
    let (published, latencies) = tokio::join!(publishing, collecting);
    published?;
    let latencies = latencies?;
    let wall = started.elapsed();
    let pipelined = round("baseline, pipelined", wall, latencies);

    // One at a time: publish, wait for the completion, next.
    let mut latencies = Vec::with_capacity(args.serial);
    let started = Instant::now();
    for i in 0..args.serial {
        let t = Instant::now();
        let subject = format!("{prefix}.{}", i % args.agents);
        js.publish(subject, (n + i).to_string().into())
            .await?
            .await?;
        loop {
            let msg = tokio::time::timeout(limit, done.next())
                .await
                .context("baseline serial round timed out")?
                .context("completion subscription ended")?;
            if std::str::from_utf8(&msg.payload)?.parse::<usize>()? == n + i {
                break;
            }
        }
        latencies.push(t.elapsed());
    }
    let serial = round("baseline, one at a time", started.elapsed(), latencies);

    for w in workers {
        w.abort();
    }
    let _ = js.delete_stream(&name).await;
    Ok((pipelined, serial))
}
