"""Shared fixtures: one shoal instance per test module, applications deleted after each test."""

from __future__ import annotations

import os
import time
from typing import Callable

import pytest

from shoal import serve

# Every shoal started by the tests, in this process or a child, listens on a free port.
os.environ.setdefault("SHOAL_HTTP_PORT", "0")


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
