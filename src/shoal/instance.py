"""A detached local instance (`shoal start`): where it is recorded and how the CLI reaches it.

The instance directory (`$SHOAL_INSTANCE_DIR`, default `/tmp/shoal-<uid>/instance`, mode 0700) holds
`token` (mode 0600, the admin API's bearer token, written by `shoal start` before the controller
starts) and `instance.json` (written by the controller once its admin API listens, removed when it
exits). Only the user who started the instance can read the token, so only they can drive it.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from typing import Optional

import psutil
from pydantic import BaseModel

INFO_FILE = "instance.json"
TOKEN_FILE = "token"


class InstanceInfo(BaseModel):
    """What `instance.json` records about a running detached instance."""

    pid: int
    session_dir: str
    admin_url: str
    http_options: dict = {}
    runtime: str = "embedded"
    address: Optional[str] = None
    supervisor_pid: Optional[int] = None  # restarts the controller (pid) when it dies


def default_instance_dir() -> str:
    env = os.environ.get("SHOAL_INSTANCE_DIR")
    if env:
        return os.path.abspath(env)
    return os.path.join(tempfile.gettempdir(), f"shoal-{os.getuid()}", "instance")


def ensure_dir(instance_dir: str) -> None:
    os.makedirs(instance_dir, mode=0o700, exist_ok=True)
    os.chmod(instance_dir, 0o700)


def new_token(instance_dir: str) -> str:
    """Write a fresh token readable by this user alone (created 0600, never widened)."""
    ensure_dir(instance_dir)
    token = secrets.token_urlsafe(32)
    path = os.path.join(instance_dir, TOKEN_FILE)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.replace(tmp, path)
    return token


def read_token(instance_dir: str) -> str:
    with open(os.path.join(instance_dir, TOKEN_FILE), encoding="utf-8") as f:
        return f.read().strip()


def write_info(instance_dir: str, info: InstanceInfo) -> None:
    path = os.path.join(instance_dir, INFO_FILE)
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(info.model_dump_json())
    os.replace(tmp, path)  # readers never see half a file


def read_info(instance_dir: str) -> Optional[InstanceInfo]:
    """The running instance recorded in `instance_dir`, or None (no file, or its processes are gone).

    An instance whose controller died but whose supervisor lives is running: its controller is
    restarting (`restarting(info)`)."""
    try:
        with open(os.path.join(instance_dir, INFO_FILE), encoding="utf-8") as f:
            info = InstanceInfo.model_validate(json.load(f))
    except (OSError, ValueError):
        return None
    alive = pid_alive(info.pid) or (info.supervisor_pid is not None and pid_alive(info.supervisor_pid))
    return info if alive else None


def restarting(info: InstanceInfo) -> bool:
    """The controller recorded in `info` is gone and its supervisor is starting a new one."""
    return not pid_alive(info.pid) and info.supervisor_pid is not None and pid_alive(info.supervisor_pid)


def wait_for_controller(instance_dir: str, timeout: float) -> Optional[InstanceInfo]:
    """Wait (at most `timeout` s) until a restarting instance's new controller has recorded itself."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        info = read_info(instance_dir)
        if info is None or not restarting(info):
            return info
        if time.monotonic() >= deadline:
            return info
        time.sleep(0.05)


def remove_info(instance_dir: str, pid: Optional[int] = None) -> None:
    """Forget the instance (only if it is still the one with `pid`, when given)."""
    path = os.path.join(instance_dir, INFO_FILE)
    if pid is not None:
        try:
            with open(path, encoding="utf-8") as f:
                if json.load(f).get("pid") != pid:
                    return
        except (OSError, ValueError):
            return
    for name in (INFO_FILE, TOKEN_FILE):
        try:
            os.unlink(os.path.join(instance_dir, name))
        except FileNotFoundError:
            pass


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class StartError(RuntimeError):
    """The detached controller did not come up; the message says why (and where its log is)."""


def start_detached(instance_dir: str, http_options: dict, admin_port: int = 0, runtime: Optional[str] = None,
                   address: Optional[str] = None, timeout: float = 60.0) -> InstanceInfo:
    """Spawn a controller that outlives this process (own session, output to its log file) and wait
    until it has recorded itself in `instance_dir`."""
    import subprocess
    import sys
    import time

    from shoal.client import _session_root

    ensure_dir(instance_dir)
    remove_info(instance_dir)
    new_token(instance_dir)
    session_dir = tempfile.mkdtemp(prefix=time.strftime("s%Y%m%d-%H%M%S-"), dir=_session_root())
    os.chmod(session_dir, 0o700)
    logs_dir = os.path.join(session_dir, "logs")
    os.makedirs(logs_dir, exist_ok=True)
    log_path = os.path.join(logs_dir, "controller.log")
    from shoal import sessions

    sessions.sweep_in_background()  # session directories of instances that have exited
    env = sessions.system_env(dict(os.environ, PYTHONUNBUFFERED="1"))  # no user module shadows a library
    from shoal.log_rotation import LOG_FILE_ENV, rotation_settings

    rotation_settings()  # a bad rotation setting fails here, in `shoal start`
    env[LOG_FILE_ENV] = log_path  # the controller rotates it by size (log_rotation.py)
    # The supervisor runs the controller with these arguments and restarts it should it die.
    cmd = [sys.executable, "-m", "shoal.supervisor", "--session-dir", session_dir, "--instance-dir", instance_dir,
           "--http-options", json.dumps(http_options), "--admin-port", str(admin_port)]
    if runtime is not None:
        cmd += ["--runtime", runtime]
    if address is not None:
        cmd += ["--address", address]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        info = read_info(instance_dir)
        if info is not None and info.supervisor_pid == proc.pid:
            return info
        if proc.poll() is not None:
            raise StartError(f"the shoal controller exited during start-up (exit code {proc.returncode}); "
                             f"see {log_path}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise StartError(f"the shoal controller did not start within {timeout:.0f} s; see {log_path}")
        time.sleep(0.02)


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return ""
