"""The keeper: the process that restarts a dead controller, and how others tell it still can.

On the embedded runtime a controller has a keeper: the driver that owns it (`serve.run`), or the
supervisor of a detached instance (`shoal start`, `shoal/supervisor.py`). The keeper's pid and start
time travel in the environment to the controller and from it to every replica and proxy. While the
controller is down, those keep serving and reconnecting as long as the keeper lives (a new controller
is on its way); once the keeper is gone too, nobody will restart the controller and they exit,
so no process is ever orphaned.
"""

from __future__ import annotations

import os
from typing import Optional

from shoal.process_identity import create_time, same_process_alive

KEEPER_PID_ENV = "SHOAL_KEEPER_PID"
KEEPER_CREATE_TIME_ENV = "SHOAL_KEEPER_CREATE_TIME"


def keeper_env(pid: Optional[int] = None) -> dict[str, str]:
    """Environment entries naming `pid` (default: this process) as the keeper."""
    pid = pid or os.getpid()
    return {KEEPER_PID_ENV: str(pid), KEEPER_CREATE_TIME_ENV: repr(create_time(pid))}


def keeper_alive() -> bool:
    """Whether the keeper named in this process's environment still runs (False when none is named)."""
    pid = os.environ.get(KEEPER_PID_ENV)
    try:
        return bool(pid) and same_process_alive(int(pid), float(os.environ.get(KEEPER_CREATE_TIME_ENV) or 0))
    except ValueError:
        return False
