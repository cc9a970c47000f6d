"""Request routing: the pluggable router interface, affinity, and balance of the default policy."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from shoal import serve
from shoal.api import get_http_url
from shoal.router.affinity import AffinityRequestRouter, prompt_text
from shoal.router.base import RequestRouter, load_router_class


@serve.deployment(num_replicas=3)
class Pid:
    def __call__(self, *args):
        return os.getpid()


def _pids(handle, n=60, **options):
    h = handle.options(**options) if options else handle
    return [r.result() for r in [h.remote() for _ in range(n)]]


def test_default_router_spreads_load(serve_app):
    h = serve.run(Pid.bind())
    assert len(set(_pids(h))) == 3


def test_custom_router_class_is_used(serve_app):
    app = Pid.options(request_router_config={
        "request_router_class": "routers_for_tests:LowestIdRouter",
        "request_router_kwargs": {"note": "x"},
    }).bind()
    h = serve.run(app)
    pids = [h.remote().result() for _ in range(30)]  # one at a time: the lowest id always has room
    assert len(set(pids)) == 1


@serve.deployment(num_replicas=3)
class ReplicaId:
    def __call__(self, *args):
        return serve.get_replica_context().replica_id.unique_id


def test_requests_wait_for_a_slow_first_connection(serve_app, monkeypatch):
    """A new router holds its first requests until it has tried to connect to every replica, however
    long that takes (a caller starved of CPU): else they would all go to the replicas it reached first,
    and a policy would see the set change under it (a session moving, not the lowest id chosen)."""
    from shoal.client import get_global_client
    from shoal.router import router as router_mod

    h = serve.run(ReplicaId.options(request_router_config={
        "request_router_class": "routers_for_tests:LowestIdRouter"}).bind())

    async def call():
        return await h.remote()

    asyncio.run(call())  # through a router of its own loop: subscribes this process to the replica set
    replicas = get_global_client()._targets[h.deployment_id].replicas
    assert len(replicas) == 3
    lowest = min(replicas, key=lambda r: r.replica_id.unique_id)
    real_connect = router_mod.connect

    async def slow_to_the_lowest(address, *args, **kwargs):
        if address == lowest.address:
            await asyncio.sleep(2.0)
        return await real_connect(address, *args, **kwargs)

    monkeypatch.setattr(router_mod, "connect", slow_to_the_lowest)  # the sync callers' new router uses it
    answers = {h.remote().result(timeout_s=60) for _ in range(10)}
    assert answers == {lowest.replica_id.unique_id}  # from the first request on


def test_session_affinity_keeps_a_session_on_one_replica(serve_app):
    app = Pid.options(request_router_config={
        "request_router_class": "shoal.router.affinity:AffinityRequestRouter",
        "request_router_kwargs": {"key": "session"},
    }).bind()
    h = serve.run(app)
    seen = {}
    for session in [f"s{i}" for i in range(12)]:
        pids = {h.options(session_id=session).remote().result() for _ in range(5)}
        assert len(pids) == 1, (session, pids)  # sequential calls: load is even, affinity holds
        seen[session] = pids.pop()
    assert len(set(seen.values())) >= 2  # different sessions spread over the replicas
    # Over HTTP the session comes from the x-session-id header.
    url = get_http_url()
    pids = {httpx.get(url + "/", headers={"x-session-id": "s3"}).json() for _ in range(5)}
    assert pids == {seen["s3"]}


def test_bad_router_class_is_rejected_clearly():
    with pytest.raises(ModuleNotFoundError):
        load_router_class("no_such_module:Router")
    with pytest.raises(TypeError, match="not a subclass"):
        load_router_class("shoal.router.affinity:prompt_text")
    with pytest.raises(ValueError, match="allowed values"):
        AffinityRequestRouter(key="user")
    with pytest.raises(TypeError, match="request_router_kwargs"):
        RequestRouter(unexpected=1)


class _View:
    def __init__(self, rid, queue_len=0, cap=5):
        self.replica_id, self.queue_len, self.max_ongoing_requests = rid, queue_len, cap
        self.multiplexed_model_ids = set()
        self.node_id = "local"

    def has_capacity(self):
        return self.queue_len < self.max_ongoing_requests


class _Req:
    def __init__(self, payload=None, session_id=""):
        self.args = (payload,) if payload is not None else ()
        self.session_id = session_id
        self.multiplexed_model_id = ""


def test_prefix_affinity_follows_the_prompt_and_falls_back_when_uneven():
    router = AffinityRequestRouter(key="prefix", prefix_chars=16, imbalance_threshold=2)
    replicas = [_View(f"r{i}") for i in range(4)]
    req = _Req({"messages": [{"role": "system", "content": "You are a helpful assistant."}]})
    first = router.choose_replica(replicas, req)
    assert all(router.choose_replica(replicas, req) is first for _ in range(10))
    assert prompt_text(_Req({"prompt": "abcdef"}), 3) == "abc"
    first.queue_len = 4  # busier than the others by more than the threshold: power of two instead
    assert router.choose_replica(replicas, req) is not first
