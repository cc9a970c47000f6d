"""Ray Serve's metrics, with Ray Serve's names, types, labels and buckets.

Names are exported with Ray's `ray_` prefix (Ray's metrics agent adds it to every metric), so the
Ray Serve Grafana dashboards find them; a counter gets `_total` on export.

The request paths do not count here: they add an entry to their journal (journal.py), which folds
each batch into plain Python containers (no lock, no formatting); each class here turns its
containers into families when a snapshot is taken:

- `ProxyStats`: per (route, application, ingress, method, status) one latency histogram list; the
  request counter, the two error counters and the histogram all come from it.
- `ReplicaStats`: per route one latency histogram list plus an error count.
- router request counts: one `[n]` cell per (deployment, route), shared by the routers of this
  process (a router that goes away leaves its count behind); queues and in-flight counts are read
  from the live routers.
"""

from __future__ import annotations

import os
import socket
from itertools import repeat
from operator import is_
from typing import Any, Optional

from shoal.telemetry.registry import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    REGISTRY,
    Snapshot,
    add_family,
    new_histogram,
)
from shoal.telemetry.journal import add_latencies, groups

# Ray's DEFAULT_LATENCY_BUCKET_MS (REQUEST_LATENCY_BUCKETS_MS unless overridden), in milliseconds.
LATENCY_BUCKETS_MS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 300.0, 400.0, 500.0, 1000.0, 2000.0,
                      5000.0, 10000.0, 60000.0, 120000.0, 300000.0, 600000.0)


def _buckets_from_env(name: str, default: tuple) -> tuple:
    """`RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS="1,2,3"` overrides a bucket list, as in Ray."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        values = tuple(sorted(float(v) for v in raw.split(",") if v.strip()))
    except ValueError:
        return default
    return values or default


REQUEST_LATENCY_BUCKETS_MS = _buckets_from_env("RAY_SERVE_REQUEST_LATENCY_BUCKETS_MS", LATENCY_BUCKETS_MS)
STARTUP_LATENCY_BUCKETS_MS = _buckets_from_env("RAY_SERVE_REPLICA_STARTUP_SHUTDOWN_LATENCY_BUCKETS_MS",
                                               LATENCY_BUCKETS_MS)
BATCH_UTILIZATION_BUCKETS_PERCENT = _buckets_from_env(
    "RAY_SERVE_BATCH_UTILIZATION_BUCKETS_PERCENT", (5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0,
                                                    95.0, 99.0, 100.0))
BATCH_SIZE_BUCKETS = _buckets_from_env("RAY_SERVE_BATCH_SIZE_BUCKETS",
                                       (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0))

# -- names ---------------------------------------------------------------------------------------------
HTTP_REQUESTS = "ray_serve_num_http_requests"
HTTP_LATENCY = "ray_serve_http_request_latency_ms"
HTTP_ERRORS = "ray_serve_num_http_error_requests"
HTTP_DEPLOYMENT_ERRORS = "ray_serve_num_deployment_http_error_requests"
HTTP_ONGOING = "ray_serve_num_ongoing_http_requests"
REPLICA_REQUESTS = "ray_serve_deployment_request_counter"
REPLICA_ERRORS = "ray_serve_deployment_error_counter"
REPLICA_LATENCY = "ray_serve_deployment_processing_latency_ms"
REPLICA_ONGOING = "ray_serve_replica_processing_queries"
ROUTER_REQUESTS = "ray_serve_num_router_requests"
ROUTER_QUEUED = "ray_serve_deployment_queued_queries"
ROUTER_RUNNING = "ray_serve_num_ongoing_requests_at_replicas"
REPLICA_HEALTHY = "ray_serve_deployment_replica_healthy"
TARGET_REPLICAS = "ray_serve_autoscaling_target_replicas"
STARTUP_LATENCY = "ray_serve_replica_startup_latency_ms"

_HTTP_LABELS = ("route", "method", "application", "status_code")
_REPLICA_LABELS = ("deployment", "replica", "application")
_ROUTER_LABELS = ("deployment", "application", "handle", "actor_id")

# The bounds in seconds: the journal's latencies are `perf_counter` differences.
REQUEST_LATENCY_BOUNDS_S = tuple(b / 1000.0 for b in REQUEST_LATENCY_BUCKETS_MS)


def _no_journal() -> None:
    return None


def _catch_up(journal_ref: Any) -> None:
    """Fold what the journal holds before a snapshot reads the counts (see journal.py)."""
    journal = journal_ref()
    if journal is not None:
        journal.catch_up()


def node_labels() -> tuple[str, str]:
    """(node_id, node_ip_address) of this process: Ray's node id on the Ray runtime, else the host name."""
    return (os.environ.get("SHOAL_NODE_ID") or socket.gethostname(),
            os.environ.get("SHOAL_NODE_IP") or "127.0.0.1")


# -- the HTTP proxy ------------------------------------------------------------------------------------

class ProxyStats:
    """The proxy's request counts, folded in per batch from its journal (telemetry/journal.py)."""

    __slots__ = ("data", "_n", "ongoing", "journal", "__weakref__")

    def __init__(self, ongoing: Any) -> None:
        self.data: dict[tuple, list] = {}
        self._n = len(REQUEST_LATENCY_BUCKETS_MS) + 1
        self.ongoing = ongoing  # () -> int: the proxy's requests in flight
        self.journal: Any = _no_journal  # () -> the Journal that feeds it, or None (set by its journal)
        REGISTRY.add_source(self.collect, weak=True)  # ends with its proxy app

    def fold(self, flat: list, w: int, start: int, secs: list) -> None:
        """Count a batch of proxy journal entries `(t0, t1, route, method, status, request_id)`
        (`route` a `Route`: grouped by identity, labelled by its fields)."""
        routes = flat[start + 2::w]
        # One route in the batch (most often): one group key; else its object's id (Route's own hash
        # and == are Python-level, too slow per request).
        ids = [0] * len(routes) if all(map(is_, routes, repeat(routes[0]))) else list(map(id, routes))
        for (route_id, method, status), part in groups([ids, flat[start + 3::w], flat[start + 4::w]], secs):
            route = routes[ids.index(route_id)]
            key = (route.prefix, route.app_name, route.ingress, method, status)
            h = self.data.get(key)
            if h is None:
                h = self.data[key] = [0] * self._n + [0.0]
            add_latencies(h, REQUEST_LATENCY_BOUNDS_S, part)
            h[-1] += sum(part) * 1000.0

    def collect(self, out: Snapshot) -> None:
        requests: dict = {}
        latency: dict = {}
        errors: dict = {}
        dep_errors: dict = {}
        _catch_up(self.journal)
        for (route, app, ingress, method, status), h in list(self.data.items()):
            code = str(status)
            n = sum(h[:-1])
            key = (route, method, app, code)
            requests[key] = requests.get(key, 0.0) + n
            have = latency.get(key)
            latency[key] = list(h) if have is None else [a + b for a, b in zip(have, h)]
            if code[0] in "45":
                k = (route, code, method, app)
                errors[k] = errors.get(k, 0.0) + n
                k = (ingress, code, method, route, app)
                dep_errors[k] = dep_errors.get(k, 0.0) + n
        if requests:
            add_family(out, HTTP_REQUESTS, COUNTER, "The number of HTTP requests processed.", _HTTP_LABELS, None,
                       requests)
            add_family(out, HTTP_LATENCY, HISTOGRAM,
                       "The end-to-end latency of HTTP requests (measured from the Serve HTTP proxy).",
                       _HTTP_LABELS, REQUEST_LATENCY_BUCKETS_MS, latency)
        if errors:
            add_family(out, HTTP_ERRORS, COUNTER, "The number of errored HTTP responses.",
                       ("route", "error_code", "method", "application"), None, errors)
            add_family(out, HTTP_DEPLOYMENT_ERRORS, COUNTER,
                       "The number of errored HTTP responses returned by each deployment.",
                       ("deployment", "error_code", "method", "route", "application"), None, dep_errors)
        add_family(out, HTTP_ONGOING, GAUGE, "The number of ongoing requests in this HTTP proxy.",
                   ("node_id", "node_ip_address"), None, {node_labels(): float(self.ongoing())})


# -- replicas ------------------------------------------------------------------------------------------

class ReplicaStats:
    """A replica's per-request counts: per route, a latency histogram list and then its error count."""

    __slots__ = ("data", "_n", "labels", "ongoing", "journal", "__weakref__")

    def __init__(self, deployment: str, replica: str, app: str, ongoing: Any) -> None:
        self.data: dict[str, list] = {}
        self._n = len(REQUEST_LATENCY_BUCKETS_MS) + 1
        self.labels = (deployment, replica, app)
        self.ongoing = ongoing  # () -> int
        self.journal: Any = _no_journal  # () -> the Journal that feeds it, or None (set by its journal)
        REGISTRY.add_source(self.collect, weak=True)  # ends with its replica server

    def fold(self, flat: list, w: int, start: int, secs: list) -> None:
        """Count a batch of replica journal entries `(t0, t1, route, failed, ...)`."""
        for (route, failed), part in groups([flat[start + 2::w], flat[start + 3::w]], secs):
            h = self.data.get(route)
            if h is None:
                h = self.data[route] = [0] * self._n + [0.0, 0]
            add_latencies(h, REQUEST_LATENCY_BOUNDS_S, part)
            h[-2] += sum(part) * 1000.0
            if failed:
                h[-1] += len(part)

    def collect(self, out: Snapshot) -> None:
        ok: dict = {}
        failed: dict = {}
        latency: dict = {}
        base = self.labels
        _catch_up(self.journal)
        for route, h in list(self.data.items()):
            key = base + (route,)
            n = sum(h[:-2])
            ok[key] = float(n - h[-1])
            failed[key] = float(h[-1])
            latency[key] = h[:-1]
        labels = _REPLICA_LABELS + ("route",)
        if ok:
            add_family(out, REPLICA_REQUESTS, COUNTER,
                       "The number of queries that have been processed in this replica.", labels, None, ok)
            add_family(out, REPLICA_ERRORS, COUNTER,
                       "The number of exceptions that have occurred in this replica.", labels, None, failed)
            add_family(out, REPLICA_LATENCY, HISTOGRAM, "The latency for queries to be processed.", labels,
                       REQUEST_LATENCY_BUCKETS_MS, latency)
        add_family(out, REPLICA_ONGOING, GAUGE, "The current number of queries being processed.",
                   _REPLICA_LABELS, None, {base: float(self.ongoing())})


# -- routers (every caller: driver, proxy, replica) ------------------------------------------------------

# (deployment_id, route) -> [requests]: routers increment their cell; it outlives them.
_router_cells: dict[tuple, list] = {}
# What the `handle` label says about this process: "driver", "proxy" or the calling deployment.
CALLER = {"handle": "driver"}


def router_cell(deployment_id: Any, route: str = "") -> list:
    key = (deployment_id, route)
    cell = _router_cells.get(key)
    if cell is None:
        cell = _router_cells.setdefault(key, [0])
    return cell


def routers_source(client: Any) -> Any:
    """A source for this process's routers (those of `client`); holds `client` weakly."""
    import weakref

    ref = weakref.ref(client)

    def collect(out: Snapshot) -> None:
        handle = CALLER["handle"]
        requests: dict = {}
        for (dep, route), cell in list(_router_cells.items()):
            if cell[0]:
                key = (dep.name, route, dep.app_name, handle, "")
                requests[key] = requests.get(key, 0.0) + cell[0]
        if requests:
            add_family(out, ROUTER_REQUESTS, COUNTER, "The number of requests processed by the router.",
                       ("deployment", "route", "application", "handle", "actor_id"), None, requests)
        c = ref()
        if c is None:
            return
        with c._lock:
            groups = [(d, list(rs)) for d, rs in c._routers.items()]
        queued: dict = {}
        running: dict = {}
        for dep, routers in groups:
            key = (dep.name, dep.app_name, handle, "")
            q = r = 0
            for router in routers:
                if router.closed:
                    continue
                q += len(router.pending)
                r += sum(e.inflight for e in list(router.entries.values()))
            queued[key] = queued.get(key, 0.0) + q
            running[key] = running.get(key, 0.0) + r
        if queued:
            add_family(out, ROUTER_QUEUED, GAUGE,
                       "The current number of queries to this deployment waiting to be assigned to a replica.",
                       _ROUTER_LABELS, None, queued)
            add_family(out, ROUTER_RUNNING, GAUGE,
                       "The current number of requests to this deployment that have been submitted to a replica.",
                       _ROUTER_LABELS, None, running)

    return collect


# -- @serve.batch ---------------------------------------------------------------------------------------

_BATCH_LABELS = _REPLICA_LABELS + ("function_name",)


class BatchMetrics:
    """Ray's batching metrics for one batched function in this process (per batch, not per request)."""

    def __init__(self, function_name: str) -> None:
        from shoal.context import _replica_context

        ctx = _replica_context
        self.labels = (str(getattr(ctx, "deployment", "")), str(getattr(ctx, "replica_tag", "")),
                       str(getattr(ctx, "app_name", "")), function_name)
        self.wait = REGISTRY.metric("ray_serve_batch_wait_time_ms", HISTOGRAM,
                                    "Time requests waited for batch to fill (in milliseconds).", _BATCH_LABELS,
                                    REQUEST_LATENCY_BUCKETS_MS)
        self.execution = REGISTRY.metric("ray_serve_batch_execution_time_ms", HISTOGRAM,
                                         "Time to execute the batch function (in milliseconds).", _BATCH_LABELS,
                                         REQUEST_LATENCY_BUCKETS_MS)
        self.queue = REGISTRY.metric("ray_serve_batch_queue_length", GAUGE,
                                     "Number of requests waiting in the batch queue.", _BATCH_LABELS)
        self.utilization = REGISTRY.metric(
            "ray_serve_batch_utilization_percent", HISTOGRAM,
            "Batch utilization as percentage (actual_batch_size / max_batch_size * 100).", _BATCH_LABELS,
            BATCH_UTILIZATION_BUCKETS_PERCENT)
        self.size = REGISTRY.metric("ray_serve_actual_batch_size", HISTOGRAM,
                                    "The actual number of requests in each batch.", _BATCH_LABELS,
                                    BATCH_SIZE_BUCKETS)
        self.processed = REGISTRY.metric("ray_serve_batches_processed", COUNTER, "Counter of batches executed.",
                                         _BATCH_LABELS)

    def formed(self, size: float, max_size: int, waited_s: float, queued: int) -> None:
        labels = self.labels
        self.wait.observe(labels, waited_s * 1000.0)
        self.size.observe(labels, float(size))
        self.utilization.observe(labels, min(100.0, 100.0 * size / max_size) if max_size else 0.0)
        self.queue.set(labels, float(queued))

    def executed(self, seconds: float) -> None:
        self.execution.observe(self.labels, seconds * 1000.0)
        self.processed.inc(self.labels)


# -- the controller's own ----------------------------------------------------------------------------------

_startup: Optional[Any] = None


def replica_started(deployment: str, replica: str, app: str, ms: float) -> None:
    """A replica became ready `ms` after it was placed (constructor, reconfigure, first health check)."""
    global _startup
    if _startup is None:
        _startup = REGISTRY.metric(STARTUP_LATENCY, HISTOGRAM,
                                   "Time from replica creation to ready state in milliseconds.", _REPLICA_LABELS,
                                   STARTUP_LATENCY_BUCKETS_MS)
    _startup.observe((deployment, replica, app), ms)


def replica_gone(deployment: str, replica: str, app: str) -> None:
    if _startup is not None:
        _startup.remove((deployment, replica, app))


def controller_source(controller: Any) -> Any:
    """Replica health and target counts, read from the controller's state at scrape time."""
    from shoal.status import ReplicaState

    serving = (ReplicaState.RUNNING, ReplicaState.UPDATING)

    def collect(out: Snapshot) -> None:
        healthy: dict = {}
        targets: dict = {}
        for did, ds in list(controller.deployments.items()):
            targets[(did.name, did.app_name)] = float(ds.target)
            for rec in list(ds.replicas.values()):
                if rec.state in serving:
                    healthy[(did.name, rec.unique_id, did.app_name)] = 1.0 if rec.health_failures == 0 else 0.0
        if healthy:
            add_family(out, REPLICA_HEALTHY, GAUGE,
                       "Tracks whether this deployment replica is healthy. 1 means healthy, 0 means unhealthy.",
                       _REPLICA_LABELS, None, healthy)
        if targets:
            add_family(out, TARGET_REPLICAS, GAUGE,
                       "The target number of replicas for this deployment. This is the number the autoscaler "
                       "is trying to reach.", ("deployment", "application"), None, targets)

    return collect


__all__ = ["ProxyStats", "ReplicaStats", "router_cell", "routers_source", "BatchMetrics", "replica_started",
           "replica_gone", "controller_source", "new_histogram", "CALLER"]
