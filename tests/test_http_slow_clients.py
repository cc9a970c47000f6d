"""The HTTP door holds against slow clients: `request_header_timeout_s` and `keep_alive_timeout_s`.

Real proxy process, real sockets. No assertion depends on how fast anything happened: slow clients
must be closed "eventually" (within a generous bound), and the within-limit client keeps wide margins.
"""

from __future__ import annotations

import asyncio
import re
import selectors
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
from fastapi import FastAPI, WebSocket

from shoal import serve
from shoal.api import get_http_url
from shoal.config import HTTPOptions, validate_model
from shoal.http.coalesce import with_header_timeout
from shoal.schema import ConfigError, parse_config

HEADER_TIMEOUT_S = 3
KEEP_ALIVE_S = 15  # the within-limit client idles 4.5 s: 10 s of margin for a starved test process
GENEROUS_S = 60  # "eventually": far above either time-out

api = FastAPI()


@serve.deployment
@serve.ingress(api)
class Long:
    @api.get("/slow")
    async def slow(self):
        await asyncio.sleep(HEADER_TIMEOUT_S + 1.5)
        return "done"

    @api.websocket("/ws")
    async def echo(self, websocket: WebSocket):
        await websocket.accept()
        while True:
            await websocket.send_text("echo:" + await websocket.receive_text())


@pytest.fixture(scope="module")
def door():
    serve.shutdown()
    serve.start(http_options={"port": 0, "request_header_timeout_s": HEADER_TIMEOUT_S,
                              "keep_alive_timeout_s": KEEP_ALIVE_S})

    @serve.deployment
    class Hi:
        def __call__(self, request):
            return "hi"

    serve.run(Hi.bind(), name="hi", route_prefix="/hi")
    url = get_http_url()
    u = urlparse(url)
    yield url, (u.hostname, u.port)
    serve.shutdown()


def _connect(addr: tuple) -> socket.socket:
    s = socket.create_connection(addr, timeout=GENEROUS_S)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _read_response(s: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"the server closed the connection; got {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "the server closed the connection midway through a response"
        body += chunk
    return head, body


def _closed_by_server(s: socket.socket) -> bytes:
    """What the server sent until it closed the connection (waits up to GENEROUS_S)."""
    s.settimeout(GENEROUS_S)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got


def test_slow_header_clients_are_dropped_while_others_are_served(door):
    url, addr = door
    fresh = [_connect(addr) for _ in range(140)]        # trickle their first request head
    kept = [_connect(addr) for _ in range(40)]          # trickle a second head on a keep-alive connection
    silent = [_connect(addr) for _ in range(20)]        # connect and send nothing
    for s in kept:
        s.sendall(b"GET /hi HTTP/1.1\r\nhost: x\r\n\r\n")
        head, body = _read_response(s)
        assert head.startswith(b"HTTP/1.1 200") and body == b"hi"
    trickling = fresh + kept
    for s in trickling:
        s.sendall(b"GET /hi HTTP/1.1\r\n")

    sel = selectors.DefaultSelector()
    for s in trickling + silent:
        sel.register(s, selectors.EVENT_READ)
    received = {s: b"" for s in trickling + silent}
    open_ = set(trickling + silent)
    served = 0
    line = 0
    deadline = time.monotonic() + GENEROUS_S
    while open_ and time.monotonic() < deadline:
        # One more header line from every slow client the server has not answered yet...
        line += 1
        for s in trickling:
            if s in open_ and not received[s]:
                try:
                    s.sendall(b"x-line-%d: slow\r\n" % line)
                except OSError:  # closed by the server: reset
                    open_.discard(s)
                    sel.unregister(s)
        # ...while everyone else is served.
        r = httpx.get(url + "/hi", timeout=GENEROUS_S)
        assert r.status_code == 200 and r.text == "hi"
        served += 1
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                received[s] += chunk
            else:
                open_.discard(s)
                sel.unregister(s)
    assert not open_, f"{len(open_)} of {len(received)} slow connections were still open after {GENEROUS_S}s"
    assert served >= 1
    # A client caught midway through a head is told why (when the reply arrived before the reset).
    answered = [received[s] for s in trickling if received[s]]
    assert answered, "no slow client got the 408"
    assert any(received[s] for s in kept), "no slow head on a keep-alive connection got the 408"
    assert all(a.startswith(b"HTTP/1.1 408") and b"connection: close" in a for a in answered), answered[:3]
    assert all(b"not complete within 3s" in a for a in answered)
    # One that never sent a byte is just disconnected.
    assert all(received[s] == b"" for s in silent)
    for s in trickling + silent:
        s.close()
    # The door still works.
    assert httpx.get(url + "/hi").text == "hi"


def test_idle_keep_alive_connection_is_closed_after_keep_alive_timeout(door):
    _, addr = door
    s = _connect(addr)
    s.sendall(b"GET /hi HTTP/1.1\r\nhost: x\r\n\r\n")
    head, body = _read_response(s)
    assert head.startswith(b"HTTP/1.1 200") and body == b"hi"
    # Idle between requests, it is closed by the keep-alive time-out: quietly, not with a 408.
    assert _closed_by_server(s) == b""
    s.close()


def test_slow_but_within_limit_client_is_served(door):
    _, addr = door
    s = _connect(addr)
    for piece in (b"GET /hi HTTP/1.1\r\n", b"host: x\r\n", b"x-a: 1\r\n", b"\r\n"):
        s.sendall(piece)
        time.sleep(0.2)  # 0.6 s for the head, well within 3 s
    head, body = _read_response(s)
    assert head.startswith(b"HTTP/1.1 200") and body == b"hi"
    # Idle on keep-alive for longer than the header time-out (but well within the keep-alive one): the
    # header time-out counts from the next request's first byte, so this one is served as well.
    time.sleep(HEADER_TIMEOUT_S + 1.5)
    for piece in (b"GET /hi HTTP/1.1\r\n", b"host: x\r\n", b"\r\n"):
        s.sendall(piece)
        time.sleep(0.2)
    head, body = _read_response(s)
    assert head.startswith(b"HTTP/1.1 200") and body == b"hi"
    s.close()


def test_long_responses_and_websockets_outlive_the_header_timeout(door):
    """Only a request head is timed: not a response the app takes long over, not an open WebSocket."""
    from websockets.sync.client import connect

    url, _ = door
    serve.run(Long.bind(), name="long", route_prefix="/long")
    got = {}
    t = threading.Thread(target=lambda: got.update(r=httpx.get(url + "/long/slow", timeout=GENEROUS_S)))
    t.start()
    with connect(url.replace("http", "ws", 1) + "/long/ws", open_timeout=GENEROUS_S) as ws:
        ws.send("a")
        assert ws.recv(timeout=GENEROUS_S) == "echo:a"
        time.sleep(HEADER_TIMEOUT_S + 1.5)
        ws.send("b")
        assert ws.recv(timeout=GENEROUS_S) == "echo:b"
    t.join(GENEROUS_S)
    assert got["r"].status_code == 200 and got["r"].json() == "done"
    serve.delete("long")


@pytest.mark.parametrize("value", [0, -1, "soon"])
def test_request_header_timeout_is_validated(value):
    assert HTTPOptions().request_header_timeout_s == 30.0
    assert "request's head" in HTTPOptions.model_fields["request_header_timeout_s"].description
    assert validate_model(HTTPOptions, {"request_header_timeout_s": 0.5}, "http_options").request_header_timeout_s \
        == 0.5
    with pytest.raises(ValueError, match=r"Invalid http_options: request_header_timeout_s=.*"):
        validate_model(HTTPOptions, {"request_header_timeout_s": value}, "http_options")
    # In a config file too.
    app = [{"import_path": "m:app"}]
    assert parse_config({"http_options": {"request_header_timeout_s": 5}, "applications": app}) \
        .http_options.to_http_options() == {"request_header_timeout_s": 5.0}
    with pytest.raises(ConfigError, match=r"http_options\.request_header_timeout_s: "):
        parse_config({"http_options": {"request_header_timeout_s": value}, "applications": app})
    with pytest.raises(ValueError):
        with_header_timeout(0)
