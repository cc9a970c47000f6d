"""uvicorn's httptools protocol with the writes of one loop iteration joined into one socket write.

uvicorn writes a response's status line and headers on `http.response.start` and its body on
`http.response.body`: two `send` syscalls on the client's TCP socket for every response, each a
full trip through the kernel's TCP stack. The proxy's responses are mostly complete in one go, so
joining what a connection writes in one loop iteration saves one of those syscalls per request
(about a tenth of the proxy's CPU time). Streamed chunks still leave within the iteration that
produced them, so streaming stays chunk by chunk.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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
    """uvicorn's `httptools` protocol on a `CoalescingTransport` (pass the class as `Config(http=...)`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        loop = self.loop
        flusher: Optional[_Flusher] = _flushers.get(loop)
        if flusher is None:
            flusher = _flushers[loop] = _Flusher(loop)
        super().connection_made(CoalescingTransport(transport, flusher))  # type: ignore[arg-type]
