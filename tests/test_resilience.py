"""Faults and changes under load: replica kill -9, rolling updates, delete while busy."""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import httpx

from shoal import serve
from shoal.api import get_http_url

from conftest import wait_for


def _running(app: str, dep: str) -> int:
    d = serve.status().applications[app].deployments[dep]
    return d.replica_states.get(serve.ReplicaState.RUNNING, 0)


def test_kill_9_under_load_loses_no_queued_request(serve_app):
    @serve.deployment(num_replicas=2, max_ongoing_requests=1)
    class Work:
        async def __call__(self, i):
            await asyncio.sleep(0.05)
            return os.getpid(), i

    h = serve.run(Work.bind(), name="work", route_prefix="/work")
    victim = h.remote(-1).result()[0]

    async def load():
        calls = [h.remote(i) for i in range(40)]  # 2 running, the rest queued in this caller
        await asyncio.sleep(0.15)
        os.kill(victim, signal.SIGKILL)
        return await asyncio.gather(*calls, return_exceptions=True)

    results = asyncio.run(load())
    failed = [r for r in results if isinstance(r, BaseException)]
    # Only a request the killed replica had started may fail, and it says which replica died.
    assert len(failed) <= 1, failed
    assert all(isinstance(f, serve.ReplicaDiedError) and "died while handling" in str(f) for f in failed)
    assert sorted(r[1] for r in results if not isinstance(r, BaseException)) == \
        sorted(set(range(40)) - {i for i, r in enumerate(results) if isinstance(r, BaseException)})
    wait_for(lambda: _running("work", "Work") == 2, timeout=60, what="the replacement replica")


def test_rolling_update_under_http_load_fails_no_request(serve_app):
    @serve.deployment(num_replicas=2, graceful_shutdown_wait_loop_s=0.1)
    class Versioned:
        def __init__(self, version):
            self.version = version

        async def __call__(self, request):
            await asyncio.sleep(0.005)
            return self.version

    serve.run(Versioned.bind("v1"), name="ver", route_prefix="/ver")
    url = get_http_url() + "/ver"
    results: list = []
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.get(url)
                results.append((r.status_code, r.text))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(results) > 20)
    serve.run(Versioned.bind("v2"), name="ver", route_prefix="/ver")  # code change: replicas roll over
    wait_for(lambda: results[-1][1] == "v2" and _running("ver", "Versioned") == 2)
    n = len(results)
    wait_for(lambda: len(results) > n + 20)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert {s for s, _ in results} == {200}, [r for r in results if r[0] != 200][:5]
    assert {t for _, t in results} == {"v1", "v2"}


def test_delete_drains_requests_in_flight(serve_app):
    @serve.deployment(graceful_shutdown_wait_loop_s=0.1)
    class Slow:
        def __init__(self):
            self.started = 0

        async def __call__(self, i):
            self.started += 1
            await asyncio.sleep(0.5)
            return i

        def num_started(self):
            return self.started

    h = serve.run(Slow.bind(), name="slow", route_prefix="/slow")
    calls = [h.remote(i) for i in range(3)]
    wait_for(lambda: h.num_started.remote().result() == 3, what="the requests to be running")
    serve.delete("slow")
    assert [c.result(timeout_s=30) for c in calls] == [0, 1, 2]


def test_downscale_and_rolling_update_under_handle_load_fail_no_request(serve_app):
    """Replicas told to stop announce draining on every connection; requests a router wrote to one
    that it never accepted are sent elsewhere, so graceful stops fail nothing."""

    @serve.deployment(num_replicas=3, graceful_shutdown_wait_loop_s=0.1)
    class Versioned:
        def __init__(self, version):
            self.version = version

        async def __call__(self):
            await asyncio.sleep(0.002)
            return self.version

    h = serve.run(Versioned.bind("v1"), name="ver", route_prefix=None)
    results: list = []
    stop = threading.Event()

    async def caller():
        while not stop.is_set():
            results.extend(await asyncio.gather(*[h.remote() for _ in range(8)], return_exceptions=True))

    def load():
        asyncio.run(caller())

    t = threading.Thread(target=load)
    t.start()
    try:
        wait_for(lambda: len(results) > 50)
        serve.run(Versioned.options(num_replicas=1).bind("v1"), name="ver", route_prefix=None)  # downscale
        wait_for(lambda: _running("ver", "Versioned") == 1, timeout=30)
        serve.run(Versioned.options(num_replicas=2).bind("v2"), name="ver", route_prefix=None)  # roll over
        wait_for(lambda: results[-1] == "v2" and _running("ver", "Versioned") == 2, timeout=30)
        n = len(results)
        wait_for(lambda: len(results) > n + 50)
    finally:
        stop.set()
        t.join(timeout=30)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert set(results) == {"v1", "v2"}
