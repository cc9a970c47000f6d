"""On a real multi-node Ray cluster (all nodes on this machine, so their proxies share the HTTP port
with SO_REUSEPORT): the proxy of a node left without replicas drains and hands its listener to the
head's proxy, and a steady HTTP load loses no request (issue 17)."""

from __future__ import annotations

import pytest

from shoal import serve
from shoal.api import get_http_url

from conftest import wait_for
from ray_cluster import ray_cluster_fixture
from test_proxy_drain import _listening_sockets, _load

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ray_cluster = ray_cluster_fixture()


@pytest.fixture(scope="module")
def serve_instance(ray_cluster):
    serve.start(runtime="ray", http_options={"port": 0})
    yield


@serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {"head": 0.01}})
class Echo:
    async def __call__(self, request):
        return "ok"


@serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {"w1": 0.01}})
class OnW1:
    def __call__(self, *args):
        return "w1"


def _proxy_of(response, body: str) -> str:
    """Which proxy process answered: a request id the proxy made starts with its pid (hex)."""
    return response.getheader("x-request-id").split("-")[0]


def test_a_node_left_without_replicas_drains_its_proxy_without_a_failed_request(serve_app, ray_cluster):
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    serve.run(OnW1.bind(), name="w1", route_prefix=None)  # a replica on w1, so a proxy there
    w1, head = ray_cluster.node_id("w1"), ray_cluster.node_id("head")

    def proxies() -> dict:
        return {key.split(":")[0]: status for key, status in serve.status().proxies.items()}

    wait_for(lambda: proxies() == {head: "HEALTHY", w1: "HEALTHY"}, timeout=120, interval=0.5,
             what="a healthy proxy on the head and on w1")
    port = int(get_http_url().rsplit(":", 1)[1])
    with _load(port, new_connection_threads=3, keep_alive_threads=2, path="/echo", who=_proxy_of) as load:
        wait_for(lambda: len(load.served_by) == 2, timeout=120, interval=0.1, what="both proxies answering")
        serve.delete("w1")  # w1 has no replica left: its proxy drains, hands its listener over, ends
        wait_for(lambda: proxies() == {head: "HEALTHY"}, timeout=120, interval=0.2,
                 what="w1's proxy to drain and end")
        after = load.count()
        wait_for(lambda: load.count() >= after + 300, timeout=120, interval=0.1, what="300 more requests")
    assert load.failures == [], load.failures[:5]
    # The head's proxy accepts on w1's proxy's listening socket too: it was handed over, not closed.
    assert len(load.served_by) == 2
    assert _listening_sockets(int(load.last, 16), port) == 2
