#!/usr/bin/env bash
# Create .venv-ray with Ray Serve, the baseline that handle_bench.py compares shoal against.
# Kept apart from .venv so Ray's large dependency tree never leaks into shoal's environment.
# Idempotent: does nothing when the venv already imports ray.serve.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-ray
PY="$VENV/bin/python"
if [ -x "$PY" ] && "$PY" -c 'import ray.serve' >/dev/null 2>&1; then
    exit 0
fi
"${PYTHON:-python3}" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q 'ray[serve]'
"$PY" -c 'import ray; print("installed ray", ray.__version__)'
