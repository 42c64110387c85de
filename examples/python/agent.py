#!/usr/bin/env python3
"""A coordkit agent in Python, written from docs/protocol.md with the official
nats-py client and nothing else.

It registers with its capabilities and capacity, heartbeats, takes assignments
from its durable consumer, reports `started` then `completed` (or `failed`) on
JetStream, publishes a state document after each task, acknowledges sync-point
notices, and stops starting work when told to cancel an attempt. Everything it
asks or says about itself goes on its own subjects (`coord.agents.{id}.…`) and
its replies come to its own inboxes (`NATS_INBOX_PREFIX`, default
`_INBOX_{id}`), so it also runs on a server that keeps agents apart.

Each task is an echo: its output is `{"agent", "kind", "echo": input, "attempt"}`.
A task whose input has `"fail": "message"` fails (not retryable) instead.

    NATS_URL=nats://127.0.0.1:4222 python agent.py --agent-id py-1 --capability python

On such a server it logs in as itself: NATS_USER=py-1 NATS_PASSWORD=….

Stops on SIGINT/SIGTERM, or after --max-tasks tasks.
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time

import nats
from nats.js.api import AckPolicy, ConsumerConfig
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import NotFoundError


def now_ms() -> int:
    return int(time.time() * 1000)


class ServiceError(Exception):
    """An error reply: `{"error": {"code", "message", "details"?}}`."""

    def __init__(self, code: str, message: str, details=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


async def request(nc, subject: str, body: dict, timeout: float = 5.0) -> dict:
    """A request/reply call; a failure reply carries the `Nats-Service-Error-Code`
    header and an `{"error": …}` body, which becomes a ServiceError."""
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
    reply = json.loads(msg.data) if msg.data else {}
    if (msg.headers and "Nats-Service-Error-Code" in msg.headers) or "error" in reply:
        err = reply.get("error") or {}
        code = err.get("code", "internal")
        message = err.get("message") or (msg.headers or {}).get("Nats-Service-Error", "")
        raise ServiceError(code, message, err.get("details"))
    return reply


class Agent:
    def __init__(self, nc, args):
        self.nc = nc
        self.js = nc.jetstream()
        self.id = args.agent_id
        self.args = args
        self.running = 0
        self.cancelled = set()  # (flow_id, task_id, attempt)
        self.done = 0
        self.stop = asyncio.Event()

    def subject(self, what: str) -> str:
        return f"coord.agents.{self.id}.{what}"

    async def register(self):
        body = {
            "agent_id": self.id,
            "capabilities": self.args.capability,
            "labels": dict(kv.split("=", 1) for kv in self.args.label),
            "capacity": {k: float(v) for k, v in (kv.split("=", 1) for kv in self.args.capacity)},
            "heartbeat_interval_ms": self.args.heartbeat_ms,
        }
        # The allocator may not be up yet: `no responders` / timeouts mean wait and retry.
        while True:
            try:
                info = await request(self.nc, self.subject("register"), body)
                print(f"registered {info['agent_id']} ({info.get('status')})", flush=True)
                return
            except (nats.errors.NoRespondersError, NatsTimeout):
                await asyncio.sleep(0.25)

    async def heartbeats(self):
        while not self.stop.is_set():
            beat = {"agent_id": self.id, "at_ms": now_ms(), "running": self.running}
            await self.nc.publish(self.subject("heartbeat"), json.dumps(beat).encode())
            try:
                await asyncio.wait_for(self.stop.wait(), self.args.heartbeat_ms / 1000)
            except asyncio.TimeoutError:
                pass

    async def on_lost(self, msg):
        # Declared lost (a long pause)? Register again to get work again.
        event = json.loads(msg.data)
        if event.get("agent_id") == self.id:
            print("declared lost; registering again", flush=True)
            await self.register()

    async def on_cancel(self, msg):
        n = json.loads(msg.data)
        self.cancelled.add((n["flow_id"], n["task_id"], n["attempt"]))
        print(f"cancel {n['flow_id']}/{n['task_id']}#{n['attempt']}: {n.get('reason', '')}", flush=True)

    async def on_sync_notice(self, msg):
        # Sync points, rollbacks, agreed state: apply (here: nothing to apply) and acknowledge.
        n = json.loads(msg.data)
        ack = {"notice_id": n["notice_id"], "revision": n.get("revision", 0)}
        await self.nc.publish(self.subject("sync.ack"), json.dumps(ack).encode())

    async def report(self, a: dict, kind: str, **fields):
        body = {
            "flow_id": a["flow_id"],
            "task_id": a["task_id"],
            "attempt": a["attempt"],
            "agent_id": self.id,
            "type": kind,
            "at_ms": now_ms(),
            **fields,
        }
        msg_id = f"{a['flow_id']}.{a['task_id']}.{a['attempt']}.{kind}"
        # JetStream publish: returns once the report is stored; retried with the
        # same Nats-Msg-Id it is stored once.
        for attempt in range(5):
            try:
                await self.js.publish(
                    self.subject("report"),
                    json.dumps(body).encode(),
                    headers={"Nats-Msg-Id": msg_id},
                )
                return
            except (NatsTimeout, nats.js.errors.NoStreamResponseError):
                await asyncio.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"report {msg_id} not stored")

    async def put_state(self, doc: dict):
        """Store this agent's state document (compare-and-set on the revision)."""
        for _ in range(5):
            try:
                current = await request(self.nc, self.subject("state.get"), {"agent_id": self.id})
                revision = current["revision"]
            except ServiceError as e:
                if e.code != "not_found":
                    raise
                revision = 0
            try:
                stored = await request(
                    self.nc,
                    self.subject("state.put"),
                    {"agent_id": self.id, "expected_revision": revision, "doc": doc},
                )
                return stored["revision"]
            except ServiceError as e:
                if e.code != "conflict":
                    raise
        raise RuntimeError("state put kept conflicting")

    async def handle(self, msg):
        a = json.loads(msg.data)
        key = (a["flow_id"], a["task_id"], a["attempt"])
        if a.get("agent_id") != self.id:
            await msg.term()  # not ours; never redeliver
            return
        self.running += 1
        try:
            await self.report(a, "started")
            await asyncio.sleep(self.args.work_ms / 1000)
            if key in self.cancelled:
                # The orchestrator already moved on; a final report would be rejected.
                await msg.term()
                return
            task_input = a.get("input")
            if isinstance(task_input, dict) and "fail" in task_input:
                await self.report(a, "failed", error=str(task_input["fail"]), retryable=False)
            else:
                output = {
                    "agent": self.id,
                    "kind": a.get("kind", ""),
                    "echo": task_input,
                    "attempt": a["attempt"],
                }
                await self.report(a, "completed", output=output)
            self.done += 1
            await self.put_state({"tasks_done": self.done, "last_task": a["task_id"], "at_ms": now_ms()})
            # Ack only once the final report is stored: a crash before this means redelivery.
            await msg.ack()
            print(f"done {a['flow_id']}/{a['task_id']}#{a['attempt']}", flush=True)
        finally:
            self.running -= 1
        if self.args.max_tasks and self.done >= self.args.max_tasks:
            self.stop.set()

    async def run(self):
        await self.register()
        subs = [
            await self.nc.subscribe(self.subject("cancel"), cb=self.on_cancel),
            await self.nc.subscribe(self.subject("sync"), cb=self.on_sync_notice),
            await self.nc.subscribe("coord.events.agent.lost", cb=self.on_lost),
        ]
        beats = asyncio.create_task(self.heartbeats())
        consumer = f"agent-{self.id}"
        # Deliveries still unacknowledged went to an earlier run that died; they
        # would hold back new work until ack_wait. A fresh consumer delivers
        # them now (the work-queue stream keeps the messages).
        try:
            info = await self.js.consumer_info("COORD_ASSIGN", consumer)
            if info.num_ack_pending:
                await self.js.delete_consumer("COORD_ASSIGN", consumer)
        except NotFoundError:
            pass
        psub = await self.js.pull_subscribe(
            self.subject("assign"),
            durable=consumer,
            stream="COORD_ASSIGN",
            config=ConsumerConfig(
                durable_name=consumer,
                filter_subject=self.subject("assign"),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=300,
                max_ack_pending=self.args.concurrency,
            ),
        )
        tasks = set()
        while not self.stop.is_set():
            free = self.args.concurrency - len(tasks)
            if free <= 0:
                _, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await psub.fetch(free, timeout=1)
            except NatsTimeout:
                continue
            for m in msgs:
                t = asyncio.create_task(self.handle(m))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks)
        beats.cancel()
        for s in subs:
            await s.unsubscribe()


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent-id", default="py-agent")
    p.add_argument("--capability", action="append", default=[], help="repeatable")
    p.add_argument("--label", action="append", default=[], help="name=value, repeatable")
    p.add_argument("--capacity", action="append", default=[], help="resource=amount, repeatable (default cpu=2)")
    p.add_argument("--heartbeat-ms", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--work-ms", type=int, default=50)
    p.add_argument("--max-tasks", type=int, default=0, help="stop after this many tasks (0: never)")
    args = p.parse_args()
    if not args.capacity:
        args.capacity = ["cpu=2"]

    holder = {}

    async def on_reconnect():
        # Events published while we were away (agent.lost among them) are gone:
        # register again after every reconnect, as the protocol page says.
        if "agent" in holder:
            print("reconnected; registering again", flush=True)
            asyncio.get_running_loop().create_task(holder["agent"].register())

    nc = await nats.connect(
        os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
        name=f"python-agent-{args.agent_id}",
        reconnected_cb=on_reconnect,
        max_reconnect_attempts=-1,
        # Replies and pulled assignments arrive on inboxes under this prefix;
        # a server keeping agents apart lets an agent read only `_INBOX_{id}.>`.
        inbox_prefix=os.environ.get("NATS_INBOX_PREFIX") or f"_INBOX_{args.agent_id}",
        user=os.environ.get("NATS_USER"),
        password=os.environ.get("NATS_PASSWORD"),
    )
    agent = Agent(nc, args)
    holder["agent"] = agent
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop.set)
    try:
        await agent.run()
    finally:
        await nc.drain()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except ServiceError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        sys.exit(1)
