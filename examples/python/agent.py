#!/usr/bin/env python3
"""A coordkit agent in Python, written from docs/protocol.md with the official
nats-py client and nothing else.

What it does, in the order of the agent life cycle:

- on start, listens first (assignments, cancel notices, verdicts, sync
  notices, `coord.events.agent.lost`), then requests `coord.agents.{id}.leave`
  so that what an earlier run held (it died mid-task) is handed back at once,
  then registers with its capabilities and capacity (again, without leaving,
  after every reconnect, whenever a `coord.events.agent.lost` event names
  it and when a heartbeat is answered `lost`), and heartbeats;
- takes assignments from a plain subscription on `coord.agents.{id}.assign`
  (no JetStream consumer, nothing acknowledged): runs at most `--concurrency`
  at once and queues the rest, reports `started` when the work begins, keeps
  the attempt's lease (a `progress` report at least every
  `lease.heartbeat_ms`), then `completed` or `failed`, on JetStream, each
  retried until it is stored;
- ignores a repeat of an assignment (delivery is at least once: it is sent
  again until `started` is stored) whose attempt it holds, or finished or
  had taken away in the last 10 minutes; ignores the allocator's empty
  `Coord-Probe` message (it needs no answer), assignments for another
  agent and unreadable ones;
- copies the assignment's `traceparent` header onto every report of that
  attempt and every request made for it (state, events), so one task is
  one trace;
- stops an attempt at once on a cancel notice (whatever its `code`: no final
  report), and also when a report of it is refused as `fenced` or
  `not_found` on `coord.agents.{id}.rejected` (every verdict is logged);
- acknowledges sync notices, so sync points complete;
- publishes an agent event `task_done` on `coord.agents.{id}.events.task_done`
  after each echo task, as a request (the reply is the stored event or why it
  was refused), with `event_id` `{flow}.{task}.{attempt}` so sending it again
  stores it once;
- on SIGTERM/SIGINT leaves as the protocol says: drains (deregister), keeps
  taking the assignments that still arrive and gives running tasks
  `--leave-grace` seconds, hands the rest back, requests
  `coord.agents.{id}.leave` (status `left`, never `lost`) and exits within
  about 5 s. A second signal skips the grace.

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

# Every timeout nats-py raises: `nats.errors.TimeoutError` subclasses
# `asyncio.TimeoutError`, and some calls raise the plain one.
TIMEOUTS = (asyncio.TimeoutError, nats.errors.TimeoutError)
# How long a report is retried through an outage: longer than a server
# restart, shorter than the report stream's duplicate window (2 min).
DELIVERY_DEADLINE_S = 60.0
# Attempts finished or taken away are remembered for 10 minutes (at most
# REMEMBER_MAX of them, the oldest forgotten first), so that a repeat of their
# assignment still on its way is not run again.
REMEMBER_S = 600.0
REMEMBER_MAX = 4096
# How long the leave on start is retried while nobody answers: past it the
# agent registers anyway, and what an earlier run held waits for its leases.
LEAVE_ON_START_S = 10.0
# The header of the allocator's empty message that checks we listen.
PROBE_HEADER = "coord-probe"


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
    """One attempt held (queued or running): its assignment, and what stopped
    it, if anything did."""

    def __init__(self, assignment: dict, headers: dict):
        self.a = assignment
        self.key = (assignment["flow_id"], assignment["task_id"], assignment["attempt"])
        # Trace context of the assignment, copied onto every report.
        self.trace = {k: v for k, v in headers.items() if k in ("traceparent", "tracestate")}
        self.task = None
        self.began = False  # out of the queue, `started` due or sent
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
        self.attempts = {}  # key -> Attempt, while held (queued or running)
        self.cancelled = collections.OrderedDict()  # key -> when it was taken away
        self.finished = collections.OrderedDict()  # key -> when its final report went out
        self.tasks = set()
        # At most --concurrency attempts run; the others wait here, held.
        self.slots = asyncio.Semaphore(args.concurrency)
        self.done = 0
        self.stop = asyncio.Event()  # first signal (or --max-tasks): leave
        self.hurry = asyncio.Event()  # second signal: skip the grace
        # Assignments are run only between the leave on start and the hand
        # back on leave: any other is one the leave hands back anyway.
        self.taking = False
        # Registering again (reconnect, declared lost) waits for the leave on
        # start: a register racing it would be undone by it.
        self.up = False
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
        """Registers in the background, once at a time, unless leaving or not
        up yet (the first register follows then anyway). Never leaves first:
        after a reconnect we still hold what we run."""
        if not self.up or self.leaving or (self.reregistering and not self.reregistering.done()):
            return
        log(f"{why}; registering again")
        self.reregistering = asyncio.get_running_loop().create_task(self._register_quietly())

    async def _register_quietly(self):
        try:
            await self.register()
        except Exception as e:  # noqa: BLE001 - logged; the next trigger tries again
            log(f"registering again failed: {e}")

    async def leave_earlier_run(self):
        """Leaves before the first register, so what an earlier run of this
        agent held (it died mid-task) is handed back now rather than when its
        leases run out. Retried while nobody answers, for LEAVE_ON_START_S."""
        deadline = time.monotonic() + LEAVE_ON_START_S
        pause = 0.25
        while not self.stop.is_set():
            timeout = max(min(deadline - time.monotonic(), 5.0), 0.5)
            try:
                info = await request(self.nc, self.subject("leave"), {"agent_id": self.id}, timeout=timeout)
                log(f"handed back what an earlier run held ({info.get('status')})")
                return
            except ServiceError as e:
                if e.code == "not_found":
                    return  # never registered (or retired): nothing to hand back
                if not transient(e):
                    log(f"leave on start refused: {e}")
                    return
            except TIMEOUTS + (nats.errors.Error,):
                pass
            if time.monotonic() + pause >= deadline:
                log(f"leave on start not answered within {LEAVE_ON_START_S:.0f} s; registering anyway")
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, 2.0)

    async def heartbeats(self):
        # With a reply subject: an allocator that has us lost (an agent.lost
        # event we never heard, our connection never dropped) answers there.
        inbox = self.nc.new_inbox()
        await self.nc.subscribe(inbox, cb=self.on_heartbeat_answer)
        while True:
            running = sum(1 for att in self.attempts.values() if att.began)
            beat = {"agent_id": self.id, "at_ms": now_ms(), "running": running}
            try:
                await self.nc.publish(self.subject("heartbeat"), json.dumps(beat).encode(), reply=inbox)
            except nats.errors.Error as e:
                log(f"heartbeat not sent: {e}")
            await asyncio.sleep(self.args.heartbeat_ms / 1000)

    async def on_heartbeat_answer(self, msg):
        try:
            info = json.loads(msg.data)
        except ValueError:
            return
        if info.get("status") == "lost":
            self.register_again("told lost on a heartbeat")

    # ---- what the services tell the agent ---------------------------------

    async def on_assign(self, msg):
        headers = msg.headers or {}
        if not msg.data or any(k.lower() == PROBE_HEADER for k in headers):
            # The allocator checking that we listen: nothing to run, and
            # nothing to answer (an isolated agent could not reply anyway).
            return
        try:
            a = json.loads(msg.data)
            key = (a["flow_id"], a["task_id"], a["attempt"])
            hash(key)
        except (ValueError, KeyError, TypeError):
            log(f"unreadable assignment ignored: {msg.data[:200]!r}")
            return
        if a.get("agent_id") != self.id:
            log(f"assignment for {a.get('agent_id')!r} ignored")
            return
        # Sent again until its `started` is stored: a repeat of what we hold,
        # finished or had taken away is not run twice.
        if key in self.attempts or recently(self.finished, key) or recently(self.cancelled, key):
            return
        if not self.taking:
            # Before the leave on start or after the hand back on leave: the
            # leave hands it back.
            log(f"assignment {key[0]}/{key[1]}#{key[2]} ignored: not taking work now")
            return
        att = Attempt(a, headers)
        self.attempts[key] = att
        att.task = asyncio.create_task(self.handle(att))
        self.tasks.add(att.task)
        att.task.add_done_callback(self.tasks.discard)

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
            hash(key)
        except (ValueError, KeyError, TypeError):
            return
        # Every code means the same to a worker: the attempt is not ours any
        # more. An unknown code is "other", handled alike.
        code = n.get("code") or "other"
        log(f"cancel {key[0]}/{key[1]}#{key[2]} [{code}]: {n.get('reason', '')}")
        if code == "agent_lost":
            # The allocator declared us lost; the event saying so may have been missed.
            self.register_again("declared lost")
        self.take_away(key, f"cancelled ({code})")

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
            key = (v.get("flow_id"), v.get("task_id"), v.get("attempt"))
            try:
                hash(key)
            except TypeError:
                return
            self.take_away(key, f"{v.get('code')} ({v.get('reason')})")

    def take_away(self, key, why: str):
        """Stops the attempt, queued or running (no final report), and keeps
        a repeat of its assignment, already on its way or yet to come, from
        running it again."""
        remember(self.cancelled, key)
        att = self.attempts.get(key)
        if att is not None and att.stopped is None:
            att.stopped = why
            if att.task is not None:
                att.task.cancel()

    async def on_sync_notice(self, msg):
        # Sync points, rollbacks, agreed state: apply (here: nothing to apply) and acknowledge.
        try:
            n = json.loads(msg.data)
            ack = {"notice_id": n["notice_id"], "revision": n.get("revision", 0)}
        except (ValueError, KeyError, TypeError):
            return
        await self.nc.publish(self.subject("sync.ack"), json.dumps(ack).encode())

    # ---- reports and state --------------------------------------------------

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

    async def handle(self, att: Attempt):
        a, key = att.a, att.key
        lease = None
        try:
            # Queued until a slot is free; a cancel notice may stop it here.
            async with self.slots:
                att.began = True
                try:
                    await self.report(att, "started")
                except RuntimeError as e:
                    # Not remembered: the assignment comes again until a
                    # `started` is stored, and is run then.
                    log(f"started not stored for {att.label()}: {e}")
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
                # Ran once: a late repeat of its assignment is not run again,
                # whether or not the final report gets stored.
                remember(self.finished, key)
                try:
                    await self.report(att, outcome[0], **outcome[1])
                except RuntimeError as e:
                    # Its lease runs out and the task's retry policy decides.
                    log(f"final report not stored for {att.label()}: {e}")
                    return
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
            # leave: no final report, nothing to acknowledge.
            where = "" if att.began else " (queued)"
            log(f"stopped {att.label()}{where}: {att.stopped or 'handed back'}")
        finally:
            if lease is not None:
                lease.cancel()
            self.attempts.pop(key, None)
        if self.args.max_tasks and self.done >= self.args.max_tasks:
            self.stop.set()

    # ---- leaving ------------------------------------------------------------

    async def leave(self):
        """Drain, keep taking what still arrives and let it run within the
        grace, hand the rest back, then leave (status `left`)."""
        self.leaving = True
        grace_end = time.monotonic() + self.args.leave_grace
        # 1. Drain: no new placements from here on.
        try:
            info = await request(self.nc, self.subject("deregister"), {"agent_id": self.id}, timeout=1)
            log(f"draining ({info.get('status')})")
        except (ServiceError,) + TIMEOUTS + (nats.errors.Error,) as e:
            log(f"drain not confirmed: {e}")

        # 2. Still subscribed: assignments placed just before the drain are
        # taken as they arrive. What is held gets the rest of the grace.
        over = asyncio.Event()
        timer = asyncio.get_running_loop().call_later(max(grace_end - time.monotonic(), 0), over.set)
        hurry = asyncio.ensure_future(self.hurry.wait())
        hurry.add_done_callback(lambda _: over.set())
        waiting = asyncio.ensure_future(over.wait())
        try:
            while self.tasks and not over.is_set():
                await asyncio.wait(self.tasks | {waiting}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            timer.cancel()
            hurry.cancel()

        # 3. Hand back what is still held: no final report. The leave
        # releases its allocation and the orchestrator runs it elsewhere; an
        # assignment arriving from now on is handed back by it too.
        self.taking = False
        if self.tasks:
            log(f"grace over, handing back {len(self.attempts)} running task(s)")
            for t in list(self.tasks):
                t.cancel()
            await asyncio.wait(set(self.tasks), timeout=0.5)

        # 4. Leave: status `left`, never `lost`.
        try:
            info = await request(self.nc, self.subject("leave"), {"agent_id": self.id}, timeout=1)
            log(f"left ({info.get('status')})")
        except (ServiceError,) + TIMEOUTS + (nats.errors.Error,) as e:
            log(f"leave not confirmed: {e}")

    async def run(self):
        # Listen before leaving and registering: the allocator places work
        # only on an agent it finds listening on its assign subject, and a
        # subscription made later would miss what comes first.
        subs = [
            await self.nc.subscribe(self.subject("assign"), cb=self.on_assign),
            await self.nc.subscribe(self.subject("cancel"), cb=self.on_cancel),
            await self.nc.subscribe(self.subject("rejected"), cb=self.on_rejected),
            await self.nc.subscribe(self.subject("sync"), cb=self.on_sync_notice),
            await self.nc.subscribe("coord.events.agent.lost", cb=self.on_lost),
        ]
        beats = None
        try:
            await self.leave_earlier_run()
            if self.stop.is_set():
                return
            self.up = True
            self.taking = True
            beats = asyncio.create_task(self.heartbeats())
            if not await self.register():
                return
            await self.stop.wait()
            await self.leave()
        finally:
            # Heartbeats stop only now, after the leave.
            if beats is not None:
                beats.cancel()
            if self.reregistering:
                self.reregistering.cancel()
            for s in subs:
                try:
                    await s.unsubscribe()
                except nats.errors.Error:
                    pass


def forget_old(ordered: collections.OrderedDict) -> None:
    """Drops entries older than REMEMBER_S, then the oldest past REMEMBER_MAX
    (entries are kept in the order they were remembered)."""
    cutoff = time.monotonic() - REMEMBER_S
    while ordered:
        oldest_at = next(iter(ordered.values()))
        if oldest_at >= cutoff and len(ordered) <= REMEMBER_MAX:
            break
        ordered.popitem(last=False)


def remember(ordered: collections.OrderedDict, key) -> None:
    ordered.pop(key, None)  # to the end: remembered afresh
    ordered[key] = time.monotonic()
    forget_old(ordered)


def recently(ordered: collections.OrderedDict, key) -> bool:
    forget_old(ordered)
    return key in ordered


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
    p.add_argument(
        "--concurrency", type=int, default=2, help="tasks run at once; more wait in a local queue (default 2)"
    )
    p.add_argument("--work-ms", type=int, default=50, help="how long an echo task takes")
    p.add_argument("--max-tasks", type=int, default=0, help="leave after this many tasks (0: never)")
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

    async def on_closed():
        # Closed for good (a login revoked, say) while running: nothing comes
        # back, so leave (what can still be said fails fast) and exit.
        agent = holder.get("agent")
        if agent is not None and not agent.stop.is_set():
            log("connection closed; leaving")
            agent.stop.set()

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
        closed_cb=on_closed,
        error_cb=on_error,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        # A server cut off by the network closes nothing: unanswered pings
        # are how the client notices and moves to another (15 s here).
        ping_interval=5,
        max_outstanding_pings=3,
        # Replies (report acks among them) arrive on inboxes under this prefix;
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
