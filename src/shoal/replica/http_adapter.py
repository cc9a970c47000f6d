"""Serves HTTP requests the proxy forwards to an ingress replica.

The proxy sends one REQUEST per HTTP request: the ASGI scope (plain data) and the whole body.
A response that is complete in one go goes back as one OK frame `(status, headers, body)`; a
streamed one as ITEM frames (`(status, headers)` first, then body chunks) and END. WebSocket
messages flow both ways: PUSH frames in, ITEM frames out.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional

from shoal.http.convert import chunk_bytes, to_http
from shoal.replica.user_callable import _ASYNC_GEN, _SYNC_GEN, UserCallable
from shoal.transport import serialization as ser
from shoal.transport.connection import Connection
from shoal.transport.framing import Kind

logger = logging.getLogger("shoal.replica")

HTTP_METHOD = "__shoal_http__"
_STREAM_HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


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
                self.conn.reply(Kind.OK, self.rid, ser.dumps((status, headers, body)))
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
    """What the app's `receive()` returns: the body once, then client messages (WebSocket) or disconnect."""

    def __init__(self, scope_type: str, body: bytes):
        self.queue: asyncio.Queue = asyncio.Queue()
        if scope_type == "http":
            self.queue.put_nowait({"type": "http.request", "body": body, "more_body": False})
        else:
            self.queue.put_nowait({"type": "websocket.connect"})
        self.scope_type = scope_type

    async def receive(self) -> dict:
        try:
            return await self.queue.get()
        except asyncio.CancelledError:
            raise

    def push(self, message: dict) -> None:
        self.queue.put_nowait(message)


class HTTPAdapter:
    def __init__(self, user_callable: UserCallable, asgi_app: Optional[Callable] = None):
        self.callable = user_callable
        self.asgi_app = asgi_app

    async def handle(self, conn: Connection, rid: int, scope: dict, body: bytes) -> None:
        responder = Responder(conn, rid)
        inbox = Inbox(scope["type"], body)
        conn.inboxes[rid] = inbox
        try:
            if self.asgi_app is not None:
                await self.asgi_app(scope, inbox.receive, responder.send)
            else:
                await self._call_plain(scope, inbox, responder)
            responder.finish()
        finally:
            conn.inboxes.pop(rid, None)

    async def _call_plain(self, scope: dict, inbox: Inbox, responder: Responder) -> None:
        from starlette.requests import Request

        request = Request(scope, inbox.receive)
        uc = self.callable
        _, kind = uc.resolve("__call__")
        if kind in (_SYNC_GEN, _ASYNC_GEN):
            await responder.send({"type": "http.response.start", "status": 200, "headers": _STREAM_HEADERS})
            async for item in uc.call_stream("__call__", (request,), {}):
                await responder.send({"type": "http.response.body", "body": chunk_bytes(item), "more_body": True})
            await responder.send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        result = await uc.call("__call__", (request,), {})
        plain = to_http(result)
        if plain is None:
            await result(scope, inbox.receive, responder.send)  # a Starlette Response
        else:
            status, headers, payload = plain
            responder.conn.reply(Kind.OK, responder.rid, ser.dumps((status, headers, payload)))
            responder.finished = True
