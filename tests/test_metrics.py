"""Metrics (docs/observability.md): Ray Serve's names on one Prometheus endpoint per instance.

Real processes and real HTTP: known traffic goes through the proxy and handles, then the endpoint
is scraped until the pushed values arrive (processes push about once a second, so every check
polls with a generous bound; none depends on how fast anything is).
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import StreamingResponse

from conftest import wait_for
from shoal import serve
from shoal.api import get_http_url
from shoal.client import get_global_client
from shoal.serve import metrics

APP = "metrics_http"
PREFIX = "/mx"
pytestmark = pytest.mark.timeout(240)


@serve.deployment(max_ongoing_requests=10)
class Site:
    def __init__(self) -> None:
        self.hits = metrics.Counter("test_site_hits", description="Requests by last path part.",
                                    tag_keys=("part",))
        self.last = metrics.Gauge("test_site_last_size", description="Size of the last body.", tag_keys=("part",))
        self.sizes = metrics.Histogram("test_site_sizes", description="Body sizes.", boundaries=[1, 10, 100],
                                       tag_keys=("part",))
        self.gate = asyncio.Event()

    async def __call__(self, request):
        part = request.url.path.rstrip("/").rsplit("/", 1)[-1]
        self.hits.inc(tags={"part": part})
        body = await request.body()
        self.last.set(len(body), tags={"part": part})
        self.sizes.observe(len(body) + 0.5, tags={"part": part})
        if part == "fail":
            raise RuntimeError("this request fails on purpose")
        if part == "stream":
            async def chunks():
                for i in range(3):
                    yield f"chunk {i}\n"
            return StreamingResponse(chunks(), media_type="text/plain")
        if part == "slow":
            await self.gate.wait()
            self.gate.clear()
            return "slow done"
        if part == "release":
            self.gate.set()
            return "released"
        return "ok"

    async def add(self, x: int) -> int:
        return x + 1


@serve.deployment
class Batched:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def double(self, xs: list) -> list:
        return [x * 2 for x in xs]

    async def __call__(self, x: int) -> int:
        return await self.double(x)


# -- scraping ----------------------------------------------------------------------------------------

def scrape() -> dict:
    """{(sample name, frozenset(labels)): value} of one scrape of the instance's endpoint."""
    url = metrics.metrics_export_url()
    text = httpx.get(url, timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict, name: str, **labels: str):
    """The sum of the samples named `name` whose labels include `labels` (None: no such sample)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    return sum(found) if found else None


def eventually(name: str, expected, **labels):
    """Poll the endpoint until the sample sum equals `expected`; returns the last scrape."""
    got = {}

    def check():
        got["samples"] = s = scrape()
        got["value"] = value(s, name, **labels)
        return got["value"] == expected

    try:
        wait_for(check, timeout=45, interval=0.2)
    except AssertionError:
        raise AssertionError(f"{name}{labels}: expected {expected}, last seen {got.get('value')}") from None
    return got["samples"]


@pytest.fixture(scope="module")
def site(serve_instance):
    handle = serve.run(Site.bind(), name=APP, route_prefix=PREFIX)
    yield get_http_url().rstrip("/") + PREFIX, handle
    serve.delete(APP)


# -- the endpoint ------------------------------------------------------------------------------------

def test_endpoint_serves_prometheus_text(serve_instance):
    url = metrics.metrics_export_url()
    assert url is not None and url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert httpx.get(url.replace("/metrics", "/nothing-here"), timeout=10).status_code == 404
    assert httpx.head(url, timeout=10).status_code == 200
    assert metrics.metrics_text().startswith("#") or metrics.metrics_text() == ""


# -- HTTP traffic ------------------------------------------------------------------------------------

def test_http_traffic_counters_histograms_and_user_metrics(site):
    base, _ = site
    before_404 = value(scrape(), "ray_serve_num_http_requests_total", route="", status_code="404") or 0
    with httpx.Client(timeout=30) as c:
        for _ in range(5):
            assert c.get(base).text == "ok"
        for _ in range(3):
            assert c.get(base + "/fail").status_code == 500
        with c.stream("GET", base + "/stream") as r:
            assert r.status_code == 200
            assert "".join(r.iter_text()) == "chunk 0\nchunk 1\nchunk 2\n"
        assert c.post(base + "/sized", content=b"x" * 20).text == "ok"
        for _ in range(2):
            assert c.get(get_http_url().rstrip("/") + "/no-such-route").status_code == 404

    http = dict(route=PREFIX, application=APP)
    s = eventually("ray_serve_num_http_requests_total", 6, method="GET", status_code="200", **http)
    s = eventually("ray_serve_num_http_requests_total", before_404 + 2, route="", application="", status_code="404")
    assert value(s, "ray_serve_num_http_requests_total", method="GET", status_code="500", **http) == 3
    assert value(s, "ray_serve_num_http_requests_total", method="POST", status_code="200", **http) == 1
    # Errors: by route, and by the deployment that answered.
    assert value(s, "ray_serve_num_http_error_requests_total", error_code="500", method="GET", **http) == 3
    assert value(s, "ray_serve_num_deployment_http_error_requests_total", deployment="Site", error_code="500",
                 method="GET", **http) == 3
    assert value(s, "ray_serve_num_http_error_requests_total", error_code="200", **http) is None
    # The proxy's latency histogram: a count per status, cumulative buckets ending at +Inf = count.
    assert value(s, "ray_serve_http_request_latency_ms_count", status_code="200", method="GET", **http) == 6
    assert value(s, "ray_serve_http_request_latency_ms_count", status_code="500", **http) == 3
    assert value(s, "ray_serve_http_request_latency_ms_bucket", le="+Inf", status_code="500", **http) == 3
    assert value(s, "ray_serve_http_request_latency_ms_sum", status_code="500", **http) > 0
    buckets = sorted((float(dict(ls)["le"]), v) for (n, ls), v in s.items()
                     if n == "ray_serve_http_request_latency_ms_bucket" and ("status_code", "200") in ls
                     and ("route", PREFIX) in ls and ("method", "GET") in ls)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1] == (float("inf"), 6)

    # The replica: successes and errors apart (as in Ray), one latency histogram over both.
    rep = dict(deployment="Site", application=APP, route=PREFIX)
    s = eventually("ray_serve_deployment_request_counter_total", 7, **rep)
    assert value(s, "ray_serve_deployment_error_counter_total", **rep) == 3
    assert value(s, "ray_serve_deployment_processing_latency_ms_count", **rep) == 10
    replicas = {dict(ls)["replica"] for (n, ls), _ in s.items() if n == "ray_serve_deployment_request_counter_total"
                and ("deployment", "Site") in ls}
    assert len(replicas) == 1
    (replica,) = replicas

    # The proxy's router counted every request it routed, under the route.
    assert value(s, "ray_serve_num_router_requests_total", deployment="Site", application=APP, handle="proxy",
                 route=PREFIX) == 10

    # The replica's user metrics, with the replica's tags added.
    tags = dict(deployment="Site", replica=replica, application=APP)
    assert value(s, "ray_test_site_hits_total", part="mx", **tags) == 5
    assert value(s, "ray_test_site_hits_total", part="fail", **tags) == 3
    assert value(s, "ray_test_site_hits_total", part="stream", **tags) == 1
    assert value(s, "ray_test_site_last_size", part="sized", **tags) == 20
    assert value(s, "ray_test_site_sizes_count", part="sized", **tags) == 1
    assert value(s, "ray_test_site_sizes_bucket", part="sized", le="10.0", **tags) == 0
    assert value(s, "ray_test_site_sizes_bucket", part="sized", le="100.0", **tags) == 1

    # The controller's view of the replica.
    assert value(s, "ray_serve_deployment_replica_healthy", **tags) == 1
    assert value(s, "ray_serve_autoscaling_target_replicas", deployment="Site", application=APP) == 1
    assert value(s, "ray_serve_replica_startup_latency_ms_count", **tags) == 1


def test_gauges_rise_with_requests_in_flight_and_return_to_zero_when_idle(site):
    base, _ = site
    done = threading.Event()

    def slow() -> None:
        try:
            httpx.get(base + "/slow", timeout=120)
        finally:
            done.set()

    thread = threading.Thread(target=slow, daemon=True)
    thread.start()
    try:
        eventually("ray_serve_num_ongoing_http_requests", 1)
        s = eventually("ray_serve_replica_processing_queries", 1, deployment="Site", application=APP)
        assert value(s, "ray_serve_num_ongoing_requests_at_replicas", deployment="Site", handle="proxy") == 1
    finally:
        wait_for(lambda: httpx.get(base + "/release", timeout=30).text == "released" and done.wait(0.5),
                 timeout=60, what="the slow request to finish")
    thread.join(30)
    eventually("ray_serve_num_ongoing_http_requests", 0)
    s = eventually("ray_serve_replica_processing_queries", 0, deployment="Site", application=APP)
    assert value(s, "ray_serve_num_ongoing_requests_at_replicas", deployment="Site", handle="proxy") == 0
    assert value(s, "ray_serve_deployment_queued_queries", deployment="Site", handle="proxy") == 0


def test_driver_handle_calls_count_in_the_router_and_the_replica(site):
    _, handle = site
    labels = dict(deployment="Site", application=APP, handle="driver", route="")
    before = value(scrape(), "ray_serve_num_router_requests_total", **labels) or 0
    rep_before = value(scrape(), "ray_serve_deployment_request_counter_total", deployment="Site", route="") or 0
    assert [handle.add.remote(i).result() for i in range(4)] == [1, 2, 3, 4]
    s = eventually("ray_serve_num_router_requests_total", before + 4, **labels)
    s = eventually("ray_serve_deployment_request_counter_total", rep_before + 4, deployment="Site", route="")
    assert value(s, "ray_serve_deployment_queued_queries", deployment="Site", handle="driver") == 0


def test_endpoint_and_live_totals_survive_a_controller_restart(site):
    """The restarted controller listens where the old one did; live processes push their totals to it."""
    base, _ = site
    labels = dict(route=PREFIX, application=APP, method="GET", status_code="200")
    before = value(scrape(), "ray_serve_num_http_requests_total", **labels) or 0
    assert httpx.get(base, timeout=30).text == "ok"
    eventually("ray_serve_num_http_requests_total", before + 1, **labels)
    url = metrics.metrics_export_url()
    client = get_global_client()
    old = client.controller_proc.pid
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: client.controller_proc.pid != old, timeout=60, what="a new controller")
    assert metrics.metrics_export_url() == url
    eventually("ray_serve_num_http_requests_total", before + 1, **labels)
    assert httpx.get(base, timeout=30).text == "ok"
    eventually("ray_serve_num_http_requests_total", before + 2, **labels)


def test_batching_metrics(serve_instance):
    handle = serve.run(Batched.bind(), name="metrics_batch", route_prefix=None)
    try:
        responses = [handle.remote(i) for i in range(8)]
        assert [r.result() for r in responses] == [i * 2 for i in range(8)]
        labels = dict(deployment="Batched", application="metrics_batch", function_name="double")
        wait_for(lambda: (value(scrape(), "ray_serve_actual_batch_size_sum", **labels) or 0) == 8, timeout=45,
                 what="8 batched requests in the batch-size histogram")
        s = scrape()
        batches = value(s, "ray_serve_batches_processed_total", **labels)
        assert batches >= 2  # at most 4 per batch
        assert value(s, "ray_serve_actual_batch_size_count", **labels) == batches
        assert value(s, "ray_serve_batch_execution_time_ms_count", **labels) == batches
        assert value(s, "ray_serve_batch_wait_time_ms_count", **labels) == batches
        assert value(s, "ray_serve_batch_utilization_percent_count", **labels) == batches
        assert value(s, "ray_serve_batch_queue_length", **labels) is not None
    finally:
        serve.delete("metrics_batch")


# -- unit: how the controller merges what processes push ----------------------------------------------

class _Conn:
    closed = False


class _Controller:
    deployments: dict = {}
    checkpoint_extra: dict = {}


def _snap(requests: float, ongoing: float) -> dict:
    return {
        "ray_serve_num_http_requests": ("counter", "", ("route",), None, {("/a",): requests}),
        "ray_serve_num_ongoing_http_requests": ("gauge", "", ("node_id",), None, {("n",): ongoing}),
    }


def _hub_value(hub, name: str, labels: tuple):
    fam = hub.merged().get(name)
    return None if fam is None else fam[4].get(labels)


def test_hub_sums_processes_and_keeps_totals_of_those_that_ended(monkeypatch):
    from shoal.telemetry import exporter

    hub = exporter.MetricsHub(_Controller())
    a, b = _Conn(), _Conn()
    hub.update(a, ("proc-a", _snap(5, 1)))
    hub.update(b, ("proc-b", _snap(7, 2)))
    assert _hub_value(hub, "ray_serve_num_http_requests", ("/a",)) == 12
    assert _hub_value(hub, "ray_serve_num_ongoing_http_requests", ("n",)) == 3
    hub.forget(a)  # process a ended: its counter total stays, its gauge goes
    assert _hub_value(hub, "ray_serve_num_http_requests", ("/a",)) == 12
    assert _hub_value(hub, "ray_serve_num_ongoing_http_requests", ("n",)) == 2
    monkeypatch.setattr(exporter, "RECONNECT_GRACE_S", -1.0)  # folded at the next merge
    hub.forget(b)
    assert _hub_value(hub, "ray_serve_num_http_requests", ("/a",)) == 12  # folded into the retired totals
    c = _Conn()
    hub.update(c, ("proc-c", _snap(1, 0)))
    assert _hub_value(hub, "ray_serve_num_http_requests", ("/a",)) == 13


def test_hub_drops_an_ended_replicas_own_series_later(monkeypatch):
    from types import SimpleNamespace

    from shoal.telemetry import exporter

    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(exporter, "time", SimpleNamespace(monotonic=lambda: clock.now))
    hub = exporter.MetricsHub(_Controller())
    conn = _Conn()
    hub.update(conn, ("replica-x", {
        "ray_serve_deployment_request_counter": ("counter", "", ("deployment", "replica"), None,
                                                 {("D", "x"): 3.0}),
        "ray_serve_num_router_requests": ("counter", "", ("deployment",), None, {("E",): 2.0}),
    }))
    hub.forget(conn)
    clock.now += exporter.RECONNECT_GRACE_S + 1  # it did not come back: its totals are retired
    assert _hub_value(hub, "ray_serve_deployment_request_counter", ("D", "x")) == 3  # kept for a while
    clock.now += exporter.DEAD_REPLICA_SERIES_TTL_S + 1
    assert _hub_value(hub, "ray_serve_deployment_request_counter", ("D", "x")) is None  # then gone, as in Ray
    assert _hub_value(hub, "ray_serve_num_router_requests", ("E",)) == 2  # totals without a replica stay


def test_hub_does_not_count_a_reconnected_process_twice():
    from shoal.telemetry import exporter

    hub = exporter.MetricsHub(_Controller())
    first = _Conn()
    hub.update(first, ("proc", _snap(5, 1)))
    hub.forget(first)  # its connection dropped ...
    hub.update(_Conn(), ("proc", _snap(6, 0)))  # ... and it came back with its cumulative totals
    assert _hub_value(hub, "ray_serve_num_http_requests", ("/a",)) == 6


def test_export_options():
    from shoal.telemetry.exporter import export_options

    assert export_options("off")["port"] == -1 and export_options(-1)["port"] == -1
    assert export_options(0, "0.0.0.0") == {"host": "0.0.0.0", "port": 0}
    with pytest.raises(ValueError, match="SHOAL_METRICS_EXPORT_PORT"):
        export_options("eighty")


def test_hub_exports_the_first_of_conflicting_definitions():
    from shoal.telemetry import exporter

    hub = exporter.MetricsHub(_Controller())
    hub.update(_Conn(), ("p1", {"ray_x": ("counter", "", ("a",), None, {("1",): 1.0})}))
    hub.update(_Conn(), ("p2", {"ray_x": ("gauge", "", ("b",), None, {("2",): 5.0})}))
    text = hub.text()
    assert 'ray_x_total{a="1"} 1.0' in text and "ray_x{" not in text


# -- unit: shoal.metrics ------------------------------------------------------------------------------

def test_user_metric_validation_outside_a_replica():
    c = metrics.Counter("test_unit_counter", tag_keys=("k",))
    with pytest.raises(ValueError, match="Missing value"):
        c.inc()
    with pytest.raises(ValueError, match="Unrecognized tag key"):
        c.inc(tags={"other": "x"})
    with pytest.raises(ValueError, match="value must be >0"):
        c.inc(0)
    c.set_default_tags({"k": "v"})
    c.inc(2)
    with pytest.raises(TypeError):
        metrics.Counter("test_unit_bad", tag_keys=["k"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        metrics.Counter("bad name")
    with pytest.raises(ValueError, match="Invalid tag key"):
        metrics.Counter("test_unit_bad_tag", tag_keys=("a-b",))
    with pytest.raises(ValueError):
        metrics.Histogram("test_unit_hist", boundaries=[])
    with pytest.raises(ValueError):
        metrics.Histogram("test_unit_hist", boundaries=[0, 1])
    with pytest.raises(ValueError, match="already defined"):
        metrics.Gauge("test_unit_counter", tag_keys=("k",))
    from shoal.telemetry.registry import REGISTRY

    fam = REGISTRY.snapshot()["ray_test_unit_counter"]
    assert fam[0] == "counter" and fam[4] == {("v",): 2.0}


def test_hub_slices_by_node_and_keeps_ended_totals_on_their_node(monkeypatch):
    """On a cluster each node's endpoint shows what that node's processes pushed; the controller's
    own metrics belong to the controller's node."""
    from shoal import common
    from shoal.telemetry import exporter

    monkeypatch.setattr(common, "LOCAL_NODE_ID", "head")
    hub = exporter.MetricsHub(_Controller())
    a, b, c = _Conn(), _Conn(), _Conn()
    a.node_id, b.node_id, c.node_id = "head", "w1", "w1"
    hub.update(a, ("proc-a", _snap(5, 1)))
    hub.update(b, ("proc-b", _snap(7, 2)))
    hub.update(c, ("proc-c", _snap(1, 1)))

    def value(node, name, labels):
        fam = hub.merged(node).get(name)
        return None if fam is None else fam[4].get(labels)

    assert value("head", "ray_serve_num_http_requests", ("/a",)) == 5
    assert value("w1", "ray_serve_num_http_requests", ("/a",)) == 8
    assert value("w2", "ray_serve_num_http_requests", ("/a",)) is None
    assert value(None, "ray_serve_num_http_requests", ("/a",)) == 13  # the whole instance
    assert value("w1", "ray_serve_num_ongoing_http_requests", ("n",)) == 3
    monkeypatch.setattr(exporter, "RECONNECT_GRACE_S", -1.0)
    hub.forget(b)  # ended: its total stays on its node
    assert value("w1", "ray_serve_num_http_requests", ("/a",)) == 8
    assert value("head", "ray_serve_num_http_requests", ("/a",)) == 5
    assert value("w1", "ray_serve_num_ongoing_http_requests", ("n",)) == 1
    head_text, w1_text = hub.text("head"), hub.text("w1")
    assert 'ray_serve_num_http_requests_total{route="/a"} 5.0' in head_text
    assert 'ray_serve_num_http_requests_total{route="/a"} 8.0' in w1_text
