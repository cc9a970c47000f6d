"""A short memory of per-deployment rates for the dashboard's charts (the controller keeps it).

Prometheus keeps history for those who run one; the dashboard should show the last minutes without
one. Every `INTERVAL_S` the controller's merged metrics snapshot (the one a scrape renders) is
reduced to one point per deployment: requests/s, error rate and p50/p99 latency from the replicas'
counters and latency histogram, and, for LLM deployments, generated tokens/s, p50 time to first
token and requests waiting in the engine. `POINTS` points are kept (10 minutes at 2 s).

Rates come from differences between two samples taken per series (label values), never from
totals: a series that vanishes (a replica ended 10 minutes ago, its series expired) then does not
make a total drop, and one that appears counts from zero, as a new replica's requests should.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Optional

from shoal.telemetry.registry import Snapshot
from shoal.telemetry.serve_metrics import REPLICA_ERRORS, REPLICA_LATENCY, REPLICA_ONGOING, REPLICA_REQUESTS

INTERVAL_S = 2.0
POINTS = 300
# Series seen in the first samples after a (re)start are a baseline, not new traffic: after a
# controller restart every live process pushes its totals since it started.
_BASELINE_S = 5.0

LLM_TOKENS = "vllm:generation_tokens"
LLM_TTFT = "vllm:time_to_first_token_seconds"
LLM_WAITING = "vllm:num_requests_waiting"
LLM_RUNNING = "vllm:num_requests_running"

DeploymentKey = tuple  # (application, deployment)


def quantile(q: float, bounds: tuple, counts: list) -> Optional[float]:
    """Prometheus' `histogram_quantile` over non-cumulative bucket counts (the last one is +Inf):
    linear within the bucket, the highest finite bound when it falls in +Inf; None without data."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if c > 0 and seen + c >= rank:
            if i >= len(bounds):
                return float(bounds[-1]) if bounds else None
            lower = float(bounds[i - 1]) if i > 0 else 0.0
            return lower + (float(bounds[i]) - lower) * (rank - seen) / c
        seen += c
    return float(bounds[-1]) if bounds else None


class _Deltas:
    """Per-series increase since the previous sample of one metric family."""

    def __init__(self) -> None:
        self.prev: dict = {}

    def step(self, samples: dict, baseline: bool) -> dict:
        out = {}
        for key, value in samples.items():
            before = self.prev.get(key)
            if isinstance(value, list):  # histogram: bucket counts, then the sum
                if before is None:
                    before = value if baseline else [0] * len(value)
                out[key] = [max(0, a - b) for a, b in zip(value[:-1], before[:-1])] if len(before) == len(value) \
                    else list(value[:-1])
            else:
                if before is None:
                    before = value if baseline else 0.0
                out[key] = max(0.0, value - before)
        self.prev = {k: (list(v) if isinstance(v, list) else v) for k, v in samples.items()}
        return out


def _samples(snap: Snapshot, name: str) -> tuple[tuple, Optional[tuple], dict]:
    fam = snap.get(name)
    if fam is None:
        return (), None, {}
    return fam[2], fam[3], fam[4]


class MetricsHistory:
    """The last `points` per-deployment points, from the merged snapshots `sample` is given.

    `engine_owner` maps an LLM engine label (a replica's unique id) to its (application,
    deployment); vLLM's metrics carry no deployment label.
    """

    def __init__(self, engine_owner: Callable[[str], Optional[DeploymentKey]] = lambda _: None,
                 points: int = POINTS, interval_s: float = INTERVAL_S) -> None:
        self.engine_owner = engine_owner
        self.interval_s = interval_s
        self.points: dict[DeploymentKey, deque] = {}
        self.maxlen = points
        self.latest: Snapshot = {}
        self._deltas: dict[str, _Deltas] = {}
        self._last_t: Optional[float] = None
        self._started: Optional[float] = None
        self._owners: dict[str, DeploymentKey] = {}

    # --- sampling --------------------------------------------------------------------------------
    def sample(self, snap: Snapshot, now: Optional[float] = None) -> None:
        """Add one point per deployment that has (or had) traffic; `now` is wall-clock seconds."""
        now = time.time() if now is None else now
        if self._started is None:
            self._started = now
        baseline = now - self._started < _BASELINE_S
        self.latest = snap
        dt = None if self._last_t is None else max(now - self._last_t, 1e-3)
        self._last_t = now
        per: dict[DeploymentKey, dict] = {}

        def slot(key: DeploymentKey) -> dict:
            return per.setdefault(key, {"ok": 0.0, "errors": 0.0, "latency": None, "tokens": 0.0, "ttft": None,
                                        "waiting": 0.0, "llm": False})

        labels, _, samples = _samples(snap, REPLICA_REQUESTS)
        for key, d in self._step(REPLICA_REQUESTS, samples, baseline).items():
            slot(_deployment_of(labels, key))["ok"] += d
        labels, _, samples = _samples(snap, REPLICA_ERRORS)
        for key, d in self._step(REPLICA_ERRORS, samples, baseline).items():
            slot(_deployment_of(labels, key))["errors"] += d
        labels, lat_bounds, samples = _samples(snap, REPLICA_LATENCY)
        for key, d in self._step(REPLICA_LATENCY, samples, baseline).items():
            _add_counts(slot(_deployment_of(labels, key)), "latency", d)
        labels, _, samples = _samples(snap, LLM_TOKENS)
        for key, d in self._step(LLM_TOKENS, samples, baseline).items():
            owner = self._engine(labels, key)
            if owner is not None:
                s = slot(owner)
                s["tokens"] += d
                s["llm"] = True
        labels, ttft_bounds, samples = _samples(snap, LLM_TTFT)
        for key, d in self._step(LLM_TTFT, samples, baseline).items():
            owner = self._engine(labels, key)
            if owner is not None:
                _add_counts(slot(owner), "ttft", d)
        labels, _, samples = _samples(snap, LLM_WAITING)
        for key, v in samples.items():
            owner = self._engine(labels, key)
            if owner is not None:
                slot(owner)["waiting"] += v
        if dt is None:
            return  # the first sample is the baseline of the next one's differences
        for dep, s in per.items():
            done = s["ok"] + s["errors"]
            point: dict[str, Any] = {
                "t": round(now, 3), "rps": round(done / dt, 3),
                "error_rate": round(s["errors"] / done, 4) if done else 0.0,
                "p50_ms": _round(quantile(0.5, lat_bounds or (), s["latency"] or [])),
                "p99_ms": _round(quantile(0.99, lat_bounds or (), s["latency"] or [])),
            }
            if s["llm"]:
                point["tokens_per_s"] = round(s["tokens"] / dt, 3)
                ttft = quantile(0.5, ttft_bounds or (), s["ttft"] or [])
                point["ttft_p50_ms"] = _round(ttft * 1000.0 if ttft is not None else None)
                point["queue"] = s["waiting"]
            self.points.setdefault(dep, deque(maxlen=self.maxlen)).append(point)
        for dep, series in self.points.items():  # an idle deployment's charts go on, at zero
            if dep not in per and series:
                idle: dict[str, Any] = {"t": round(now, 3), "rps": 0.0, "error_rate": 0.0, "p50_ms": None,
                                        "p99_ms": None}
                if "tokens_per_s" in series[-1]:
                    idle.update(tokens_per_s=0.0, ttft_p50_ms=None, queue=0.0)
                series.append(idle)

    def _step(self, name: str, samples: dict, baseline: bool) -> dict:
        return self._deltas.setdefault(name, _Deltas()).step(samples, baseline)

    def _engine(self, labels: tuple, key: tuple) -> Optional[DeploymentKey]:
        try:
            engine = key[labels.index("engine")]
        except (ValueError, IndexError):
            return None
        owner = self.engine_owner(engine)
        if owner is not None:
            self._owners[engine] = owner  # remembered: the replica may be gone at the next sample
        return self._owners.get(engine)

    def forget(self, keep: set) -> None:
        """Drop the points of deployments not in `keep` (deleted ones)."""
        for dep in [d for d in self.points if d not in keep]:
            del self.points[dep]

    # --- reading -------------------------------------------------------------------------------
    def series(self, dep: DeploymentKey, since: float = 0.0) -> list[dict]:
        return [p for p in self.points.get(dep, ()) if p["t"] > since]

    def ongoing(self) -> dict[tuple, float]:
        """Requests running in each replica, by (application, deployment, replica id), as last sampled."""
        labels, _, samples = _samples(self.latest, REPLICA_ONGOING)
        out = {}
        for key, v in samples.items():
            row = dict(zip(labels, key))
            out[(row.get("application", ""), row.get("deployment", ""), row.get("replica", ""))] = v
        return out

    def llm_queues(self) -> dict[str, tuple[float, float]]:
        """(running, waiting) requests per LLM engine (replica id), as last sampled."""
        out: dict[str, list] = {}
        for index, name in ((0, LLM_RUNNING), (1, LLM_WAITING)):
            labels, _, samples = _samples(self.latest, name)
            for key, v in samples.items():
                row = dict(zip(labels, key))
                out.setdefault(row.get("engine", ""), [0.0, 0.0])[index] += v
        return {k: (v[0], v[1]) for k, v in out.items()}


def _deployment_of(labels: tuple, key: tuple) -> DeploymentKey:
    row = dict(zip(labels, key))
    return (row.get("application", ""), row.get("deployment", ""))


def _add_counts(slot: dict, field: str, counts: list) -> None:
    have = slot[field]
    slot[field] = list(counts) if have is None else [a + b for a, b in zip(have, counts)]


def _round(v: Optional[float]) -> Optional[float]:
    return None if v is None else round(v, 3)
