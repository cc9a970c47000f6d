"""Everything the dashboard page shows, as one JSON document (`GET /dashboard/api/snapshot`).

Read from the controller's own state (applications, deployments, replica records, the autoscaling
decisions it made), the metrics every process pushes to it (through `MetricsHistory`, the same
numbers the Prometheus endpoint serves) and the replica log files it follows. Built on the
controller's loop between two events, so it is consistent; nothing here blocks or waits.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Optional

from shoal.common import DeploymentID
from shoal.controller.memory_monitor import read_rss
from shoal.telemetry.history import MetricsHistory

if TYPE_CHECKING:
    from shoal.controller.controller import Controller
    from shoal.controller.deployment_state import DeploymentState, ReplicaRecord

LOG_LINES = 20  # the last lines of each replica's log shown on the page


def build(controller: "Controller", history: MetricsHistory, since: float = 0.0) -> dict:
    """The page's data; chart points newer than `since` (wall-clock seconds) only, so a page that
    polls gets the new points and not the whole history each time."""
    ongoing = history.ongoing()
    queues = history.llm_queues()
    apps = []
    for name, app in sorted(controller.apps.items()):
        deployments = []
        for dep_name in sorted(app.deployment_names):
            ds = controller.deployments.get(DeploymentID(dep_name, name))
            if ds is not None:
                deployments.append(_deployment(ds, history, ongoing, queues, since))
        apps.append({"name": name, "status": app.status.value, "message": app.message,
                     "route_prefix": app.spec.route_prefix, "ingress": app.spec.ingress,
                     "last_deployed_time_s": app.last_deployed_time_s, "deployments": deployments})
    return {
        "time": time.time(),
        "interval_s": history.interval_s,
        "instance": {"controller_pid": os.getpid(), "http_url": controller.proxies.url(),
                     "metrics_url": controller.metrics.url,
                     "proxies": {k: v.value for k, v in controller.proxies.statuses().items()}},
        "applications": apps,
        "autoscaling_decisions": controller.scaling_log.recent(),
    }


def _deployment(ds: "DeploymentState", history: MetricsHistory, ongoing: dict, queues: dict,
                since: float) -> dict:
    cfg = ds.spec.config
    auto = cfg.autoscaling_config
    replicas = [_replica(ds, rec, ongoing, queues) for rec in sorted(ds.replicas.values(), key=lambda r: r.start_time)]
    series = history.series((ds.id.app_name, ds.id.name), since)
    llm_replicas = [r for r in replicas if "llm_waiting" in r]
    return {
        "name": ds.id.name, "status": ds.status.value, "trigger": ds.trigger.value, "message": ds.message,
        "target_replicas": ds.target,
        "replica_states": {k.value: v for k, v in ds.replica_state_counts().items()},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "autoscaling": None if auto is None else {
            "min_replicas": auto.min_replicas, "max_replicas": auto.max_replicas,
            "target_ongoing_requests": auto.target_ongoing_requests},
        "replicas": replicas,
        "series": series,
        "llm": None if not llm_replicas and not any("tokens_per_s" in p for p in series) else {
            "running": sum(r["llm_running"] for r in llm_replicas),
            "waiting": sum(r["llm_waiting"] for r in llm_replicas)},
    }


def _replica(ds: "DeploymentState", rec: "ReplicaRecord", ongoing: dict, queues: dict) -> dict:
    proc = rec.process
    pid: Optional[int] = getattr(proc, "pid", None)
    node = (rec.reservation.node_id if rec.reservation is not None else getattr(proc, "node_id", "")) or "local"
    out: dict[str, Any] = {
        "id": rec.unique_id, "state": rec.state.value, "pid": pid, "node": node,
        "age_s": round(max(0.0, time.time() - rec.start_time), 1),
        "ongoing_requests": ongoing.get((ds.id.app_name, ds.id.name, rec.unique_id)),
        "rss_bytes": read_rss(pid) if pid and node == "local" else None,
        "log_tail": _log_tail(proc),
    }
    if rec.unique_id in queues:
        out["llm_running"], out["llm_waiting"] = queues[rec.unique_id]
    return out


def _log_tail(proc: Any) -> list[str]:
    if proc is None:
        return []
    try:
        text = proc.recent_output()
    except Exception:  # noqa: BLE001 - a log file that went away: the page shows no lines
        return []
    return text.splitlines()[-LOG_LINES:]
