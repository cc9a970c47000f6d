"""HTTP ingress over real sockets: routing, conversions, streaming, errors, cancellation, backpressure."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import pytest
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse

from shoal import serve
from shoal.api import get_http_url

from conftest import wait_for
from test_handles import Signal, WaitsForSignal


@pytest.fixture
def url(serve_app) -> str:
    return get_http_url()


@serve.deployment
class Echo:
    async def __call__(self, request):
        body = await request.body()
        return {
            "method": request.method,
            "path": request.url.path,
            "root_path": request.scope.get("root_path"),
            "query": dict(request.query_params),
            "header": request.headers.get("x-test"),
            "body": body.decode(),
            "json": (await request.json()) if body and request.headers.get("content-type") == "application/json"
            else None,
        }


def test_request_parts_reach_the_deployment(url):
    serve.run(Echo.bind(), route_prefix="/echo")
    r = httpx.post(url + "/echo/sub/path?a=1&b=two", json={"k": [1, 2]}, headers={"x-test": "yes"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"method": "POST", "path": "/echo/sub/path", "root_path": "/echo",
                        "query": {"a": "1", "b": "two"}, "header": "yes", "body": '{"k":[1,2]}',
                        "json": {"k": [1, 2]}}
    # The proxy reads a body only when a length header announces one: a GET with a body keeps it,
    # a chunked body arrives whole, and a request without either has an empty body.
    r = httpx.request("GET", url + "/echo", content=b"in a GET")
    assert r.json()["body"] == "in a GET"
    r = httpx.post(url + "/echo", content=iter([b"one ", b"two"]))
    assert "content-length" not in r.request.headers and r.json()["body"] == "one two"
    r = httpx.get(url + "/echo")
    assert r.json()["body"] == "" and r.json()["method"] == "GET"


@serve.deployment
class Conversions:
    def __call__(self, request):
        kind = request.query_params["kind"]
        return {
            "str": "text",
            "bytes": b"raw",
            "none": None,
            "list": [1, "a"],
            "html": HTMLResponse("<b>hi</b>"),
            "json": JSONResponse({"x": 1}, status_code=201),
            "teapot": PlainTextResponse("short and stout", status_code=418),
            "redirect": RedirectResponse("/elsewhere"),
        }[kind]


@pytest.mark.parametrize("kind, status, ctype, body", [
    ("str", 200, "text/plain; charset=utf-8", b"text"),
    ("bytes", 200, "text/plain", b"raw"),
    ("none", 200, "text/plain", b""),
    ("list", 200, "application/json", b'[1,"a"]'),
    ("html", 200, "text/html; charset=utf-8", b"<b>hi</b>"),
    ("json", 201, "application/json", b'{"x":1}'),
    ("teapot", 418, "text/plain; charset=utf-8", b"short and stout"),
    ("redirect", 307, None, b""),
])
def test_return_value_conversion(url, kind, status, ctype, body):
    serve.run(Conversions.bind())
    r = httpx.get(url + "/", params={"kind": kind}, follow_redirects=False)
    assert r.status_code == status
    if ctype:
        assert r.headers["content-type"] == ctype
    assert r.content == body
    if kind == "redirect":
        assert r.headers["location"] == "/elsewhere"


def test_large_response_arrives_whole(url):
    @serve.deployment
    class Big:
        def __call__(self, request):
            n = int(request.query_params["n"])
            return bytes(range(256)) * (n // 256)

    serve.run(Big.bind(), name="big", route_prefix="/big")
    for n in (256, 3 * 1024 * 1024):  # joined with the head into one write / handed over as is
        r = httpx.get(url + f"/big?n={n}")
        assert r.status_code == 200 and r.content == bytes(range(256)) * (n // 256)
        assert r.headers["content-length"] == str(n)
    serve.delete("big")


def test_longest_prefix_routing_and_system_routes(url):
    @serve.deployment
    class Named:
        def __init__(self, name):
            self.name = name

        def __call__(self, request):
            return self.name

    serve.run(Named.bind("root"), name="root", route_prefix="/")
    serve.run(Named.bind("a"), name="a", route_prefix="/a")
    serve.run(Named.bind("ab"), name="ab", route_prefix="/a/b")
    assert httpx.get(url + "/a").text == "a"
    assert httpx.get(url + "/a/").text == "a"
    assert httpx.get(url + "/a/c").text == "a"
    assert httpx.get(url + "/a/b/c").text == "ab"
    assert httpx.get(url + "/ab").text == "root"  # /a does not match /ab
    assert httpx.get(url + "/x/y").text == "root"
    assert httpx.get(url + "/-/routes").json() == {"/": "root", "/a": "a", "/a/b": "ab"}
    r = httpx.get(url + "/-/healthz")
    assert (r.status_code, r.text) == (200, "success")


def test_unknown_route_is_404_naming_routes_endpoint(url):
    serve.run(Echo.bind(), route_prefix="/only")
    r = httpx.get(url + "/nope")
    assert r.status_code == 404
    assert "Path '/nope' not found" in r.text and "/-/routes" in r.text


def test_app_without_route_is_not_exposed(url):
    serve.run(Echo.bind(), name="hidden", route_prefix=None)
    assert httpx.get(url + "/").status_code == 404


def test_user_exception_is_500_without_traceback(url):
    @serve.deployment
    class Broken:
        def __call__(self, request):
            raise ValueError("secret internals")

    serve.run(Broken.bind(), name="broken", route_prefix="/broken")
    r = httpx.get(url + "/broken")
    assert r.status_code == 500
    assert r.text == "Internal Server Error"
    assert "secret" not in r.text
    from shoal.client import get_global_client

    logs = os.path.join(get_global_client().session_dir, "logs")

    def logged():
        text = "".join(open(os.path.join(logs, f)).read() for f in os.listdir(logs)
                       if f.startswith("replica_broken_Broken_"))
        return "ValueError: secret internals" in text and "Traceback" in text

    wait_for(logged, what="the traceback in the replica's log")


def test_request_id_is_echoed_or_made(url):
    serve.run(Echo.bind())
    r = httpx.get(url + "/", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r1, r2 = httpx.get(url + "/"), httpx.get(url + "/")
    assert r1.headers["x-request-id"] and r1.headers["x-request-id"] != r2.headers["x-request-id"]


def test_multiplexed_model_id_header(url):
    @serve.deployment
    class Model:
        def __call__(self, request):
            return serve.get_multiplexed_model_id()

    serve.run(Model.bind())
    assert httpx.get(url + "/", headers={"serve_multiplexed_model_id": "m7"}).text == "m7"
    assert httpx.get(url + "/").text == ""


def test_generator_streams_chunks_before_it_finishes(url):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    @serve.deployment
    class Tokens:
        def __init__(self, sig):
            self.sig = sig

        async def __call__(self, request):
            yield "first "
            await self.sig.wait.remote()
            yield "second"

    serve.run(Tokens.bind(sig), name="tokens", route_prefix="/tokens")
    with httpx.stream("GET", url + "/tokens", timeout=30) as r:
        chunks = r.iter_text()
        assert next(chunks) == "first "  # arrives while the generator waits on the signal
        sig.send.remote().result()
        assert "".join(chunks) == "second"


def test_streaming_response_sse(url):
    @serve.deployment
    class Events:
        def __call__(self, request):
            async def events():
                for i in range(3):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)

            return StreamingResponse(events(), media_type="text/event-stream")

    serve.run(Events.bind())
    with httpx.stream("GET", url + "/") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines == ["data: 0", "data: 1", "data: 2"]


def test_client_disconnect_cancels_replica_and_downstream(url):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    h = serve.run(WaitsForSignal.bind(sig), name="waits", route_prefix="/waits")
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET /waits HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_for(lambda: sig.num_waiters.remote().result() == 1, what="the request to reach the replica")
    s.close()
    wait_for(lambda: h.num_cancelled.remote().result() == 1, what="the replica to see the cancellation")
    wait_for(lambda: sig.num_waiters.remote().result() == 0, what="the downstream call to be cancelled")


def test_backpressure_503(url):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    narrow = WaitsForSignal.options(name="Narrow", max_ongoing_requests=1, max_queued_requests=1)
    serve.run(narrow.bind(sig), name="narrow", route_prefix="/narrow")
    statuses = _concurrent_gets(url + "/narrow", 3, sig)
    assert sorted(statuses) == [200, 200, 503]


def test_backpressure_429_with_retry_after(url):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    narrow = WaitsForSignal.options(name="Narrow", max_ongoing_requests=1, max_queued_requests=1,
                                    backpressure_config={"status_code": 429, "retry_after_s": 7})
    serve.run(narrow.bind(sig), name="narrow", route_prefix="/narrow")
    results = _concurrent_gets(url + "/narrow", 3, sig, full=True)
    rejected = [r for r in results if r.status_code == 429]
    assert len(rejected) == 1 and rejected[0].headers["retry-after"] == "7"
    assert "backpressure" in rejected[0].text


def _concurrent_gets(target: str, n: int, sig, full: bool = False) -> list:
    """Fire n GETs at once; release the signal once the rejected one is back."""
    results: list = []

    def get():
        r = httpx.get(target, timeout=60)
        results.append(r if full else r.status_code)

    threads = [threading.Thread(target=get) for _ in range(n)]
    for t in threads:
        t.start()
        time.sleep(0.2)  # in order: the first runs, the second queues, the third overflows
    wait_for(lambda: len(results) == 1, what="the overflowing request to be rejected")
    sig.send.remote().result()
    for t in threads:
        t.join(timeout=60)
    return results
