#!/usr/bin/env bash
# Build llama.cpp's `llama-server`, the peer of benchmarks/llm_bench.py, from the llama.cpp source that
# the `llama-cpp-python` sdist vendors (the same version as shoal's llama.cpp engine, so both sides run
# the same kernels), and cache it under ~/.cache/shoal-bench. Prints the binary's path.
# Idempotent: a cached binary of that version is reused (a build takes ~10-20 min on 2 cores).
# `--amx-fix`: build it with the C++ flags shoal's `make install` gives llama.cpp (read from the
# Makefile's LLAMA_CMAKE_ARGS: GCC 12 drops the AMX tile configuration's stores without them), cached apart.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
ROOT="${SHOAL_BENCH_CACHE:-$HOME/.cache/shoal-bench}"
CXX_FLAGS=""
SUFFIX=""
if [ "${1:-}" = "--amx-fix" ]; then
    CXX_FLAGS="$(sed -n "s/^LLAMA_CMAKE_ARGS.*CMAKE_CXX_FLAGS='\([^']*\)'.*/\1/p" "$(dirname "$0")/../Makefile")"
    [ -n "$CXX_FLAGS" ] || { echo "ensure_llama_server.sh: no CMAKE_CXX_FLAGS in the Makefile's LLAMA_CMAKE_ARGS" >&2; exit 1; }
    SUFFIX="-amx-fix"
fi
DEST="$ROOT/llama-server-$VERSION$SUFFIX"
BIN="$DEST/bin/llama-server"
if [ -x "$BIN" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then
    echo "$BIN"
    exit 0
fi
command -v cmake >/dev/null 2>&1 || { echo "ensure_llama_server.sh: cmake is needed (apt-get install cmake)" >&2; exit 1; }
PY="${PYTHON:-$(dirname "$0")/../.venv/bin/python}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# The sdist from the package registry: its vendor/llama.cpp is the source llama-cpp-python builds.
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "llama-cpp-python==$VERSION" >&2
tar -xzf "$WORK"/llama_cpp_python-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_CXX_FLAGS="$CXX_FLAGS" >&2
cmake --build "$WORK/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$DEST/bin"
cp "$WORK/build/bin/llama-server" "$BIN"
echo "$VERSION" > "$DEST/VERSION"
echo "$BIN"
