"""The peer round: no-op tasks through Celery with Redis as broker and result
backend, on their defaults (Redis without an append-only file: not durable),
measured the way `coord-bench dispatch` measures coordkit: a burst of tasks
sent at once and waited for, then tasks one at a time. Prints one markdown
table. Run by scripts/bench-celery.sh, which starts Redis and the worker.
"""

import os
import statistics
import sys
import time

from celery import Celery

BROKER = os.environ["PEER_BROKER"]
app = Celery("peer", broker=BROKER, backend=BROKER)


@app.task(name="noop")
def noop():
    return None


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(len(xs) * p + 0.999) - 1))]


def main():
    burst, serial = int(sys.argv[1]), int(sys.argv[2])
    # Warm up: the worker is up and the connections are open.
    noop.delay().get(timeout=60)
    rows = []
    started = time.perf_counter()
    sent = [(time.perf_counter(), noop.delay()) for _ in range(burst)]
    lat = []
    for at, r in sent:
        r.get(timeout=300)
        lat.append(time.perf_counter() - at)
    rows.append(("celery, burst", burst, time.perf_counter() - started, lat))
    started = time.perf_counter()
    lat = []
    for _ in range(serial):
        at = time.perf_counter()
        noop.delay().get(timeout=60)
        lat.append(time.perf_counter() - at)
    rows.append(("celery, one at a time", serial, time.perf_counter() - started, lat))
    print("| round | tasks | wall s | tasks/s | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, n, wall, lat in rows:
        print(
            f"| {name} | {n} | {wall:.2f} | {n / wall:.0f} | "
            f"{statistics.median(lat) * 1e3:.2f} | {pct(lat, 0.99) * 1e3:.2f} |"
        )


if __name__ == "__main__":
    main()
