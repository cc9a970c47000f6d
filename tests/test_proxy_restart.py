"""A proxy that restarts after apps were deployed routes to them at once (it gets the table on hello)."""

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
            if p.status() != psutil.STATUS_ZOMBIE and "shoal.http.proxy" in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.Error:  # exited (or a zombie not yet reaped) meanwhile
            pass
    return pids


def test_restarted_proxy_routes_to_existing_apps(serve_app):
    @serve.deployment
    def hello(request):
        return "hello"

    serve.run(hello.bind(), route_prefix="/hello")
    url = get_http_url() + "/hello"
    assert httpx.get(url).text == "hello"
    old = _proxy_pids()
    assert len(old) == 1
    os.kill(old.pop(), signal.SIGKILL)

    def served_by_new_proxy():
        new = _proxy_pids()
        if not new:
            return False
        try:
            r = httpx.get(url, timeout=5)
        except httpx.HTTPError:
            return False
        assert r.status_code == 200, r.text  # a 404 here: the new proxy has no route table
        return r.text == "hello"

    wait_for(served_by_new_proxy, what="the restarted proxy to serve /hello")
