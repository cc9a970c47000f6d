#!/usr/bin/env bash
# Install wrk, the HTTP load generator that http_bench.py drives, from the Debian/Ubuntu archive.
# A packaged wrk keeps the benchmark free of a C toolchain and a wrk source checkout.
# Idempotent: does nothing when wrk is already on PATH.
set -euo pipefail
if command -v wrk >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_wrk.sh: no apt-get here; install wrk (https://github.com/wg/wrk) by hand" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "ensure_wrk.sh: installing wrk needs root or sudo" >&2
        exit 1
    fi
    SUDO=(sudo)
fi
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk
# `wrk -v` prints its version and exits 1.
wrk -v 2>&1 | head -n 1 || true
