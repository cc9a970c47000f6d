"""Memory enforcement on the embedded runtime: per-replica limits and a machine-level monitor.

Ray treats `ray_actor_options["memory"]` as a scheduling resource only; on one machine shoal also
enforces it, and, like Ray's memory monitor, replaces the largest replica before the machine runs
out of memory. The controller samples, off the request path, every `SHOAL_MEMORY_MONITOR_INTERVAL_S`
(default 0.5 s), the resident set size (RSS) of each replica process it started (`/proc/<pid>/statm`)
and the machine's memory (`/proc/meminfo`: used = MemTotal - MemAvailable):

- **Per-replica limit.** A replica whose RSS is above its `memory` on `LIMIT_SAMPLES` (2)
  consecutive samples is replaced: one sample above is a spike that is tolerated, two in a row mean
  the memory stays. `SHOAL_MEMORY_LIMITS=off` turns this off.
- **Machine monitor.** When used / total memory exceeds `SHOAL_MEMORY_USAGE_THRESHOLD` (default
  0.95; `off` turns it off), the replica with the largest RSS is replaced, at most one per sample
  and none while the previous one it replaced is still exiting.

Replacing a replica: the controller logs a WARNING ("replica X of app/D exceeded its memory limit of
200.0 MiB (RSS 312.4 MiB); replacing it"), records the reason for the deployment's status message
(`status_notes.py`), asks the replica over its control connection (`abort_requests`) to fail its
in-flight requests with `ReplicaOutOfMemoryError` carrying the reason (waiting at most
`ABORT_GRACE_S`), then kills it; the reconcile step reaps it and starts a replacement as for any
replica that died. A replica still starting is failed as a start failure with the reason instead.

Only processes with a local pid are watched: the Ray runtime never starts this monitor (Ray places
`memory` as a resource and has its own memory monitor), and without `/proc` (not Linux) it does
nothing and says so once. RSS is that of the replica process itself, not of processes it spawns.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

from shoal.controller import status_notes
from shoal.status import ReplicaState

if TYPE_CHECKING:
    from shoal.controller.controller import Controller
    from shoal.controller.deployment_state import DeploymentState, ReplicaRecord

logger = logging.getLogger("shoal.controller")

LIMIT_SAMPLES = 2  # consecutive samples above the limit before a replica is replaced
ABORT_GRACE_S = 1.0  # how long the replica may take to fail its in-flight requests before the kill
DEFAULT_INTERVAL_S = 0.5
DEFAULT_USAGE_THRESHOLD = 0.95
_OFF = ("off", "0", "false", "no", "none", "disabled")
_WATCHED = (ReplicaState.STARTING, ReplicaState.RUNNING, ReplicaState.UPDATING)

try:
    _PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError, AttributeError):
    _PAGE_SIZE = 4096


def read_rss(pid: int) -> Optional[int]:
    """Resident set size of `pid` in bytes, or None if it cannot be read (gone, not Linux)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def read_meminfo() -> Optional[tuple[int, int]]:
    """(total, available) memory of the machine in bytes from /proc/meminfo, or None."""
    total = available = None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemTotal:"):
                    total = int(line.split()[1]) * 1024
                elif line.startswith(b"MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                if total is not None and available is not None:
                    return total, available
    except (OSError, ValueError, IndexError):
        return None
    return None


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _env_number(name: str, raw: str, default: float, valid: Callable[[float], bool], allowed: str) -> float:
    """`raw` (an environment variable's text) as a number, or `default` (with a warning) when it is not one
    or not `allowed`; empty means the default."""
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        logger.warning("%s=%r is not a number; using %g", name, raw, default)
        return default
    if not valid(value):
        logger.warning("%s=%r is not %s; using %g", name, raw, allowed, default)
        return default
    return value


@dataclass(frozen=True)
class MemorySettings:
    enforce_limits: bool = True
    usage_threshold: Optional[float] = DEFAULT_USAGE_THRESHOLD  # None: no machine monitor
    interval_s: float = DEFAULT_INTERVAL_S

    @classmethod
    def from_env(cls, env: Any = None) -> "MemorySettings":
        env = os.environ if env is None else env
        enforce = (env.get("SHOAL_MEMORY_LIMITS") or "on").strip().lower() not in _OFF
        raw = (env.get("SHOAL_MEMORY_USAGE_THRESHOLD") or "").strip().lower()
        threshold = None if raw in _OFF else _env_number(
            "SHOAL_MEMORY_USAGE_THRESHOLD", raw, DEFAULT_USAGE_THRESHOLD, lambda v: 0 < v <= 1, "in (0, 1]")
        interval = _env_number("SHOAL_MEMORY_MONITOR_INTERVAL_S", (env.get("SHOAL_MEMORY_MONITOR_INTERVAL_S") or "").strip(),
                               DEFAULT_INTERVAL_S, lambda v: v > 0, "positive")
        return cls(enforce, threshold, interval)

    @property
    def active(self) -> bool:
        return self.enforce_limits or self.usage_threshold is not None


@dataclass
class _Sample:
    ds: "DeploymentState"
    rec: "ReplicaRecord"
    rss: int


class MemoryMonitor:
    """Samples replica and machine memory every interval and replaces offending replicas."""

    def __init__(self, controller: "Controller", settings: Optional[MemorySettings] = None,
                 rss_reader: Callable[[int], Optional[int]] = read_rss,
                 meminfo_reader: Callable[[], Optional[tuple[int, int]]] = read_meminfo):
        self.controller = controller
        self.settings = settings or MemorySettings.from_env()
        self.read_rss = rss_reader
        self.read_meminfo = meminfo_reader
        self._over: dict[str, int] = {}  # replica uid -> consecutive samples above its limit
        self._victims: dict[str, Any] = {}  # replica uid -> process being replaced for memory

    async def run(self) -> None:
        if not self.settings.active:
            logger.info("memory monitor off (SHOAL_MEMORY_LIMITS=off, SHOAL_MEMORY_USAGE_THRESHOLD=off)")
            return
        if self.read_meminfo() is None:
            logger.info("memory monitor off: /proc/meminfo cannot be read on this system")
            return
        while not self.controller.done.is_set():
            await asyncio.sleep(self.settings.interval_s)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the monitor must keep running
                logger.exception("memory monitor step failed")

    # --- one sample -----------------------------------------------------------------------------
    def tick(self) -> None:
        self._victims = {uid: p for uid, p in self._victims.items() if p.exit_code() is None}
        samples = self._sample()
        if not self._check_limits(samples):
            self._check_machine(samples)

    def _sample(self) -> list[_Sample]:
        samples = []
        for ds in list(self.controller.deployments.values()):
            for rec in list(ds.replicas.values()):
                proc = rec.process
                pid = getattr(proc, "pid", None)
                if (rec.state not in _WATCHED or not isinstance(pid, int) or rec.unique_id in self._victims
                        or proc.exit_code() is not None):  # type: ignore[union-attr]
                    continue
                rss = self.read_rss(pid)
                if rss is not None:
                    samples.append(_Sample(ds, rec, rss))
        return samples

    def _check_limits(self, samples: list[_Sample]) -> bool:
        """Replace replicas that stay above their memory limit; True if any was replaced."""
        over: dict[str, int] = {}
        replaced = False
        for s in samples if self.settings.enforce_limits else ():
            limit = _limit_of(s.ds, s.rec)
            if limit <= 0 or s.rss <= limit:
                continue
            uid = s.rec.unique_id
            over[uid] = self._over.get(uid, 0) + 1
            if over[uid] >= LIMIT_SAMPLES:
                del over[uid]
                replaced = True
                size = f"its memory limit of {format_bytes(limit)} (RSS {format_bytes(s.rss)})"
                self._replace(
                    s, log=f"replica {uid} of {_name(s.ds)} exceeded {size}; replacing it",
                    notice=f"Replica {uid} exceeded {size} and was replaced at {_clock()}.",
                    error=f"Replica '{uid}' of deployment '{s.ds.id.name}' in application "
                          f"'{s.ds.id.app_name}' exceeded {size} and was stopped; it is being replaced.")
        self._over = over
        return replaced

    def _check_machine(self, samples: list[_Sample]) -> None:
        threshold = self.settings.usage_threshold
        if threshold is None or not samples or self._victims:
            return  # off, nothing to replace, or the last replica replaced is still exiting
        info = self.read_meminfo()
        if info is None:
            return
        total, available = info
        used = total - available
        if total <= 0 or used / total <= threshold:
            return
        s = max(samples, key=lambda x: x.rss)
        uid = s.rec.unique_id
        machine = (f"the machine is low on memory: {format_bytes(used)} of {format_bytes(total)} used "
                   f"({used / total:.1%}), above the threshold of {threshold * 100:.4g}% "
                   f"(SHOAL_MEMORY_USAGE_THRESHOLD)")
        largest = f"the largest replica (RSS {format_bytes(s.rss)})"
        self._replace(
            s, log=f"{machine}; replacing replica {uid} of {_name(s.ds)}, {largest}",
            notice=f"Replica {uid} was replaced at {_clock()} because {machine}; it was {largest}.",
            error=f"Replica '{uid}' of deployment '{s.ds.id.name}' in application '{s.ds.id.app_name}' "
                  f"was stopped because {machine}; it was {largest}. It is being replaced.")

    # --- replacing one replica ------------------------------------------------------------------
    def _replace(self, s: _Sample, log: str, notice: str, error: str) -> None:
        rec = s.rec
        logger.warning(log)
        self._victims[rec.unique_id] = rec.process
        status_notes.record_memory_event(s.ds, notice)
        if rec.state == ReplicaState.STARTING:
            s.ds.on_replica_failed(rec, error)  # a start failure with the reason; it is killed
        else:
            self.controller.spawn(self._abort_then_kill(rec, error))

    async def _abort_then_kill(self, rec: "ReplicaRecord", error: str) -> None:
        conn = rec.conn
        if conn is not None:
            try:
                await conn.call("abort_requests", error, timeout=ABORT_GRACE_S)
            except Exception as e:  # noqa: BLE001 - gone already, or too busy to answer: kill it anyway
                logger.debug("replica %s did not fail its requests before the kill: %r", rec.unique_id, e)
        if rec.process is not None:
            rec.process.kill()
        self.controller.wake()


def _limit_of(ds: "DeploymentState", rec: "ReplicaRecord") -> float:
    """The `memory` the replica was started with (its reservation), else its deployment's."""
    reservation = rec.reservation
    if reservation is not None:
        return reservation.request.memory
    return ds.request.memory


def _name(ds: "DeploymentState") -> str:
    return f"{ds.id.app_name}/{ds.id.name}"


def _clock() -> str:
    return time.strftime("%H:%M:%S")
