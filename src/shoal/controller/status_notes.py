"""Extra sentences for a deployment's status message: slow starts and memory replacements.

`notes(ds)` is what the reconcile step's status derivation (`DeploymentState._update_status`) shows
when it has nothing more pressing to say (no placement problem, start failure or failed health
check):

- **Slow starts**, as Ray Serve words them: replicas placed more than `SHOAL_SLOW_STARTUP_WARNING_S`
  (default 30; Ray's `SERVE_SLOW_STARTUP_WARNING_S` is read too) seconds ago whose constructor or
  `reconfigure` has not finished ("... has 1 replica that has taken more than 30s to initialize ..."),
  and replicas still waiting to be placed (or, on a cluster, for a node to start on) for that long
  ("... to be scheduled"). The controller logs
  the same sentence at WARNING once per that period while it holds.
- **Memory replacements** (`controller/memory_monitor.py` records them): the last replica replaced
  for exceeding its memory limit or for the machine running low on memory. The sentence stays, also
  once the deployment is HEALTHY again, until the deployment is redeployed with another code or
  config version, so `serve.status()` still tells why a replica was restarted.

Everything is kept per `DeploymentState` object in a weak map: nothing to clean up, and nothing in
the replica records.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.status import ReplicaState

if TYPE_CHECKING:
    from shoal.controller.deployment_state import DeploymentState

logger = logging.getLogger("shoal.controller")

DEFAULT_SLOW_STARTUP_WARNING_S = 30.0


def slow_startup_warning_s() -> float:
    """Seconds after which a starting replica counts as slow (`SHOAL_SLOW_STARTUP_WARNING_S`)."""
    raw = os.environ.get("SHOAL_SLOW_STARTUP_WARNING_S") or os.environ.get("SERVE_SLOW_STARTUP_WARNING_S")
    try:
        value = float(raw) if raw else DEFAULT_SLOW_STARTUP_WARNING_S
    except ValueError:
        value = DEFAULT_SLOW_STARTUP_WARNING_S
    return value if value > 0 else DEFAULT_SLOW_STARTUP_WARNING_S


@dataclass
class _Notes:
    last_slow_log: float = float("-inf")  # monotonic time of the last slow-start warning
    last_slow_text: str = ""
    memory_text: str = ""
    memory_versions: tuple = ()
    memory_count: int = 0


_notes: "weakref.WeakKeyDictionary[DeploymentState, _Notes]" = weakref.WeakKeyDictionary()


def _of(ds: "DeploymentState") -> _Notes:
    n = _notes.get(ds)
    if n is None:
        n = _notes[ds] = _Notes()
    return n


def _versions(ds: "DeploymentState") -> tuple:
    return (ds.code_version, ds.reconfigure_version)


def record_memory_event(ds: "DeploymentState", text: str) -> None:
    """Remember why a replica of `ds` was replaced for memory; shown until the next new version."""
    n = _of(ds)
    n.memory_count = n.memory_count + 1 if n.memory_versions == _versions(ds) else 1
    n.memory_text = text
    n.memory_versions = _versions(ds)
    ds.controller.status_changed()


def _plural(count: int) -> str:
    return f"{count} replica that has" if count == 1 else f"{count} replicas that have"


def slow_start_message(ds: "DeploymentState", now: float, threshold: float) -> str:
    """Ray's slow-start sentences for `ds`, or "" when no replica has been starting for that long."""
    initializing = scheduling = 0
    for rec in ds.replicas.values():
        if rec.state != ReplicaState.STARTING or now - rec.start_time <= threshold:
            continue
        if rec.placed and not (rec.reservation is not None and rec.reservation.waiting):
            initializing += 1
        else:
            scheduling += 1
    where = f"Deployment '{ds.id.name}' in application '{ds.id.app_name}' has"
    parts = []
    if scheduling:
        parts.append(f"{where} {_plural(scheduling)} taken more than {threshold:g}s to be scheduled. "
                     f"This may be due to waiting for resources other replicas hold to be released, "
                     f"or for the cluster to add a node.")
    if initializing:
        parts.append(f"{where} {_plural(initializing)} taken more than {threshold:g}s to initialize. "
                     f"This may be caused by a slow __init__ or reconfigure method.")
    return " ".join(parts)


def notes(ds: "DeploymentState") -> str:
    """The extra status sentences for `ds` now (may be ""); logs slow starts once per period."""
    n = _of(ds)
    threshold = slow_startup_warning_s()
    slow = slow_start_message(ds, time.time(), threshold)
    if slow:
        mono = time.monotonic()
        if mono - n.last_slow_log >= threshold or slow != n.last_slow_text:
            n.last_slow_log = mono
            n.last_slow_text = slow
            logger.warning(slow)
    else:
        n.last_slow_text = ""
    memory = ""
    if n.memory_text and n.memory_versions == _versions(ds):
        memory = n.memory_text
        if n.memory_count > 1:
            memory += f" ({n.memory_count} replicas of this deployment replaced for memory so far.)"
    return " ".join(p for p in (slow, memory) if p)
