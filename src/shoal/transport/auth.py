"""The per-instance secret, and the handshake every TCP connection makes before any frame is read.

Frames carry pickles, and unpickling runs code: a peer must prove it holds the instance's secret
before either side reads a single frame. The proof is mutual (a client also unpickles replies, so
it must not talk to an impostor) and costs one round trip per connection, never per request:

    server -> client   MAGIC + server nonce (16 bytes)
    client -> server   client nonce (16) + HMAC(secret, "C" + server nonce + client nonce)
    server -> client   HMAC(secret, "S" + server nonce + client nonce)

A wrong proof closes the socket. Unix sockets skip this: they are readable by their user alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
from typing import Optional

MAGIC = b"SHOAL1\n"
NONCE_SIZE = 16
MAC_SIZE = 32
HANDSHAKE_TIMEOUT_S = 10.0

_secret: Optional[bytes] = None


class AuthenticationError(ConnectionError):
    """The peer did not prove that it holds this instance's secret."""


def new_secret() -> bytes:
    return os.urandom(32)


def set_secret(secret: Optional[bytes]) -> None:
    """The secret of the shoal instance this process belongs to (one per process)."""
    global _secret
    _secret = secret


def get_secret_or_none() -> Optional[bytes]:
    return _secret


def get_secret() -> bytes:
    if _secret is None:
        raise AuthenticationError("this process holds no shoal instance secret; it cannot use TCP connections")
    return _secret


def _mac(secret: bytes, role: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(secret, role + server_nonce + client_nonce, hashlib.sha256).digest()


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise AuthenticationError("the peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


async def client_handshake(sock: socket.socket, secret: bytes) -> None:
    """Prove the secret to the server and check that the server holds it too."""
    loop = asyncio.get_running_loop()

    async def run() -> None:
        hello = await _recv_exactly(loop, sock, len(MAGIC) + NONCE_SIZE)
        if not hello.startswith(MAGIC):
            raise AuthenticationError("the peer is not a shoal endpoint")
        server_nonce = hello[len(MAGIC):]
        client_nonce = os.urandom(NONCE_SIZE)
        await loop.sock_sendall(sock, client_nonce + _mac(secret, b"C", server_nonce, client_nonce))
        proof = await _recv_exactly(loop, sock, MAC_SIZE)
        if not hmac.compare_digest(proof, _mac(secret, b"S", server_nonce, client_nonce)):
            raise AuthenticationError("the peer does not hold this shoal instance's secret")

    await asyncio.wait_for(run(), HANDSHAKE_TIMEOUT_S)


async def server_handshake(sock: socket.socket, secret: bytes) -> bool:
    """Challenge a connecting client; True once it proved the secret (it then gets our proof)."""
    loop = asyncio.get_running_loop()

    async def run() -> bool:
        server_nonce = os.urandom(NONCE_SIZE)
        await loop.sock_sendall(sock, MAGIC + server_nonce)
        answer = await _recv_exactly(loop, sock, NONCE_SIZE + MAC_SIZE)
        client_nonce, proof = answer[:NONCE_SIZE], answer[NONCE_SIZE:]
        if not hmac.compare_digest(proof, _mac(secret, b"C", server_nonce, client_nonce)):
            return False
        await loop.sock_sendall(sock, _mac(secret, b"S", server_nonce, client_nonce))
        return True

    try:
        return await asyncio.wait_for(run(), HANDSHAKE_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError, AuthenticationError):
        return False
