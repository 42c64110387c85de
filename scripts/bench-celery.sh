#!/usr/bin/env bash
# The peer for BENCHMARKS.md's headline: Celery 5.7 with Redis (Debian's
# redis-server, on its defaults: no append-only file) running no-op tasks,
# a burst and one at a time, with a worker of 8 threads. Celery comes from
# PyPI into .local/celery-venv; redis-server must be on PATH
# (`apt-get install redis-server`), else the script says so and exits 0.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BURST="${1:-4000}"
SERIAL="${2:-200}"
if ! command -v redis-server >/dev/null; then
    echo "bench-celery: no redis-server on PATH (apt-get install redis-server); no peer measured"
    exit 0
fi
VENV=.local/celery-venv
if [ ! -x "$VENV/bin/celery" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "celery[redis]==5.7.0"
fi
PORT=$((20000 + RANDOM % 20000))
DIR="$(mktemp -d)"
redis-server --port "$PORT" --bind 127.0.0.1 --dir "$DIR" >"$DIR/redis.log" 2>&1 &
REDIS=$!
export PEER_BROKER="redis://127.0.0.1:$PORT/0"
cd scripts/peer
../../"$VENV"/bin/celery -A celery_bench worker -P threads -c 8 --loglevel=WARNING \
    >"$DIR/worker.log" 2>&1 &
WORKER=$!
trap 'kill "$WORKER" "$REDIS" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT
../../"$VENV"/bin/python celery_bench.py "$BURST" "$SERIAL"
