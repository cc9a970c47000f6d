"""uvicorn's httptools protocol with the writes of one loop iteration joined into one socket write.

uvicorn writes a response's status line and headers on `http.response.start` and its body on
`http.response.body`: two `send` syscalls on the client's TCP socket for every response, each a
full trip through the kernel's TCP stack. The proxy's responses are mostly complete in one go, so
joining what a connection writes in one loop iteration saves one of those syscalls per request
(about a tenth of the proxy's CPU time). Streamed chunks still leave within the iteration that
produced them, so streaming stays chunk by chunk.

The protocol also holds the door against slow clients: uvicorn's httptools protocol has no time limit
on receiving a request head, so a client that sends one header line a second would hold its
connection forever. `with_header_timeout(t)` makes a protocol class whose connections must send each
request head within `t` seconds, checked by one periodic tick over the server's connections (nothing
per request: the tick reads uvicorn's own per-connection state).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any, Optional

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

logger = logging.getLogger("shoal.proxy")


_JOIN_MAX = 64 * 1024  # joined into one write up to this size


class _Flusher:
    """Writes out every transport that buffered data, once per loop iteration (one callback for all)."""

    __slots__ = ("loop", "dirty")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.dirty: list[CoalescingTransport] = []

    def run(self) -> None:
        dirty, self.dirty = self.dirty, []
        for t in dirty:
            t.flush()


class CoalescingTransport:
    """Wraps a transport: `write` buffers until the end of the loop iteration; the rest passes through."""

    # The transport's other methods, bound once per connection (a `__getattr__` fallback would slow
    # down every attribute read on this object).
    _PASSED = ("is_closing", "pause_reading", "resume_reading", "is_reading", "get_extra_info", "set_protocol",
               "get_protocol", "set_write_buffer_limits", "get_write_buffer_limits", "can_write_eof")
    __slots__ = ("transport", "_buf", "_flusher") + _PASSED

    def __init__(self, transport: asyncio.Transport, flusher: _Flusher):
        self.transport = transport
        self._buf: list[bytes] = []
        self._flusher = flusher
        for name in self._PASSED:
            setattr(self, name, getattr(transport, name))

    def write(self, data: bytes) -> None:
        if not data:
            return
        buf = self._buf
        if not buf:
            flusher = self._flusher  # inline `_Flusher.add`: this runs twice per response
            if not flusher.dirty:
                flusher.loop.call_soon(flusher.run)
            flusher.dirty.append(self)
        buf.append(data)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        buf = self._buf
        if buf:
            self._buf = []
            t = self.transport
            if t.is_closing():
                return
            if len(buf) == 1:
                t.write(buf[0])
            elif sum(map(len, buf)) <= _JOIN_MAX:
                t.write(b"".join(buf))
            else:
                t.writelines(buf)  # a large body: handed over as is, not copied into one buffer

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + sum(len(b) for b in self._buf)

    # Anything that ends the byte stream must come after what is buffered.
    def close(self) -> None:
        self.flush()
        self.transport.close()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def abort(self) -> None:
        self._buf = []
        self.transport.abort()


_flushers: dict[asyncio.AbstractEventLoop, _Flusher] = {}


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's `httptools` protocol on a `CoalescingTransport` (pass the class as `Config(http=...)`).

    With `header_timeout_s` set (see `with_header_timeout`), each request head must arrive within it.
    """

    header_timeout_s: Optional[float] = None
    # What the connection was last seen waiting for (`_FIRST`, or the scope dict of a request whose head
    # is arriving on a keep-alive connection) and since when: set by `connection_made`, then by the tick.
    _head_key: Any = None
    _head_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        loop = self.loop
        flusher: Optional[_Flusher] = _flushers.get(loop)
        if flusher is None:
            flusher = _flushers[loop] = _Flusher(loop)
        super().connection_made(CoalescingTransport(transport, flusher))  # type: ignore[arg-type]
        if self.header_timeout_s is not None:
            self._head_key = _FIRST
            self._head_since = loop.time()
            watch = _head_watches.get(self.server_state)
            if watch is None:
                watch = _head_watches[self.server_state] = _HeadWatch(type(self), self.connections, loop)
            if not watch.ticking:
                watch.start()

    def head_timed_out(self, started: bool) -> None:
        """Too slow with its request head: 408 if part of a head arrived, then close the connection."""
        transport = self.transport
        if transport.is_closing():
            return
        if started:
            msg = f"The request head was not complete within {self.header_timeout_s:g}s.".encode()
            content = [STATUS_LINE[408]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend([b"content-type: text/plain; charset=utf-8\r\ncontent-length: ", str(len(msg)).encode(),
                            b"\r\nconnection: close\r\n\r\n", msg])
            transport.write(b"".join(content))
        transport.close()


def with_header_timeout(timeout_s: float) -> type[CoalescingHttpToolsProtocol]:
    """A `CoalescingHttpToolsProtocol` class whose connections must send each request head within `timeout_s`.

    The time counts from the connection's start for its first request, and from the first byte of the
    next request on a keep-alive connection (uvicorn's keep-alive timeout covers the idle time before
    it). It is checked by a tick of at most 0.5 s, so a slow connection goes up to a tick or two late.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    return type("HeaderTimeoutHttpToolsProtocol", (CoalescingHttpToolsProtocol,), {"header_timeout_s": timeout_s})


_FIRST = object()  # a connection waiting for its first request head
_HEAD_TICK_MAX_S = 0.5


class _HeadWatch:
    """Closes the connections of one uvicorn server that take too long to send a request head.

    One timer for all connections, running while there are any. A connection is waiting for a head
    when it has had no complete one yet (`cycle is None`), or when its last response is complete and
    the parser began a new request (uvicorn's `on_message_begin` made a new `scope`). A keep-alive
    connection idle between requests is left to uvicorn's keep-alive timer. Nothing here runs per request.
    """

    __slots__ = ("cls", "connections", "loop", "timeout_s", "interval", "ticking", "__weakref__")

    def __init__(self, cls: type[CoalescingHttpToolsProtocol], connections: set, loop: asyncio.AbstractEventLoop):
        self.cls = cls
        self.connections = connections  # uvicorn's set of the server's connections (protocol objects)
        self.loop = loop
        self.timeout_s: float = cls.header_timeout_s  # type: ignore[assignment]
        self.interval = min(_HEAD_TICK_MAX_S, self.timeout_s / 4)
        self.ticking = False

    def start(self) -> None:
        self.ticking = True
        self.loop.call_later(self.interval, self.tick)

    def tick(self) -> None:
        now = self.loop.time()
        timeout = self.timeout_s
        cls = self.cls
        late: list[tuple[CoalescingHttpToolsProtocol, bool]] = []
        mine = 0
        for p in self.connections:
            if type(p) is not cls:
                continue  # a WebSocket protocol
            mine += 1
            cycle = p.cycle
            if cycle is None:
                key = _FIRST
            elif cycle.response_complete and p.scope is not cycle.scope:
                key = p.scope  # the next request's head is arriving
            else:
                continue  # a request in progress, or idle between requests
            if p._head_key is not key:
                p._head_key = key
                p._head_since = now
            elif now - p._head_since >= timeout:
                late.append((p, key is not _FIRST or p.scope is not None))
        for p, started in late:
            p.head_timed_out(started)
        if late:
            logger.info("closed %d connection(s) that did not send a request head within %gs", len(late), timeout)
        if mine:
            self.loop.call_later(self.interval, self.tick)
        else:
            self.ticking = False


# uvicorn's ServerState (one per server) -> its watch
_head_watches: "weakref.WeakKeyDictionary[Any, _HeadWatch]" = weakref.WeakKeyDictionary()
