"""One connection between two shoal processes: frames both ways, many requests in flight.

Either side may send requests; replies are matched by request id. Writes made in one loop
iteration are coalesced into one syscall, which is what keeps many small frames cheap.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Optional, Protocol

from shoal.transport import serialization as ser
from shoal.transport.framing import HEADER, HEADER_SIZE, Kind, pack

logger = logging.getLogger(__name__)


class ConnectionLost(ConnectionError):
    """The peer went away (its process exited or closed the socket)."""


class Sink(Protocol):
    """Receives the frames that answer one outgoing request."""

    def on_frame(self, kind: int, body: bytes) -> None: ...
    def on_lost(self, exc: BaseException) -> None: ...


class Handler(Protocol):
    """Serves the requests a peer sends on a connection."""

    def on_request(self, conn: "Connection", rid: int, body: bytes) -> None: ...
    def on_cancel(self, conn: "Connection", rid: int) -> None: ...
    def on_notify(self, conn: "Connection", topic: str, payload: Any) -> None: ...
    def on_connection_lost(self, conn: "Connection", exc: Optional[BaseException]) -> None: ...
    # Optional: `on_connection_made(conn)`, called once the connection is up (replicas track theirs).


class FutureSink:
    """Resolves an asyncio future with the single reply to a control call."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future):
        self.future = future

    def on_frame(self, kind: int, body: bytes) -> None:
        if self.future.done():
            return
        if kind == Kind.OK:
            self.future.set_result(ser.loads(body))
        elif kind == Kind.ERROR:
            self.future.set_exception(ser.loads_exception(body))
        else:
            self.future.set_exception(RuntimeError(f"unexpected frame kind {kind} for a control call"))

    def on_lost(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


_READ_CHUNK = 64 * 1024


class Connection(asyncio.BufferedProtocol):
    """A framed, bidirectional connection.

    A `BufferedProtocol`: the loop reads straight into one reusable buffer. (A plain `Protocol`
    under asyncio's own loop allocates and frees a 256 KiB bytes object for every read.)
    """

    def __init__(self, handler: Optional[Handler] = None, name: str = "", on_capacity: Optional[Callable] = None,
                 immediate: bool = False):
        self.handler = handler
        # Write each frame at once instead of coalescing per loop iteration: for loops that sync
        # callers run just long enough to send (see sync_loop.py).
        self.immediate = immediate
        self.name = name
        self.on_capacity = on_capacity
        self.transport: Optional[asyncio.Transport] = None
        self.loop = asyncio.get_event_loop()
        self.sinks: dict[int, Sink] = {}
        self.closed = False
        self.close_exc: Optional[BaseException] = None
        self.closed_future: asyncio.Future = self.loop.create_future()
        self._next_rid = 1
        self._rbuf = bytearray(_READ_CHUNK)
        self._rstart = 0  # first unparsed byte
        self._rend = 0    # end of received bytes
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._dispatching = False
        self.sock = None  # the socket, when we made it (connect_unix)
        # Per-request state a server keeps for this peer (e.g. running tasks to cancel).
        self.tasks: dict[int, asyncio.Task] = {}
        self.inboxes: dict[int, Any] = {}  # requests that take pushed messages (WebSockets)

    # --- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        made = getattr(self.handler, "on_connection_made", None)
        if made is not None:
            made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self._rbuf
        start, end = self._rstart, self._rend
        if start == end:
            self._rstart = self._rend = start = end = 0
        need = max(_READ_CHUNK, sizehint)
        if end - start >= HEADER_SIZE:  # a frame is partly here: make room for all of it
            need = max(need, HEADER_SIZE + HEADER.unpack_from(buf, start)[0] - (end - start))
        if len(buf) - end < need:
            if start:  # move the unparsed tail to the front
                buf[:end - start] = buf[start:end]
                self._rend = end = end - start
                self._rstart = start = 0
            if len(buf) - end < need:
                buf.extend(bytes(need - (len(buf) - end)))
        return memoryview(buf)[end:]

    def buffer_updated(self, nbytes: int) -> None:
        self._rend += nbytes
        buf = self._rbuf
        pos, end = self._rstart, self._rend
        unpack = HEADER.unpack_from
        self._dispatching = True
        while end - pos >= HEADER_SIZE:
            length, kind, rid = unpack(buf, pos)
            stop = pos + HEADER_SIZE + length
            if stop > end:
                break
            body = bytes(buf[pos + HEADER_SIZE:stop])
            pos = stop
            try:
                self._dispatch(kind, rid, body)
            except BaseException:  # noqa: BLE001 - one bad frame must not stall or kill the connection
                logger.exception("error handling frame kind=%s rid=%s on %s", kind, rid, self.name)
        self._rstart = pos
        self._dispatching = False
        if len(buf) > 4 * _READ_CHUNK and pos == end:
            self._rbuf = bytearray(_READ_CHUNK)  # give back the room a large frame needed
            self._rstart = self._rend = 0
        if self._out:
            self._flush()  # replies made while handling these frames go out in one write

    def data_received(self, data: bytes) -> None:
        """Feed bytes that arrived some other way (tests, foreign transports)."""
        self.get_buffer(len(data))[:len(data)] = data
        self.buffer_updated(len(data))

    def _dispatch(self, kind: int, rid: int, body: bytes) -> None:
        if kind == Kind.REQUEST:
            self.handler.on_request(self, rid, body)  # type: ignore[union-attr]
        elif kind == Kind.OK:  # the most common reply, ahead of the rarer kinds
            sink = self.sinks.pop(rid, None)
            if sink is not None:
                sink.on_frame(kind, body)
        elif kind == Kind.CANCEL:
            self.handler.on_cancel(self, rid)  # type: ignore[union-attr]
        elif kind == Kind.NOTIFY:
            topic, payload = ser.loads(body)
            self.handler.on_notify(self, topic, payload)  # type: ignore[union-attr]
        elif kind == Kind.CAPACITY:
            if self.on_capacity is not None:
                self.on_capacity(self)
        elif kind == Kind.PUSH:
            self.handler.on_push(self, rid, body)  # type: ignore[union-attr]
        else:
            sink = self.sinks.get(rid)
            if sink is None:
                return  # reply to a request we already gave up on (cancelled)
            if kind != Kind.ITEM:
                del self.sinks[rid]
            sink.on_frame(kind, body)

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        self.close_exc = exc
        lost = ConnectionLost(f"connection to {self.name or 'peer'} lost" + (f": {exc}" if exc else ""))
        sinks, self.sinks = self.sinks, {}
        for sink in sinks.values():
            try:
                sink.on_lost(lost)
            except Exception:  # noqa: BLE001
                logger.exception("error failing a request on lost connection")
        if self.handler is not None:
            try:
                self.handler.on_connection_lost(self, exc)
            except Exception:  # noqa: BLE001
                logger.exception("error in connection-lost handler")
        if not self.closed_future.done():
            self.closed_future.set_result(None)

    # --- sending ----------------------------------------------------------------------------
    def send(self, frame: bytes) -> None:
        if self.closed:
            return
        if self.immediate and not self._out and self.transport is not None:
            self.transport.write(frame)
            return
        self._out.append(frame)
        if not self._flush_scheduled and not self._dispatching:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self.closed or self.transport is None or not out:
            return
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def new_rid(self) -> int:
        rid = self._next_rid
        self._next_rid = rid + 1
        return rid

    def request(self, body: bytes, sink: Sink) -> int:
        """Send a request; `sink` gets every frame that answers it."""
        if self.closed:
            raise ConnectionLost(f"connection to {self.name or 'peer'} is closed")
        rid = self._next_rid
        self._next_rid = rid + 1
        self.sinks[rid] = sink
        self.send(HEADER.pack(len(body), Kind.REQUEST, rid) + body)  # `pack`, inlined: once per request
        return rid

    def push(self, rid: int, message: Any) -> None:
        """Send a message into a running request (the peer's `on_push`)."""
        self.send(pack(Kind.PUSH, rid, ser.dumps(message)))

    def cancel(self, rid: int) -> None:
        self.sinks.pop(rid, None)
        self.send(pack(Kind.CANCEL, rid))

    def reply(self, kind: int, rid: int, body: bytes = b"") -> None:
        self.send(HEADER.pack(len(body), kind, rid) + body)

    def notify(self, topic: str, payload: Any) -> None:
        self.send(pack(Kind.NOTIFY, 0, ser.dumps((topic, payload))))

    async def call(self, method: str, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        """A control-plane call: `await conn.call("name", ...)` runs `rpc_name` on the peer."""
        fut = self.loop.create_future()
        self.request(ser.dumps((method, args, kwargs, None)), FutureSink(fut))
        if timeout is None:
            return await fut
        return await asyncio.wait_for(fut, timeout)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._flush()
            self.transport.close()


class RpcHandler:
    """Dispatches control calls `conn.call("x", ...)` to `async def rpc_x(self, conn, ...)`."""

    def on_request(self, conn: Connection, rid: int, body: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(conn, rid, body))
        conn.tasks[rid] = task
        task.add_done_callback(lambda _t: conn.tasks.pop(rid, None))

    async def _serve(self, conn: Connection, rid: int, body: bytes) -> None:
        try:
            method, args, kwargs, _meta = ser.loads(body)
            fn = getattr(self, "rpc_" + method, None)
            if fn is None:
                raise AttributeError(f"{type(self).__name__} has no control method '{method}'")
            result = await fn(conn, *args, **kwargs)
            conn.reply(Kind.OK, rid, ser.dumps(result))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
            conn.reply(Kind.ERROR, rid, ser.dumps_exception(e))

    def on_cancel(self, conn: Connection, rid: int) -> None:
        task = conn.tasks.get(rid)
        if task is not None:
            task.cancel()

    def on_notify(self, conn: Connection, topic: str, payload: Any) -> None:
        fn = getattr(self, "notify_" + topic, None)
        if fn is not None:
            fn(conn, payload)

    def on_connection_lost(self, conn: Connection, exc: Optional[BaseException]) -> None:
        for task in list(conn.tasks.values()):
            task.cancel()


async def connect_unix(path: str, handler: Optional[Handler] = None, name: str = "", **kw: Any) -> Connection:
    import socket

    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, path)
        _, conn = await loop.create_unix_connection(lambda: Connection(handler, name=name, **kw), sock=sock)
    except BaseException:
        sock.close()
        raise
    conn.sock = sock  # lets a sync caller that owns the loop read it directly (sync_loop.py)
    return conn


async def serve_unix(path: str, handler_factory: Callable[[], Optional[Handler]], name: str = "") -> asyncio.AbstractServer:
    """Listen on a Unix socket readable (0600) by this user alone; each peer gets its own `Connection`."""
    import os

    loop = asyncio.get_running_loop()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        server = await loop.create_unix_server(lambda: Connection(handler_factory(), name=name), path)
    finally:
        os.umask(old)
    return server


TCP_PREFIX = "tcp://"


def parse_tcp_address(address: str) -> tuple[str, int]:
    """`tcp://host:port` -> (host, port); IPv6 hosts are written in brackets."""
    hostport = address[len(TCP_PREFIX):]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def format_tcp_address(host: str, port: int) -> str:
    return f"{TCP_PREFIX}[{host}]:{port}" if ":" in host else f"{TCP_PREFIX}{host}:{port}"


def _tune_tcp(sock: Any) -> None:
    """No Nagle delay for small frames; keepalive so a peer on a vanished node is noticed."""
    import socket

    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)


async def connect(address: str, handler: Optional[Handler] = None, name: str = "", **kw: Any) -> Connection:
    """Connect to a Unix socket path or a `tcp://host:port` address (authenticated)."""
    if address.startswith(TCP_PREFIX):
        return await connect_tcp(address, handler, name, **kw)
    return await connect_unix(address, handler, name, **kw)


async def connect_tcp(address: str, handler: Optional[Handler] = None, name: str = "", **kw: Any) -> Connection:
    import socket

    from shoal.transport import auth

    secret = auth.get_secret()
    host, port = parse_tcp_address(address)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        _tune_tcp(sock)
        await loop.sock_connect(sock, (host, port))
        await auth.client_handshake(sock, secret)
        _, conn = await loop.create_connection(lambda: Connection(handler, name=name, **kw), sock=sock)
    except BaseException:
        sock.close()
        raise
    conn.sock = sock
    return conn


class TcpServer:
    """Accepts TCP connections; each becomes a `Connection` only after the peer proved the secret."""

    def __init__(self, sock: Any, handler_factory: Callable[[], Optional[Handler]], name: str, secret: bytes):
        self.sock = sock
        self.handler_factory = handler_factory
        self.name = name
        self.secret = secret
        host, port = sock.getsockname()[:2]
        self.address = format_tcp_address(host, port)
        self._pending: set = set()
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self.sock)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                logger.warning("accept on %s failed: %r", self.address, e)
                await asyncio.sleep(0.1)
                continue
            task = loop.create_task(self._admit(sock))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _admit(self, sock: Any) -> None:
        from shoal.transport import auth

        sock.setblocking(False)
        try:
            _tune_tcp(sock)
            if not await auth.server_handshake(sock, self.secret):
                logger.warning("refused a connection to %s: it did not prove the instance secret", self.name)
                sock.close()
                return
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: Connection(self.handler_factory(), name=self.name), sock)
        except BaseException:
            sock.close()
            raise

    def close(self) -> None:
        self._task.cancel()
        for task in list(self._pending):
            task.cancel()
        self.sock.close()


async def serve_tcp(host: str, port: int, handler_factory: Callable[[], Optional[Handler]],
                    name: str = "") -> TcpServer:
    """Listen on TCP; `server.address` is the `tcp://host:port` peers connect to."""
    import socket

    from shoal.transport import auth

    secret = auth.get_secret()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return TcpServer(sock, handler_factory, name, secret)
