#!/usr/bin/env bash
# Install the CPU build of PyTorch 2.13.0 into shoal's venv, for batch_bench.py.
# Idempotent: does nothing when `import torch` already works in that interpreter.
#
# The pin carries the `+cpu` local label on purpose: on this machine it resolves to the CPU wheel that
# pip's find-links folder holds (the same wheel `torch==2.13.0` picks here), and where no CPU wheel is
# reachable it fails instead of falling back to PyPI's multi-GB CUDA build of torch==2.13.0.
# Override the interpreter with PYTHON=/path/to/python.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
if "$PY" -c "import torch" >/dev/null 2>&1; then
    exit 0
fi
echo "ensure_torch.sh: installing torch==2.13.0+cpu into $("$PY" -c 'import sys; print(sys.prefix)')" >&2
if ! "$PY" -m pip install -q --only-binary torch "torch==2.13.0+cpu"; then
    cat >&2 <<'MSG'
ensure_torch.sh: no CPU wheel of torch 2.13.0 could be found. Put one in pip's find-links folder,
or add PyTorch's CPU package index (https://download.pytorch.org/whl/cpu) with --extra-index-url,
then rerun. Do not install a plain `torch`: on Linux that is the multi-GB CUDA build.
MSG
    exit 1
fi
"$PY" -c "import torch; print('ensure_torch.sh: torch', torch.__version__)" 2>/dev/null >&2
