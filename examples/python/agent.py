#!/usr/bin/env python3
"""A coordkit agent in Python, written from docs/protocol.md with the official
nats-py client and nothing else.

What it does, in the order of the agent life cycle:

- registers with its capabilities and capacity (again after every reconnect and
  whenever a `coord.events.agent.lost` event names it), and heartbeats;
- takes assignments from its durable consumer `agent-{id}`, reports `started`,
  keeps the attempt's lease (a `progress` report at least every
  `lease.heartbeat_ms`), then `completed` or `failed`, on JetStream, and acks
  the assignment once the final report is stored;
- copies the assignment's `traceparent` header onto every report of that
  attempt and every request made for it (state, events), so one task is
  one trace;
- stops an attempt at once on a cancel notice (whatever its `code`: no final
  report, the assignment is terminated with +TERM), and also when a report of
  it is refused as `fenced` or `not_found` on `coord.agents.{id}.rejected`
  (every verdict is logged);
- acknowledges sync notices, so sync points complete;
- publishes an agent event `task_done` on `coord.agents.{id}.events.task_done`
  after each echo task, as a request (the reply is the stored event or why it
  was refused), with `event_id` `{flow}.{task}.{attempt}` so sending it again
  stores it once;
- on SIGTERM/SIGINT leaves as the protocol says: drains (deregister), takes
  what is already stored for it and gives running tasks `--leave-grace`
  seconds, hands the rest back, requests `coord.agents.{id}.leave` (status
  `left`, never `lost`) and exits within about 5 s. A second signal skips the
  grace.

Everything it asks or says about itself goes on its own subjects
(`coord.agents.{id}.…`) and its replies come to its own inboxes
(`--inbox-prefix`, `NATS_INBOX_PREFIX`, default `_INBOX_{id}`), so it also
runs on a server that keeps agents apart. It logs in with `NATS_USER` and
`NATS_PASSWORD` or a credentials file `NATS_CREDS`, and speaks TLS with
`NATS_TLS_CA` (and `NATS_TLS_CERT`/`NATS_TLS_KEY` for mutual TLS, or
`NATS_TLS_REQUIRED=true` to demand TLS against the system's trusted CAs).

Tasks:

- a task whose input has a `conformance` object runs as that object says (the
  convention every conforming agent implements): `sleep_ms` of work,
  `progress_every_ms` progress reports ("step N"), `fail` ("retryable" or
  "fatal"), `output`, and `state` written as the agent's own document by
  compare-and-set before the final report;
- any other task is an echo: its output is `{"agent", "kind", "echo": input,
  "attempt"}` after `--work-ms`; an input with `"fail": "message"` fails (not
  retryable) instead. After each one the agent stores
  `{"tasks_done", "last_task", "at_ms"}` as its state document.

    NATS_URL=nats://127.0.0.1:4222 python agent.py --agent-id py-1 --capability python

Stops on SIGINT/SIGTERM, or after --max-tasks tasks, by leaving.
"""

import argparse
import asyncio
import collections
import json
import os
import signal
import ssl
import sys
import time
import uuid

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig

STREAM = "COORD_ASSIGN"
# Every timeout nats-py raises: `nats.errors.TimeoutError` subclasses
# `asyncio.TimeoutError`, and `fetch()` also raises the plain one.
TIMEOUTS = (asyncio.TimeoutError, nats.errors.TimeoutError)
# How long a report or an ack is retried through an outage: longer than a
# server restart, shorter than the report stream's duplicate window (2 min).
DELIVERY_DEADLINE_S = 60.0
# Attempts remembered as finished, so a redelivery after our ack is acked again.
REMEMBER_FINISHED = 4096


def now_ms() -> int:
    return int(time.time() * 1000)


def log(line: str) -> None:
    print(line, flush=True)


class ServiceError(Exception):
    """An error reply: `{"error": {"code", "message", "details"?}}`."""

    def __init__(self, code: str, message: str, details=None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details


class TaskFailed(Exception):
    """The task ends with a `failed` report."""

    def __init__(self, error: str, retryable: bool):
        super().__init__(error)
        self.error = error
        self.retryable = retryable


async def request(nc, subject: str, body: dict, timeout: float = 5.0, headers: dict = None) -> dict:
    """A request/reply call; a failure reply carries the `Nats-Service-Error-Code`
    header and an `{"error": …}` body, which becomes a ServiceError. `headers`:
    the task's trace context, for requests made on a task's behalf."""
    msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout, headers=headers or None)
    reply = json.loads(msg.data) if msg.data else {}
    if (msg.headers and "Nats-Service-Error-Code" in msg.headers) or "error" in reply:
        err = reply.get("error") or {}
        code = err.get("code", "internal")
        message = err.get("message") or (msg.headers or {}).get("Nats-Service-Error", "")
        raise ServiceError(code, message, err.get("details"))
    return reply


def transient(e: BaseException) -> bool:
    """Worth retrying: nobody answered yet, the connection is coming back, or
    the service said so."""
    if isinstance(e, ServiceError):
        return e.code in ("unavailable", "timeout", "internal")
    return isinstance(e, TIMEOUTS + (nats.errors.Error,))


class Attempt:
    """One attempt being worked on: its assignment, its message, and what
    stopped it, if anything did."""

    def __init__(self, assignment: dict, msg):
        self.a = assignment
        self.msg = msg
        self.key = (assignment["flow_id"], assignment["task_id"], assignment["attempt"])
        # Trace context of the assignment, copied onto every report.
        self.trace = {k: v for k, v in (msg.headers or {}).items() if k in ("traceparent", "tracestate")}
        self.task = None
        self.stopped = None  # why it was taken away, once it was
        self.last_report = time.monotonic()

    def label(self) -> str:
        return f"{self.key[0]}/{self.key[1]}#{self.key[2]}"


class Agent:
    def __init__(self, nc, args):
        self.nc = nc
        self.js = nc.jetstream()
        self.id = args.agent_id
        self.args = args
        self.consumer = f"agent-{self.id}"
        self.attempts = {}  # key -> Attempt, while worked on
        self.cancelled = collections.OrderedDict()  # keys cancelled before they ran
        self.finished = collections.OrderedDict()  # keys reported and acked
        self.tasks = set()
        self.done = 0
        self.stop = asyncio.Event()  # first signal (or --max-tasks): leave
        self.hurry = asyncio.Event()  # second signal: skip the grace
        self.leaving = False
        self.reregistering = None

    def subject(self, what: str) -> str:
        return f"coord.agents.{self.id}.{what}"

    # ---- registration and heartbeats -------------------------------------

    async def register(self):
        body = {
            "agent_id": self.id,
            "capabilities": self.args.capability,
            "labels": dict(kv.split("=", 1) for kv in self.args.label),
            "capacity": {k: float(v) for k, v in (kv.split("=", 1) for kv in self.args.capacity)},
            "heartbeat_interval_ms": self.args.heartbeat_ms,
        }
        # The allocator (or the connection) may not be up yet: retry until it answers.
        pause = 0.25
        while not self.stop.is_set():
            try:
                info = await request(self.nc, self.subject("register"), body)
                log(f"registered {info['agent_id']} ({info.get('status')})")
                return True
            except ServiceError as e:
                if not transient(e):
                    raise
            except TIMEOUTS + (nats.errors.Error,):
                pass
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)
        return False

    def register_again(self, why: str):
        """Registers in the background, once at a time, unless leaving."""
        if self.leaving or (self.reregistering and not self.reregistering.done()):
            return
        log(f"{why}; registering again")
        self.reregistering = asyncio.get_running_loop().create_task(self._register_quietly())

    async def _register_quietly(self):
        try:
            await self.register()
        except Exception as e:  # noqa: BLE001 - logged; the next trigger tries again
            log(f"registering again failed: {e}")

    async def heartbeats(self):
        while True:
            beat = {"agent_id": self.id, "at_ms": now_ms(), "running": len(self.attempts)}
            try:
                await self.nc.publish(self.subject("heartbeat"), json.dumps(beat).encode())
            except nats.errors.Error as e:
                log(f"heartbeat not sent: {e}")
            await asyncio.sleep(self.args.heartbeat_ms / 1000)

    # ---- what the services tell the agent ---------------------------------

    async def on_lost(self, msg):
        try:
            event = json.loads(msg.data)
        except ValueError:
            return
        if event.get("agent_id") == self.id:
            # A long pause or a partition: register again to get work again.
            self.register_again("declared lost")

    async def on_cancel(self, msg):
        try:
            n = json.loads(msg.data)
            key = (n["flow_id"], n["task_id"], n["attempt"])
        except (ValueError, KeyError, TypeError):
            return
        # Every code means the same to a worker: the attempt is not ours any
        # more. An unknown code is "other", handled alike.
        code = n.get("code") or "other"
        log(f"cancel {key[0]}/{key[1]}#{key[2]} [{code}]: {n.get('reason', '')}")
        if code == "agent_lost":
            # The allocator declared us lost; the event saying so may have been missed.
            self.register_again("declared lost")
        if not self.take_away(key, f"cancelled ({code})"):
            remember(self.cancelled, key)

    async def on_rejected(self, msg):
        try:
            v = json.loads(msg.data)
        except ValueError:
            return
        if v.get("event_type"):
            # An event of ours published without a reply subject was refused.
            log(f"rejected event {v.get('event_type')} {v.get('event_id')}: {v.get('code')}/{v.get('reason')}")
            return
        where = f"{v.get('flow_id')}/{v.get('task_id')}#{v.get('attempt')}"
        log(
            f"rejected {v.get('report_type')} report of {where}: "
            f"{v.get('code')}/{v.get('reason')}: {v.get('message', '')}"
        )
        # Fenced or unknown: the attempt is not ours (any more); stop working on it.
        if v.get("code") in ("fenced", "not_found"):
            self.take_away((v.get("flow_id"), v.get("task_id"), v.get("attempt")), f"fenced ({v.get('reason')})")

    def take_away(self, key, why: str) -> bool:
        att = self.attempts.get(key)
        if att is None:
            return False
        if att.stopped is None:
            att.stopped = why
            if att.task is not None:
                att.task.cancel()
        return True

    async def on_sync_notice(self, msg):
        # Sync points, rollbacks, agreed state: apply (here: nothing to apply) and acknowledge.
        try:
            n = json.loads(msg.data)
            ack = {"notice_id": n["notice_id"], "revision": n.get("revision", 0)}
        except (ValueError, KeyError, TypeError):
            return
        await self.nc.publish(self.subject("sync.ack"), json.dumps(ack).encode())

    # ---- reports, acks and state -------------------------------------------

    async def report(self, att: Attempt, kind: str, **fields):
        a = att.a
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
        if kind == "progress":
            # Each progress report is new: a repeated id inside the stream's
            # duplicate window would be dropped (and renew nothing).
            msg_id += f".{uuid.uuid4().hex}"
        headers = {"Nats-Msg-Id": msg_id, **att.trace}
        # A JetStream publish returns once the report is stored; retried with
        # the same Nats-Msg-Id it is stored once.
        deadline = time.monotonic() + DELIVERY_DEADLINE_S
        pause = 0.1
        while True:
            try:
                await self.js.publish(self.subject("report"), json.dumps(body).encode(), headers=headers)
                att.last_report = time.monotonic()
                return
            except TIMEOUTS + (nats.errors.Error,) as e:
                if time.monotonic() + pause >= deadline:
                    raise RuntimeError(f"report {msg_id} not stored: {e!r}") from e
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def ack(self, msg):
        """Acks and waits for the server to confirm it, through an outage: a
        lost ack brings the assignment back after ack_wait."""
        deadline = time.monotonic() + DELIVERY_DEADLINE_S
        pause = 0.1
        while True:
            try:
                await msg.ack_sync(timeout=2)
                return
            except TIMEOUTS + (nats.errors.Error,) as e:
                if time.monotonic() + pause >= deadline:
                    log(f"ack not confirmed, the assignment will come back: {e!r}")
                    return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def term(self, msg):
        try:
            await msg.term()
        except nats.errors.Error as e:
            log(f"+TERM not sent: {e!r}")

    async def put_state(self, doc: dict, retries: int = 5, trace: dict = None) -> int:
        """Stores this agent's state document (scope default) by
        compare-and-set: get (not_found: revision 0), put with that
        expected_revision; on `conflict`, get again and retry. `trace`: the
        task's trace headers, when written for a task."""
        conflicts = 0
        pause = 0.1
        deadline = time.monotonic() + DELIVERY_DEADLINE_S
        while True:
            try:
                try:
                    current = await request(
                        self.nc, self.subject("state.get"), {"agent_id": self.id}, headers=trace
                    )
                    revision = current["revision"]
                except ServiceError as e:
                    if e.code != "not_found":
                        raise
                    revision = 0
                stored = await request(
                    self.nc,
                    self.subject("state.put"),
                    {"agent_id": self.id, "expected_revision": revision, "doc": doc},
                    headers=trace,
                )
                return stored["revision"]
            except ServiceError as e:
                if e.code == "conflict":
                    conflicts += 1
                    if conflicts > retries:
                        raise
                    continue
                if not transient(e) or time.monotonic() + pause >= deadline:
                    raise
            except TIMEOUTS + (nats.errors.Error,):
                if time.monotonic() + pause >= deadline:
                    raise
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    # ---- running an attempt -------------------------------------------------

    async def publish_event(self, event_type: str, data, event_id: str = None, trace: dict = None) -> dict:
        """Publishes an event of ours and returns it as stored; a refusal
        (a registered schema not met, say) raises ServiceError with its code.
        `trace`: the task's trace headers, when published for a task."""
        body = {"data": data}
        if event_id is not None:
            body["event_id"] = event_id
        return await request(self.nc, self.subject(f"events.{event_type}"), body, headers=trace)

    async def keep_lease(self, att: Attempt):
        """Sends a bare `progress` whenever no report went out for half the
        lease's heartbeat_ms: the orchestrator checks only every tick_ms, and
        a report takes a moment to be stored."""
        every = ((att.a.get("lease") or {}).get("heartbeat_ms") or 0) / 1000
        if every <= 0:
            return
        every = max(every / 2, 0.05)
        while True:
            wait = att.last_report + every - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            try:
                await self.report(att, "progress")
            except RuntimeError as e:
                log(f"lease not renewed for {att.label()}: {e}")
                att.last_report = time.monotonic()

    async def conformance(self, att: Attempt, c: dict):
        """The conformance-task convention (see the module docstring)."""
        sleep_ms = max(int(c.get("sleep_ms") or 0), 0)
        every_ms = c.get("progress_every_ms")
        start = time.monotonic()
        end = start + sleep_ms / 1000
        step = 0
        next_progress = start + every_ms / 1000 if every_ms else None
        # Work in short steps; a cancel notice cancels this coroutine at once.
        while True:
            now = time.monotonic()
            if now >= end:
                break
            if next_progress is not None and now >= next_progress:
                step += 1
                elapsed_ms = (now - start) * 1000
                fraction = min(max(elapsed_ms / sleep_ms, 0.0), 1.0)
                await self.report(att, "progress", progress=fraction, message=f"step {step}")
                next_progress += every_ms / 1000
                continue
            until = end if next_progress is None else min(end, next_progress)
            await asyncio.sleep(min(until - now, 0.1))
        if isinstance(c.get("state"), dict):
            try:
                await self.put_state(c["state"], trace=att.trace)
            except (ServiceError,) + TIMEOUTS + (nats.errors.Error,) as e:
                raise TaskFailed(f"conformance: state not stored: {e}", True) from e
        if isinstance(c.get("event"), dict):
            ev = c["event"]
            try:
                await self.publish_event(
                    ev.get("type") or "conformance", ev.get("data"), ev.get("event_id"), trace=att.trace
                )
            except (ServiceError,) + TIMEOUTS + (nats.errors.Error,) as e:
                raise TaskFailed(f"conformance: event not stored: {e}", False) from e
        fail = c.get("fail")
        if fail in ("retryable", "fatal"):
            raise TaskFailed("conformance: asked to fail", fail == "retryable")
        return c["output"] if "output" in c else {"echo": att.a.get("input")}

    async def echo(self, att: Attempt):
        await asyncio.sleep(self.args.work_ms / 1000)
        task_input = att.a.get("input")
        if isinstance(task_input, dict) and "fail" in task_input:
            raise TaskFailed(str(task_input["fail"]), False)
        return {"agent": self.id, "kind": att.a.get("kind", ""), "echo": task_input, "attempt": att.a["attempt"]}

    async def handle(self, msg):
        try:
            a = json.loads(msg.data)
            key = (a["flow_id"], a["task_id"], a["attempt"])
        except (ValueError, KeyError, TypeError):
            log("unreadable assignment terminated")
            await self.term(msg)
            return
        if a.get("agent_id") != self.id:
            await self.term(msg)  # not ours; never redeliver
            return
        if key in self.finished:
            # Delivered again after our ack (a server restarted right after it).
            await self.ack(msg)
            return
        if key in self.attempts:
            return  # being worked on already; that delivery is acked when it ends
        if key in self.cancelled:
            await self.term(msg)
            return
        att = Attempt(a, msg)
        att.task = asyncio.current_task()
        self.attempts[key] = att
        lease = None
        try:
            try:
                await self.report(att, "started")
            except RuntimeError as e:
                log(f"started not stored for {att.label()}, delivering again: {e}")
                await msg.nak(delay=1)
                return
            task_input = a.get("input")
            conformance = isinstance(task_input, dict) and isinstance(task_input.get("conformance"), dict)
            # A conformance task says itself when to report progress: keeping
            # the lease on top would hide whether its lease really runs out.
            if not conformance:
                lease = asyncio.create_task(self.keep_lease(att))
            try:
                if conformance:
                    outcome = ("completed", {"output": await self.conformance(att, task_input["conformance"])})
                else:
                    outcome = ("completed", {"output": await self.echo(att)})
            except TaskFailed as f:
                outcome = ("failed", {"error": f.error, "retryable": f.retryable})
            except Exception as e:  # noqa: BLE001 - a broken task fails, the agent goes on
                outcome = ("failed", {"error": f"task broke: {e}", "retryable": True})
            if lease is not None:
                lease.cancel()
            try:
                await self.report(att, outcome[0], **outcome[1])
            except RuntimeError as e:
                log(f"final report not stored for {att.label()}, delivering again: {e}")
                await msg.nak(delay=1)
                return
            remember(self.finished, key)
            # Ack only once the final report is stored: a crash before this means redelivery.
            await self.ack(msg)
            self.done += 1
            log(f"{outcome[0]} {att.label()}")
            if not (isinstance(task_input, dict) and "conformance" in task_input):
                try:
                    event = await self.publish_event(
                        "task_done",
                        {"flow_id": a["flow_id"], "task_id": a["task_id"], "attempt": a["attempt"]},
                        event_id=f"{a['flow_id']}.{a['task_id']}.{a['attempt']}",
                        trace=att.trace,
                    )
                    log(f"event task_done {event.get('event_id')} stored")
                except (ServiceError,) + TIMEOUTS + (nats.errors.Error,) as e:
                    log(f"event task_done not stored: {e}")
                doc = {"tasks_done": self.done, "last_task": a["task_id"], "at_ms": now_ms()}
                try:
                    await self.put_state(doc, trace=att.trace)
                except (ServiceError,) + TIMEOUTS + (nats.errors.Error,) as e:
                    log(f"state not stored: {e}")
        except asyncio.CancelledError:
            # Taken away (cancel notice, fenced report) or handed back on
            # leave: no final report; +TERM so it is never redelivered here.
            log(f"stopped {att.label()}: {att.stopped or 'handed back'}")
            await self.term(msg)
        finally:
            if lease is not None:
                lease.cancel()
            self.attempts.pop(key, None)
        if self.args.max_tasks and self.done >= self.args.max_tasks:
            self.stop.set()

    def start(self, msg):
        t = asyncio.create_task(self.handle(msg))
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    # ---- assignments ------------------------------------------------------

    async def bind(self):
        # Deliveries still unacknowledged went to an earlier run that died; they
        # would hold back new work until ack_wait. A fresh consumer delivers
        # them now (the work-queue stream keeps the messages).
        try:
            info = await self.js.consumer_info(STREAM, self.consumer)
            if info.num_ack_pending:
                await self.js.delete_consumer(STREAM, self.consumer)
        except nats.js.errors.NotFoundError:
            pass
        return await self.js.pull_subscribe(
            self.subject("assign"),
            durable=self.consumer,
            stream=STREAM,
            config=ConsumerConfig(
                durable_name=self.consumer,
                filter_subject=self.subject("assign"),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=300,
                max_ack_pending=self.args.concurrency,
            ),
        )

    async def fetch(self, psub, n: int, timeout: float, until: asyncio.Event):
        """Up to n assignments; none on a timeout, a NATS hiccup, or `until`."""
        fetching = asyncio.ensure_future(psub.fetch(n, timeout=timeout))
        waiting = asyncio.ensure_future(until.wait())
        try:
            await asyncio.wait({fetching, waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if not fetching.done():
            fetching.cancel()
        try:
            return await fetching
        except (asyncio.CancelledError,) + TIMEOUTS:
            return []

    async def take(self, psub):
        """Fetches and runs assignments until told to stop."""
        timeout = self.args.fetch_timeout
        while not self.stop.is_set():
            free = self.args.concurrency - len(self.tasks)
            if free <= 0:
                waiting = asyncio.ensure_future(self.stop.wait())
                await asyncio.wait(self.tasks | {waiting}, return_when=asyncio.FIRST_COMPLETED)
                waiting.cancel()
                continue
            try:
                msgs = await self.fetch(psub, free, timeout, self.stop)
            except nats.errors.Error as e:
                if self.nc.is_closed:
                    # Refused for good (a login revoked, say): nothing comes back.
                    log("connection closed; leaving")
                    self.stop.set()
                    break
                # A reconnect, a consumer made afresh, a server restart: wait a
                # moment; a missing consumer is made again.
                log(f"fetch failed: {e!r}")
                await asyncio.sleep(0.5)
                psub = await self.rebind(psub)
                continue
            for m in msgs:
                self.start(m)
        return psub

    async def rebind(self, psub):
        try:
            await self.js.consumer_info(STREAM, self.consumer)
            return psub
        except nats.js.errors.NotFoundError:
            pass
        except TIMEOUTS + (nats.errors.Error,):
            return psub
        log("assignment consumer gone; making it again")
        try:
            await psub.unsubscribe()
        except nats.errors.Error:
            pass
        try:
            return await self.bind()
        except TIMEOUTS + (nats.errors.Error,) as e:
            log(f"assignment consumer not made: {e!r}")
            return psub

    # ---- leaving ------------------------------------------------------------

    async def leave(self, psub):
        """Drain, take what is stored, let running tasks finish within the
        grace, hand the rest back, then leave (status `left`)."""
        self.leaving = True
        grace_end = time.monotonic() + self.args.leave_grace
        # 1. Drain: no new placements from here on.
        try:
            info = await request(self.nc, self.subject("deregister"), {"agent_id": self.id}, timeout=1)
            log(f"draining ({info.get('status')})")
        except (ServiceError,) + TIMEOUTS + (nats.errors.Error,) as e:
            log(f"drain not confirmed: {e}")

        # 2. What was placed before the drain is stored for us: take it while the grace lasts.
        over = asyncio.Event()
        timer = asyncio.get_running_loop().call_later(max(grace_end - time.monotonic(), 0), over.set)
        hurry = asyncio.ensure_future(self.hurry.wait())
        hurry.add_done_callback(lambda _: over.set())
        try:
            while not over.is_set():
                try:
                    pending = (await asyncio.wait_for(psub.consumer_info(), 0.5)).num_pending
                except TIMEOUTS + (nats.errors.Error,):
                    pending = 0
                if pending == 0 and psub.pending_msgs == 0:
                    break
                free = self.args.concurrency - len(self.tasks)
                if free <= 0:
                    waiting = asyncio.ensure_future(over.wait())
                    await asyncio.wait(self.tasks | {waiting}, return_when=asyncio.FIRST_COMPLETED)
                    waiting.cancel()
                    continue
                try:
                    msgs = await self.fetch(psub, free, 0.25, over)
                except nats.errors.Error:
                    msgs = []
                for m in msgs:
                    self.start(m)

            # 3. Running tasks get the rest of the grace.
            waiting = asyncio.ensure_future(over.wait())
            while self.tasks and not over.is_set():
                await asyncio.wait(self.tasks | {waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
        finally:
            timer.cancel()
            hurry.cancel()

        # 4. Hand back what still runs: no final report, +TERM; the leave
        # releases its allocation and the orchestrator runs it elsewhere.
        if self.tasks:
            log(f"grace over, handing back {len(self.attempts)} running task(s)")
            for t in list(self.tasks):
                t.cancel()
            await asyncio.wait(set(self.tasks), timeout=0.5)

        # 5. Leave: status `left`, never `lost`.
        try:
            info = await request(self.nc, self.subject("leave"), {"agent_id": self.id}, timeout=1)
            log(f"left ({info.get('status')})")
        except (ServiceError,) + TIMEOUTS + (nats.errors.Error,) as e:
            log(f"leave not confirmed: {e}")

    async def run(self):
        subs = [
            await self.nc.subscribe(self.subject("cancel"), cb=self.on_cancel),
            await self.nc.subscribe(self.subject("rejected"), cb=self.on_rejected),
            await self.nc.subscribe(self.subject("sync"), cb=self.on_sync_notice),
            await self.nc.subscribe("coord.events.agent.lost", cb=self.on_lost),
        ]
        beats = asyncio.create_task(self.heartbeats())
        try:
            if not await self.register():
                return
            psub = await self.bind()
            psub = await self.take(psub)
            await self.leave(psub)
        finally:
            beats.cancel()
            if self.reregistering:
                self.reregistering.cancel()
            for s in subs:
                try:
                    await s.unsubscribe()
                except nats.errors.Error:
                    pass


def remember(ordered: collections.OrderedDict, key) -> None:
    ordered[key] = True
    while len(ordered) > REMEMBER_FINISHED:
        ordered.popitem(last=False)


def tls_context():
    """TLS from NATS_TLS_CA (and NATS_TLS_CERT/NATS_TLS_KEY), as the Rust services read it."""
    ca = os.environ.get("NATS_TLS_CA")
    cert, key = os.environ.get("NATS_TLS_CERT"), os.environ.get("NATS_TLS_KEY")
    required = os.environ.get("NATS_TLS_REQUIRED", "").lower() in ("1", "true", "yes")
    if not (ca or cert or required):
        return None
    ctx = ssl.create_default_context(cafile=ca)
    if cert and key:
        ctx.load_cert_chain(cert, key)
    return ctx


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agent-id", default="py-agent")
    p.add_argument("--capability", action="append", default=[], help="repeatable")
    p.add_argument("--label", action="append", default=[], help="name=value, repeatable")
    p.add_argument("--capacity", action="append", default=[], help="resource=amount, repeatable (default cpu=2)")
    p.add_argument("--heartbeat-ms", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--work-ms", type=int, default=50, help="how long an echo task takes")
    p.add_argument("--max-tasks", type=int, default=0, help="leave after this many tasks (0: never)")
    p.add_argument(
        "--fetch-timeout", type=float, default=5.0, help="seconds one pull request waits for assignments (default 5)"
    )
    p.add_argument(
        "--leave-grace",
        type=float,
        default=3.0,
        help="seconds running tasks get to finish on leave before they are handed back (default 3)",
    )
    p.add_argument(
        "--inbox-prefix",
        default=None,
        help="reply-subject prefix (default: $NATS_INBOX_PREFIX, else _INBOX_{agent id})",
    )
    args = p.parse_args()
    if not args.capacity:
        args.capacity = ["cpu=2"]

    holder = {}

    async def on_reconnect():
        # Events published while we were away (agent.lost among them) are gone:
        # register again after every reconnect, as the protocol page says.
        if "agent" in holder:
            holder["agent"].register_again("reconnected")

    async def on_disconnect():
        log("disconnected from nats")

    async def on_error(e):
        log(f"nats: {e!r}")

    creds = os.environ.get("NATS_CREDS")
    nc = await nats.connect(
        os.environ.get("NATS_URL", "nats://127.0.0.1:4222").split(","),
        name=f"python-agent-{args.agent_id}",
        reconnected_cb=on_reconnect,
        disconnected_cb=on_disconnect,
        error_cb=on_error,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        # A server cut off by the network closes nothing: unanswered pings
        # are how the client notices and moves to another (15 s here).
        ping_interval=5,
        max_outstanding_pings=3,
        # Replies and pulled assignments arrive on inboxes under this prefix;
        # a server keeping agents apart lets an agent read only `_INBOX_{id}.>`.
        inbox_prefix=args.inbox_prefix or os.environ.get("NATS_INBOX_PREFIX") or f"_INBOX_{args.agent_id}",
        user=os.environ.get("NATS_USER") or None,
        password=os.environ.get("NATS_PASSWORD") or None,
        user_credentials=creds or None,
        tls=tls_context(),
    )
    agent = Agent(nc, args)
    holder["agent"] = agent
    loop = asyncio.get_running_loop()

    def on_signal():
        if agent.stop.is_set():
            agent.hurry.set()
        agent.stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        await agent.run()
    finally:
        # Not drain(): it can wait ~30 s for the server (DrainTimeoutError).
        # Everything that matters was confirmed already; flush and close.
        try:
            await asyncio.wait_for(nc.close(), 1)
        except (asyncio.TimeoutError, nats.errors.Error):
            pass
    log("stopped")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except ServiceError as e:
        print(f"error [{e.code}]: {e.message}", file=sys.stderr)
        sys.exit(1)
