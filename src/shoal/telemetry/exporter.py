"""The controller's side: gathers every process's snapshot and serves them in Prometheus format.

`MetricsHub` keeps the latest snapshot each connected process pushed (`notify_metrics`), with the
node that process runs on (from its hello), and the counters and histograms of processes that ended
(their gauges are dropped: a dead proxy has no requests in flight). A scrape merges them with the
controller's own metrics (replica health, targets, start-up latency) and renders them through a
`prometheus_client` custom collector.

Where it is served: on one machine, by a small HTTP server on the controller's event loop (so a
scrape reads the state between two events, never halfway through one): `GET /metrics` (or `/`),
loopback by default. On the Ray runtime, per node, as Ray does: an exporter actor on every node
(`node_exporter.py`) listens there and, on each scrape, fetches that node's slice from here.
Options: `{"host": ..., "port": ...}` from the driver that started shoal (`serve.start`'s
`metrics_export_port`/`metrics_export_host`, else `SHOAL_METRICS_EXPORT_PORT`/`_HOST`); port 0 picks
a free port, -1 (or "off") turns the endpoint off. A port already taken falls back to a free one,
with a warning naming it. A restarted controller listens where its predecessor did (per node: the
exporters outlive it).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any, Optional

from shoal.telemetry.endpoint import MetricsEndpoint, endpoint_url
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
    """Every process's latest snapshot, by the node it runs on (its `node_id` hello; "" on one
    machine): the whole instance for `metrics_text()`, one node's slice for that node's exporter."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self.live: dict[Any, tuple] = {}         # connection -> (process token, latest snapshot, node)
        self.ending: dict[str, tuple] = {}       # token -> (deadline, snapshot, node) of a process that left
        self.retired: dict[str, Snapshot] = {}   # node -> counters/histograms of ended processes
        self.expiring: deque = deque()            # (deadline, snapshot, node) of ended replicas' own series
        self.options: Optional[dict] = None
        self.endpoint: Optional[MetricsEndpoint] = None
        self.url: Optional[str] = None
        self.per_node = False                     # the runtime's node exporters serve the endpoints
        self.node_urls: dict[str, str] = {}       # node -> where its exporter listens (per_node only)
        self._conflicts: set = set()
        from shoal.telemetry.serve_metrics import controller_source

        self._controller_source = controller_source(controller)
        self._registries: dict[Optional[str], Any] = {}

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
        self.live[conn] = (token, snapshot, getattr(conn, "node_id", ""))

    def forget(self, conn: Any) -> None:
        """A process's connection ended: its totals stay (for a while under its token, in case it
        reconnects, then folded into the retired totals of its node)."""
        entry = self.live.pop(conn, None)
        if entry is not None:
            token, snap, node = entry
            self.ending[token] = (time.monotonic() + RECONNECT_GRACE_S, _without_gauges(snap), node)
        node = getattr(conn, "exporter_node", None)
        if node is not None and self.node_urls.get(node) == conn.exporter_url:  # a node's exporter left
            del self.node_urls[node]

    def _fold_ended(self, now: float) -> None:
        for token in [t for t, (deadline, _, _) in self.ending.items() if deadline < now]:
            _, snap, node = self.ending.pop(token)
            keep: Snapshot = {}
            expire: Snapshot = {}
            for name, fam in snap.items():
                (expire if _IDENTITY_LABELS.intersection(fam[2]) else keep)[name] = fam
            _merge(self.retired.setdefault(node, {}), keep, self._conflicts)
            if expire:
                self.expiring.append((now + DEAD_REPLICA_SERIES_TTL_S, expire, node))
        while self.expiring and self.expiring[0][0] < now:
            self.expiring.popleft()

    # --- the merged view ----------------------------------------------------------------------
    def merged(self, node: Optional[str] = None) -> Snapshot:
        """The whole instance (`node` None), or what the processes on `node` counted; the
        controller's own metrics belong to the controller's node, as in Ray."""
        from shoal import common

        self._fold_ended(time.monotonic())
        out: Snapshot = {}
        for n, snap in self.retired.items():
            if node is None or n == node:
                _merge(out, snap, self._conflicts)
        for entries in (self.expiring, self.ending.values(), self.live.values()):
            for entry in list(entries):
                if node is None or entry[2] == node:
                    _merge(out, entry[1], self._conflicts)
        if node is None or node == common.LOCAL_NODE_ID:
            _merge(out, REGISTRY.snapshot([self._controller_source]), self._conflicts)
        return out

    def text(self, node: Optional[str] = None) -> str:
        """Everything (or one node's slice), in Prometheus' text format."""
        from prometheus_client import generate_latest

        registry = self._registries.get(node)
        if registry is None:
            from prometheus_client import CollectorRegistry

            registry = self._registries[node] = CollectorRegistry(auto_describe=False)
            registry.register(_Collector(self, node))
        return generate_latest(registry).decode("utf-8")

    def url_for(self, node: str) -> Optional[str]:
        """The endpoint that shows `node`'s processes (the controller's node's, for a node without one)."""
        from shoal import common

        if not self.per_node:
            return self.url
        return self.node_urls.get(node) or self.node_urls.get(common.LOCAL_NODE_ID)

    def exporter_hello(self, conn: Any, node: str, url: Optional[str]) -> None:
        """A node's exporter listens at `url` (it says so again after a controller restart)."""
        if url:
            conn.exporter_node, conn.exporter_url = node, url
            self.node_urls[node] = url

    # --- the endpoint -------------------------------------------------------------------------
    async def configure(self, options: Optional[dict]) -> None:
        """Start the endpoint once (the first options win, as for HTTP options): here, or, on a
        runtime that exports per node (Ray), one exporter per node."""
        if self.options is not None or options is None:
            return
        self.options = dict(options)
        port = int(self.options.get("port", DEFAULT_PORT))
        if port < 0:
            logger.info("the metrics endpoint is off (SHOAL_METRICS_EXPORT_PORT=off)")
            self._remember(OFF)
            return
        host = self.options.get("host") or DEFAULT_HOST
        if self.controller.runtime.exports_metrics_per_node:
            self.per_node = True
            self._remember(port)
            self.tick()
            return

        async def render() -> str:
            return self.text()

        self.endpoint = MetricsEndpoint(render)
        actual = await self.endpoint.listen(host, port)
        if actual is None:
            return
        self.url = endpoint_url(host, actual)
        self._remember(actual)
        logger.info("Prometheus metrics at %s", self.url)

    def tick(self) -> None:
        """Per node: an exporter on every node (new nodes get one; one that died is replaced)."""
        if self.per_node and self.options is not None and not self.controller.shutting_down:
            try:
                self.controller.runtime.ensure_node_exporters(
                    {"host": self.options.get("host") or DEFAULT_HOST, "port": int(self.options.get("port", 0))})
            except Exception:  # noqa: BLE001 - e.g. Ray busy: the next tick tries again
                logger.exception("starting the per-node metrics exporters failed")

    async def resume(self) -> None:
        """After a restart: listen where the controller that died did (per node: the exporters,
        which outlive the controller, are found again)."""
        saved = self.controller.checkpoint_extra.get(_CHECKPOINT_KEY)
        if saved:
            await self.configure({"host": saved[0], "port": saved[1]})

    def _remember(self, port: int) -> None:
        host = (self.options or {}).get("host") or DEFAULT_HOST
        self.controller.checkpoint_extra[_CHECKPOINT_KEY] = (host, port)

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None
        if self.per_node:
            self.controller.runtime.stop_node_exporters()


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
    """A `prometheus_client` custom collector over the merged snapshot (of one node, or all)."""

    def __init__(self, hub: MetricsHub, node: Optional[str] = None) -> None:
        self.hub = hub
        self.node = node

    def describe(self) -> list:
        return []  # no collect() at registration time

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        for name, (kind, doc, labels, bounds, samples) in sorted(self.hub.merged(self.node).items()):
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
