"""Model multiplexing end to end: requests for a model stick to the replica that loaded it."""

from __future__ import annotations

import asyncio
import os

import httpx

from shoal import serve
from shoal.api import get_http_url

from conftest import wait_for


@serve.deployment(num_replicas=3)
class Models:
    def __init__(self):
        self.loads = 0

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str):
        self.loads += 1
        return f"model-{model_id}"

    async def __call__(self, *args):
        model = await self.get_model()
        return os.getpid(), model, serve.get_multiplexed_model_id()

    def num_loads(self):
        return os.getpid(), self.loads


def test_requests_for_a_model_stick_to_its_replica(serve_app):
    h = serve.run(Models.bind())
    pid, model, mid = h.options(multiplexed_model_id="m1").remote().result()
    assert (model, mid) == ("model-m1", "m1")
    # Once the replica reported m1, every request for m1 goes there, though others are idle.
    for _ in range(30):
        assert h.options(multiplexed_model_id="m1").remote().result()[0] == pid
    # A second model lands on a replica holding fewer models (not the one with m1).
    pid2 = h.options(multiplexed_model_id="m2").remote().result()[0]
    assert pid2 != pid
    assert {h.options(multiplexed_model_id="m2").remote().result()[0] for _ in range(10)} == {pid2}
    # m1 was loaded exactly once in the whole deployment.
    loads = {}
    for _ in range(60):
        p, n = h.num_loads.remote().result()
        loads[p] = n
    assert sum(loads.values()) == 2


def test_model_id_from_http_header(serve_app):
    serve.run(Models.bind())
    url = get_http_url()
    first = httpx.get(url + "/", headers={"serve_multiplexed_model_id": "h1"}).json()
    assert first[1:] == ["model-h1", "h1"]
    pids = {httpx.get(url + "/", headers={"serve_multiplexed_model_id": "h1"}).json()[0] for _ in range(15)}
    assert pids == {first[0]}


@serve.deployment
class Gate:
    """Callers wait here until `open` is called."""

    def __init__(self):
        self.event = asyncio.Event()
        self.waiters = 0

    async def wait(self):
        self.waiters += 1
        try:
            await self.event.wait()
        finally:
            self.waiters -= 1

    def open(self):
        self.event.set()

    def num_waiters(self):
        return self.waiters


@serve.deployment(num_replicas=2, max_ongoing_requests=1)
class OneAtATime:
    def __init__(self, gate):
        self.gate = gate

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str):
        return model_id

    async def __call__(self, *args):
        await self.get_model(serve.get_multiplexed_model_id())
        await self.gate.wait.remote()
        return os.getpid()


def test_a_busy_model_spills_onto_an_idle_replica(serve_app):
    # As in Ray Serve: the replica holding model "1" is full, so the second request for "1" goes to the
    # idle replica (which loads it too) instead of queueing behind the first.
    h = serve.run(OneAtATime.bind(Gate.bind())).options(multiplexed_model_id="1")
    gate = serve.get_deployment_handle("Gate", "default")
    first, second = h.remote(), h.remote()
    wait_for(lambda: gate.num_waiters.remote().result() == 2, what="both requests running at once")
    gate.open.remote().result()
    assert first.result() != second.result()


def test_a_busy_model_spills_over_http_too(serve_app):
    serve.run(OneAtATime.bind(Gate.bind()))
    gate = serve.get_deployment_handle("Gate", "default")
    url = get_http_url() + "/"

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            calls = [asyncio.ensure_future(client.get(url, headers={"serve_multiplexed_model_id": "1"}))
                     for _ in range(2)]
            for _ in range(400):
                if await gate.num_waiters.remote() == 2:
                    break
                await asyncio.sleep(0.05)
            await gate.open.remote()
            return [r.json() for r in await asyncio.gather(*calls)]

    pids = asyncio.run(main())
    assert len(set(pids)) == 2
