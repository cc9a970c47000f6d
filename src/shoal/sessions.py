"""Session directories: who runs one, how `shoal status` finds a driver's, and clean-up of exited ones.

Every instance has a session directory `/tmp/shoal-<uid>/s<time>-<random>/` (see `client.py`). A
driver that owns its controller (`serve.run` in a script, `shoal run`) records itself there in
`driver.json` (pid, start time, command line), so that:

- `shoal status` finds a running `shoal run` (or any driver's) instance when no detached one
  (`shoal start`) is running, and reads its status from the controller's socket (read-only);
- the clean-up knows the session is in use even while its controller restarts.

A session directory is *exited* when no process of it runs: no live process names it on its command
line (the controller, the supervisor, replicas and proxies all do) and the driver recorded in it is
gone. Starting an instance removes exited session directories older than a minute, keeping the
newest `SHOAL_KEEP_EXITED_SESSIONS` (default 3) of them for their logs.

`system_env()` builds the environment of shoal's own processes (controller, supervisor, proxies): the
driver's import path with the user's directories (the working directory and the script's) moved to
the end, and `PYTHONSAFEPATH=1` so `python -m` does not put the working directory first (Python 3.10
ignores it: there the controller and proxies drop it themselves, `drop_implicit_cwd`). A driver script named like a library (`websockets.py`) then cannot shadow that library there,
while user modules named by a config (custom policies, routers) still import. Replicas run user code:
they put the driver's path back in its order (`replica/server.py`) and get the user's own
`PYTHONSAFEPATH` back (`user_env`).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Optional

import psutil

from shoal.process_identity import same_process_alive

DRIVER_FILE = "driver.json"
CONTROLLER_SOCKET = "controller.sock"
SESSION_NAME = re.compile(r"^s\d{8}-\d{6}-")
KEEP_ENV = "SHOAL_KEEP_EXITED_SESSIONS"
DEFAULT_KEEP = 3
GRACE_S = 60.0  # a directory this new may belong to an instance whose first process is still starting
# What this process tells `shoal status` about itself (`shoal run` sets a clearer one).
driver_command: Optional[str] = None
_USER_SAFEPATH_ENV = "SHOAL_USER_PYTHONSAFEPATH"


def session_root() -> str:
    return os.path.join(tempfile.gettempdir(), f"shoal-{os.getuid()}")


# --- the environment of shoal's own processes ---------------------------------------------------------
def _user_dirs() -> list[str]:
    """The directories Python put first on this driver's path on its own: the working directory and,
    unless started with -P, the script's (`sys.path[0]`; '' for -c and the REPL, meaning the cwd)."""
    dirs = [os.getcwd()]
    if sys.path and not getattr(sys.flags, "safe_path", False):
        first = os.path.abspath(sys.path[0] or os.curdir)
        if first not in dirs:
            dirs.append(first)
    return dirs


def system_python_path() -> list[str]:
    """This process's import path for a shoal process: the user's directories last (unless shoal
    itself is imported from one of them: that one stays where it is)."""
    import shoal

    own = os.path.dirname(os.path.dirname(os.path.abspath(shoal.__file__)))
    user = [d for d in _user_dirs() if d != own]
    rest: list[str] = []
    for p in sys.path:
        p = os.path.abspath(p or os.curdir)  # ('' is the working directory, which the child shares)
        if p not in user and p not in rest:
            rest.append(p)
    return [*rest, *user]


def system_env(base: Optional[dict] = None) -> dict:
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(system_python_path())
    env[_USER_SAFEPATH_ENV] = env.get("PYTHONSAFEPATH", "")
    env["PYTHONSAFEPATH"] = "1"
    return env


def drop_implicit_cwd() -> None:
    """In a shoal process: forget the working directory `python -m` put first on the path where
    `PYTHONSAFEPATH` is not supported (Python 3.10), before anything is imported lazily. (It stays
    at the end, from `PYTHONPATH`, for user modules named in options.)"""
    if not getattr(sys.flags, "safe_path", False) and sys.path and sys.path[0] == os.getcwd():
        del sys.path[0]


def user_env(env: dict) -> dict:
    """`env` (a shoal process's) as user code expects it: the user's own `PYTHONSAFEPATH` back."""
    if _USER_SAFEPATH_ENV in env:
        user = env.pop(_USER_SAFEPATH_ENV)
        if user:
            env["PYTHONSAFEPATH"] = user
        else:
            env.pop("PYTHONSAFEPATH", None)
    return env


# --- the driver that owns a session -------------------------------------------------------------------
@dataclass
class DriverInfo:
    session_dir: str
    pid: int
    create_time: float
    command: str
    cwd: str = ""
    started_at: float = 0.0

    def alive(self) -> bool:
        return same_process_alive(self.pid, self.create_time)


def record_driver(session_dir: str) -> None:
    """Write `driver.json`: this process owns the instance of `session_dir`."""
    command = driver_command or " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]]).strip()
    data = {"pid": os.getpid(), "create_time": psutil.Process().create_time(), "command": command,
            "cwd": os.getcwd(), "started_at": time.time()}
    path = os.path.join(session_dir, DRIVER_FILE)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_driver(session_dir: str) -> Optional[DriverInfo]:
    try:
        with open(os.path.join(session_dir, DRIVER_FILE), encoding="utf-8") as f:
            data = json.load(f)
        return DriverInfo(session_dir=session_dir, pid=int(data["pid"]), create_time=float(data["create_time"]),
                          command=str(data.get("command", "")), cwd=str(data.get("cwd", "")),
                          started_at=float(data.get("started_at", 0.0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _session_dirs(root: str) -> list[str]:
    try:
        names = os.listdir(root)
    except OSError:
        return []
    return [os.path.join(root, n) for n in names if SESSION_NAME.match(n)]


def running_driver_sessions(root: Optional[str] = None) -> list[DriverInfo]:
    """The instances owned by a running driver (`shoal run`, a `serve.run` script), newest first."""
    found = []
    for path in _session_dirs(root or session_root()):
        info = read_driver(path)
        if info is not None and info.alive() and os.path.exists(os.path.join(path, CONTROLLER_SOCKET)):
            found.append(info)
    return sorted(found, key=lambda i: i.started_at, reverse=True)


def read_status(session_dir: str, wait_s: float = 30.0) -> dict:
    """`serve.status()` of the instance in `session_dir`, as plain data, asked of its controller
    (read-only: a connection that deploys nothing and owns nothing). While the controller restarts,
    retries for at most `wait_s` seconds."""
    from shoal.transport.connection import RpcHandler, connect

    async def ask() -> dict:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                conn = await asyncio.wait_for(connect(os.path.join(session_dir, CONTROLLER_SOCKET),
                                                      handler=RpcHandler(), name="controller"), 5)
            except (OSError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            try:
                await asyncio.wait_for(conn.call("hello", role="observer", pid=os.getpid()), 10)
                status = await asyncio.wait_for(conn.call("status"), 30)
            except (ConnectionError, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
                continue
            finally:
                conn.close()
            return status.to_dict()

    return asyncio.run(ask())


# --- clean-up -----------------------------------------------------------------------------------------
def _sessions_in_use(root: str) -> set[str]:
    """Session directories named on the command line of a live process of this user."""
    prefix = root.rstrip(os.sep) + os.sep
    uid = os.getuid()
    used: set[str] = set()
    for p in psutil.process_iter(["cmdline", "uids"]):
        try:
            uids = p.info.get("uids")
            if uids is not None and uids.real != uid:
                continue
            for arg in p.info.get("cmdline") or ():
                if arg.startswith(prefix):
                    used.add(prefix + arg[len(prefix):].split(os.sep, 1)[0])
        except psutil.Error:
            continue
    return used


def sweep_exited_sessions(root: Optional[str] = None, keep: Optional[int] = None,
                          grace_s: float = GRACE_S) -> list[str]:
    """Remove the session directories of instances that exited; returns the ones removed."""
    root = root or session_root()
    if keep is None:
        try:
            keep = max(0, int(os.environ.get(KEEP_ENV, DEFAULT_KEEP)))
        except ValueError:
            keep = DEFAULT_KEEP
    candidates = _session_dirs(root)
    if len(candidates) <= keep:
        return []
    in_use = _sessions_in_use(root)
    now = time.time()
    exited = []
    for path in candidates:
        if path in in_use:
            continue
        driver = read_driver(path)
        if driver is not None and driver.alive():
            continue
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            continue
        if now - mtime < grace_s:
            continue
        exited.append((mtime, path))
    exited.sort(reverse=True)
    removed = []
    for _, path in exited[keep:]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def sweep_in_background(root: Optional[str] = None) -> None:
    """Start the clean-up without delaying start-up (a daemon thread; a later start finishes it)."""
    def run() -> None:
        try:
            sweep_exited_sessions(root)
        except Exception:  # noqa: BLE001 - clean-up is best effort
            pass

    threading.Thread(target=run, name="shoal-session-sweep", daemon=True).start()


def describe(info: DriverInfo) -> str:
    return f"`{info.command}` (pid {info.pid}, session {info.session_dir})"

