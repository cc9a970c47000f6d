"""Handing a proxy's listening sockets to another proxy on the same host, so that no connection is lost.

Several proxies on one host listen on the same port with `SO_REUSEPORT` (the Ray runtime always does:
fake multi-node clusters run on one machine, and real hosts can run several raylets). The kernel
hashes each new connection to one of the sockets of that port and queues it there until the owner
calls `accept`. Closing a listening socket resets every connection still in its queue, and any
connection the kernel hashes to it between the owner's last `accept` and the close: a proxy that
leaves while the port is busy loses connections, however carefully it closes.

So a departing proxy does not close its listening sockets; it gives them away. Every serving proxy
of an instance that shares its port runs a `HandoverReceiver`: a Unix socket in
`<shoal root>/listeners/<port>-<instance>/` (mode 0700, one file per proxy; the instance key keeps
two shoal instances that share a port by mistake apart). A draining proxy sends its listening
sockets' descriptors to one of them (`SCM_RIGHTS`, `socket.send_fds`); the survivor checks that each
is a listening socket of its own address and port, accepts on it with its own uvicorn server, and
only then answers "ok". Until
that answer both accept from the socket; after it the departing proxy closes its descriptors, which
closes nothing in the kernel, since the survivor holds the same socket. The survivor keeps accepting
on it for as long as it serves, and passes it on in turn should it leave too. Closing a listener later
would bring the race back (the kernel keeps hashing new connections to it until it is closed), unless
the kernel migrates a closed listener's queue (`net.ipv4.tcp_migrate_req=1`, off by default), so one
extra descriptor per departed peer is the price. The last proxy of a port on a host has nobody to give
its sockets to: it drains for the minimum period first (`http/drain.py`), as Ray Serve's proxies do.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import socket
from typing import Any, Optional

logger = logging.getLogger("shoal.proxy")

_MAGIC = b"SHOAL-LISTENERS-1"  # with the descriptors; the reply is b"ok" or b"no: <reason>"
_MAX_FDS = 64
_OK = b"ok"


def instance_key(secret: Optional[bytes], fallback: str) -> str:
    """A name for the shoal instance: from its secret (every process of it holds the same), else `fallback`."""
    if secret:
        import hashlib

        return hashlib.sha256(b"shoal-listeners:" + secret).hexdigest()[:16]
    return os.path.basename(fallback.rstrip("/")) or "local"


def handover_dir(port: int, instance: str = "", root: Optional[str] = None) -> str:
    """Where the receivers of `instance`'s proxies listening on `port` put their Unix sockets (made, 0700)."""
    if root is None:
        from shoal.client import _session_root

        root = _session_root()  # /tmp/shoal-<uid>: made 0700 if missing, refused if not this user's
    path = os.path.join(root, "listeners", f"{port}-{instance}" if instance else str(port))
    for directory in (os.path.dirname(path), path):  # each level 0700 (makedirs gives parents the umask's)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.stat(directory).st_mode & 0o077:
            os.chmod(directory, 0o700)
    return path


def sweep(listeners_root: str, keep: str = "", min_age_s: float = 60.0) -> None:
    """Remove what killed proxies left under `listeners_root`: socket files nobody listens on (a
    connection is refused), then directories left empty for `min_age_s` (none is `keep`)."""
    import time

    try:
        directories = [os.path.join(listeners_root, d) for d in os.listdir(listeners_root)]
    except OSError:
        return
    for directory in directories:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            if name.endswith(".sock") and _refused(os.path.join(directory, name)):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass
        try:
            if directory != keep and time.time() - os.stat(directory).st_mtime >= min_age_s:
                os.rmdir(directory)  # only if empty
        except OSError:
            pass


def _refused(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)  # a live receiver sees a connection that sends nothing and ignores it
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


class ListenerSet:
    """The listening sockets one uvicorn server accepts on: its own, and any that departing peers handed it.

    `server` is a started `uvicorn.Server`; sockets added here get its protocol factory and join its
    `servers`, so its shutdown closes them as its own.
    """

    def __init__(self, server: Any, sockets: list[socket.socket]):
        self.server = server
        self.sockets = list(sockets)
        self.accepting = True

    def _protocol(self, _loop: Optional[asyncio.AbstractEventLoop] = None) -> asyncio.Protocol:
        config = self.server.config
        return config.http_protocol_class(config=config, server_state=self.server.server_state,
                                          app_state=self.server.lifespan.state, _loop=_loop)

    def matches(self, sock: socket.socket) -> str:
        """Why `sock` may not be accepted on here ("" if it may): it must be a listening TCP socket
        with the address and port of ours."""
        try:
            if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                return "not a listening TCP socket"
            theirs = sock.getsockname()
        except OSError as e:
            return f"not a usable socket: {e}"
        if not self.accepting or not self.sockets:
            return "this proxy no longer accepts connections"
        mine = self.sockets[0].getsockname()
        if sock.family != self.sockets[0].family or theirs[:2] != mine[:2]:
            return f"listens on {theirs[:2]}, this proxy on {mine[:2]}"
        return ""

    async def adopt(self, sockets: list[socket.socket]) -> None:
        """Accept on `sockets` too, from now on."""
        loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
            server = await loop.create_server(self._protocol, sock=sock, backlog=self.server.config.backlog)
            self.server.servers.append(server)
            self.sockets.append(sock)

    def stop_accepting(self) -> None:
        """Stop accepting and close this process's descriptors (a socket handed over lives on in the peer)."""
        self.accepting = False
        for server in self.server.servers:
            server.close()
        for sock in self.sockets:
            sock.close()
        self.sockets = []


class HandoverReceiver:
    """Takes the listening sockets of a departing peer on the same host and port (see the module doc)."""

    def __init__(self, listeners: ListenerSet, directory: str):
        self.listeners = listeners
        self.directory = directory  # `handover_dir(...)`
        self.path = os.path.join(directory, f"{os.getpid()}-{secrets.token_hex(4)}.sock")
        self._sock: Optional[socket.socket] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._tasks: set = set()

    def start(self) -> str:
        """Listen; and clear what killed proxies left in the listeners directory (see `sweep`)."""
        self._loop = asyncio.get_running_loop()
        sweep(os.path.dirname(self.directory), keep=self.directory)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for attempt in range(3):
            try:
                sock.bind(self.path)
                break
            except FileNotFoundError:  # another proxy's sweep removed the directory just as it emptied
                if attempt == 2:
                    raise
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_accept)
        return self.path

    def close(self) -> None:
        """Take nothing more: no peer finds this one from now on."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        self._loop.remove_reader(sock.fileno())  # type: ignore[union-attr]
        sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def settled(self) -> None:
        """Wait for the handovers in progress (a closed receiver takes no new one): sockets adopted
        meanwhile are in `listeners` once this returns, so a proxy that leaves now passes them on too."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _on_accept(self) -> None:
        if self._sock is None:
            return
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        task = self._loop.create_task(self._serve(conn))  # type: ignore[union-attr]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        conn.setblocking(False)
        received: list[socket.socket] = []
        try:
            if not _same_user(conn):
                return
            data = b""
            fds: list[int] = []
            while len(data) < len(_MAGIC):
                readable = loop.create_future()
                loop.add_reader(conn.fileno(), lambda: readable.done() or readable.set_result(None))
                try:
                    await asyncio.wait_for(readable, 5.0)
                finally:
                    loop.remove_reader(conn.fileno())
                chunk, more, _flags, _addr = socket.recv_fds(conn, 256, _MAX_FDS)
                fds += more
                if not chunk:
                    break
                data += chunk
            received = [socket.socket(fileno=fd) for fd in fds]
            if not data and not received:
                return  # a peer's `sweep` checking that this receiver lives
            why = "" if data == _MAGIC else "not a handover message"
            for sock in received:
                why = why or self.listeners.matches(sock)
            if why or self._sock is None:
                conn.sendall(b"no: " + (why or "this proxy is leaving too").encode())
                return
            await self.listeners.adopt(received)
            logger.info("took over %d listening socket(s) of a departing proxy on this port", len(received))
            received = []
            conn.sendall(_OK)
        except Exception as e:  # noqa: BLE001 - the sender keeps its sockets and tries elsewhere
            logger.warning("a listener handover failed: %r", e)
        finally:
            for sock in received:  # refused: this process's copies only; the sender still has its own
                sock.close()
            conn.close()


def _same_user(conn: socket.socket) -> bool:
    """The peer runs as this user (the directory is 0700 already; Linux says it once more)."""
    import struct

    if not hasattr(socket, "SO_PEERCRED"):
        return True
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid == os.getuid()


def _send(path: str, fds: list[int], timeout_s: float) -> str:
    """Send `fds` to the receiver at `path`; its answer ("ok", "no: ...")."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(path)
        socket.send_fds(s, [_MAGIC], fds)
        reply = b""
        while True:
            chunk = s.recv(1024)
            if not chunk:
                break
            reply += chunk
        return reply.decode(errors="replace") or "closed without an answer"


async def hand_over(listeners: ListenerSet, directory: str, exclude: str = "", timeout_s: float = 5.0) -> Optional[str]:
    """Give `listeners`' sockets to another proxy whose receiver is in `directory` (`handover_dir`); the
    path of the receiver that took them, or None when none would (the caller still holds them then).

    Receivers whose process is gone (connection refused) are removed on the way.
    """
    if not listeners.sockets:
        return None
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    fds = [s.fileno() for s in listeners.sockets]
    for name in names:
        path = os.path.join(directory, name)
        if path == exclude or not name.endswith(".sock"):
            continue
        try:
            answer = await asyncio.to_thread(_send, path, fds, timeout_s)
        except OSError as e:
            if e.errno == errno.ECONNREFUSED:  # nobody listens there: a proxy that died
                try:
                    os.unlink(path)
                except OSError:
                    pass
            elif not isinstance(e, FileNotFoundError):
                logger.info("could not hand the listener over to %s: %s", path, e)
            continue
        if answer == _OK.decode():
            return path
        logger.info("%s did not take the listener: %s", path, answer)
    return None
