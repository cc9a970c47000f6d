"""The Prometheus scrape endpoint: a tiny HTTP server that answers `GET /metrics` (or `/`).

Shared by the controller (one endpoint per instance on the embedded runtime) and the per-node
exporters of the Ray runtime (`node_exporter.py`). `render` produces the text on each scrape, so
text is only ever formatted when someone asks. A port already taken falls back to a free one with
a warning naming it (several Ray nodes on one machine share an address; so do two instances).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Optional

logger = logging.getLogger("shoal.controller")

Render = Callable[[], Awaitable[str]]


class Unavailable(Exception):
    """`render` cannot produce the text now (e.g. the controller is restarting): a 503."""


class MetricsEndpoint:
    def __init__(self, render: Render) -> None:
        self.render = render
        self.server: Optional[asyncio.AbstractServer] = None

    async def listen(self, host: str, port: int) -> Optional[int]:
        """Listen on host:port (0: any free port; taken: a free one instead). The port, or None."""
        try:
            self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        except OSError as e:
            if port == 0:
                logger.warning("the metrics endpoint could not listen on %s: %s", host, e)
                return None
            try:
                self.server = await asyncio.start_server(self._serve, host, 0, reuse_address=True)
            except OSError as e2:
                logger.warning("the metrics endpoint could not listen on %s: %s", host, e2)
                return None
            logger.warning("port %d is taken (%s); the metrics endpoint listens on port %d instead "
                           "(set SHOAL_METRICS_EXPORT_PORT or serve.start(metrics_export_port=...))",
                           port, e.strerror or e, self.server.sockets[0].getsockname()[1])
        return self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            while True:  # headers: not needed
                h = await asyncio.wait_for(reader.readline(), 10)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            method = parts[0] if parts else ""
            path = parts[1].split("?", 1)[0] if len(parts) > 1 else ""
            plain = "text/plain; charset=utf-8"
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", plain, b"Method Not Allowed\n"
            elif path in ("/metrics", "/"):
                from prometheus_client import CONTENT_TYPE_LATEST

                try:
                    status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, (await self.render()).encode("utf-8")
                except Unavailable as e:
                    status, ctype, body = "503 Service Unavailable", plain, f"{e}\n".encode("utf-8")
            else:
                status, ctype, body = "404 Not Found", plain, b"Not Found: try /metrics\n"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode("latin-1")
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a scrape must never take its process down
            logger.exception("serving a metrics scrape failed")
        finally:
            writer.close()


def endpoint_url(host: str, port: int, node_ip: Optional[str] = None) -> str:
    """The URL to scrape; with `node_ip`, a wildcard host is shown as that address."""
    if node_ip and host in ("", "0.0.0.0", "::"):
        host = node_ip
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/metrics"
