"""Metrics on the Ray runtime: every node has its own endpoint, showing the shoal processes on that
node (as Ray exports metrics per node); `metrics_text()` still shows the whole instance
(docs/observability.md)."""

from __future__ import annotations

import os
import signal
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_for
from ray_cluster import ray_cluster_fixture
from shoal import serve
from shoal.api import get_http_url
from shoal.serve import metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ray_cluster = ray_cluster_fixture()
NODES = ("head", "w1", "w2")
REQUESTS = "ray_serve_deployment_request_counter_total"


@pytest.fixture(scope="module")
def serve_instance(ray_cluster):
    # Port 0: every node's exporter takes a free port (the three "nodes" here share one address).
    serve.start(runtime="ray", http_options={"port": 0}, metrics_export_port=0)
    yield


def _parse(text: str) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _scrape(url: str) -> dict:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, (r.status_code, r.text)
    return _parse(r.text)


def _sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def _label_values(samples: dict, name: str, label: str, **labels: str) -> set:
    return {dict(ls)[label] for (n, ls), _ in samples.items() if n == name and set(labels.items()) <= ls}


@serve.deployment(num_replicas=3, max_replicas_per_node=1)
class Node:
    async def __call__(self, request=None):
        return f"{os.environ['SHOAL_NODE_ID']} {serve.get_replica_context().replica_tag}"


def _node_urls(ray_cluster) -> dict:
    wanted = {ray_cluster.node_id(n) for n in NODES}
    return wait_for(lambda: (lambda u: u if set(u) == wanted else None)(metrics.metrics_export_urls()),
                    timeout=120, what="an exporter on each of the three nodes")


def test_each_node_endpoint_shows_its_own_processes(serve_app, ray_cluster):
    import ray

    handle = serve.run(Node.bind(), name="nodes", route_prefix="/node")
    urls = _node_urls(ray_cluster)
    assert len(set(urls.values())) == 3  # one address, three ports
    served: Counter = Counter()
    replica_node: dict = {}

    def count(answer: str) -> None:
        node, replica = answer.split()
        served[node] += 1
        replica_node[replica] = node

    with httpx.Client(timeout=30) as c:  # new connections reach the proxies of several nodes
        for _ in range(12):
            count(c.get(get_http_url() + "/node", headers={"connection": "close"}).text)
    calls = 0
    while calls < 30 or len(replica_node) < 3:  # routers prefer their own node's replica: call until all answered
        count(handle.remote().result(timeout_s=30))
        calls += 1
        assert calls < 1000, replica_node
    assert set(replica_node.values()) == set(urls)  # a replica on each node
    driver_node = ray.get_runtime_context().get_node_id()
    wait_for(lambda: _sum(_scrape(urls[driver_node]), "ray_serve_num_router_requests_total", application="nodes",
                          handle="driver") == calls, timeout=60, what=f"the driver's {calls} calls on its node")

    for node, url in urls.items():
        wait_for(lambda: _sum(_scrape(url), REQUESTS, application="nodes") == served[node], timeout=60,
                 what=f"node {node}'s replica to show its {served[node]} requests at {url}")
        s = _scrape(url)
        assert _label_values(s, REQUESTS, "replica", application="nodes") == {
            r for r, n in replica_node.items() if n == node}  # its own replica, not the others'
        # Its own proxy (every node with replicas gets one; it may start after the node's replica).
        wait_for(lambda: _label_values(_scrape(url), "ray_serve_num_ongoing_http_requests", "node_id") == {node},
                 timeout=60, what=f"node {node}'s proxy, and only it, at {url}")
        # The controller's own metrics are exported on its node (the head), as in Ray.
        healthy = _sum(s, "ray_serve_deployment_replica_healthy", application="nodes")
        assert healthy == (3 if node == ray_cluster.node_id("head") else 0), (node, healthy)
        routed = _sum(s, "ray_serve_num_router_requests_total", application="nodes", handle="driver")
        assert routed == (calls if node == driver_node else 0), (node, routed)

    # The proxies' counts, node by node, add up to the HTTP requests sent; the whole instance's text has all.
    wait_for(lambda: sum(_sum(_scrape(u), "ray_serve_num_http_requests_total", application="nodes",
                              status_code="200") for u in urls.values()) == 12,
             timeout=60, what="12 HTTP requests counted by the proxies of the three nodes")
    whole = _parse(metrics.metrics_text())
    assert _sum(whole, REQUESTS, application="nodes") == 12 + calls
    assert _label_values(whole, "ray_serve_num_ongoing_http_requests", "node_id") == set(urls)
    assert metrics.metrics_export_url() == urls[driver_node]


def test_node_endpoints_survive_a_controller_restart(serve_app, ray_cluster):
    import ray

    from shoal.runtime.ray import CONTROLLER_NAME, NAMESPACE

    handle = serve.run(Node.bind(), name="restart", route_prefix="/restart")
    served: Counter = Counter()
    for _ in range(9):
        served[handle.remote().result(timeout_s=30).split()[0]] += 1
    urls = _node_urls(ray_cluster)
    for node, url in urls.items():
        wait_for(lambda: _sum(_scrape(url), REQUESTS, application="restart") == served[node], timeout=60,
                 what=f"{served[node]} requests at {url}")
    actor = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    before = ray.get(actor.info.remote(), timeout=60)
    os.kill(before["pid"], signal.SIGKILL)
    after = ray.get(actor.info.remote(), timeout=120)  # Ray retries it on the restarted actor
    assert after["pid"] != before["pid"]
    # Same endpoints; the live replicas push their totals to the new controller, so counts continue.
    assert _node_urls(ray_cluster) == urls
    for node, url in urls.items():
        wait_for(lambda: _sum(_scrape(url), REQUESTS, application="restart") == served[node], timeout=120,
                 what=f"{served[node]} requests at {url} after the controller restart")
