"""A proxy that dies is replaced at once and routes to the apps deployed before: the standby proxy
takes over its index and port, and a proxy started anew gets the route table with its hello reply."""

from __future__ import annotations

import os
import signal

import httpx
import psutil

from shoal import serve
from shoal.api import get_http_url
from shoal.client import get_global_client

from conftest import wait_for


def _proxy_pids() -> set:
    controller = psutil.Process(get_global_client().controller_proc.pid)
    pids = set()
    for p in controller.children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "shoal.http.proxy" in p.cmdline():
                pids.add(p.pid)
        except psutil.Error:  # exited (or a zombie not yet reaped) meanwhile
            pass
    return pids


def _listening(url: str) -> set:
    """Pids of the processes listening on the port of `url`: the serving proxies (not the standby)."""
    port = int(url.split(":")[2].split("/")[0])
    pids = set()
    for pid in _proxy_pids():
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in psutil.Process(pid).net_connections("tcp")):
                pids.add(pid)
        except psutil.Error:
            pass
    return pids


def _standby_ready(standby: set) -> bool:
    """Whether the standby said hello: only then does it hold the route table, connect to the route's
    replica (beside the serving proxy: two connections accepted on the replica's data socket) and take
    over a proxy that dies. A standby still starting is passed over for a new process."""
    controller = psutil.Process(get_global_client().controller_proc.pid)
    for p in controller.children(recursive=True):
        try:
            if "shoal.replica.server" in p.cmdline():
                # The replica's data socket `<session>/r/<id>.sock`: the listener and each accepted connection.
                named = [c for c in p.net_connections("unix") if "/r/" in c.laddr and c.laddr.endswith(".sock")]
                return len(standby) == 1 and len(named) - 1 >= 2
        except psutil.Error:
            pass
    return False


def _wait_served(url: str) -> None:
    """Until a proxy answers `url` with "hello" (a 404 on the way: the new proxy has no route table)."""

    def served() -> bool:
        try:
            r = httpx.get(url, timeout=5)
        except httpx.HTTPError:
            return False
        assert r.status_code == 200, r.text
        return r.text == "hello"

    wait_for(served, what=f"a proxy to serve {url}")


def test_restarted_proxy_routes_to_existing_apps(serve_app):
    @serve.deployment
    def hello(request):
        return "hello"

    serve.run(hello.bind(), route_prefix="/hello")
    url = get_http_url() + "/hello"
    assert httpx.get(url).text == "hello"
    old = _listening(url)
    assert len(old) == 1
    standby = wait_for(lambda: _proxy_pids() - old, what="a standby proxy")
    wait_for(lambda: _standby_ready(standby), timeout=60, what="the standby proxy to say hello and warm its routers")
    os.kill(next(iter(old)), signal.SIGKILL)
    _wait_served(url)
    assert _listening(url) == standby  # the standby took over; a new standby replaces it
    wait_for(lambda: _proxy_pids() - standby - old, what="a new standby proxy")


def test_a_proxy_starts_anew_without_a_standby(monkeypatch):
    monkeypatch.setenv("SHOAL_SPARE_PROXY", "0")
    serve.shutdown()  # the module's instance (with a standby) is not this test's
    serve.start(http_options={"port": 0})
    try:
        @serve.deployment
        def hello(request):
            return "hello"

        serve.run(hello.bind(), route_prefix="/hello")
        url = get_http_url() + "/hello"
        old = _proxy_pids()
        assert len(old) == 1 and _listening(url) == old  # no standby
        os.kill(old.pop(), signal.SIGKILL)
        _wait_served(url)
    finally:
        serve.shutdown()
