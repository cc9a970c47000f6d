"""The per-process metric store, its snapshots, and the pusher that sends them to the controller.

A snapshot is plain builtin data, cheap to pickle and compare:

    {name: (kind, help, label_names, bucket_bounds, {label_values: value})}

`kind` is COUNTER, GAUGE or HISTOGRAM; a counter or gauge value is a float; a histogram value is a
list: one count per bucket (not cumulative; the last bucket is +Inf), then the sum. Names are the
exported ones (`ray_serve_...`, `vllm:...`), without the `_total` a counter gets on export.

Values get here in two ways. `Metric` objects (user metrics, batching, LLM, the controller's own)
take `inc`/`set`/`observe` calls under a lock, since user code may call them from threads. The
request paths instead keep their own plain counters (see `serve_metrics.py`) and register a
*source*: a function that adds their families to a snapshot when one is taken.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
import weakref
from bisect import bisect_left
from typing import Any, Callable, Optional, Sequence

logger = logging.getLogger("shoal.metrics")

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
KINDS = (COUNTER, GAUGE, HISTOGRAM)

PUSH_INTERVAL_S = float(os.environ.get("SHOAL_METRICS_PUSH_INTERVAL_S") or 1.0)
# Sent with every snapshot: the controller tells this process's pushes from another's by it.
PROCESS_TOKEN = uuid.uuid4().hex

Snapshot = dict  # name -> (kind, help, labels, bounds, samples)


def new_histogram(bounds: Sequence[float]) -> list:
    """Bucket counts (one per bound, then +Inf) followed by the sum of observations."""
    return [0] * (len(bounds) + 1) + [0.0]


def observe_into(h: list, bounds: Sequence[float], value: float) -> None:
    h[bisect_left(bounds, value)] += 1  # `le` buckets: the first bound >= value
    h[-1] += value


def add_family(out: Snapshot, name: str, kind: str, doc: str, labels: tuple, bounds: Optional[tuple],
               samples: dict) -> None:
    """Add `samples` to the snapshot `out`, summing with samples already there under equal labels."""
    fam = out.get(name)
    if fam is None:
        out[name] = (kind, doc, labels, bounds, samples)
        return
    if fam[0] != kind or fam[2] != labels or fam[3] != bounds:
        return  # a conflicting definition of the same name: the first one wins (see exporter.merge)
    merge_samples(fam[4], samples, kind)


def merge_samples(into: dict, samples: dict, kind: str) -> None:
    for key, value in samples.items():
        have = into.get(key)
        if have is None:
            into[key] = list(value) if kind == HISTOGRAM else value
        elif kind == HISTOGRAM:
            if len(have) == len(value):
                into[key] = [a + b for a, b in zip(have, value)]
        else:
            into[key] = have + value


class Metric:
    """One metric family with explicit updates (thread-safe). Label values are a tuple of strings
    in the order of `labels`."""

    __slots__ = ("name", "kind", "doc", "labels", "bounds", "samples", "_lock", "__weakref__")

    def __init__(self, name: str, kind: str, doc: str = "", labels: Sequence[str] = (),
                 bounds: Optional[Sequence[float]] = None):
        if kind not in KINDS:
            raise ValueError(f"unknown metric kind {kind!r}")
        self.name = name
        self.kind = kind
        self.doc = doc
        self.labels = tuple(labels)
        self.bounds = tuple(float(b) for b in bounds) if kind == HISTOGRAM else None
        self.samples: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def inc(self, values: tuple = (), amount: float = 1.0) -> None:
        with self._lock:
            self.samples[values] = self.samples.get(values, 0.0) + amount

    def set(self, values: tuple, value: float) -> None:
        with self._lock:
            self.samples[values] = float(value)

    def observe(self, values: tuple, value: float, count: int = 1) -> None:
        """Record `value` once (or `count` times)."""
        with self._lock:
            h = self.samples.get(values)
            if h is None:
                h = self.samples[values] = new_histogram(self.bounds)  # type: ignore[arg-type]
            h[bisect_left(self.bounds, value)] += count  # type: ignore[arg-type]
            h[-1] += value * count

    def remove(self, values: tuple) -> None:
        with self._lock:
            self.samples.pop(values, None)

    def clear(self) -> None:
        with self._lock:
            self.samples.clear()

    def collect(self, out: Snapshot) -> None:
        with self._lock:
            if not self.samples:
                return
            samples = ({k: list(v) for k, v in self.samples.items()} if self.kind == HISTOGRAM
                       else dict(self.samples))
        add_family(out, self.name, self.kind, self.doc, self.labels, self.bounds, samples)


class Registry:
    """This process's metrics: `Metric` objects by name, plus sources read at snapshot time."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._sources: list[Callable[[Snapshot], None]] = []
        self._lock = threading.Lock()
        self._failed_sources: set = set()

    def metric(self, name: str, kind: str, doc: str = "", labels: Sequence[str] = (),
               bounds: Optional[Sequence[float]] = None) -> Metric:
        """The metric of that name, made on first use; a second definition must match the first."""
        with self._lock:
            m = self._metrics.get(name)
            if m is None:
                m = self._metrics[name] = Metric(name, kind, doc, labels, bounds)
                return m
        if m.kind != kind or m.labels != tuple(labels) or (
                kind == HISTOGRAM and m.bounds != tuple(float(b) for b in bounds or ())):
            raise ValueError(f"metric {name!r} is already defined as a {m.kind} with labels {m.labels}"
                             + (f" and boundaries {list(m.bounds)}" if m.bounds else ""))
        return m

    def add_source(self, source: Callable[[Snapshot], None], weak: bool = False) -> None:
        """`source(snapshot)` adds its families when a snapshot is taken. `weak=True` (for a bound
        method) lets its object go: the source then ends with it."""
        with self._lock:
            self._sources.append(weakref.WeakMethod(source) if weak else source)  # type: ignore[arg-type]

    def remove_source(self, source: Callable[[Snapshot], None]) -> None:
        with self._lock:
            try:
                self._sources.remove(source)
            except ValueError:
                pass

    def snapshot(self, extra: Sequence[Callable[[Snapshot], None]] = ()) -> Snapshot:
        out: Snapshot = {}
        with self._lock:
            metrics = list(self._metrics.values())
            sources = list(self._sources)
        for m in metrics:
            m.collect(out)
        live = []
        for source in sources:
            if isinstance(source, weakref.WeakMethod):
                fn = source()
                if fn is None:
                    self.remove_source(source)  # type: ignore[arg-type]
                    continue
                live.append(fn)
            else:
                live.append(source)
        for source in live + list(extra):
            try:
                source(out)
            except Exception:  # noqa: BLE001 - one broken source must not stop the others
                key = getattr(source, "__qualname__", repr(source))
                if key not in self._failed_sources:
                    self._failed_sources.add(key)
                    logger.exception("collecting metrics from %s failed", key)
        return out


REGISTRY = Registry()


# --- pushing snapshots to the controller ------------------------------------------------------------

class Pusher:
    """Sends this process's snapshot to the controller every PUSH_INTERVAL_S, when it changed.

    Runs on the client's I/O loop. A new controller connection (after a controller restart) gets
    the full snapshot at once, whether or not it changed: snapshots are cumulative, so the new
    controller loses nothing of a live process.
    """

    def __init__(self, client: Any, extra_sources: Sequence[Callable[[Snapshot], None]] = ()):
        self._client = weakref.ref(client)
        self._extra = list(extra_sources)
        self._last: Optional[Snapshot] = None
        self._last_conn: Any = None
        self._interval = PUSH_INTERVAL_S

    def start(self, loop: Any) -> None:
        loop.call_later(self._interval, self._tick, loop)

    def _tick(self, loop: Any) -> None:
        client = self._client()
        if client is None or client.closed:
            return
        try:
            self.push(client)
        except Exception:  # noqa: BLE001 - metrics must never break the process
            logger.exception("pushing metrics failed")
        loop.call_later(self._interval, self._tick, loop)

    def push(self, client: Any) -> None:
        conn = client.conn
        if conn is None or conn.closed:
            return
        snap = REGISTRY.snapshot(self._extra)
        if conn is self._last_conn and snap == self._last:
            return
        conn.notify("metrics", (PROCESS_TOKEN, snap))
        self._last, self._last_conn = snap, conn


def start_pushing(client: Any, extra_sources: Sequence[Callable[[Snapshot], None]] = ()) -> Pusher:
    """Start (once per client) the periodic push on the client's loop; call it on that loop."""
    pusher = getattr(client, "metrics_pusher", None)
    if pusher is None:
        pusher = client.metrics_pusher = Pusher(client, extra_sources)
        pusher.start(client.loop)
    return pusher


def flush(client: Any) -> None:
    """Push now what changed (e.g. before a graceful exit); on the client's loop."""
    pusher = getattr(client, "metrics_pusher", None)
    if pusher is not None:
        try:
            pusher.push(client)
        except Exception:  # noqa: BLE001
            logger.debug("final metrics push failed", exc_info=True)

