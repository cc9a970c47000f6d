"""Logs (docs/observability.md, "Logs"): access lines, request ids through handle calls, `logging_config`.

Real processes and real HTTP: a composed application (an ingress calling a downstream deployment by
handle) is hit with `x-request-id`, then the replicas' and the proxy's log files under the session's
logs directory are read until the lines arrive (polled with a generous bound, nothing timed).
"""

from __future__ import annotations

import glob
import json
import logging
import os

import httpx
import pytest

from conftest import wait_for
from shoal import serve
from shoal.api import get_http_url
from shoal.client import get_global_client

pytestmark = pytest.mark.timeout(240)
log = logging.getLogger("ray.serve")


@serve.deployment
class Down:
    def hello(self, who: str) -> str:
        log.info("down user line for %s", who)
        log.warning("down warning line")
        return f"hello {who}"


@serve.deployment
class Front:
    def __init__(self, down) -> None:
        self.down = down

    async def __call__(self, request) -> str:
        log.info("front user line")
        return await self.down.hello.remote("front")



def _logs_dir() -> str:
    return get_global_client().session_dir + "/logs"


def _lines(pattern: str) -> list[str]:
    """The lines of the log files matching `pattern` in the session's logs directory."""
    lines: list[str] = []
    for path in glob.glob(os.path.join(_logs_dir(), pattern)):
        with open(path, errors="replace") as f:
            lines += f.read().splitlines()
    return lines


def _replica_lines(app: str, deployment: str) -> list[str]:
    return _lines(f"replica_{app}_{deployment}_*.log")


def _proxy_lines() -> list[str]:
    return _lines("proxy_*.log")


def _run(app: str, rid: str, logging_config=None) -> None:
    serve.run(Front.bind(Down.bind()), name=app, route_prefix=f"/{app}", logging_config=logging_config)
    r = httpx.get(f"{get_http_url()}/{app}", headers={"x-request-id": rid}, timeout=30)
    assert r.status_code == 200 and r.text == "hello front"
    assert r.headers["x-request-id"] == rid


def _wait_line(app: str, deployment: str, *parts: str) -> str:
    def find():
        return next((ln for ln in _replica_lines(app, deployment) if all(p in ln for p in parts)), None)

    return wait_for(find, timeout=30, what=f"a line with {parts} in {app}/{deployment}'s log")  # type: ignore


def test_text_access_and_user_lines_carry_request_id_in_both_replicas(serve_app):
    app, rid = "alog_text", "abc123"
    _run(app, rid)
    front_access = _wait_line(app, "Front", "shoal.access", rid)
    assert f"GET /{app} 200 " in front_access and "ms" in front_access
    assert f"{app}#Front" in front_access
    _wait_line(app, "Front", "front user line", rid)
    down_access = _wait_line(app, "Down", "shoal.access", rid)
    assert "CALL hello OK " in down_access and f"{app}#Down" in down_access
    _wait_line(app, "Down", "down user line for front", rid)
    proxy_access = wait_for(lambda: next((ln for ln in _proxy_lines() if " shoal.access " in ln and f" {rid} " in ln),
                                         None), timeout=30, what="the proxy's access line")
    assert f"-- GET /{app} 200 " in proxy_access and f"{app}#Front proxy_0 {rid} --" in proxy_access


def test_json_encoding(serve_app):
    app, rid = "alog_json", "abc123json"
    _run(app, rid, {"encoding": "JSON", "additional_log_standard_attrs": ["funcName"]})
    for deployment, text in (("Front", "front user line"), ("Down", "down user line for front")):
        access = json.loads(_wait_line(app, deployment, '"shoal.access"', rid))
        user = json.loads(_wait_line(app, deployment, text, rid))
        for record in (access, user):
            assert record["request_id"] == rid
            assert record["application"] == app and record["deployment"] == deployment
            assert record["replica"] and record["worker_id"].isdigit()
            assert record["levelname"] == "INFO" and record["asctime"] and record["message"]
            assert "funcName" in record
        assert user["message"] == text and user["funcName"] in ("__call__", "hello")
        assert access["route"] == (f"/{app}" if deployment == "Front" else "")


def test_access_log_off(serve_app):
    app, rid = "alog_off", "abc123off"
    _run(app, rid, {"enable_access_log": False})
    _wait_line(app, "Front", "front user line", rid)
    _wait_line(app, "Down", "down user line for front", rid)
    # Once the proxy's access line (still on) is written, the replicas' batches (same period) most likely
    # would have been too: an absence check can only pass wrongly, never fail wrongly.
    wait_for(lambda: any(" shoal.access " in ln and f" {rid} " in ln for ln in _proxy_lines()), timeout=30,
             what="the proxy's access line")
    for deployment in ("Front", "Down"):
        assert not [ln for ln in _replica_lines(app, deployment) if "shoal.access" in ln]


def test_log_level_filters(serve_app):
    app, rid = "alog_warn", "abc123warn"
    _run(app, rid, {"log_level": "WARNING"})
    _wait_line(app, "Down", "down warning line", rid)
    for deployment in ("Front", "Down"):
        lines = _replica_lines(app, deployment)
        assert not [ln for ln in lines if "user line" in ln or "shoal.access" in ln]


def test_terminal_copy_drops_exactly_the_access_lines():
    """The log tailer keeps access lines off the terminal (they stay in the file) but never a user
    line, even one that mentions the access logger and arrives in the same read as access lines."""
    from shoal.runtime.embedded import _drop_access_lines

    access = b"INFO 2026-12-07 12:00:00,123 shoal.access GET / 200 1.2ms\n"
    json_access = b'{"levelname": "INFO", "asctime": "2026-12-07 12:00:00,123", "name": "shoal.access", "x": 1}\n'
    user = b"INFO 2026-12-07 12:00:00,124 ray.serve grep for ' shoal.access ' in the file\n"
    assert _drop_access_lines(access * 3) == b""
    assert _drop_access_lines(json_access + access) == b""
    assert _drop_access_lines(access + user) == user
    assert _drop_access_lines(user + access + user) == user + user
    assert _drop_access_lines(access + b"partial line without end") == b"partial line without end"
    assert _drop_access_lines(access * 100_000) == b""  # one long read: no recursion limit
