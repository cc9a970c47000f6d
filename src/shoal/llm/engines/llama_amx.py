"""AMX for the llama.cpp engine: whether this llama.cpp build runs ggml's AMX kernels without
faulting, and giving back the GGUF pages that repacked weights no longer read.

Why it matters: on CPUs with AMX, llama.cpp repacks Q4_0/Q4_1/Q8_0/K-quant weights into tiles at
load ("extra buffers") and multiplies them with AMX (one row: AVX512-VNNI over the repacked layout).
On the 2-core Xeon here that is 2.2x the tokens/s of its generic kernels, at 1 and at 16 streams.

Why it needs a check: GCC 12's `_tile_loadconfig` tells the optimizer it reads 8 bytes, so the
stores that fill the rest of the 64-byte tile configuration are dropped as dead, and ggml's first
`ldtilecfg` takes a general-protection fault (llama.cpp PR 26954 moves the configuration out of
the optimizer's reach). shoal's `make install` builds llama.cpp with ``-fno-tree-dse -fno-dse``,
which keeps the stores; a wheel built otherwise (pip's cached one, another installer) still
crashes, and a crash kills the process. So the check loads the model and runs a multi-row and a
one-row batch in a child process, once per library file (by path, size and mtime), and the answer
is kept in shoal's cache directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from ..models import cache_root, cpu_flags, file_identity

logger = logging.getLogger(__name__)

__all__ = ["amx_kernels_work", "cpu_has_amx", "release_file_pages"]

PROBE_TIMEOUT_S = 120.0

# Run in a child: load the model with repacked weights, decode a 20-token and a 1-token batch.
# Exit status 0 and "ok" on stdout mean the AMX path ran; a fault kills the child with SIGSEGV.
PROBE_CODE = """
import sys
import llama_cpp as llama
llama.llama_backend_init()
mparams = llama.llama_model_default_params()
mparams.n_gpu_layers = 0
mparams.use_extra_bufts = True
model = llama.llama_model_load_from_file(sys.argv[1].encode(), mparams)
assert model, "could not load the model"
cparams = llama.llama_context_default_params()
cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 64
cparams.n_threads = cparams.n_threads_batch = 2
ctx = llama.llama_init_from_model(model, cparams)
assert ctx, "could not create a context"
for tokens in (list(range(10, 30)), [30]):
    array = (llama.llama_token * len(tokens))(*tokens)
    assert llama.llama_decode(ctx, llama.llama_batch_get_one(array, len(tokens))) == 0, "decode failed"
print("ok", flush=True)
"""


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX tiles."""
    return "amx_tile" in cpu_flags()


def amx_kernels_work(model_path: Path) -> bool:
    """Whether llama.cpp's AMX kernels run here without faulting, probed in a child process the
    first time for this library build and model file, then read from the cache."""
    key = _build_key(model_path)
    cache = cache_root() / "llama-amx-probe.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), bool):
        return known[key]
    works = probe_in_child(model_path)
    if not works:
        logger.warning(
            "llama.cpp's AMX kernels failed their check in a child process (most likely a llama.cpp built "
            "by GCC 12 without -fno-tree-dse -fno-dse, as `make install` builds it: its tile configuration "
            "faults); running without repacked weights, about half the tokens/s"
        )
    known[key] = works
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(cache)
    except OSError:  # a read-only cache: probe again next time
        pass
    return works


def probe_in_child(model_path: Path, code: str = PROBE_CODE) -> bool:
    """Run `code` (the AMX probe) on `model_path` in a child Python; True if it printed "ok"."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(model_path)], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return False
    if done.returncode != 0:
        logger.info("the AMX check exited with status %s: %s", done.returncode, done.stderr[-500:])
    return done.returncode == 0 and done.stdout.strip().endswith("ok")


def _build_key(model_path: Path) -> str:
    """The llama.cpp libraries' identity and the model file's (`file_identity`)."""
    try:
        import llama_cpp

        lib_dir = Path(llama_cpp.__file__).resolve().parent / "lib"
        libraries = sorted(lib_dir.glob("lib*.so*")) or [Path(llama_cpp.__file__).resolve()]
    except ImportError:  # pragma: no cover - the engine imports it first
        libraries = []
    parts = []
    for path in [*libraries, Path(model_path)]:
        try:
            parts.append(file_identity(path))
        except OSError:
            continue
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def release_file_pages(path: Path) -> int:
    """Drop this process's resident pages of `path`'s memory mappings (madvise MADV_DONTNEED), in
    bytes. Why: weights repacked for AMX are copies, so the file pages they came from are never
    read again but stay resident (and counted) while mapped; pages still used (the embeddings,
    norms) fault back in from the page cache on their next read. Linux only; 0 elsewhere."""
    target = str(Path(path).resolve())
    try:
        with open("/proc/self/maps") as f:
            ranges = [line.split(None, 5) for line in f]
    except OSError:  # pragma: no cover - not Linux
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    madv_dontneed = 4
    released = 0
    for fields in ranges:
        if len(fields) < 6 or fields[5].strip() != target:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), madv_dontneed) == 0:
            released += end - start
    return released
