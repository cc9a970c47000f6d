"""The dashboard's routes on the admin API, and the sampler that feeds its charts.

    POST /api/dashboard/login-code  (bearer token) -> {"code", "login_url", "expires_in_s"}
    GET  /dashboard/login?code=C     -> 303 to /dashboard with the session cookie; 401 for a bad code
    GET  /dashboard                  -> the page (cookie or bearer token)
    GET  /dashboard/static/NAME      -> its script and style sheet
    GET  /dashboard/api/snapshot     -> everything the page shows (`snapshot.py`); `?since=T` sends
                                        only chart points newer than T (wall-clock seconds)

The admin API's guard (`admin_api._Auth`) decides who gets here; see `auth.py`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from shoal.dashboard import snapshot
from shoal.dashboard.auth import CODE_TTL_S, DashboardAuth
from shoal.telemetry.history import MetricsHistory

if TYPE_CHECKING:
    from shoal.controller.controller import Controller

logger = logging.getLogger("shoal.controller")

STATIC = Path(__file__).parent / "static"
_FILES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
# The page loads its own files only: nothing from elsewhere, no inline script, no framing.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

LOGIN_FAILED = """<!doctype html><html><head><meta charset="utf-8"><title>shoal dashboard</title></head>
<body><h1>This login link is not valid</h1><p>A login link works once, for {ttl:g} minutes.
Run <code>shoal dashboard</code> (or <code>shoal dashboard --url</code>) for a new one.</p></body></html>"""

NOT_LOGGED_IN = """<!doctype html><html><head><meta charset="utf-8"><title>shoal dashboard</title></head>
<body><h1>Not logged in</h1><p>Open the dashboard with <code>shoal dashboard</code>
(or <code>shoal dashboard --url</code> for a login link to paste).</p></body></html>"""


class Dashboard:
    """The login codes and sessions, the chart history and the routes of one admin API."""

    def __init__(self, controller: "Controller", token: str, port: int) -> None:
        self.controller = controller
        self.port = port
        self.auth = DashboardAuth(token, port)
        self.history = MetricsHistory(self._engine_owner)
        self._task: Optional[asyncio.Task] = None

    def _engine_owner(self, replica_uid: str) -> Optional[tuple]:
        rec = self.controller.replicas_by_uid.get(replica_uid)
        if rec is None:
            return None
        did = rec.replica_id.deployment_id
        return (did.app_name, did.name)

    # --- the chart sampler ----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sample_forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _sample_forever(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - the charts may miss a point; the controller goes on
                logger.exception("sampling metrics for the dashboard failed")
            await asyncio.sleep(self.history.interval_s)

    def sample(self) -> None:
        self.history.sample(self.controller.metrics.merged())
        self.history.forget({(d.app_name, d.name) for d in self.controller.deployments})

    # --- routes --------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        return [
            Route("/api/dashboard/login-code", self.login_code, methods=["POST"]),
            Route("/dashboard/login", self.login, methods=["GET"]),
            Route("/dashboard", self.page, methods=["GET"]),
            Route("/dashboard/", self.page, methods=["GET"]),
            Route("/dashboard/static/{name}", self.static, methods=["GET"]),
            Route("/dashboard/api/snapshot", self.snapshot, methods=["GET"]),
        ]

    def login_url(self, code: str) -> str:
        return f"http://127.0.0.1:{self.port}/dashboard/login?code={code}"

    async def login_code(self, request: Request) -> Response:
        code = self.auth.new_code()
        return JSONResponse({"code": code, "login_url": self.login_url(code), "expires_in_s": CODE_TTL_S})

    async def login(self, request: Request) -> Response:
        session = self.auth.redeem(request.query_params.get("code", ""))
        if session is None:
            return HTMLResponse(LOGIN_FAILED.format(ttl=CODE_TTL_S / 60), 401, headers=_HEADERS)
        # 303: the browser follows with a GET to /dashboard, and its history keeps no usable code.
        return RedirectResponse("/dashboard", 303, headers={**_HEADERS, "Set-Cookie": self.auth.set_cookie(session)})

    async def page(self, request: Request) -> Response:
        return HTMLResponse((STATIC / "index.html").read_text("utf-8"), headers=_HEADERS)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _FILES:
            return Response("not found", 404)
        return Response((STATIC / name).read_bytes(), media_type=_FILES[name], headers=_HEADERS)

    async def snapshot(self, request: Request) -> Response:
        try:
            since = float(request.query_params.get("since") or 0.0)
        except ValueError:
            return JSONResponse({"error": "since must be a time in seconds since the epoch, e.g. since=1700000000.5"},
                                400)
        return JSONResponse(snapshot.build(self.controller, self.history, since), headers={"Cache-Control": "no-store"})


def not_logged_in() -> Response:
    return HTMLResponse(NOT_LOGGED_IN, 401, headers=_HEADERS)
