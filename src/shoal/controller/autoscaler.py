"""The controller's side of autoscaling: load reports, custom metrics, the look-back window, the policy call.

Every process that calls an autoscaled deployment reports its routers' queued and running request
counts (every 0.25 s while non-zero, at once when a request waits with no replica). The autoscaler
sums them per deployment, keeps a window of samples, and asks the policy for a replica count.
Replicas whose class defines `record_autoscaling_stats()` report its values too (Ray's custom
metrics); policies read them in `ctx.aggregated_metrics` / `ctx.raw_metrics`.

A policy that fails (it raises, returns something else than `(replicas, state)`, or cannot be
loaded) leaves the replica count as it is; each distinct error is logged once, with its traceback.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

from shoal.autoscaling_policy import (
    AutoscalingContext,
    TimeStampedValue,
    apply_app_level_autoscaling_config,
    instantiate,
    load_policy,
)
from shoal.common import DeploymentID, ReplicaID
from shoal.config import AutoscalingConfig, AutoscalingPolicy

if TYPE_CHECKING:
    from shoal.controller.deployment_state import DeploymentState
    from shoal.transport.connection import Connection

logger = logging.getLogger("shoal.controller")

_MAX_REMEMBERED_ERRORS = 64


class LoadReports:
    """Newest (queued, running) per caller process and deployment."""

    def __init__(self) -> None:
        self.by_deployment: dict[Any, dict["Connection", tuple[float, float]]] = {}

    def update(self, conn: "Connection", payload: dict) -> bool:
        """Store a report; True when some deployment has requests waiting and no replica may be up."""
        cold = False
        for dep_id, (queued, running) in payload.items():
            self.by_deployment.setdefault(dep_id, {})[conn] = (queued, running)
            cold = cold or queued > 0
        return cold

    def forget(self, conn: "Connection") -> None:
        for reports in self.by_deployment.values():
            reports.pop(conn, None)

    def totals(self, dep_id: Any) -> tuple[float, float]:
        """(queued, queued + running) summed over callers."""
        reports = self.by_deployment.get(dep_id, {})
        queued = sum(q for q, _ in reports.values())
        return queued, queued + sum(r for _, r in reports.values())


class ScalingLog:
    """The latest autoscaling decisions (for the dashboard): when, which deployment, from, to, why."""

    def __init__(self, size: int = 50) -> None:
        self.events: deque[dict] = deque(maxlen=size)

    def record(self, dep_id: DeploymentID, old: int, new: int, why: str) -> None:
        self.events.append({"time": time.time(), "application": dep_id.app_name, "deployment": dep_id.name,
                            "from": old, "to": new, "reason": why})

    def recent(self) -> list[dict]:
        return list(reversed(self.events))  # newest first


class ErrorLog:
    """Logs each distinct policy error once (the control loop would repeat it every 100 ms)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def report(self, what: str, exc: BaseException, keeping: str) -> None:
        # Distinct: another type, another place it was raised, or another message (numbers aside, so a
        # message quoting a time or a count does not make every tick's error a new one).
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        site = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
        key = f"{type(exc).__name__}@{site}: {re.sub(r'[0-9.]+', '#', str(exc))}"
        if key in self.seen:
            return
        if len(self.seen) >= _MAX_REMEMBERED_ERRORS:
            self.seen.clear()
        self.seen.add(key)
        logger.error("autoscaling policy of %s failed; keeping %s (this error is logged once): %s: %s",
                     what, keeping, type(exc).__name__, exc, exc_info=(type(exc), exc, exc.__traceback__))


def _aggregate(points: list[tuple[float, float]], how: str, now: float) -> float:
    """Aggregate one series over its window: time-weighted mean (each sample holds until the next),
    max or min."""
    if how == "max":
        return max(v for _, v in points)
    if how == "min":
        return min(v for _, v in points)
    if len(points) == 1:
        return points[0][1]
    total = weight = 0.0
    for (t, v), nxt in zip(points, points[1:] + [(max(now, points[-1][0]), 0.0)]):
        w = max(nxt[0] - t, 1e-3)
        total += v * w
        weight += w
    return total / weight


class CustomMetrics:
    """Per replica, the values its `record_autoscaling_stats()` returned over the look-back window."""

    def __init__(self) -> None:
        self.by_replica: dict[ReplicaID, deque[tuple[float, dict]]] = {}

    def record(self, replica_id: ReplicaID, values: dict, now: float) -> None:
        self.by_replica.setdefault(replica_id, deque()).append((now, values))

    def prune(self, look_back_s: float, now: float, running: Iterable[ReplicaID]) -> None:
        alive = set(running)
        for rid in list(self.by_replica):
            if rid not in alive:
                del self.by_replica[rid]
                continue
            series = self.by_replica[rid]
            while len(series) > 1 and series[0][0] < now - look_back_s:
                series.popleft()  # the newest sample stays: a slow reporter still counts

    def raw(self, running: list[ReplicaID]) -> dict:
        out: dict[str, dict] = {}
        for rid in running:
            for t, values in self.by_replica.get(rid, ()):
                for name, v in values.items():
                    out.setdefault(name, {}).setdefault(rid, []).append(TimeStampedValue(t, v))
        return out

    def aggregated(self, running: list[ReplicaID], how: str, now: float) -> dict:
        return {name: {rid: _aggregate([(p.timestamp, p.value) for p in series], how, now)
                       for rid, series in per_replica.items()}
                for name, per_replica in self.raw(running).items()}


class DeploymentAutoscaler:
    def __init__(self, deployment_id: DeploymentID, config: AutoscalingConfig):
        self.id = deployment_id
        self.samples: deque[tuple[float, float, float]] = deque()  # (monotonic time, total, queued)
        self.policy_state: dict = {}
        self.metrics = CustomMetrics()
        self.errors = ErrorLog()
        self.last_scale_up_time: Optional[float] = None
        self.last_scale_down_time: Optional[float] = None
        self._policy_key: Any = None
        self.policy: Optional[Callable] = None
        self.load_error: Optional[BaseException] = None
        self.configure(config)

    def configure(self, config: AutoscalingConfig) -> None:
        self.config = config
        p = config.policy
        key = None if p is None or p.is_default_policy_function() else (
            p.policy_function, repr(sorted(p.policy_kwargs.items())), p.get_serialized_policy_def())
        if key == self._policy_key and (self.policy is not None or self.load_error is not None):
            return  # the same policy: keep its instance and its state
        self._policy_key = key
        self.policy_state = {}
        self.errors = ErrorLog()
        try:
            self.policy, self.load_error = load_policy(config), None
        except Exception as e:  # noqa: BLE001 - reported by `decide`, every time it would run
            self.policy, self.load_error = None, e
        if key is not None and self.policy is not None:
            logger.info("using custom autoscaling policy '%s' for deployment %s", p.policy_function, self.id)

    def observe(self, queued: float, total: float, now: Optional[float] = None) -> None:
        now = time.monotonic() if now is None else now
        self.samples.append((now, total, queued))
        while self.samples and self.samples[0][0] < now - self.config.look_back_period_s:
            self.samples.popleft()

    def _window(self, index: int) -> float:
        values = [s[index] for s in self.samples] or [0.0]
        how = self.config.aggregation_function
        return max(values) if how == "max" else min(values) if how == "min" else sum(values) / len(values)

    def context(self, running: list[ReplicaID], target: int, policy_state: Optional[dict] = None) -> AutoscalingContext:
        cfg = self.config
        now = time.time()
        self.metrics.prune(cfg.look_back_period_s, now, running)
        newest = self.samples[-1][1] if self.samples else 0.0
        return AutoscalingContext(
            deployment_id=self.id, deployment_name=self.id.name, app_name=self.id.app_name,
            current_num_replicas=len(running), target_num_replicas=target, running_replicas=list(running),
            total_num_requests=lambda: self._window(1), total_queued_requests=lambda: self._window(2),
            current_num_requests=newest,
            aggregated_metrics=lambda: self.metrics.aggregated(running, cfg.aggregation_function, now),
            raw_metrics=lambda: self.metrics.raw(running),
            capacity_adjusted_min_replicas=cfg.min_replicas, capacity_adjusted_max_replicas=cfg.max_replicas,
            policy_state=dict(self.policy_state if policy_state is None else policy_state),
            last_scale_up_time=self.last_scale_up_time, last_scale_down_time=self.last_scale_down_time,
            current_time=now, config=cfg,
        )

    def bound(self, desired: Any) -> int:
        cfg = self.config
        return max(cfg.min_replicas, min(cfg.max_replicas, math.ceil(desired)))

    def decide(self, running: list[ReplicaID], target: int) -> int:
        """The replica count the policy wants, within the bounds; `target` when the policy fails."""
        if self.policy is None:
            self.errors.report(f"deployment {self.id}", self.load_error or RuntimeError("no policy"),
                               f"{target} replica(s)")
            return target
        try:
            desired, state = self.policy(self.context(running, target))
            if isinstance(desired, bool) or not isinstance(desired, (int, float)) or not isinstance(state, dict):
                raise TypeError(f"an autoscaling policy must return (number of replicas, dict), "
                                f"got ({desired!r}, {type(state).__name__})")
            result = self.bound(desired)
        except Exception as e:  # noqa: BLE001 - a broken custom policy keeps the current count
            self.errors.report(f"deployment {self.id}", e, f"{target} replica(s)")
            return target
        self.policy_state = state
        return result

    def explain(self, by_app: bool) -> str:
        """Why the policy moved the count, in words: the load it saw and the policy that decided."""
        cfg = self.config
        now = self.samples[-1][1] if self.samples else 0.0
        seen = (f"{now:g} requests queued or running, {self._window(1):.1f} "
                f"({cfg.aggregation_function} over the last {cfg.look_back_period_s:g} s)")
        if by_app:
            return f"{seen}; the application's autoscaling policy decided"
        p = cfg.policy
        if p is not None and not p.is_default_policy_function():
            name = p.policy_function if isinstance(p.policy_function, str) else getattr(
                p.policy_function, "__name__", "custom")
            return f"{seen}; custom policy {name}"
        return f"{seen}; target {cfg.target_ongoing_requests:g} per replica"

    def scaled(self, old: int, new: int) -> None:
        if new > old:
            self.last_scale_up_time = time.time()
        elif new < old:
            self.last_scale_down_time = time.time()


class ApplicationAutoscaler:
    """An application-level policy (a config file's `autoscaling_policy`): one call decides every
    autoscaling deployment of the application; their own policies are then not used."""

    def __init__(self, app_name: str, policy: AutoscalingPolicy):
        self.app_name = app_name
        self._key: Any = object()
        self.configure(policy)

    def configure(self, policy: AutoscalingPolicy) -> None:
        key = (policy.policy_function, repr(sorted(policy.policy_kwargs.items())), policy.get_serialized_policy_def())
        if key == self._key:
            return
        self._key = key
        self.policy_function = policy.policy_function
        self.states: dict[DeploymentID, dict] = {}
        self.errors = ErrorLog()
        try:
            self.policy: Optional[Callable] = apply_app_level_autoscaling_config(
                instantiate(policy.get_policy(), policy.policy_kwargs))
            self.load_error: Optional[BaseException] = None
            logger.info("using custom autoscaling policy '%s' for application '%s'", policy.policy_function,
                        self.app_name)
        except Exception as e:  # noqa: BLE001
            self.policy, self.load_error = None, e

    def decide(self, states: list["DeploymentState"]) -> dict[DeploymentID, int]:
        """New targets for the deployments whose count should change (none when the policy fails)."""
        what = f"application '{self.app_name}'"
        if self.policy is None:
            self.errors.report(what, self.load_error or RuntimeError("no policy"), "every deployment's replica count")
            return {}
        contexts = {ds.id: ds.autoscaler.context(ds.running_ids(), ds.target, self.states.get(ds.id, {}))  # type: ignore[union-attr]
                    for ds in states}
        try:
            decisions, new_states = self.policy(contexts)
            result = {ds.id: ds.autoscaler.bound(decisions[ds.id])  # type: ignore[union-attr]
                      for ds in states if ds.id in decisions}
        except Exception as e:  # noqa: BLE001
            self.errors.report(what, e, "every deployment's replica count")
            return {}
        self.states = new_states
        return result
