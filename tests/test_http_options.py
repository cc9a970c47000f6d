"""HTTP options that need their own instance: request timeout, body limit, several proxies."""

from __future__ import annotations


import httpx
import pytest

from shoal import serve
from shoal.api import get_http_url

from conftest import wait_for
from test_handles import Signal, WaitsForSignal


@pytest.fixture(scope="module")
def limited():
    serve.shutdown()
    serve.start(http_options={"port": 0, "request_timeout_s": 1, "max_request_body_bytes": 1000,
                              "num_proxies": 2, "root_path": "/base"})
    yield get_http_url()
    serve.shutdown()


def test_request_timeout_is_408_and_cancels(limited):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    h = serve.run(WaitsForSignal.bind(sig), name="slow", route_prefix="/slow")
    r = httpx.get(limited + "/slow", timeout=30)
    assert r.status_code == 408
    assert "timed out after 1" in r.text and r.headers["x-request-id"] in r.text
    wait_for(lambda: h.num_cancelled.remote().result() == 1, what="the timed-out request to be cancelled")
    serve.delete("slow")
    serve.delete("signal")


def test_body_over_limit_is_413(limited):
    @serve.deployment
    class Size:
        async def __call__(self, request):
            return len(await request.body())

    serve.run(Size.bind(), name="size", route_prefix="/size")
    assert httpx.post(limited + "/size", content=b"x" * 1000).text == "1000"
    r = httpx.post(limited + "/size", content=b"x" * 1001)
    assert r.status_code == 413 and "1000 bytes" in r.text
    # Sent in chunks (no content-length up front), the limit still holds.
    r = httpx.post(limited + "/size", content=iter([b"x" * 600, b"x" * 600]))
    assert r.status_code == 413
    assert httpx.post(limited + "/size", content=iter([b"x" * 500, b"x" * 500])).text == "1000"
    serve.delete("size")


def test_root_path_is_prepended_for_apps_behind_a_reverse_proxy(limited):
    @serve.deployment
    class Where:
        def __call__(self, request):
            return {"path": request.url.path, "root_path": request.scope["root_path"]}

    serve.run(Where.bind(), name="where", route_prefix="/rp")
    assert httpx.get(limited + "/rp/x").json() == {"path": "/base/rp/x", "root_path": "/base/rp"}
    serve.delete("where")


def test_several_proxies_share_the_port(limited):
    @serve.deployment
    class Hi:
        def __call__(self, request):
            return "hi"

    serve.run(Hi.bind(), name="hi", route_prefix="/hi")
    proxies = serve.status().proxies
    assert len(proxies) == 2 and all(s == serve.ProxyStatus.HEALTHY for s in proxies.values())
    # New connections are spread over both processes by the kernel; each must route.
    assert all(httpx.get(limited + "/hi").text == "hi" for _ in range(20))
    serve.delete("hi")
