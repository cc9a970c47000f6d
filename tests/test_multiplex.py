"""Model multiplexing end to end: requests for a model stick to the replica that loaded it."""

from __future__ import annotations

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
