#!/usr/bin/env bash
# Runs every test of the workspace: unit tests of the pure cores and integration
# tests against real nats-servers (one fresh server per test).
# Installs nats-server into .local/ on first use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
