#!/usr/bin/env bash
# Starts the whole coordkit system locally and runs the demo:
#   nats-server (JetStream, data in .local/run/), the four services, a demo agent,
#   and the demo flow a -> b, a -> c with live progress until it completes.
# The system then stays up until Ctrl-C. With --exit it stops once the demo is done;
# with --release it runs optimised binaries.
#
# Environment: NATS_PORT (default 4222), NATS_MONITOR_PORT (default 8222),
# MONITOR_PORT (the dashboard and /metrics, default 9090).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"

NATS_PORT="${NATS_PORT:-4222}"
NATS_MONITOR_PORT="${NATS_MONITOR_PORT:-8222}"
MONITOR_PORT="${MONITOR_PORT:-9090}"
RUN="$LOCAL/run"
LOGS="$RUN/logs"
mkdir -p "$LOGS" "$RUN/jetstream"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$NATS_PORT" "$NATS_MONITOR_PORT" "$MONITOR_PORT"; do
    if port_busy "$p"; then
        echo "error: port $p is in use; stop what uses it or set NATS_PORT / NATS_MONITOR_PORT / MONITOR_PORT" >&2
        exit 1
    fi
done

# The debug profile by default: the test command (scripts/test.sh) builds on
# the same artifacts, so the second command compiles only the tests.
# --release builds optimised binaries (for measuring; slower to build).
BIN=target/debug
BUILD=(build --workspace --bins --quiet)
demo_args=()
for arg in "$@"; do
    if [[ "$arg" == "--release" ]]; then
        BIN=target/release
        BUILD+=(--release)
    else
        demo_args+=("$arg")
    fi
done
echo "==> building ($BIN; the first build takes several minutes, later ones seconds)"
cargo "${BUILD[@]}"

pids=()
cleanup() {
    trap - EXIT INT TERM
    echo "==> stopping"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat > "$RUN/nats.conf" <<CONF
listen: 127.0.0.1:$NATS_PORT
http: 127.0.0.1:$NATS_MONITOR_PORT
jetstream {
  store_dir: "$RUN/jetstream"
  sync_interval: always
}
CONF
echo "==> nats-server on 127.0.0.1:$NATS_PORT (monitoring http://127.0.0.1:$NATS_MONITOR_PORT), logs in $LOGS"
nats-server -c "$RUN/nats.conf" >"$LOGS/nats-server.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do port_busy "$NATS_PORT" && break; sleep 0.1; done
port_busy "$NATS_PORT" || { echo "error: nats-server did not start, see $LOGS/nats-server.log" >&2; exit 1; }

export NATS_URL="nats://127.0.0.1:$NATS_PORT"
export MONITOR_HTTP_ADDR="127.0.0.1:$MONITOR_PORT"
export MONITOR_NATS_MONITOR_URL="http://127.0.0.1:$NATS_MONITOR_PORT"
for svc in orchestrator allocator synchronizer monitor; do
    "$BIN/coord-$svc" >"$LOGS/$svc.log" 2>&1 &
    pids+=($!)
    echo "==> coord-$svc started (pid $!)"
done

echo "==> dashboard: http://127.0.0.1:$MONITOR_PORT/  (Prometheus: /metrics, health: /healthz)"
echo "==> demo"
"$BIN/coordctl" demo "${demo_args[@]}"
