#!/usr/bin/env bash
# Runs the commands behind BENCHMARKS.md's tables (and so its headline),
# section by section in that page's order, and redraws the curves in
# docs/bench/ (the large-flow table of the orchestrator's section comes from
# the curves at the end). The 10,000-agent sync point is left to its own
# command there; earlier rounds in docs/bench/history.md name the flags they
# used. Everything goes to the terminal and to .local/bench/bench-<date>.log.
# Takes about an hour on two cores once built (the 1,000,000-task flow
# alone about ten minutes, the 10,000-agent soak as long); figures move
# with whatever else the machine runs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
mkdir -p .local/bench
LOG=".local/bench/bench-$(date -u +%Y%m%dT%H%M%SZ).log"
exec > >(tee "$LOG") 2>&1
export RUST_LOG=error

run() {
    echo
    echo "\$ $*"
    "$@"
}

cargo build --release -p tests --bin coord-bench
cargo build --release -p allocator --example roundtrip
cargo build --release -p monitor --example burst
BENCH=./target/release/coord-bench

# Allocator
run cargo bench -p allocator --bench placement -- --warm-up-time 1 --measurement-time 3
STORE="$(mktemp -d)"
nats-server -a 127.0.0.1 -p 14322 -js -sd "$STORE" >/dev/null 2>&1 &
NATS_PID=$!
trap 'kill "$NATS_PID" 2>/dev/null; rm -rf "$STORE"' EXIT
sleep 1
run ./target/release/examples/roundtrip --nats-url nats://127.0.0.1:14322 --ops 3000 --concurrency 32

# Orchestrator
run cargo bench -p orchestrator --bench flow -- --warm-up-time 1 --measurement-time 3
# both settings, a server each: page cache, then fsync always, five runs
# each and their medians (the headline)
# (1,000 one at a time: a round of 200 lasts under a second, too short
# to hold still on a shared machine)
run $BENCH --spawn dispatch --serial 1000 --tasks 4000 --repeat 5
# the peer: Celery + Redis, a burst and one at a time (needs redis-server)
run ./scripts/bench-celery.sh 4000 1000
# two replicas: its last table is run 3 in docs/bench/history.md
run $BENCH --spawn dispatch --orchestrators 2

# Monitor
run ./target/release/examples/burst --messages 1000000
run cargo bench -p monitor --bench detect -- --warm-up-time 1 --measurement-time 3
run $BENCH --spawn monitor --monitor-rates 10000,20000,40000,80000,160000,320000

# Synchronizer
run cargo bench -p synchronizer --bench merge -- --warm-up-time 1 --measurement-time 3
run $BENCH --spawn state

# Scale
run $BENCH --spawn dag
run $BENCH --spawn --agents 16 dag --work-ms 10
run $BENCH --spawn alloc
run $BENCH --spawn --fsync-always --timeout-s 900 agents \
    --agents-curve 100,300,1000,2000,5000,10000 --agents-flow-tasks 10000 \
    --agents-soak-s 600 --svg-dir docs/bench
run $BENCH --spawn --page-cache --timeout-s 900 agents \
    --agents-curve 100,300,1000,2000,5000,10000 --agents-flow-tasks 10000 \
    --svg-dir docs/bench
run $BENCH --spawn --agents 16 --timeout-s 3600 curves \
    --curve-flow-sizes 1000,10000,100000,1000000 --svg-dir docs/bench

echo
echo "log: $LOG"
