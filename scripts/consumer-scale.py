#!/usr/bin/env python3
"""What one durable consumer per agent costs nats-server, raw: no coordkit.

For N agents, each with its own filtered pull consumer (`agent-{i}`,
filter `coord.agents.{i}.assign`) on a work-queue stream, as COORD_ASSIGN
has them, this times creating the N consumers, then 2,000 messages each
published to one agent's subject, fetched through that agent's consumer
and acked, 64 at a time. The same again with the agents spread over
`--shards` streams (filter `coord.assign.{shard}.{i}`), to see what
splitting the assignments stream would buy.

    source scripts/setup.sh
    nats-server -js -sd /tmp/cs &   # or with `sync_interval: always`
    .local/venv/bin/python scripts/consumer-scale.py --agents 1000,10000

The server's work per consumer creation and per ack grows with the
consumers on the stream (on a work-queue stream it checks the new filter
against every other, and an ack asks every consumer whether it still
needs the message), so both columns are read against the agent count.
"""

import argparse
import asyncio
import time

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

MESSAGES = 2000
AT_ONCE = 64


def layout(n, shards):
    """(stream, subject, consumer) per agent."""
    out = []
    for i in range(n):
        if shards <= 1:
            out.append(("CS_ASSIGN", f"cs.agents.{i}.assign", f"agent-{i}"))
        else:
            k = i % shards
            out.append((f"CS_ASSIGN_{k}", f"cs.assign.{k}.{i}", f"agent-{i}"))
    return out


async def one(js, n, shards):
    agents = layout(n, shards)
    streams = sorted({a[0] for a in agents})
    for s in streams:
        try:
            await js.delete_stream(s)
        except Exception:
            pass
        subject = "cs.agents.*.assign" if shards <= 1 else f"cs.assign.{s.rsplit('_', 1)[1]}.*"
        await js.add_stream(
            StreamConfig(
                name=s,
                subjects=[subject],
                retention=RetentionPolicy.WORK_QUEUE,
                max_consumers=-1 if n < 1000 else 100_000,
            )
        )

    sem = asyncio.Semaphore(AT_ONCE)

    async def make(a):
        async with sem:
            await js.add_consumer(
                a[0],
                ConsumerConfig(durable_name=a[2], filter_subject=a[1], ack_policy=AckPolicy.EXPLICIT),
            )

    t = time.monotonic()
    await asyncio.gather(*(make(a) for a in agents))
    created = time.monotonic() - t

    subs = {}

    async def round_trip(j):
        a = agents[(j * 7919) % n]
        async with sem:
            await js.publish(a[1], b"{}")
            sub = subs.get(a[2])
            if sub is None:
                sub = await js.pull_subscribe_bind(a[2], a[0])
                subs[a[2]] = sub
            msgs = await sub.fetch(1, timeout=10)
            for m in msgs:
                await m.ack_sync()

    t = time.monotonic()
    await asyncio.gather(*(round_trip(j) for j in range(MESSAGES)))
    rate = MESSAGES / (time.monotonic() - t)
    for s in streams:
        await js.delete_stream(s)
    return created, rate


async def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="nats://127.0.0.1:4222")
    p.add_argument("--agents", default="1000,10000")
    p.add_argument("--shards", type=int, default=16)
    args = p.parse_args()
    nc = await nats.connect(args.url)
    js = nc.jetstream(timeout=60)
    print("| agents | streams | create all consumers s | publish, fetch, ack /s |")
    print("| ---: | ---: | ---: | ---: |")
    for n in [int(x) for x in args.agents.split(",")]:
        for shards in (1, args.shards):
            created, rate = await one(js, n, shards)
            print(f"| {n:,} | {shards} | {created:.2f} | {rate:,.0f} |", flush=True)
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
