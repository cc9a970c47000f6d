"""The admin REST API of a detached instance, served by the controller process on loopback only.

Every request needs `Authorization: Bearer <token>` (the token file of the instance directory, mode
0600); without it the answer is 401. The socket is bound to 127.0.0.1, and a peer that is not a
loopback address is refused (403) as well. Routes follow Ray's dashboard where one exists:

    PUT    /api/serve/applications/   body: the config (JSON)  -> 200 {"warnings": [...]} | 400 {"errors": [...]}
                                         | 409 (superseded by a newer PUT)
    GET    /api/serve/applications/   -> {"status": <serve.status()>, "applications": {name: config}, "http_url"}
    DELETE /api/serve/applications/   -> 200, then the instance shuts down (as `serve.shutdown()`)
    GET    /api/serve/status          -> serve.status() as plain data (enum values as their names);
                                         `?wait_routes=1`: once every proxy has the current route table

The web dashboard's routes (`/dashboard...`, `POST /api/dashboard/login-code`) are in
`shoal.dashboard.web`; a browser reads them with a session cookie instead of the token.

A PUT is validated (schema) here, then built in a fresh `python -m shoal.builder` process
(imports, builders, overrides), then applied declaratively; any error leaves the running
applications untouched. `?app_dir=DIR` puts DIR first on the builder's import path;
`?build_timeout_s=S` bounds the build (default $SHOAL_BUILD_TIMEOUT_S of the controller, else 120 s):
the builder is then killed and the error names the application and its import path. The latest
config wins: a PUT stops the build of an older one still in progress (killing its builder), and the
older PUT answers 409 "superseded"; a client that closes its connection stops its build too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
import warnings
from typing import TYPE_CHECKING, Any, Iterator, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.websockets import WebSocketClose

from shoal.builder import build_specs_async, build_timeout_s
from shoal.dashboard.auth import readable_with_cookie
from shoal.dashboard.web import Dashboard, not_logged_in
from shoal.exceptions import RayServeException
from shoal.schema import ConfigError, ConfigWarning, parse_config

if TYPE_CHECKING:
    from shoal.controller.controller import Controller

logger = logging.getLogger("shoal.controller")


def _is_loopback(host: Optional[str]) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Auth:
    """ASGI middleware: loopback peers with the right bearer token only; the dashboard's session
    cookie opens its read-only pages (see `shoal.dashboard.auth`)."""

    def __init__(self, app: Any, token: str, dashboard: Optional[Dashboard] = None):
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.dashboard = dashboard

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        client = scope.get("client")
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        if not _is_loopback(client[0] if client else None):
            refusal: Any = JSONResponse({"error": "the admin API serves loopback clients only"}, 403)
        elif secrets.compare_digest(given, self.expected) or self._dashboard_allows(scope, headers):
            return await self.app(scope, receive, send)
        elif self.dashboard is not None and scope["type"] == "http" and scope["path"].rstrip("/") == "/dashboard":
            refusal = not_logged_in()  # a browser without a session: say how to get one
        else:
            refusal = JSONResponse({"error": "missing or wrong bearer token (see the instance's token file)"},
                                   401, headers={"WWW-Authenticate": "Bearer"})
        if scope["type"] == "websocket":
            refusal = WebSocketClose(code=1008)
        await refusal(scope, receive, send)

    def _dashboard_allows(self, scope: dict, headers: dict) -> bool:
        """The login link (its code is checked by the route), or a read of the dashboard with a valid
        session cookie sent to this instance by name (not to a host name that resolves here)."""
        d = self.dashboard
        if d is None or scope["type"] != "http":
            return False
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/dashboard/login":
            return True
        if not readable_with_cookie(method, path):
            return False
        host = headers.get(b"host", b"").decode("latin-1")
        if host not in (f"127.0.0.1:{d.port}", f"localhost:{d.port}"):
            return False
        session = d.auth.session_of(headers.get(b"cookie", b"").decode("latin-1"))
        return session is not None and d.auth.valid(session)


SUPERSEDED = "superseded by a newer deploy (the latest config wins); nothing of this one was applied"


async def _client_gone(request: Request) -> None:
    """Returns once the client closes its connection (call after the body has been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def make_app(controller: "Controller", token: str, dashboard: Optional[Dashboard] = None) -> Any:
    lock = asyncio.Lock()  # one build and apply at a time: each sees the result of the previous one
    newest = [0]  # the number of the newest PUT: an older one that has not applied yet gives way
    building: dict[int, asyncio.Future] = {}  # the build in progress, by the number of its PUT

    async def status(request: Request) -> Response:
        if request.query_params.get("wait_routes"):  # after a deploy: answer once proxies route to it
            await controller.proxies.wait_routes(10.0)
        return JSONResponse((await controller.rpc_status(None)).to_dict())  # type: ignore[arg-type]

    async def get_apps(request: Request) -> Response:
        st = (await controller.rpc_status(None)).to_dict()  # type: ignore[arg-type]
        return JSONResponse({"status": st, "applications": controller.app_configs(),
                             "http_url": controller.proxies.url()})

    async def put_apps(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError as e:
            return JSONResponse({"errors": [f"the body is not JSON: {e}"]}, 400)
        if not isinstance(body, dict):
            return JSONResponse({"errors": ["the body must be a mapping with `applications:`"]}, 400)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConfigWarning)
                schema = parse_config(body)
            timeout = build_timeout_s(request.query_params.get("build_timeout_s"), "build_timeout_s")
        except ConfigError as e:
            return JSONResponse({"errors": e.problems}, 400)
        newest[0] += 1
        mine = newest[0]
        for older in building.values():  # the latest config wins: stop an older build now
            older.cancel()
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            async with lock:
                if newest[0] != mine:
                    return JSONResponse({"errors": [SUPERSEDED]}, 409)
                build = building[mine] = asyncio.ensure_future(
                    build_specs_async(body, request.query_params.get("app_dir"), timeout))
                try:
                    await asyncio.wait([build, gone], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    del building[mine]
                    if not build.done():  # the client left (or this request was cancelled): stop it
                        build.cancel()
                        await asyncio.wait([build])
                if build.cancelled():
                    if newest[0] != mine:
                        return JSONResponse({"errors": [SUPERSEDED]}, 409)
                    logger.info("deploy cancelled: the client closed the connection while it was building")
                    return JSONResponse({"errors": ["the client went away; the build was stopped"]}, 499)
                try:
                    specs = build.result()
                except ConfigError as e:
                    return JSONResponse({"errors": e.problems}, 400)
                if newest[0] != mine:
                    return JSONResponse({"errors": [SUPERSEDED]}, 409)
                configs = {a.name: a.model_dump(mode="json", exclude_unset=True) for a in schema.applications}
                notes = list(schema.config_warnings)
                running = controller.proxies.options or {}
                wanted = schema.http_options.to_http_options()
                changed = [k for k, v in wanted.items() if k in running and running[k] != v]
                if changed:
                    notes.append(f"http_options: {', '.join(changed)} differ from the running instance's; "
                                 "they take effect at the next `shoal start`")
                try:
                    await controller.rpc_apply_config(None, specs, configs)
                except RayServeException as e:
                    return JSONResponse({"errors": [str(e)]}, 503)
        finally:
            gone.cancel()
        return JSONResponse({"warnings": notes, "applications": [s.name for s in specs]})

    async def delete_apps(request: Request) -> Response:
        controller.spawn(controller.shutdown())
        return JSONResponse({"shutting_down": True})

    app = Starlette(routes=[
        Route("/api/serve/status", status, methods=["GET"]),
        Route("/api/serve/applications/", get_apps, methods=["GET"]),
        Route("/api/serve/applications/", put_apps, methods=["PUT"]),
        Route("/api/serve/applications/", delete_apps, methods=["DELETE"]),
        *(dashboard.routes() if dashboard is not None else []),
    ])
    return _Auth(app, token, dashboard)


class AdminServer:
    """uvicorn on the controller's loop, listening on 127.0.0.1 only."""

    def __init__(self, controller: "Controller", token: str, port: int = 0):
        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:  # the controller handles its own signals
                yield

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.dashboard = Dashboard(controller, token, self.port)
        config = uvicorn.Config(make_app(controller, token, self.dashboard), loop="none", lifespan="off",
                                access_log=False, log_level="warning", timeout_graceful_shutdown=2)
        self.server = _Server(config)
        self.task: Optional[asyncio.Task] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.dashboard.start()
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started and not self.task.done():
            await asyncio.sleep(0.01)
        if self.task.done():
            self.task.result()

    async def stop(self) -> None:
        self.dashboard.stop()
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 5)
