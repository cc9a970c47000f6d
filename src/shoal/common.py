"""Small value types shared by the controller, routers and replicas."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

SERVE_DEFAULT_APP_NAME = "default"
SERVE_MULTIPLEXED_MODEL_ID = "serve_multiplexed_model_id"
SERVE_HTTP_REQUEST_ID_HEADER = "x-request-id"
CONTROL_LOOP_INTERVAL_S = 0.1

# The cluster node this process runs on ("" on one machine): routers prefer replicas there when
# load is even. Set by the Ray runtime (`runtime/ray.py`) before any request is routed.
LOCAL_NODE_ID = ""

# How a replica or proxy process ends itself. A Ray actor replaces it, so Ray sees an intended exit
# rather than a crash (and prints no "worker died unexpectedly" to the driver's terminal).
_exit_hook: Optional[Callable[[int], None]] = None


def exit_process(code: int) -> None:
    """End this process now: no cleanup, its sockets close with it (access lines gathered are written)."""
    journal = sys.modules.get("shoal.telemetry.journal")
    if journal is not None:
        journal.flush_all()
    sys.stdout.flush()
    sys.stderr.flush()
    if _exit_hook is not None:
        _exit_hook(code)
    os._exit(code)


def set_exit_hook(hook: Optional[Callable[[int], None]]) -> None:
    global _exit_hook
    _exit_hook = hook


@dataclass(frozen=True)
class DeploymentID:
    name: str
    app_name: str = SERVE_DEFAULT_APP_NAME

    def __str__(self) -> str:
        return f"{self.app_name}#{self.name}"


@dataclass(frozen=True)
class ReplicaID:
    unique_id: str
    deployment_id: DeploymentID

    def __str__(self) -> str:
        return f"{self.deployment_id}#{self.unique_id}"


@dataclass(frozen=True)
class RunningReplicaInfo:
    """What a router needs to send requests to one replica."""

    replica_id: ReplicaID
    address: str
    max_ongoing_requests: int
    node_id: str = "local"
    multiplexed_model_ids: frozenset = frozenset()


@dataclass
class DeploymentTargets:
    """The replica set of a deployment as the controller publishes it to routers."""

    deployment_id: DeploymentID
    replicas: list[RunningReplicaInfo] = field(default_factory=list)
    max_queued_requests: int = -1
    exists: bool = True
    autoscaling: bool = False  # callers report their queued and running counts when set
    # How an HTTP proxy answers when this deployment's queue is full (503, or 429 + Retry-After).
    backpressure_status_code: int = 503
    backpressure_retry_after_s: Optional[float] = None
    request_router_class: str = "shoal.router.pow2:PowerOfTwoChoicesRequestRouter"
    request_router_kwargs: tuple = ()  # sorted (name, value) pairs
    # (initial_backoff_s, backoff_multiplier, max_backoff_s) for Ray-style routers; () for the defaults
    request_router_backoff: tuple = ()
