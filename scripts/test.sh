#!/usr/bin/env bash
# Runs every test of the workspace: unit tests of the pure cores and integration
# tests against real nats-servers (one fresh server per test).
# Installs nats-server into .local/ on first use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
cd "$ROOT"
# The dashboard test renders the monitor's page in headless Chromium.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    echo "==> installing chromium (for the dashboard test)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
    if command -v apt-get >/dev/null 2>&1; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
            || { $SUDO apt-get update -q >/dev/null 2>&1 \
                 && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
            || echo "warning: chromium could not be installed; the dashboard test will report that it skipped" >&2
    else
        echo "warning: no apt-get to install chromium; the dashboard test will report that it skipped" >&2
    fi
fi
# The metrics and alert-rule tests check with Prometheus's promtool. Debian's
# `prometheus` package ships it: take just that binary, without root, into
# .local/bin; fall back to installing the package.
if ! command -v promtool >/dev/null 2>&1; then
    echo "==> installing promtool (for the Prometheus tests)"
    if command -v apt-get >/dev/null 2>&1 && command -v dpkg >/dev/null 2>&1; then
        TMP="$(mktemp -d)"
        if (cd "$TMP" && apt-get download prometheus >/dev/null 2>&1 \
                && dpkg -x prometheus_*.deb x && [ -x x/usr/bin/promtool ]); then
            mkdir -p "$LOCAL/bin" && cp "$TMP/x/usr/bin/promtool" "$LOCAL/bin/promtool"
        else
            SUDO=""
            if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
            $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
                || { $SUDO apt-get update -q >/dev/null 2>&1 \
                     && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; } \
                || echo "warning: promtool could not be installed; the Prometheus tests will report that they skipped (and fail under CI)" >&2
        fi
        rm -rf "$TMP"
    else
        echo "warning: no apt-get to install promtool; the Prometheus tests will report that they skipped (and fail under CI)" >&2
    fi
fi
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
