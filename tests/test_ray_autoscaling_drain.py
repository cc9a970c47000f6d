"""Scale-down under steady HTTP load on an autoscaling Ray cluster (issue 17): replicas leave nodes,
those nodes' proxies drain and hand their listeners to a proxy sharing the port (all nodes run on
this machine), the idle nodes go, and no request fails."""

from __future__ import annotations

import os

import pytest

from shoal import serve
from shoal.api import get_http_url

from autoscaling_cluster import autoscaling_cluster_fixture
from conftest import wait_for
from test_proxy_drain import _load
from test_ray_proxy_drain import _proxy_of

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
autoscaling_cluster = autoscaling_cluster_fixture(
    {"CPU": 1}, {"cpu_node": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 3}})

GROW_TIMEOUT_S = 240  # nodes start as processes on this (slow, shared) machine: a bound, not a measure


@pytest.fixture(scope="module")
def serve_instance(autoscaling_cluster):
    serve.start(runtime="ray", http_options={"port": 0})
    yield


@serve.deployment(version="1", ray_actor_options={"num_cpus": 1})
class Answer:
    async def __call__(self, request):
        return os.environ["SHOAL_NODE_ID"]


def _alive_nodes() -> set:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}


def _healthy_proxy_nodes() -> set:
    return {key.split(":")[0] for key, s in serve.status().proxies.items() if s == "HEALTHY"}


def _running(replicas: int) -> bool:
    app = serve.status().applications.get("scaled")
    return bool(app and app.status == "RUNNING"
                and app.deployments["Answer"].replica_states == {"RUNNING": replicas})


def test_scale_down_under_http_load_fails_no_request_and_the_idle_nodes_go(serve_app):
    serve._run(Answer.options(num_replicas=4).bind(), name="scaled", route_prefix="/scaled", _blocking=False)
    wait_for(lambda: _running(4), timeout=GROW_TIMEOUT_S, interval=0.5, what="4 replicas running")
    grown = _alive_nodes()
    assert len(grown) >= 3  # four 1-CPU replicas: the 1-CPU head and two 2-CPU nodes at least
    wait_for(lambda: _healthy_proxy_nodes() == grown, timeout=GROW_TIMEOUT_S, interval=0.5,
             what="a healthy proxy on every node")
    port = int(get_http_url().rsplit(":", 1)[1])
    with _load(port, new_connection_threads=3, keep_alive_threads=2, path="/scaled", who=_proxy_of) as load:
        wait_for(lambda: len(load.served_by) == len(grown), timeout=120, interval=0.1,
                 what="every node's proxy answering")
        # The same version with fewer replicas: three stop gracefully, in place.
        serve._run(Answer.options(num_replicas=1).bind(), name="scaled", route_prefix="/scaled", _blocking=False)
        wait_for(lambda: _running(1), timeout=GROW_TIMEOUT_S, interval=0.5, what="1 replica running")
        wait_for(lambda: len(_alive_nodes()) <= 2 and _healthy_proxy_nodes() == _alive_nodes()
                 and len(serve.status().proxies) == len(_alive_nodes()),
                 timeout=GROW_TIMEOUT_S, interval=1.0, what="the idle nodes and their proxies to go")
        after = load.count()
        wait_for(lambda: load.count() >= after + 300, timeout=120, interval=0.1, what="300 more requests")
    assert load.failures == [], load.failures[:5]
    assert load.count() > 300
