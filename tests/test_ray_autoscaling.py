"""The Ray runtime on an autoscaling Ray cluster: replicas that fit no node make the cluster grow.

Ray's `AutoscalingCluster` (tests/autoscaling_cluster.py): a head with 1 CPU and a worker type with
2 CPUs, up to 3 workers, started by Ray's autoscaler as local processes when demand is pending.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from shoal import serve
from shoal.api import get_http_url

from autoscaling_cluster import autoscaling_cluster_fixture
from conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
autoscaling_cluster = autoscaling_cluster_fixture(
    {"CPU": 1}, {"cpu_node": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 3}})

# Nodes start as processes on this (slow, shared) machine: generous, never a measure of speed.
GROW_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def serve_instance(autoscaling_cluster):
    serve.start(runtime="ray", http_options={"port": 0})
    yield


@serve.deployment
class WhereAmI:
    async def __call__(self, *args):
        import asyncio

        await asyncio.sleep(0.2)  # with one request per replica, concurrent calls reach every replica
        return serve.get_replica_context().replica_id.unique_id, os.environ["SHOAL_NODE_ID"]


def _deployment(app: str, name: str = "WhereAmI"):
    status = serve.status().applications.get(app)
    return status.deployments.get(name) if status else None


def _answers(handle, replicas: int) -> dict:
    """replica id -> node, once `replicas` distinct replicas answer one burst of concurrent calls."""
    def burst():
        seen = dict(r.result(timeout_s=60) for r in [handle.remote() for _ in range(4 * replicas)])
        return seen if len(seen) == replicas else None

    return wait_for(burst, timeout=GROW_TIMEOUT_S, interval=0.5, what=f"{replicas} replicas answering")


def test_a_replica_no_node_type_can_hold_waits_for_a_node_and_says_so(serve_app):
    serve._run(WhereAmI.options(ray_actor_options={"num_cpus": 3}).bind(), name="too_big", route_prefix=None,
               _blocking=False)

    def message():
        d = _deployment("too_big")
        return d and "waiting for the cluster" in d.message and d.message

    text = wait_for(message, timeout=60, what="a status message saying the replica waits for a node")
    assert "has 1 replica waiting for the cluster to add a node with CPU: 3" in text
    assert serve.status().applications["too_big"].status == "DEPLOYING"


def test_replicas_that_fit_no_node_make_the_cluster_grow_and_start_there(serve_app):
    handle = serve._run(WhereAmI.options(num_replicas=4, max_ongoing_requests=1,
                                         ray_actor_options={"num_cpus": 1}).bind(), _blocking=False)
    wait_for(lambda: (_deployment("default") or None) and _deployment("default").replica_states.get("RUNNING") == 4,
             timeout=GROW_TIMEOUT_S, interval=0.5, what="4 RUNNING replicas")
    nodes = _answers(handle, 4)
    assert len(set(nodes.values())) >= 3  # the head holds one; the others need two more nodes
    wait_for(lambda: serve.status().applications["default"].status == "RUNNING", timeout=60,
             what="the application RUNNING")
    r = httpx.get(get_http_url() + "/", timeout=60)
    assert r.status_code == 200


def test_max_replicas_per_node_holds_on_nodes_the_cluster_adds(serve_app):
    # Half a CPU each: the head has room for two, but only one may run there.
    handle = serve._run(WhereAmI.options(name="OnePerNode", num_replicas=3, max_replicas_per_node=1,
                                         max_ongoing_requests=1, ray_actor_options={"num_cpus": 0.5}).bind(),
                        name="one_per_node", route_prefix=None, _blocking=False)
    wait_for(lambda: (_deployment("one_per_node", "OnePerNode") or None)
             and _deployment("one_per_node", "OnePerNode").replica_states.get("RUNNING") == 3,
             timeout=GROW_TIMEOUT_S, interval=0.5, what="3 RUNNING replicas")
    nodes = _answers(handle, 3)
    assert len(set(nodes.values())) == 3


def test_a_node_that_joins_later_gets_a_proxy_that_serves(serve_app):
    handle = serve._run(WhereAmI.options(name="Grown", num_replicas=4, max_ongoing_requests=1,
                                         ray_actor_options={"num_cpus": 1}).bind(),
                        name="grown", route_prefix="/grown", _blocking=False)
    nodes = set(_answers(handle, 4).values())  # the head and at least two nodes the cluster added

    def proxies_on_every_node():
        proxies = serve.status().proxies
        return nodes <= {key.split(":")[0] for key, s in proxies.items() if s == "HEALTHY"}

    wait_for(proxies_on_every_node, timeout=GROW_TIMEOUT_S, interval=0.5, what="a healthy proxy on every node")
    wait_for(lambda: serve.status().applications["grown"].status == "RUNNING", timeout=60,
             what="the application RUNNING")
    # The proxies share the port (SO_REUSEPORT, one host here): new connections reach all of them,
    # and every one routes (a proxy without the route table would answer 404).
    with httpx.Client() as c:
        for _ in range(24):
            r = c.get(get_http_url() + "/grown", headers={"connection": "close"}, timeout=60)
            assert r.status_code == 200 and r.json()[1] in nodes


@serve.deployment(max_ongoing_requests=2, ray_actor_options={"num_cpus": 1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1,
                                      "upscale_delay_s": 0, "downscale_delay_s": 1, "metrics_interval_s": 0.2,
                                      "look_back_period_s": 1})
class Elastic:
    async def __call__(self, seconds: float = 0.0):
        import asyncio

        await asyncio.sleep(seconds)
        return os.environ["SHOAL_NODE_ID"]


@contextlib.contextmanager
def _calls_in_flight(call, callers: int):
    """`callers` threads, each making `call()` one after another while the block runs; yields the
    list their failures are recorded in (the threads have stopped when the block ends)."""
    stop = threading.Event()
    failures: list = []

    def load():
        while not stop.is_set():
            try:
                call()
            except Exception as e:  # noqa: BLE001 - recorded: the tests assert there are none
                failures.append(e)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(callers)]
    for t in threads:
        t.start()
    try:
        yield failures
    finally:
        stop.set()
        for t in threads:
            t.join(150)


def _alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def _head_node() -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n.get("Resources", {}))


def test_serve_autoscaling_grows_the_cluster_and_idle_nodes_go_when_load_drops(serve_app):
    handle = serve.run(Elastic.bind(), name="elastic", route_prefix=None)  # one replica: the head has room
    # Eight callers, a call at a time each, every call holding a replica slot for a while.
    with _calls_in_flight(lambda: handle.remote(0.5).result(timeout_s=120), 8) as failures:
        wait_for(lambda: (_deployment("elastic", "Elastic") or None)
                 and _deployment("elastic", "Elastic").replica_states.get("RUNNING") == 4,
                 timeout=GROW_TIMEOUT_S, interval=0.5, what="serve autoscaling to reach 4 running replicas")
        grown = _alive_nodes()
        assert grown >= 3  # four 1-CPU replicas: the head's one CPU and two 2-CPU nodes at least
    assert not failures, failures[:3]
    # Load gone: serve scales down to one replica, and Ray's autoscaler removes the nodes left idle.
    wait_for(lambda: _deployment("elastic", "Elastic").replica_states == {"RUNNING": 1},
             timeout=GROW_TIMEOUT_S, interval=0.5, what="serve autoscaling back to 1 replica")
    # The head's replica is the one left (replicas stop on the emptiest node first, the head's last),
    # so every added node goes.
    assert handle.remote().result(timeout_s=60) == _head_node()
    wait_for(lambda: _alive_nodes() == 1, timeout=GROW_TIMEOUT_S, interval=1.0,
             what="the cluster to remove its idle nodes")
    # The proxies of the removed nodes are gone, not started again elsewhere; the app still answers.
    wait_for(lambda: len(serve.status().proxies) == _alive_nodes()
             and all(s == "HEALTHY" for s in serve.status().proxies.values()),
             timeout=120, interval=0.5, what="one healthy proxy per remaining node")
    assert handle.remote().result(timeout_s=60)


def _replica_nodes(deployment: str, app: str) -> list:
    """The nodes of the deployment's serving replicas, as this driver's routers know them."""
    from shoal import client as client_mod
    from shoal.common import DeploymentID

    targets = client_mod.get_global_client()._targets.get(DeploymentID(deployment, app))
    return [r.node_id for r in targets.replicas] if targets else []


def test_scaling_down_to_one_replica_compacts_onto_the_head_and_the_cluster_shrinks(serve_app):
    """Replicas stop in Ray Serve's order (controller/downscale.py): the emptiest node's first, the
    head's last. So 4 -> 1 leaves the head's replica, every added node is left idle and goes."""
    head = _head_node()
    compact = WhereAmI.options(name="Compact", version="1", max_ongoing_requests=1,
                               ray_actor_options={"num_cpus": 1})
    handle = serve._run(compact.options(num_replicas=4).bind(), name="compact", route_prefix="/compact",
                        _blocking=False)
    nodes = _answers(handle, 4)
    assert head in nodes.values() and len(set(nodes.values())) >= 3  # the head's one CPU and two added nodes
    wait_for(lambda: serve.status().applications["compact"].status == "RUNNING", timeout=60,
             what="the application RUNNING")
    grown = _alive_nodes()
    url = get_http_url() + "/compact"
    calls = []

    def http_call():
        calls.append(1)
        r = httpx.get(url, headers={"connection": "close"}, timeout=60)
        if r.status_code != 200:
            raise AssertionError(f"HTTP {r.status_code}: {r.text[:200]}")

    # A steady HTTP load (a new connection per request) while it scales down: the emptied nodes'
    # proxies drain and, sharing the port on this host, hand their listeners to the head's, so no
    # request fails (test_ray_proxy_drain.py covers keep-alive clients).
    with _calls_in_flight(http_call, 2) as failures:
        start = time.monotonic()
        serve._run(compact.options(num_replicas=1).bind(), name="compact", route_prefix="/compact",
                   _blocking=False)  # the same version: a pure downscale, no replacement
        wait_for(lambda: _replica_nodes("Compact", "compact") == [head], timeout=120, interval=0.2,
                 what="one serving replica, on the head")
        scaled = time.monotonic() - start
        wait_for(lambda: _alive_nodes() == 1, timeout=GROW_TIMEOUT_S, interval=0.5,
                 what="the cluster to remove every added node")
        shrunk = time.monotonic() - start
    print(f"\n[downscale] nodes {grown} -> {_alive_nodes()}; 1 replica left on the head after {scaled:.1f}s, "
          f"cluster shrunk after {shrunk:.1f}s; HTTP calls during it: {len(calls)}, failed: {len(failures)}"
          + (f" (first: {failures[0]!r})" if failures else ""))
    assert failures == [], failures[:5]
    assert len(calls) > 20
    assert _deployment("compact", "Compact").replica_states == {"RUNNING": 1}
    assert handle.remote().result(timeout_s=60)[1] == head
    wait_for(lambda: list(serve.status().proxies.values()) == ["HEALTHY"], timeout=120, interval=0.5,
             what="the head's proxy alone, healthy")
    r = httpx.get(url, timeout=60)
    assert r.status_code == 200 and r.json()[1] == head


# Last: it takes a node out of the module's cluster.
def test_a_draining_node_loses_its_proxy_and_its_replicas_move_without_failed_calls(serve_app, autoscaling_cluster):
    import ray

    handle = serve._run(WhereAmI.options(name="Drained", num_replicas=4, max_ongoing_requests=1,
                                         ray_actor_options={"num_cpus": 1}).bind(),
                        name="drained", route_prefix="/drained", _blocking=False)
    nodes = _answers(handle, 4)
    head = next(n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n.get("Resources", {}))
    victim = next(n for n in sorted(set(nodes.values())) if n != head)

    def proxy_nodes() -> set:
        return {key.split(":")[0] for key, s in serve.status().proxies.items() if s == "HEALTHY"}

    wait_for(lambda: victim in proxy_nodes(), timeout=GROW_TIMEOUT_S, what="a proxy on the node to drain")
    with _calls_in_flight(lambda: handle.remote().result(timeout_s=120), 2) as failures:
        # What Ray's autoscaler or a preemption notice does before a node goes (Ray's own CLI for it).
        out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "drain-node",
                              f"--address={autoscaling_cluster.address}", f"--node-id={victim}",
                              "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=test"],
                             capture_output=True, text=True, timeout=120,
                             env=dict(os.environ, RAY_AUTH_MODE="disabled"))
        assert out.returncode == 0, out.stderr[-2000:]
        wait_for(lambda: victim not in proxy_nodes() and head in proxy_nodes(), timeout=120,
                 what="the draining node's proxy to leave")
        # Its replicas are replaced elsewhere (on a node the cluster adds if none has room), then stop.
        wait_for(lambda: (lambda n: len(n) == 4 and victim not in n)(_replica_nodes("Drained", "drained")),
                 timeout=GROW_TIMEOUT_S, interval=0.5, what="4 serving replicas, none on the draining node")
    assert not failures, failures[:3]
    assert victim not in _answers(handle, 4).values()
