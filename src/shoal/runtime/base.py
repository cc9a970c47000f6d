"""The narrow interface between the controller and whatever starts replica processes.

The controller asks a runtime to reserve resources for a replica, to launch it, to tell whether it
still runs, and to stop it. Routing, autoscaling, batching and HTTP never see the runtime.
"""

from __future__ import annotations

import dataclasses
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional, Union

from shoal.common import ReplicaID

#: Tolerance when comparing fractional resource amounts (0.1 + 0.2 must fit in 0.3).
RESOURCE_EPS = 1e-9


@dataclass(frozen=True)
class ResourceRequest:
    """What one replica reserves (Ray's `ray_actor_options` resource keys)."""

    num_cpus: float = 0.0
    num_gpus: float = 0.0
    memory: float = 0.0
    resources: tuple = ()  # sorted (name, amount) pairs, hashable
    # Placement beyond one machine's accounting (the Ray runtime honours these; one machine has one node).
    placement_group_bundles: tuple = ()  # one sorted (name, amount) tuple per bundle; the replica goes in bundle 0
    placement_group_strategy: str = ""
    max_replicas_per_node: int = 0
    group: str = ""  # the deployment, for counting its replicas per node

    @classmethod
    def from_config(cls, config, group: str) -> "ResourceRequest":
        """What one replica of a deployment with `config` (a DeploymentConfig) asks for."""
        bundles = tuple(tuple(sorted((k, float(v)) for k, v in b.items()))
                        for b in (config.placement_group_bundles or ()))
        strategy = getattr(config.placement_group_strategy, "value", config.placement_group_strategy) or ""
        return dataclasses.replace(cls.from_actor_options(config.ray_actor_options),
                                   placement_group_bundles=bundles, placement_group_strategy=str(strategy),
                                   max_replicas_per_node=int(config.max_replicas_per_node or 0), group=group)

    @classmethod
    def from_actor_options(cls, opts) -> "ResourceRequest":
        return cls(
            num_cpus=float(opts.num_cpus or 0.0),
            num_gpus=float(opts.num_gpus or 0.0),
            memory=float(opts.memory or 0.0),
            resources=tuple(sorted((k, float(v)) for k, v in (opts.resources or {}).items())),
        )

    def as_dict(self) -> dict[str, float]:
        d = {"CPU": self.num_cpus, "GPU": self.num_gpus, "memory": self.memory, **dict(self.resources)}
        return {k: v for k, v in d.items() if v}


@dataclass
class Reservation:
    """Resources granted to one replica; `gpu_ids` become its CUDA_VISIBLE_DEVICES."""

    request: ResourceRequest
    gpu_ids: list[int] = field(default_factory=list)
    node_id: str = "local"
    # Set by a cluster runtime when no node has room now: what the replica waits for the cluster to
    # add ("CPU: 1 (every node ... is full)"). Its process is launched all the same, so the cluster's
    # autoscaler sees the demand; cleared once it starts (`Runtime.placed`).
    waiting: str = ""


class ReplicaProcess(ABC):
    """A started replica, as seen by the controller."""

    pid: Optional[int] = None
    node_id: str = "local"
    log_file: Optional[str] = None

    @abstractmethod
    def exit_code(self) -> Optional[int]:
        """None while it runs; the exit status once it has ended."""

    @abstractmethod
    def terminate(self) -> None: ...

    @abstractmethod
    def kill(self) -> None: ...

    def recent_output(self) -> str:
        """The last lines it printed, for error messages."""
        return ""


class CheckpointStore(ABC):
    """Where a controller keeps its checkpoint, so a restarted controller finds it."""

    @abstractmethod
    def load(self) -> Optional[bytes]: ...

    @abstractmethod
    def save(self, data: bytes) -> None:
        """Replace the checkpoint atomically: a reader sees the old one or the new one, never half."""

    @abstractmethod
    def clear(self) -> None: ...


class FileCheckpointStore(CheckpointStore):
    """A file, replaced by write-then-rename (the embedded runtime: in the session directory)."""

    def __init__(self, path: str):
        self.path = path

    def load(self) -> Optional[bytes]:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class Runtime(ABC):
    name: str = "abstract"
    # Whether the replicas' own output reaches the driver's terminal through the controller (the
    # embedded runtime echoes their log files): then the controller need not repeat a traceback.
    echoes_replica_output: bool = False

    @abstractmethod
    def reserve(self, request: ResourceRequest) -> Union[Reservation, str]:
        """Reserve resources, or return why they cannot be had now."""

    @abstractmethod
    def release(self, reservation: Reservation) -> None: ...

    @abstractmethod
    def replica_address(self, replica_id: ReplicaID) -> str:
        """Where the replica will listen for requests."""

    @abstractmethod
    def launch(self, replica_id: ReplicaID, reservation: Reservation,
               logs_dir: Optional[str] = None) -> ReplicaProcess: ...

    @abstractmethod
    def launch_proxy(self, index: int) -> ReplicaProcess:
        """Start HTTP proxy number `index` (it fetches its options from the controller)."""

    @abstractmethod
    def capacity(self) -> dict[str, float]:
        """Total resources, for status messages."""

    def proxy_count(self, http_options: dict, fresh: bool = False) -> int:
        """How many HTTP proxies to run (a cluster runtime runs one per node, as nodes come and go;
        `fresh`: ask the cluster now, not a recent answer, as when a proxy just ended)."""
        return int(http_options.get("num_proxies", 1))

    def draining_nodes(self) -> frozenset:
        """Nodes about to go (a cluster's autoscaler or a preemption notice drains them): replicas
        there are replaced elsewhere first, then stopped gracefully. Answered from what the runtime
        last learned: called every reconcile tick."""
        return frozenset()

    def head_node(self) -> Optional[str]:
        """The node that never goes (a cluster's head), whose replicas stop last on downscale, so
        the nodes the cluster can remove empty first; None where there is no such node (one machine)."""
        return None

    def surplus_proxies(self, http_options: dict) -> list[int]:
        """Indices of running proxies whose node no longer needs one (a cluster runtime: no replicas
        there any more); the controller drains and stops them, so the node can go idle."""
        return []

    def proxy_count_may_grow(self, http_options: dict) -> bool:
        """Whether more proxies may join later (nodes joining a cluster): then every proxy listens
        with SO_REUSEPORT from the start, so one started later on the same host can share the port."""
        return False

    def placed(self, reservation: Reservation, node_id: str) -> None:
        """The replica started on `node_id` (it says so when it first connects). A cluster runtime
        may have let its scheduler pick another node than `reserve` did, or none yet: its
        accounting follows the replica to where it runs."""
        reservation.node_id = node_id
        reservation.waiting = ""

    def close(self) -> None:
        """Release anything the runtime holds (called when the controller exits)."""

    # --- per-node metrics endpoints ----------------------------------------------------------------
    # False: the controller serves the instance's one metrics endpoint itself. True (a cluster):
    # an exporter on every node serves that node's processes' metrics, fetched from the controller.
    exports_metrics_per_node: bool = False

    def ensure_node_exporters(self, options: dict) -> None:
        """Run a metrics exporter on every node that lacks one (`options`: host, port). Called on
        every reconcile tick: cheap when nothing changed."""

    def stop_node_exporters(self) -> None:
        """Stop the exporters (shoal shuts down)."""

    # --- surviving a controller restart ----------------------------------------------------------
    def checkpoint_store(self) -> Optional[CheckpointStore]:
        """Where the controller checkpoints its state (None: it cannot be restarted)."""
        return None

    def describe(self, process: ReplicaProcess) -> Optional[dict]:
        """Plain, picklable data that lets a restarted controller find `process` again (`adopt`)."""
        return None

    def adopt(self, description: dict) -> Optional[ReplicaProcess]:
        """The process `describe` described, if it still runs (None: it is gone)."""
        return None

    def adopt_reservation(self, reservation: Reservation) -> None:
        """Account again for the resources of a replica that a restarted controller adopts."""
