"""Serves HTTP requests the proxy forwards to an ingress replica.

The proxy sends one REQUEST per HTTP request: the ASGI scope (a flat tuple, `http/scope.py`) and
the whole body. A response that is complete in one go goes back as one OK frame `(status, headers, body)`; a
streamed one as ITEM frames (`(status, headers)` first, then body chunks) and END. WebSocket
messages flow both ways: PUSH frames in, ITEM frames out.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, AsyncIterator, Callable, Optional

from starlette.requests import Request

from shoal.http.convert import TEXT_UTF8, chunk_bytes, to_http
from shoal.http.scope import scope_from_wire
from shoal.replica.user_callable import _ASYNC, _ASYNC_GEN, _GENERATOR_TYPES, _SYNC_GEN, UserCallable
from shoal.transport import serialization as ser
from shoal.transport.connection import Connection
from shoal.transport.framing import Kind

logger = logging.getLogger("shoal.replica")

HTTP_METHOD = "__shoal_http__"


_pickler = ser.PlainPickler()  # replies are made on the replica's event loop thread only


def _dumps_plain(value: tuple) -> bytes:
    """`(status, headers, body)`: builtin data in practice, so no `ser.dumps` check up front."""
    try:
        return _pickler.dumps(value)
    except Exception:  # noqa: BLE001 - e.g. an app's own class as a status or header: by value then
        return ser.dumps(value)


class Responder:
    """Turns ASGI `send` messages into reply frames, coalescing a one-shot response into one frame."""

    def __init__(self, conn: Connection, rid: int):
        self.conn = conn
        self.rid = rid
        self.start: Optional[tuple[int, list]] = None
        self.streaming = False
        self.finished = False

    async def send(self, message: dict) -> None:
        t = message["type"]
        if t == "http.response.start":
            self.start = (message["status"], [tuple(h) for h in message.get("headers", [])])
        elif t == "http.response.body":
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if not self.streaming and not more:
                status, headers = self.start or (200, [])
                self.conn.reply(Kind.OK, self.rid, _dumps_plain((status, headers, bytes(body))))
                self.finished = True
                return
            if not self.streaming:
                self.streaming = True
                self.conn.reply(Kind.ITEM, self.rid, ser.dumps(self.start or (200, [])))
            if body:
                self.conn.reply(Kind.ITEM, self.rid, ser.dumps(bytes(body)))
            if not more:
                self.conn.reply(Kind.END, self.rid)
                self.finished = True
        elif t.startswith("websocket."):
            self.conn.reply(Kind.ITEM, self.rid, ser.dumps(message))
            if t == "websocket.close":
                self.finished = True

    def finish(self) -> None:
        """End a response the app left open (e.g. a WebSocket handler that returned)."""
        if self.streaming and not self.finished:
            self.conn.reply(Kind.END, self.rid)
        elif not self.finished and self.start is None:
            self.conn.reply(Kind.END, self.rid)
        self.finished = True


class Inbox:
    """What the app's `receive()` returns: the first message (the body, or the WebSocket connect), then
    client messages pushed in (WebSocket), else it waits until the request is cancelled.

    The queue behind it is made only when a second message is asked for or pushed: a plain HTTP
    request reads its body once and never needs one.
    """

    __slots__ = ("first", "queue")

    def __init__(self, first: dict):
        self.first: Optional[dict] = first
        self.queue: Optional[asyncio.Queue] = None

    async def receive(self) -> dict:
        first = self.first
        if first is not None:
            self.first = None
            return first
        if self.queue is None:
            self.queue = asyncio.Queue()
        return await self.queue.get()

    def push(self, message: dict) -> None:
        if self.queue is None:
            self.queue = asyncio.Queue()
        self.queue.put_nowait(message)


class HTTPAdapter:
    def __init__(self, user_callable: UserCallable, asgi_app: Optional[Callable] = None):
        self.callable = user_callable
        self.asgi_app = asgi_app
        self._plain: Optional[tuple[Callable, int, bool]] = None  # `__call__`, its kind, takes the request

    def _resolve_plain(self) -> tuple[Callable, int, bool]:
        """`__call__` and whether it takes the request: as in Ray, one with no parameters (`def
        __call__(self)`, a function deployment `def f()`) is called without it. Resolved once."""
        fn, kind = self.callable.resolve("__call__")
        try:
            takes_request = len(inspect.signature(fn).parameters) > 0
        except (TypeError, ValueError):  # no signature to read (a builtin, say): give it the request
            takes_request = True
        self._plain = (fn, kind, takes_request)
        return self._plain

    async def handle(self, conn: Connection, rid: int, wire_scope: tuple, body: bytes) -> Any:
        """Answers the request; returns the response's status where it is known (for the access log)."""
        scope = scope_from_wire(wire_scope)
        if scope["type"] != "http":
            return await self._websocket(scope, conn, rid)
        inbox = Inbox({"type": "http.request", "body": body, "more_body": False})
        if self.asgi_app is not None:
            responder = Responder(conn, rid)
            await self.asgi_app(scope, inbox.receive, responder.send)
            responder.finish()
            return responder.start[0] if responder.start else None
        # A plain deployment, in this coroutine (no extra level per request): an async `__call__`
        # runs right here, a sync one in the pool, a generator streams.
        fn, kind, takes_request = self._plain or self._resolve_plain()
        args = (Request(scope, inbox.receive),) if takes_request else ()
        if kind == _ASYNC:
            result = await fn(*args)
        elif kind == _SYNC_GEN or kind == _ASYNC_GEN:
            return await self._stream(self.callable.call_stream("__call__", args, {}), conn, rid)
        else:
            result = await self.callable.run(fn, kind, args, {})
        plain = to_http(result)
        if plain is not None:
            conn.reply(Kind.OK, rid, _dumps_plain(plain))
            return plain[0]
        elif isinstance(result, _GENERATOR_TYPES):  # `__call__` returned a generator: stream it too
            await self._stream(self.callable.iterate(result), conn, rid)
        else:  # a Starlette Response: run it as an ASGI app
            responder = Responder(conn, rid)
            await result(scope, inbox.receive, responder.send)
            responder.finish()
            return responder.start[0] if responder.start else None

    async def _stream(self, items: AsyncIterator[Any], conn: Connection, rid: int) -> None:
        """A generator `__call__`: each item is sent as a chunk as soon as it is produced."""
        responder = Responder(conn, rid)
        await responder.send({"type": "http.response.start", "status": 200, "headers": TEXT_UTF8})
        async for item in items:
            await responder.send({"type": "http.response.body", "body": chunk_bytes(item), "more_body": True})
        await responder.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _websocket(self, scope: dict, conn: Connection, rid: int) -> None:
        if self.asgi_app is None:
            raise TypeError(f"WebSocket request to '{scope['path']}': only deployments with a "
                            "`@serve.ingress` ASGI app (e.g. FastAPI) accept WebSockets.")
        inbox = Inbox({"type": "websocket.connect"})
        conn.inboxes[rid] = inbox  # the proxy pushes the client's messages in
        try:
            responder = Responder(conn, rid)
            await self.asgi_app(scope, inbox.receive, responder.send)
            responder.finish()
        finally:
            conn.inboxes.pop(rid, None)
