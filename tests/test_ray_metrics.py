"""Metrics on the Ray runtime: proxies and replicas on every node push to the controller actor,
whose one endpoint shows them all (docs/observability.md)."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="module")
def serve_instance(ray_cluster):
    serve.start(runtime="ray", http_options={"port": 0}, metrics_export_port=0)
    yield


def _scrape() -> dict:
    text = httpx.get(metrics.metrics_export_url(), timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


@serve.deployment(num_replicas=3, max_replicas_per_node=1)
class Node:
    async def __call__(self, request):
        return os.environ["SHOAL_NODE_ID"]


def test_one_endpoint_shows_every_node(serve_app, ray_cluster):
    serve.run(Node.bind(), name="nodes", route_prefix="/node")
    with httpx.Client() as c:  # new connections reach the proxies of several nodes
        seen = {c.get(get_http_url() + "/node", headers={"connection": "close"}).text for _ in range(12)}
    assert len(seen) >= 2
    wait_for(lambda: _sum(_scrape(), "ray_serve_num_http_requests_total", application="nodes",
                          status_code="200") == 12, timeout=60, what="12 requests counted by the proxies")
    wait_for(lambda: _sum(_scrape(), "ray_serve_deployment_request_counter_total", application="nodes",
                          deployment="Node") == 12, timeout=60, what="12 requests counted by the replicas")
    s = _scrape()
    assert _sum(s, "ray_serve_deployment_replica_healthy", application="nodes", deployment="Node") == 3
    # A proxy on each node with replicas (all three here), each pushing its metrics.
    wait_for(lambda: {dict(ls)["node_id"] for (n, ls), _ in _scrape().items()
                      if n == "ray_serve_num_ongoing_http_requests"} == {ray_cluster.node_id(n) for n in ("head", "w1", "w2")},
             timeout=60, what="the proxies of all three nodes in the metrics")
