"""The HTTP proxy: a plain ASGI app on uvicorn that forwards each request straight to a replica.

Run by the controller as `python -m shoal.http.proxy SESSION_DIR INDEX`. It learns the route table
from the controller, matches the longest route prefix, and sends the request through a router on
its own event loop to a replica of the application's ingress deployment. Requests never pass
through the controller.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from typing import Any, Optional

from shoal.common import SERVE_HTTP_REQUEST_ID_HEADER, SERVE_MULTIPLEXED_MODEL_ID, DeploymentID
from shoal.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from shoal.http.convert import TEXT_UTF8
from shoal.http.drain import DRAINING_MESSAGE, closing
from shoal.http.routes import Route, RouteTable
from shoal.http.scope import scope_to_wire
from shoal.replica.http_adapter import HTTP_METHOD
from shoal.telemetry.journal import journal_for
from shoal.telemetry.serve_metrics import CALLER, ProxyStats, router_cell
from shoal.transport.serialization import PlainPickler

logger = logging.getLogger("shoal.proxy")

_REQUEST_ID_HEADER = SERVE_HTTP_REQUEST_ID_HEADER.encode()
_MODEL_ID_HEADER = SERVE_MULTIPLEXED_MODEL_ID.encode()
_SESSION_HEADER = b"x-session-id"
_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding"})
_NO_KWARGS: dict = {}
_NO_ITEMS = ()
_pickler = PlainPickler()  # the proxy serves from one loop
_ids = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}-"
_WATCH_TICK_S = 0.025  # unanswered after 1-2 ticks: watch for a disconnect
_now = time.perf_counter
_NO_ROUTE = Route("", "", "")  # the journal's route of a request no route matched (404)
CLIENT_GONE = 499  # the status metrics record for a request whose client went away (nginx's)


class HTTPCall:
    """One forwarded HTTP request, as the router sees it (same interface as a DeploymentResponse).

    It also carries the relay's own per-request state (disconnect watcher, time-out), so a request
    costs one object here.
    """

    method_name = HTTP_METHOD
    stream = True
    kwargs: dict = {}

    __slots__ = ("args", "payload", "multiplexed_model_id", "request_id", "_cancelled", "_call", "result", "exc",
                 "items", "finished", "_waiter", "loop", "session_id", "_queued_at",
                 "receive", "router", "gen", "relayed", "started_at", "timed_out", "watcher", "timeout_handle")

    def __init__(self, loop: asyncio.AbstractEventLoop, wire_scope: tuple, body: bytes, model_id: str,
                 request_id: str, session_id: str = "", receive: Any = None):
        self.loop = loop
        self.session_id = session_id
        self._queued_at = 0.0
        self.args = (wire_scope, body)
        # The request body for the replica, made once (a retry re-sends it): builtin data only.
        self.payload = _pickler.dumps((HTTP_METHOD, True, model_id, request_id, self.args, _NO_KWARGS))
        self.multiplexed_model_id = model_id
        self.request_id = request_id
        self._cancelled = False
        self._call = None
        self.result: Any = None
        self.exc: Optional[BaseException] = None
        self.items: Any = _NO_ITEMS  # a deque once a streamed item arrives
        self.finished = False
        self._waiter: Optional[asyncio.Future] = None
        self.receive = receive
        self.router: Any = None
        self.gen: Optional[set] = None  # the proxy's set of young or old requests it is in
        self.relayed = False  # the proxy is done with it (answered the client or gave up)
        self.started_at = 0.0
        self.timed_out = False
        self.watcher: Optional[asyncio.Task] = None
        self.timeout_handle: Optional[asyncio.TimerHandle] = None

    # Router-facing: called on this loop.
    def _complete(self, value: Any = None, exc: Optional[BaseException] = None) -> None:
        if self.finished:
            return
        self.result, self.exc, self.finished = value, exc, True
        self._wake()

    def _push(self, item: Any) -> None:
        if self.items is _NO_ITEMS:
            self.items = deque()
        self.items.append(item)
        self._wake()

    @property
    def queued_for_s(self) -> float:
        return time.monotonic() - self._queued_at if self._queued_at else 0.0

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self) -> None:
        """Until an item or the end arrives."""
        if self.items or self.finished:
            return
        self._waiter = self.loop.create_future()
        await self._waiter
        self._waiter = None


class ProxyApp:
    """The ASGI app uvicorn serves (an ASGI 3 callable: `__call__` returns the coroutine to await)."""

    def __init__(self, client: Any, options: dict, component: str = "proxy"):
        self.client = client
        self.options = options
        self.routes = RouteTable()
        self.routes_ready = False
        self.draining = False  # see `start_draining`
        self.routers: dict[str, tuple[Route, Any]] = {}  # route prefix -> (route, its router)
        self.timeout_s: Optional[float] = options.get("request_timeout_s")
        self.max_body = options.get("max_request_body_bytes") or 0
        self.loop = asyncio.get_event_loop()
        # Requests in flight younger than one tick, and those one tick older: at each tick the older
        # ones get a disconnect watcher (and their time-out timer). Most requests are answered
        # within a tick and never cost a timer or a task of their own. Sets, so an answered request
        # leaves at once (holding it for a tick would keep its objects alive for the cyclic GC).
        self._young: set[HTTPCall] = set()
        self._old: set[HTTPCall] = set()
        self._ticking = False
        # A time-out shorter than two ticks gets its timer at once, so it is never late by a tick.
        self._timer_at_once = self.timeout_s is not None and self.timeout_s <= 2 * _WATCH_TICK_S
        # Metrics and access lines: requests routed and not yet answered (exact at any moment), and
        # one journal entry per answered request, counted and written per batch (telemetry/journal.py).
        from shoal.access_log import PROXY_ENTRY_WIDTH, AccessLog, proxy_render
        from shoal.serve_logging import system_access_log_enabled, system_log_encoding

        self.ongoing = 0
        self.stats = ProxyStats(lambda: self.ongoing)
        # One line per routed HTTP request (`serve.start(logging_config={"enable_access_log": False})`: none).
        lines = AccessLog(proxy_render(system_log_encoding(), component)) if system_access_log_enabled() else None
        self.journal = journal_for(self.stats, self.loop, PROXY_ENTRY_WIDTH, lines)

    def name_access_lines(self, component: str) -> None:
        """A standby that took over proxy `component`'s place: its access lines say so from now on."""
        from shoal.access_log import proxy_render
        from shoal.serve_logging import system_log_encoding

        self.journal.flush()
        if self.journal.lines is not None:
            self.journal.lines.render = proxy_render(system_log_encoding(), component)

    def start_draining(self) -> None:
        """From now on `/-/healthz` and `/-/routes` answer 503 "This node is being drained." and every
        response closes its connection (`http/drain.py`)."""
        self.draining = True

    def set_routes(self, routes: list[Route]) -> None:
        self.routes = RouteTable(routes)
        self.routes_ready = True
        # A router per route now, not at its first request: it learns its replicas while the controller
        # is reachable, so a first request that comes while the controller restarts is served too.
        for route in routes:
            self._router(route)
        live = {r.prefix for r in routes}
        for prefix in [p for p in self.routers if p not in live]:
            del self.routers[prefix]

    def _router(self, route: Route) -> Any:
        """The router of `route`'s ingress deployment on this loop (`http` reads the cache inline)."""
        cached = self.routers.get(route.prefix)
        if cached is not None and cached[0] is route and not cached[1].closed:
            return cached[1]
        router = self.client.get_router(DeploymentID(route.ingress, route.app_name), self.loop)
        router.requests_cell = router_cell(router.deployment_id, route.prefix)  # metrics: counted per route
        self.routers[route.prefix] = (route, router)
        return router

    def __call__(self, scope: dict, receive: Any, send: Any) -> Any:
        t = scope["type"]
        if t == "http":
            if self.draining:
                send = closing(send)
            return self.http(scope, receive, send)
        if t == "websocket":
            return self.websocket(scope, receive, send)
        return self.lifespan(receive, send)

    @staticmethod
    async def lifespan(receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- HTTP ----------------------------------------------------------------------------------
    async def http(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope["path"]
        if path.startswith("/-/"):
            if self.draining and path in ("/-/healthz", "/-/routes"):
                return await _respond(send, 503, DRAINING_MESSAGE)
            if path == "/-/healthz":
                if self.routes_ready:
                    return await _respond(send, 200, b"success")
                return await _respond(send, 503, b"Route table is not populated yet.")
            if path == "/-/routes":
                body = json.dumps(self.routes.as_dict()).encode()
                return await _respond(send, 200, body, [(b"content-type", b"application/json")])
        t0 = _now()
        root = scope["root_path"]
        route = self.routes.match(path[len(root):] if root and path.startswith(root) else path)
        if route is None:
            await _respond(send, 404, (
                f"Path '{path}' not found. Ping http://{scope['server'][0]}:{scope['server'][1]}/-/routes "
                "for available routes.").encode() if scope.get("server") else
                f"Path '{path}' not found. Ping /-/routes for available routes.".encode())
            # Counted without a route label (paths are unbounded); no access line (request id None).
            self.journal.add((t0, _now(), _NO_ROUTE, scope["method"], 404, None))
            return
        request_id = ""
        model_id = ""
        session_id = ""
        has_body = False
        for k, v in scope["headers"]:
            if k == _REQUEST_ID_HEADER:
                request_id = v.decode("latin-1")
            elif k == _MODEL_ID_HEADER:
                model_id = v.decode("latin-1")
            elif k == _SESSION_HEADER:
                session_id = v.decode("latin-1")
            elif k in _BODY_HEADERS:
                has_body = True
        if not request_id:
            request_id = _ID_PREFIX + str(next(_ids))
        rid_header = (_REQUEST_ID_HEADER, request_id.encode("latin-1"))
        # HTTP/1.1: without a length header there is no body to read.
        body = b""
        if has_body:
            body = await self._read_body(receive, send, rid_header)
            if body.__class__ is int:  # answered (413), or the client went away
                self.journal.add((t0, _now(), route, scope["method"], body, None))  # counted, no access line
                return
        call = HTTPCall(self.loop, scope_to_wire(scope, route.prefix), body, model_id, request_id, session_id,
                        receive)
        cached = self.routers.get(route.prefix)
        router = call.router = cached[1] if cached is not None and cached[0] is route and not cached[1].closed \
            else self._router(route)
        self.ongoing += 1
        router.assign(call)
        status = 500  # unless the response says otherwise (a stream that breaks midway stays 500)
        try:
            if not call.finished:
                self._track(call)
                call._waiter = waiter = self.loop.create_future()
                await waiter  # the first reply frame
            if call.finished and call.exc is None and not call.items and call.result is not None:
                status, headers, body = call.result  # the common case: the whole response in one frame
                headers.append(rid_header)  # a list just unpickled: ours to extend
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            status = await self._relay(call, router, send, rid_header)
        finally:
            self._untrack(call)
            self.ongoing -= 1
            journal = self.journal  # Journal.add, inlined: the hot path
            journal.pending += (t0, _now(), route, scope["method"], status, request_id)
            if not journal.scheduled:
                journal.schedule()

    async def _read_body(self, receive: Any, send: Any, rid_header: tuple) -> Any:
        """The whole body, within the configured limit; else the status to record: 413 (answered so)
        or CLIENT_GONE."""
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return CLIENT_GONE
        body = msg.get("body", b"")
        size = len(body)
        if msg.get("more_body"):
            chunks = [body]
            while msg.get("more_body"):
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    return CLIENT_GONE
                chunk = msg.get("body", b"")
                size += len(chunk)
                if self.max_body and size > self.max_body:
                    break  # no need to read the rest
                chunks.append(chunk)
            body = b"".join(chunks)
        if self.max_body and size > self.max_body:
            await _respond(send, 413, f"Request body exceeds the limit of {self.max_body} bytes.".encode(),
                           extra=[rid_header])
            return 413
        return body

    def _track(self, call: HTTPCall) -> None:
        """Watch for a disconnect (and time the request out) only once it has taken a while."""
        if self.timeout_s is not None:
            if self._timer_at_once:
                call.timeout_handle = self.loop.call_later(self.timeout_s, _time_out, call)
            else:
                call.started_at = self.loop.time()
        gen = call.gen = self._young
        gen.add(call)
        if not self._ticking:
            self._ticking = True
            self.loop.call_later(_WATCH_TICK_S, self._tick)

    def _tick(self) -> None:
        loop = self.loop
        for call in self._old:
            call.gen = None
            if call.finished:
                continue  # its response is being written
            call.watcher = loop.create_task(_watch_disconnect(call.receive, call))
            if self.timeout_s is not None and call.timeout_handle is None:
                delay = max(0.0, call.started_at + self.timeout_s - loop.time())
                call.timeout_handle = loop.call_later(delay, _time_out, call)
        self._old, self._young = self._young, set()
        if self._old:
            loop.call_later(_WATCH_TICK_S, self._tick)
        else:
            self._ticking = False

    @staticmethod
    def _untrack(call: HTTPCall) -> None:
        call.relayed = True
        call._waiter = None
        gen = call.gen
        if gen is not None:
            gen.discard(call)
            call.gen = None
        call.receive = None
        if call.watcher is not None:
            call.watcher.cancel()
        if call.timeout_handle is not None:
            call.timeout_handle.cancel()

    async def _relay(self, call: HTTPCall, router: Any, send: Any, rid_header: tuple) -> int:
        """Write a streamed (or failed) response; returns the status for metrics."""
        started = False
        status = 500
        while True:
            if not call.items and not call.finished:
                await call.wait()
            if call.items:
                item = call.items.popleft()
                if not started:
                    status, headers = item
                    await send({"type": "http.response.start", "status": status, "headers": headers + [rid_header]})
                    started = True
                else:
                    await send({"type": "http.response.body", "body": item, "more_body": True})
                continue
            break  # finished and drained
        exc = call.exc
        if exc is None:
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return status
            await _respond(send, 500, b"Internal Server Error", extra=[rid_header])
            return 500
        if started:
            if isinstance(exc, RequestCancelledError) and not call.timed_out:
                return CLIENT_GONE  # the client went away midway: nobody to tell, nothing to log
            raise RuntimeError("the response stream failed midway") from exc  # uvicorn drops the connection
        return await self._error_response(exc, call, router, send, rid_header)

    async def _error_response(self, exc: BaseException, call: HTTPCall, router: Any, send: Any,
                              rid_header: tuple) -> int:
        """Answer a request that failed before its response started; returns the status."""
        if call.timed_out:
            await _respond(send, 408, f"Request {call.request_id} timed out after {self.timeout_s}s."
                           .encode(), extra=[rid_header])
            return 408
        if isinstance(exc, RequestCancelledError):
            return CLIENT_GONE  # the client went away
        if isinstance(exc, BackPressureError):
            status = getattr(router, "backpressure_status_code", 503) or 503
            extra = [rid_header]
            retry = getattr(router, "backpressure_retry_after_s", None)
            if retry is not None:
                extra.append((b"retry-after", str(int(retry) if float(retry).is_integer() else retry).encode()))
            await _respond(send, status, exc.message.encode(), extra=extra)
            return status
        if isinstance(exc, DeploymentUnavailableError):
            await _respond(send, 503, str(exc).encode(), extra=[rid_header])
            return 503
        logger.warning("request %s failed in the replica: %s: %s", call.request_id, type(exc).__name__, exc)
        await _respond(send, 500, b"Internal Server Error", extra=[rid_header])
        return 500

    # --- WebSocket -----------------------------------------------------------------------------
    async def websocket(self, scope: dict, receive: Any, send: Any) -> None:
        route = self.routes.match(scope["path"])
        if route is None:
            await send({"type": "websocket.close", "code": 1000})
            return
        call = HTTPCall(self.loop, scope_to_wire(scope, route.prefix), b"", "", _ID_PREFIX + str(next(_ids)))
        router = self._router(route)
        router.assign(call)
        pump = self.loop.create_task(self._pump_client(call, receive))
        try:
            while True:
                if not call.items and not call.finished:
                    await call.wait()
                if call.items:
                    await send(call.items.popleft())
                    continue
                break
        finally:
            pump.cancel()
            if not call.finished:
                router.cancel(call)

    async def _pump_client(self, call: HTTPCall, receive: Any) -> None:
        """Client messages into the replica's `receive()`."""
        while True:
            msg = await receive()
            if msg["type"] == "websocket.connect":
                continue  # the replica's receive() starts with its own connect message
            while call._call is None and not call.finished:
                await asyncio.sleep(0.001)  # not yet sent to a replica
            if call.finished:
                return
            c = call._call
            c.entry.conn.push(c.rid, msg)
            if msg["type"] == "websocket.disconnect":
                return


async def _watch_disconnect(receive: Any, call: HTTPCall) -> None:
    """Cancel the call (in the replica and downstream) when the client goes away."""
    while not call.finished:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            if not call.finished:
                call._cancelled = True
                call.loop.call_soon(call.router.cancel, call)
            return


def _time_out(call: HTTPCall) -> None:
    if call.finished or call.relayed:
        return
    call.timed_out = True
    call._cancelled = True
    call.router.cancel(call)


async def _respond(send: Any, status: int, body: bytes, headers: Optional[list] = None,
                   extra: Optional[list] = None) -> None:
    h = list(headers or TEXT_UTF8) + [(b"content-length", str(len(body)).encode())] + list(extra or ())
    await send({"type": "http.response.start", "status": status, "headers": h})
    await send({"type": "http.response.body", "body": body})


def _listen_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Control:
    """Control calls a proxy answers: `take_over` makes a standby proxy (index -1) proxy `index`;
    `drain` ends a serving proxy gracefully (its node no longer needs one; `http/drain.py`)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.order: asyncio.Future = loop.create_future()
        self.drain: asyncio.Future = loop.create_future()

    async def rpc_take_over(self, conn: Any, index: int, port: int, reuse_port: bool) -> None:
        if not self.order.done():
            self.order.set_result((index, port, reuse_port))

    async def rpc_drain(self, conn: Any, timeout_s: float, min_period_s: float = 0.0, handover: bool = True) -> None:
        """Drain (`http/drain.py`): answer health checks with 503, hand the listener to a peer on this
        host or keep it `min_period_s`, finish the requests in flight (at most `timeout_s` more), exit."""
        if not self.drain.done():
            self.drain.set_result((timeout_s, min_period_s, handover))


async def _bind_when_free(host: str, port: int, reuse_port: bool, timeout: float) -> socket.socket:
    """Bind the port a dead proxy held; its socket may take a moment to close."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _listen_socket(host, port, reuse_port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.002)


def uvicorn_server(app: Any, options: dict) -> Any:
    """The uvicorn server a proxy runs `app` on (not started: `serve(sockets=[...])` starts it)."""
    import uvicorn

    from shoal.http.coalesce import with_header_timeout

    protocol = with_header_timeout(float(options.get("request_header_timeout_s") or 30.0))
    config = uvicorn.Config(app, loop="none", http=protocol, ws="auto", lifespan="off",
                            interface="asgi3",
                            access_log=False, log_level="warning", proxy_headers=False, server_header=False,
                            timeout_keep_alive=float(options.get("keep_alive_timeout_s") or 90),  # type: ignore[arg-type]
                            root_path=options.get("root_path") or "")
    return uvicorn.Server(config)


async def run_proxy(session_dir: str, index: int) -> None:
    from shoal.client import ServeClient, set_global_client
    from shoal.common import exit_process
    from shoal.http.drain import drain_server
    from shoal.http.listener_handover import HandoverReceiver, ListenerSet, handover_dir, instance_key
    from shoal.transport import auth

    loop = asyncio.get_running_loop()
    client = ServeClient(loop, session_dir)
    set_global_client(client)
    CALLER["handle"] = "proxy"  # the `handle` label of this process's router metrics
    control = _Control()
    standby = control if index < 0 else None
    if standby is not None:
        client.controller_recoverable = lambda: False  # a standby leaves with its controller
    info = await client.connect("proxy", extra_handler=control, index=index)
    options = info["http_options"]
    app = ProxyApp(client, options, f"proxy_{index}" if index >= 0 else "proxy_standby")

    def apply_routes(routes: list, version: int) -> None:
        app.set_routes(routes)
        if client.conn is not None:
            client.conn.notify("routes_ack", version)

    client.on_routes = apply_routes
    client.on_routes(*max([info["routes"], client.pending_routes or info["routes"]], key=lambda rv: rv[1]))
    # A controller that dies and restarts finds this proxy still serving: it says so on reconnecting
    # and gets the current route table back. Only once nothing will restart the controller does it exit.
    serving = {"port": 0}
    client.hello_state = lambda: {"serving_port": serving["port"], "draining": app.draining}
    client.on_reconnected = lambda reply: apply_routes(*reply["routes"])
    client.on_controller_lost = lambda: exit_process(0)
    reuse_port, port_wanted = info.get("reuse_port", info["num_proxies"] > 1), info["port"]
    if standby is not None:  # ready, routers warm: wait to replace a proxy that dies
        index, port_wanted, reuse_port = await standby.order
        client._hello["index"] = index
        app.name_access_lines(f"proxy_{index}")
        from shoal import client as client_mod
        from shoal.keeper import keeper_alive

        client.controller_recoverable = client_mod.default_controller_recoverable or keeper_alive
    try:
        sock = await _bind_when_free(options["host"], port_wanted, reuse_port, 3.0 if standby else 0.0)
    except OSError as e:
        await client.control_call("proxy_failed", index, f"could not listen on {options['host']}:{port_wanted}: {e}")
        exit_process(1)
    port = sock.getsockname()[1]
    server = uvicorn_server(app, options)
    serving_task = loop.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving_task.done():
        await asyncio.sleep(0.002)
    if serving_task.done():
        await client.control_call("proxy_failed", index, f"uvicorn exited: {serving_task.exception()!r}")
        exit_process(1)
    serving["port"] = port
    # Proxies sharing the port on this host: one that leaves hands its listener to another one.
    listeners = ListenerSet(server, [sock])
    receiver = None
    if reuse_port:
        try:
            instance = instance_key(auth.get_secret_or_none(), session_dir)  # (on Ray: the controller's address)
            receiver = HandoverReceiver(listeners, handover_dir(port, instance))
            receiver.start()
        except Exception as e:  # noqa: BLE001 - it serves all the same (its peers then close their listeners)
            logger.warning("cannot take over the listeners of departing proxies: %s", e)
            receiver = None
    await client.control_call("proxy_ready", index, port)
    try:
        await asyncio.wait([serving_task, control.drain], return_when=asyncio.FIRST_COMPLETED)
        if control.drain.done() and not serving_task.done():
            timeout_s, min_period_s, handover = control.drain.result()
            app.start_draining()
            logger.info("draining (at least %gs unless another proxy on this host takes the listener)",
                        min_period_s)
            how = await drain_server(server, listeners, receiver, timeout_s=timeout_s, min_period_s=min_period_s,
                                     handover=handover)
            logger.info("drained: %s", how)
        await serving_task
    finally:
        if receiver is not None:
            receiver.close()


def main() -> None:
    session_dir, index = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the driver
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s -- %(message)s")
    from shoal.serve_logging import configure_system_logging
    from shoal.sessions import drop_implicit_cwd

    drop_implicit_cwd()  # (Python 3.10: uvicorn imports `websockets` later; a user's websockets.py must not win)
    configure_system_logging(f"proxy_{index}" if index >= 0 else "proxy_standby")
    from shoal.client import new_event_loop
    from shoal.log_rotation import setup_rotation

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    setup_rotation(loop)  # its log file rotates by size (log_rotation.py)
    loop.run_until_complete(run_proxy(session_dir, index))
    from shoal.common import exit_process

    exit_process(0)


if __name__ == "__main__":
    main()
