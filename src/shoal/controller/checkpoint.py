"""What the controller must not lose, and how a restarted controller gets it back.

The controller writes a `ControllerSnapshot` to its runtime's `CheckpointStore` whenever the state
in it changes (applications, specs, targets, replicas, proxies): at the end of every control call
that changes desired state, and at the end of any reconcile tick that changed a replica or a proxy.
A controller started with `recover=True` loads it before it accepts a single connection, adopts
the replicas and proxies that still run (same processes, no restart) and replaces the rest.

Plain dataclasses, pickled: specs already carry the user's code as bytes, so unpickling a snapshot
never imports user code.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional

import cloudpickle

from shoal.common import DeploymentID, ReplicaID
from shoal.config import ReplicaRank
from shoal.controller.specs import ApplicationSpec, DeploymentSpec
from shoal.runtime.base import CheckpointStore, Reservation

logger = logging.getLogger("shoal.controller")

FORMAT_VERSION = 1


@dataclass
class ReplicaSnapshot:
    replica_id: ReplicaID
    code_version: str
    reconfigure_version: str
    state: str  # a ReplicaState value
    address: str
    start_time: float
    reservation: Optional[Reservation]
    process: Optional[dict]  # Runtime.describe(process)
    model_ids: frozenset = frozenset()
    rank: Optional[ReplicaRank] = None  # kept across a restart: replicas keep their ranks
    rank_node: str = ""


@dataclass
class DeploymentSnapshot:
    deployment_id: DeploymentID
    spec: DeploymentSpec
    target: int
    deleting: bool
    status: str
    trigger: str
    message: str
    replicas: list[ReplicaSnapshot] = field(default_factory=list)


@dataclass
class ApplicationSnapshot:
    spec: ApplicationSpec
    config: Optional[dict]
    deleting: bool
    status: str
    message: str
    last_deployed_time_s: float
    deployment_names: set


@dataclass
class ProxySnapshot:
    index: int
    process: Optional[dict]
    port: int
    status: str


@dataclass
class ControllerSnapshot:
    apps: list[ApplicationSnapshot]
    deployments: list[DeploymentSnapshot]
    http_options: Optional[dict]
    proxies: list[ProxySnapshot]
    proxy_port: int
    routes_version: int
    extra: dict = field(default_factory=dict)  # runtime- or mode-specific (the admin API's port, ...)
    format_version: int = FORMAT_VERSION


def dumps(snapshot: ControllerSnapshot) -> bytes:
    try:
        return pickle.dumps(snapshot, protocol=5)
    except (pickle.PicklingError, TypeError, AttributeError):
        return cloudpickle.dumps(snapshot, protocol=5)


def load(store: CheckpointStore) -> Optional[ControllerSnapshot]:
    """The last checkpoint, or None (none written, or unreadable: logged, and the controller starts empty)."""
    data = store.load()
    if not data:
        return None
    try:
        snap: Any = pickle.loads(data)
    except Exception:  # noqa: BLE001 - a damaged checkpoint must not keep the controller down
        logger.exception("the controller checkpoint could not be read; starting with no applications")
        return None
    if not isinstance(snap, ControllerSnapshot) or snap.format_version != FORMAT_VERSION:
        logger.error("the controller checkpoint has an unknown format; starting with no applications")
        return None
    return snap


def process_descriptions(snap: ControllerSnapshot) -> list[dict]:
    """Every replica and proxy process the snapshot records (`Runtime.describe` data)."""
    out = [r.process for d in snap.deployments for r in d.replicas if r.process]
    return out + [p.process for p in snap.proxies if p.process]
