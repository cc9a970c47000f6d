"""The controller's side: gathers every process's snapshot and serves them in Prometheus format.

`MetricsHub` keeps the latest snapshot each connected process pushed (`notify_metrics`), and the
counters and histograms of processes that ended (their gauges are dropped: a dead proxy has no
requests in flight). A scrape merges all of them with the controller's own metrics (replica
health, targets, start-up latency) and renders them through a `prometheus_client` custom collector.

The endpoint is a small HTTP server on the controller's event loop (so a scrape reads the state
between two events, never halfway through one): `GET /metrics` (or `/`), loopback by default.
Options: `{"host": ..., "port": ...}` from the driver that started shoal (`serve.start`'s
`metrics_export_port`/`metrics_export_host`, else `SHOAL_METRICS_EXPORT_PORT`/`_HOST`); port 0 picks
a free port, -1 (or "off") turns the endpoint off. A port already taken falls back to a free one,
with a warning naming it. A restarted controller listens where its predecessor did.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from typing import Any, Optional

from shoal.telemetry.registry import COUNTER, GAUGE, HISTOGRAM, REGISTRY, Snapshot, merge_samples

logger = logging.getLogger("shoal.controller")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080  # Ray's metrics_export_port
OFF = -1
# Series naming a replica that ended stay this long (for the last scrapes), then go, as in Ray.
DEAD_REPLICA_SERIES_TTL_S = 600.0
# A process whose connection ended may come back (a TCP blip): its totals wait this long under its
# token before they join the retired totals.
RECONNECT_GRACE_S = 60.0
_CHECKPOINT_KEY = "metrics_export"
# Labels that name one replica (vLLM's `engine` is the replica's id): its series end with it.
_IDENTITY_LABELS = frozenset({"replica", "engine"})


def export_options(port: Any = None, host: Optional[str] = None) -> dict:
    """Where the endpoint should listen: arguments, else the environment, else 127.0.0.1:8080."""
    if port is None:
        port = os.environ.get("SHOAL_METRICS_EXPORT_PORT", "").strip() or DEFAULT_PORT
    if isinstance(port, str):
        try:
            port = OFF if port.lower() in ("off", "none", "false", "disabled") else int(port)
        except ValueError:
            raise ValueError(f"SHOAL_METRICS_EXPORT_PORT must be a port number, 0 (any free port) or -1/off "
                             f"(no endpoint), not {port!r}") from None
    if port is None or int(port) < 0:
        port = OFF
    return {"host": host or os.environ.get("SHOAL_METRICS_EXPORT_HOST", "").strip() or DEFAULT_HOST,
            "port": int(port)}


class MetricsHub:
    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.live: dict[Any, tuple] = {}         # connection -> (process token, latest snapshot)
        self.ending: dict[str, tuple] = {}       # token -> (deadline, snapshot) of a process that left
        self.retired: Snapshot = {}               # counters/histograms of ended processes
        self.expiring: deque = deque()            # (deadline, snapshot) of ended replicas' own series
        self.options: Optional[dict] = None
        self.server: Optional[asyncio.AbstractServer] = None
        self.url: Optional[str] = None
        self._conflicts: set = set()
        from shoal.telemetry.serve_metrics import controller_source

        self._controller_source = controller_source(controller)
        self._registry: Any = None

    # --- what processes push ------------------------------------------------------------------
    def update(self, conn: Any, payload: Any) -> None:
        """`payload` is (process token, snapshot): the token tells a process that reconnected from
        a new one, so its totals are not counted twice."""
        try:
            token, snapshot = payload
        except (TypeError, ValueError):
            return
        if not isinstance(snapshot, dict) or getattr(conn, "closed", False):
            return
        self.ending.pop(token, None)
        self.live[conn] = (token, snapshot)

    def forget(self, conn: Any) -> None:
        """A process's connection ended: its totals stay (for a while under its token, in case it
        reconnects, then folded into the retired totals)."""
        entry = self.live.pop(conn, None)
        if entry is not None:
            token, snap = entry
            self.ending[token] = (time.monotonic() + RECONNECT_GRACE_S, _without_gauges(snap))

    def _fold_ended(self, now: float) -> None:
        for token in [t for t, (deadline, _) in self.ending.items() if deadline < now]:
            snap = self.ending.pop(token)[1]
            keep: Snapshot = {}
            expire: Snapshot = {}
            for name, fam in snap.items():
                (expire if _IDENTITY_LABELS.intersection(fam[2]) else keep)[name] = fam
            _merge(self.retired, keep, self._conflicts)
            if expire:
                self.expiring.append((now + DEAD_REPLICA_SERIES_TTL_S, expire))
        while self.expiring and self.expiring[0][0] < now:
            self.expiring.popleft()

    # --- the merged view ----------------------------------------------------------------------
    def merged(self) -> Snapshot:
        self._fold_ended(time.monotonic())
        out: Snapshot = {}
        _merge(out, self.retired, self._conflicts)
        for _, snap in self.expiring:
            _merge(out, snap, self._conflicts)
        for _, snap in list(self.ending.values()):
            _merge(out, snap, self._conflicts)
        for _, snap in list(self.live.values()):
            _merge(out, snap, self._conflicts)
        _merge(out, REGISTRY.snapshot([self._controller_source]), self._conflicts)
        return out

    def text(self) -> str:
        """Everything, in Prometheus' text format."""
        from prometheus_client import generate_latest

        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self))
        return generate_latest(self._registry).decode("utf-8")

    # --- the endpoint -------------------------------------------------------------------------
    async def configure(self, options: Optional[dict]) -> None:
        """Start the endpoint once (the first options win, as for HTTP options)."""
        if self.options is not None or options is None:
            return
        self.options = dict(options)
        port = int(self.options.get("port", DEFAULT_PORT))
        if port < 0:
            logger.info("the metrics endpoint is off (SHOAL_METRICS_EXPORT_PORT=off)")
            self._remember(OFF)
            return
        host = self.options.get("host") or DEFAULT_HOST
        try:
            self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        except OSError as e:
            if port == 0:
                logger.warning("the metrics endpoint could not listen on %s: %s", host, e)
                return
            try:
                self.server = await asyncio.start_server(self._serve, host, 0, reuse_address=True)
            except OSError as e2:
                logger.warning("the metrics endpoint could not listen on %s: %s", host, e2)
                return
            logger.warning("port %d is taken (%s); the metrics endpoint listens on port %d instead "
                           "(set SHOAL_METRICS_EXPORT_PORT or serve.start(metrics_export_port=...))",
                           port, e.strerror or e, self.server.sockets[0].getsockname()[1])
        actual = self.server.sockets[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{actual}/metrics"
        self._remember(actual)
        logger.info("Prometheus metrics at %s", self.url)

    async def resume(self) -> None:
        """After a restart: listen where the controller that died did."""
        saved = self.controller.checkpoint_extra.get(_CHECKPOINT_KEY)
        if saved:
            await self.configure({"host": saved[0], "port": saved[1]})

    def _remember(self, port: int) -> None:
        host = (self.options or {}).get("host") or DEFAULT_HOST
        self.controller.checkpoint_extra[_CHECKPOINT_KEY] = (host, port)

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
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain; charset=utf-8", b"Method Not Allowed\n"
            elif path in ("/metrics", "/"):
                from prometheus_client import CONTENT_TYPE_LATEST

                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.text().encode("utf-8")
            else:
                status, ctype, body = "404 Not Found", "text/plain; charset=utf-8", b"Not Found: try /metrics\n"
            head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode("latin-1")
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a scrape must never take the controller down
            logger.exception("serving a metrics scrape failed")
        finally:
            writer.close()


def _without_gauges(snap: Snapshot) -> Snapshot:
    return {name: fam for name, fam in snap.items() if fam[0] != GAUGE}


def _merge(out: Snapshot, snap: Snapshot, conflicts: set) -> None:
    for name, fam in snap.items():
        kind, doc, labels, bounds, samples = fam
        have = out.get(name)
        if have is None:
            copied = {k: list(v) for k, v in samples.items()} if kind == HISTOGRAM else dict(samples)
            out[name] = (kind, doc, labels, bounds, copied)
        elif have[0] != kind or have[2] != labels or have[3] != bounds:
            if name not in conflicts:
                conflicts.add(name)
                logger.warning("metric %s is defined differently by two processes (%s %s vs %s %s); "
                               "exporting the first definition only", name, have[0], list(have[2]), kind,
                               list(labels))
        else:
            merge_samples(have[4], samples, kind)


class _Collector:
    """A `prometheus_client` custom collector over the merged snapshot."""

    def __init__(self, hub: MetricsHub) -> None:
        self.hub = hub

    def describe(self) -> list:
        return []  # no collect() at registration time

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for name, (kind, doc, labels, bounds, samples) in sorted(self.hub.merged().items()):
            labels = list(labels)
            try:
                if kind == COUNTER:
                    fam: Any = CounterMetricFamily(name, doc, labels=labels)
                    for values, v in samples.items():
                        fam.add_metric(list(values), v)
                elif kind == GAUGE:
                    fam = GaugeMetricFamily(name, doc, labels=labels)
                    for values, v in samples.items():
                        fam.add_metric(list(values), v)
                else:
                    fam = HistogramMetricFamily(name, doc, labels=labels)
                    les = [_le(b) for b in bounds] + ["+Inf"]
                    for values, h in samples.items():
                        cum, buckets = 0, []
                        for le, c in zip(les, h[:-1]):
                            cum += c
                            buckets.append((le, cum))
                        fam.add_metric(list(values), buckets, h[-1])
            except Exception:  # noqa: BLE001 - e.g. a user metric with a name Prometheus refuses
                if name not in self.hub._conflicts:
                    self.hub._conflicts.add(name)
                    logger.exception("metric %s cannot be exported", name)
                continue
            yield fam


def _le(bound: float) -> str:
    return repr(float(bound))
