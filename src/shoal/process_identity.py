"""A process known by its pid *and* its start time, so a reused pid is never taken for it.

Used wherever one shoal process watches another it did not start or no longer parents: a restarted
controller and the replicas it adopts, replicas and their keeper, exited session directories.
"""

from __future__ import annotations

import psutil


def create_time(pid: int) -> float:
    """When `pid` started (0.0 if it is gone)."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def same_process_alive(pid: int, started: float) -> bool:
    """`pid` still runs and is the process that started at `started` (not a reused pid, not a zombie)."""
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() - started) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
