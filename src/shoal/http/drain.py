"""A proxy that drains: it tells load balancers, moves its clients off, finishes its requests, then ends.

As Ray Serve's proxies do when their node is about to go: from the moment the controller says
`drain`, `GET /-/healthz` and `GET /-/routes` answer 503 "This node is being drained." (a load
balancer's health check takes the proxy out of its pool), every response carries `Connection: close`
(a keep-alive client opens its next connection elsewhere), and requests in flight finish.

How long it stays depends on whether another proxy on this host shares its port
(`http/listener_handover.py`):

- one does: the draining proxy hands it its listening sockets at once, so new connections (and
  those already queued in the kernel) go to the survivor and none is reset; the proxy ends as soon
  as its last connection closed (each closes after its next response), or once the minimum draining
  period has passed with no request in flight (idle keep-alive connections are closed then);
- none does: it keeps accepting and serving (with the 503 health answer, so a load balancer moves
  off) for `SHOAL_PROXY_MIN_DRAINING_PERIOD_S` (default 30 s, Ray's `PROXY_MIN_DRAINING_PERIOD_S`),
  then closes its listener and ends once no request is in flight.

Either way requests still running get at most `timeout_s` more after that (uvicorn's graceful
shutdown), and the controller kills a proxy that overstays.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Callable

logger = logging.getLogger("shoal.proxy")

DRAINING_MESSAGE = b"This node is being drained."  # Ray Serve's words, byte for byte
MIN_DRAINING_PERIOD_ENV = "SHOAL_PROXY_MIN_DRAINING_PERIOD_S"
DEFAULT_MIN_DRAINING_PERIOD_S = 30.0
HANDOVER_ENV = "SHOAL_PROXY_LISTENER_HANDOVER"  # "0" turns the handover off (to measure what it saves)
_CLOSE = (b"connection", b"close")
_POLL_S = 0.1


def min_draining_period_s() -> float:
    """`SHOAL_PROXY_MIN_DRAINING_PERIOD_S` (read by the controller when it drains a proxy); a value that
    is not a number >= 0 is logged and the default used, so a typo never stops a drain."""
    raw = os.environ.get(MIN_DRAINING_PERIOD_ENV, "").strip()
    if not raw:
        return DEFAULT_MIN_DRAINING_PERIOD_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        logger.warning("%s must be a number of seconds >= 0, not %r; using %gs", MIN_DRAINING_PERIOD_ENV, raw,
                       DEFAULT_MIN_DRAINING_PERIOD_S)
        return DEFAULT_MIN_DRAINING_PERIOD_S
    return value


def handover_enabled() -> bool:
    return os.environ.get(HANDOVER_ENV, "1").lower() not in ("0", "off", "false")


def closing(send: Callable) -> Callable:
    """An ASGI `send` whose response head carries `Connection: close` (uvicorn then closes the
    connection once the response is written)."""

    async def send_closing(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = dict(message, headers=[*message.get("headers", ()), _CLOSE])
        await send(message)

    return send_closing


def refuse_keep_alive(connections: Any) -> int:
    """Requests already running on uvicorn's `connections` close their connection once answered
    (uvicorn adds `Connection: close` to a head not yet sent); idle connections are left open, so a
    client that is just sending on one is not cut off. Returns how many were running."""
    running = 0
    for protocol in list(connections):
        cycle = getattr(protocol, "cycle", None)  # None on WebSocket protocols and fresh connections
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            running += 1
    return running


async def drain_server(server: Any, listeners: Any, receiver: Any, *, timeout_s: float, min_period_s: float,
                       handover: bool = True) -> str:
    """Drain a started uvicorn `server` (its app already answers as draining, see `ProxyApp.start_draining`)
    and make it exit; returns what happened, for the log. The caller awaits `server.serve()` after.

    `listeners` (a `ListenerSet`) are the sockets it accepts on, `receiver` its `HandoverReceiver`
    (None when it shares no port).
    """
    from shoal.http.listener_handover import hand_over

    started = time.monotonic()
    connections = server.server_state.connections
    refuse_keep_alive(connections)
    peer = None
    if receiver is not None:
        receiver.close()  # a peer leaving now must not hand its sockets to this one
        await receiver.settled()  # and one that just did: its sockets go on with ours
        if handover:
            peer = await hand_over(listeners, receiver.directory, exclude=receiver.path)
    if peer is not None:
        listeners.stop_accepting()
        how = f"its listening sockets went to the proxy at {peer}"
        # Nothing new arrives here: end once every client moved off, or once the period has passed.
        while connections and time.monotonic() - started < min_period_s:
            await asyncio.sleep(_POLL_S)
    else:
        how = "no other proxy on this host takes its listener" if receiver is not None else "it shares no port"
        await asyncio.sleep(max(0.0, min_period_s - (time.monotonic() - started)))
    # uvicorn's graceful shutdown: listeners and idle connections close, requests in flight finish.
    server.config.timeout_graceful_shutdown = max(0.0, float(timeout_s))
    server.should_exit = True
    return how
