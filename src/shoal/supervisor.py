"""The supervisor of a detached instance: restarts its controller at once when it dies.

`shoal start` runs `python -m shoal.supervisor CONTROLLER-ARGS...`. The supervisor starts the
controller with those arguments and waits. A controller that exits with status 0 was shut down on
purpose (`shoal shutdown`, SIGTERM), and the supervisor exits with it. Any other end (a crash, `kill
-9`, the OOM killer) starts a new controller with `--recover`: it loads the checkpoint and adopts the
replicas and proxies, which kept serving meanwhile. A controller that keeps dying right after its
start is restarted with growing pauses (at most `MAX_BACKOFF_S`).

Deliberately small and import-light (nothing of shoal but `keeper`): it is the one process of an
instance that must not fail. It is the keeper named to the controller and through it to every replica
(see keeper.py), and a child subreaper on Linux, so the processes of a dead controller are reaped
here instead of lingering as zombies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import Optional

from shoal import keeper

PR_SET_CHILD_SUBREAPER = 36
QUICK_DEATH_S = 5.0
MAX_BACKOFF_S = 5.0


def _log(message: str) -> None:
    sys.stderr.write(f"(shoal supervisor) {time.strftime('%Y-%m-%d %H:%M:%S')} -- {message}\n")
    sys.stderr.flush()


def _become_subreaper() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: orphans go to init, which reaps them
        pass


class Supervisor:
    def __init__(self, controller_args: list[str]):
        self.args = controller_args
        self.env = dict(os.environ, **keeper.keeper_env())
        self.controller: Optional[subprocess.Popen] = None
        self.stopping = False

    def _start(self, recover: bool) -> None:
        cmd = [sys.executable, "-m", "shoal.controller", *self.args] + (["--recover"] if recover else [])
        self.controller = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL)

    def _forward(self, signum: int, frame: object) -> None:
        self.stopping = True
        if self.controller is not None and self.controller.poll() is None:
            self.controller.send_signal(signal.SIGTERM)  # the controller shuts everything down, then exits 0

    def run(self) -> int:
        _become_subreaper()
        signal.signal(signal.SIGTERM, self._forward)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self._start(recover=False)
        backoff = 0.0
        while True:
            started = time.monotonic()
            code = self._wait_controller()
            if code == 0 or self.stopping:
                return 0
            backoff = min(MAX_BACKOFF_S, max(0.1, backoff * 2)) if time.monotonic() - started < QUICK_DEATH_S else 0.0
            _log(f"the controller (pid {self.controller.pid}) exited with status {code}; restarting it"  # type: ignore[union-attr]
                 + (f" in {backoff:.1f} s" if backoff else ""))
            time.sleep(backoff)
            if self.stopping:
                return 0
            self._start(recover=True)

    def _wait_controller(self) -> int:
        """Reap children (the controller, and orphans handed to this subreaper) until the controller ends."""
        assert self.controller is not None
        while True:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                return self.controller.returncode if self.controller.returncode is not None else 1
            except InterruptedError:
                continue
            if pid == self.controller.pid:
                self.controller.returncode = os.waitstatus_to_exitcode(status)
                return self.controller.returncode


def main() -> None:
    sys.exit(Supervisor(sys.argv[1:]).run())


if __name__ == "__main__":
    main()
