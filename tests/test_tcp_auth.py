"""TCP connections prove the instance secret before any frame is read; Unix sockets are private."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import stat
import subprocess
import sys

import pytest

from shoal.transport import auth
from shoal.transport.connection import RpcHandler, connect, serve_tcp
from shoal.transport.framing import Kind, pack


class _Echo(RpcHandler):
    def __init__(self, calls: list):
        self.calls = calls

    async def rpc_echo(self, conn, x):
        self.calls.append(x)
        return x


class _RunsCode:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _run(coro):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.fixture
def secret():
    auth.set_secret(auth.new_secret())
    yield
    auth.set_secret(None)


def test_peer_with_the_secret_calls_and_peers_without_it_are_refused(secret, tmp_path):
    marker = tmp_path / "ran"
    calls: list = []
    evil = pack(Kind.REQUEST, 1, pickle.dumps(("echo", (_RunsCode(str(marker)),), {}, None)))

    async def main():
        server = await serve_tcp("127.0.0.1", 0, lambda: _Echo(calls), name="echo")
        conn = await connect(server.address, name="good")
        assert await conn.call("echo", 42) == 42
        host, port = server.address[len("tcp://"):].rsplit(":", 1)
        loop = asyncio.get_running_loop()

        # No handshake at all: the frame is taken for a (wrong) proof, and the connection closed.
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(evil * 3)
        assert (await reader.readexactly(len(auth.MAGIC))) == auth.MAGIC
        await reader.readexactly(auth.NONCE_SIZE)
        try:
            assert await reader.read() == b""
        except ConnectionResetError:
            pass  # closed with our unread bytes in its buffer: a reset instead of EOF
        writer.close()

        # A wrong secret: the client itself notices the server's proof does not match either.
        good = auth.get_secret()
        auth.set_secret(b"x" * 32)
        with pytest.raises((auth.AuthenticationError, ConnectionError, asyncio.IncompleteReadError)):
            await connect(server.address, name="bad")
        auth.set_secret(good)

        # A server that does not hold our secret never gets a request from us.
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        fake = f"tcp://127.0.0.1:{sock.getsockname()[1]}"

        async def impostor():
            s, _ = await loop.sock_accept(sock)
            s.setblocking(False)
            await loop.sock_sendall(s, auth.MAGIC + os.urandom(auth.NONCE_SIZE))
            await loop.sock_recv(s, 64)
            await loop.sock_sendall(s, os.urandom(auth.MAC_SIZE))  # a made-up proof
            s.close()

        sock.setblocking(False)
        task = loop.create_task(impostor())
        with pytest.raises(auth.AuthenticationError):
            await connect(fake, name="impostor")
        await task
        sock.close()
        server.close()
        await asyncio.sleep(0)  # let the accept loop see its cancellation

    _run(main())
    assert calls == [42]
    assert not marker.exists()


def test_connecting_over_tcp_without_a_secret_fails_clearly():
    auth.set_secret(None)
    with pytest.raises(auth.AuthenticationError, match="no shoal instance secret"):
        _run(connect("tcp://127.0.0.1:9", name="x"))


def test_embedded_sockets_are_private_to_the_user(serve_app):
    from shoal import client as client_mod
    from shoal import serve

    @serve.deployment
    def f():
        return 1

    serve.run(f.bind())
    session = client_mod.get_global_client().session_dir
    assert stat.S_IMODE(os.stat(session).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.dirname(session)).st_mode) == 0o700
    socks = [os.path.join(session, "controller.sock")] + [
        os.path.join(session, "r", n) for n in os.listdir(os.path.join(session, "r"))]
    assert len(socks) >= 2
    for path in socks:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_the_embedded_runtime_does_not_import_ray():
    code = ("import sys; from shoal import serve\n"
            "@serve.deployment\n"
            "def f(): return 1\n"
            "assert serve.run(f.bind()).remote().result() == 1\n"
            "serve.shutdown()\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, SHOAL_RUNTIME="embedded"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
