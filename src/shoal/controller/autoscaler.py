"""The controller's side of autoscaling: load reports from callers, the look-back window, the policy call.

Every process that calls an autoscaled deployment reports its routers' queued and running request
counts (every 0.25 s while non-zero, at once when a request waits with no replica). The autoscaler
sums them per deployment, keeps a window of samples, and asks the policy for a replica count.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from shoal.autoscaling_policy import AutoscalingContext, load_policy
from shoal.config import AutoscalingConfig

if TYPE_CHECKING:
    from shoal.transport.connection import Connection

logger = logging.getLogger("shoal.controller")


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


class DeploymentAutoscaler:
    def __init__(self, config: AutoscalingConfig):
        self.samples: deque[tuple[float, float]] = deque()
        self.policy_state: dict = {}
        self.configure(config)

    def configure(self, config: AutoscalingConfig) -> None:
        self.config = config
        self.policy = load_policy(config)

    def decide(self, name: str, app: str, running: int, target: int, queued: float, total: float,
               now: Optional[float] = None) -> int:
        cfg = self.config
        now = time.monotonic() if now is None else now
        self.samples.append((now, total))
        while self.samples and self.samples[0][0] < now - cfg.look_back_period_s:
            self.samples.popleft()
        values = [v for _, v in self.samples]
        agg = {"mean": lambda v: sum(v) / len(v), "max": max, "min": min}[cfg.aggregation_function](values)
        ctx = AutoscalingContext(
            deployment_name=name, app_name=app, config=cfg, current_num_replicas=running,
            target_num_replicas=target, total_num_requests=agg, current_num_requests=total,
            total_queued_requests=queued, capacity_adjusted_min_replicas=cfg.min_replicas,
            capacity_adjusted_max_replicas=cfg.max_replicas, policy_state=self.policy_state, current_time=now,
        )
        try:
            desired, self.policy_state = self.policy(ctx)
        except Exception:  # noqa: BLE001 - a broken custom policy keeps the current count
            logger.exception("autoscaling policy of %s/%s failed; keeping %d replicas", app, name, target)
            return target
        return max(cfg.min_replicas, min(cfg.max_replicas, int(desired)))
