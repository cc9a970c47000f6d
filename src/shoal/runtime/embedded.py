"""The embedded runtime: replicas are child processes of the controller on this machine.

Resources a replica asks for are reserved against the machine (CPUs, GPUs, memory, custom
resources from SHOAL_RESOURCES); GPUs are handed out through CUDA_VISIBLE_DEVICES, fractional
requests sharing a device. A replica that asks for nothing reserves nothing: on one machine,
reserving a whole CPU per replica by default (Ray's rule) would leave a three-deployment app
unplaceable on a two-core laptop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections import deque
from typing import Iterator, Optional, Union

from shoal.common import ReplicaID
from shoal.log_rotation import LOG_FILE_ENV
from shoal.process_identity import create_time, same_process_alive
from shoal.runtime.base import (
    RESOURCE_EPS,
    CheckpointStore,
    FileCheckpointStore,
    ReplicaProcess,
    Reservation,
    ResourceRequest,
    Runtime,
)

CHECKPOINT_FILE = "controller.checkpoint"



def _detect_gpus() -> int:
    env = os.environ.get("SHOAL_NUM_GPUS")
    if env is not None:
        return int(env)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            return 0
    return 0


def _total_memory() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return float("inf")


class LogTailer:
    """Echoes replica and proxy log files, prefixed, to the controller's stderr (the driver's terminal).

    Processes write straight to their log files, never to a pipe the controller holds: a pipe would
    break (EPIPE on every `print`) when the controller dies, and replicas must outlive it. The
    controller follows the files instead, every `PERIOD_S`, and keeps each one's last lines for
    error messages. Access lines (`shoal.access`, see access_log.py) are left in the files only; they
    are dropped by one regular expression over what was read (C speed: the controller must not
    spend a Python loop per request). A file its process rotated (log_rotation.py) is read to its
    end, then the new file at the same path is followed from its start.
    """

    PERIOD_S = 0.1

    def __init__(self) -> None:
        self.files: dict[str, "_Followed"] = {}
        self._task: Optional[asyncio.Task] = None

    def follow(self, path: str, prefix: str, from_end: bool, offset: int = 0) -> deque:
        """Start echoing `path` from its end, or from `offset`; returns its last lines (kept live)."""
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = _Followed(path, prefix, from_end, offset)
        else:
            f.prefix = prefix
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return f.tail

    def unfollow(self, path: str) -> None:
        f = self.files.pop(path, None)
        if f is not None:
            f.read(final=True)
            f.close()

    def drain(self, path: str) -> None:
        f = self.files.get(path)
        if f is not None:
            f.read()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.PERIOD_S)
            for f in list(self.files.values()):
                f.read()

    def close(self) -> None:
        for path in list(self.files):
            self.unfollow(path)
        if self._task is not None:
            self._task.cancel()


# An access line (access_log.py), TEXT or JSON: its logger name sits right after `asctime`.
_ACCESS_LINE_TEXT = (rb'(?:INFO [^\n]{23} shoal\.access |\{"levelname": "INFO", "asctime": "[^"\n]*", '
                     rb'"name": "shoal\.access")[^\n]*\n')
_ACCESS_LINE = re.compile(rb"^" + _ACCESS_LINE_TEXT, re.M)
_ONLY_ACCESS_LINES = re.compile(rb"(?:" + _ACCESS_LINE_TEXT + rb")+")


def _drop_access_lines(data: bytes) -> bytes:
    """`data` without its access lines. Under load a read is most often access lines only: one
    `fullmatch` (C speed) tells so exactly and nothing is left to split."""
    if b" shoal.access " not in data and b'"name": "shoal.access"' not in data:
        return data
    if _ONLY_ACCESS_LINES.fullmatch(data):
        return b""
    return _ACCESS_LINE.sub(b"", data)


class _Followed:
    def __init__(self, path: str, prefix: str, from_end: bool, offset: int):
        self.path = path
        self.prefix = prefix
        self.tail: deque = deque(maxlen=40)
        self.partial = b""
        self.fh = open(path, "ab+")  # created if missing; read from where it ends (or begins)
        self.fh.seek(0, os.SEEK_END) if from_end else self.fh.seek(offset)

    def _rotated(self) -> bool:
        """Whether the path now names another file than the one read (its process rotated it)."""
        try:
            return os.stat(self.path).st_ino != os.fstat(self.fh.fileno()).st_ino
        except OSError:  # not there (yet): keep reading the old one
            return False

    def read(self, final: bool = False) -> None:
        data = self.fh.read()
        if not final and self._rotated():
            data += self.fh.read()  # what came in before the process switched files
            if data and not data.endswith(b"\n"):
                data += b"\n"  # a line cut by the switch ends there
            try:
                fh = open(self.path, "rb")
            except OSError:
                fh = None
            if fh is not None:
                self.fh.close()
                self.fh = fh
                data += self.fh.read()
        data = self.partial + data
        if final and data and not data.endswith(b"\n"):
            data += b"\n"
        data = _drop_access_lines(data)  # they stay in the file, as Ray keeps them off the terminal
        *lines, self.partial = data.split(b"\n")
        if not lines:
            return
        out = []
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            self.tail.append(line)
            out.append(f"{self.prefix} {line}\n")
        try:
            for chunk in _whole_line_chunks(out):
                sys.stderr.write(chunk)
                sys.stderr.flush()
        except (OSError, ValueError):  # the terminal went away: the log file still has it all
            pass

    def close(self) -> None:
        self.fh.close()


PIPE_ATOMIC_BYTES = 4096  # POSIX PIPE_BUF: a write up to this size reaches a pipe in one piece


def _whole_line_chunks(lines: list) -> Iterator[str]:
    """`lines` joined into writes that each fit in one atomic pipe write, so another process writing to
    the same terminal or pipe (the driver's own prints) can land between our lines, never inside one."""
    chunk: list = []
    size = 0
    for line in lines:
        n = len(line) if line.isascii() else len(line.encode("utf-8", "replace"))
        if chunk and size + n > PIPE_ATOMIC_BYTES:
            yield "".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += n
    if chunk:
        yield "".join(chunk)


class EmbeddedReplicaProcess(ReplicaProcess):
    """A replica or proxy process on this machine: our child, or one a previous controller started.

    A process adopted after a controller restart is not our child, so its exit status is unknown:
    it counts as ended (-1) once its pid is gone, a zombie, or reused by another process.
    """

    def __init__(self, pid: int, create_time: float, log_file: str, runtime: "EmbeddedRuntime",
                 popen: Optional[subprocess.Popen] = None):
        self.popen = popen
        self.pid = pid
        self.create_time = create_time
        self.log_file = log_file
        self._runtime = runtime
        self._tail: deque = deque()
        self._code: Optional[int] = None

    def exit_code(self) -> Optional[int]:
        if self._code is None:
            if self.popen is not None:
                self._code = self.popen.poll()
            elif not same_process_alive(self.pid, self.create_time):
                self._code = -1
            if self._code is not None:
                self._runtime.logs.unfollow(self.log_file)
        return self._code

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.send_signal(sig)
        elif same_process_alive(self.pid, self.create_time):
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def recent_output(self) -> str:
        self._runtime.logs.drain(self.log_file)
        return "\n".join(self._tail)


def kill_described(description: dict) -> None:
    """SIGKILL the process a `describe` call described, if it is still that process."""
    pid = description.get("pid")
    if pid and same_process_alive(pid, description.get("create_time", 0.0)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class EmbeddedRuntime(Runtime):
    name = "embedded"
    echoes_replica_output = True

    def __init__(self, session_dir: str, logs_dir: str):
        self.session_dir = session_dir
        self.logs_dir = logs_dir
        os.makedirs(os.path.join(session_dir, "r"), mode=0o700, exist_ok=True)
        os.makedirs(logs_dir, exist_ok=True)
        cpus = float(os.environ.get("SHOAL_NUM_CPUS") or os.cpu_count() or 1)
        self.totals: dict[str, float] = {"CPU": cpus, "GPU": float(_detect_gpus()), "memory": _total_memory()}
        self.totals.update({k: float(v) for k, v in json.loads(os.environ.get("SHOAL_RESOURCES") or "{}").items()})
        self.free = dict(self.totals)
        self.gpu_free = [1.0] * int(self.totals["GPU"])
        self.logs = LogTailer()

    def capacity(self) -> dict[str, float]:
        return dict(self.totals)

    def _describe(self, key: str) -> str:
        if key == "memory":
            return f"{self.free.get(key, 0) / 2**30:.2f} GiB memory free of {self.totals.get(key, 0) / 2**30:.2f} GiB"
        return f"{self.free.get(key, 0):g} {key} free of {self.totals.get(key, 0):g}"

    def reserve(self, request: ResourceRequest) -> Union[Reservation, str]:
        wanted = request.as_dict()
        missing = [k for k, v in wanted.items() if k != "GPU" and self.free.get(k, 0.0) + RESOURCE_EPS < v]
        gpu_ids = self._pick_gpus(request.num_gpus) if request.num_gpus else []
        if request.num_gpus and gpu_ids is None:
            missing.append("GPU")
        if missing:
            parts = ", ".join(f"{k}: {wanted[k]:g} ({self._describe(k)})" for k in missing)
            return f"needs {parts}"
        for k, v in wanted.items():
            self.free[k] = self.free.get(k, 0.0) - v
        share = request.num_gpus if request.num_gpus < 1 else 1.0
        for g in gpu_ids or []:
            self.gpu_free[g] -= share
        return Reservation(request, gpu_ids or [])

    def _pick_gpus(self, num_gpus: float) -> Optional[list[int]]:
        if num_gpus < 1:
            # Fractions share a device: pack onto the fullest device that still fits.
            fits = [i for i, f in enumerate(self.gpu_free) if f + RESOURCE_EPS >= num_gpus]
            return [min(fits, key=lambda i: self.gpu_free[i])] if fits else None
        whole = [i for i, f in enumerate(self.gpu_free) if f >= 1 - RESOURCE_EPS]
        n = int(num_gpus)
        return whole[:n] if len(whole) >= n else None

    def release(self, reservation: Reservation) -> None:
        for k, v in reservation.request.as_dict().items():
            self.free[k] = self.free.get(k, 0.0) + v
        share = reservation.request.num_gpus if reservation.request.num_gpus < 1 else 1.0
        for g in reservation.gpu_ids:
            self.gpu_free[g] = min(1.0, self.gpu_free[g] + share)

    def replica_address(self, replica_id: ReplicaID) -> str:
        return os.path.join(self.session_dir, "r", replica_id.unique_id + ".sock")

    def _spawn(self, args: list[str], env: dict, log_file: str, prefix_fmt: str) -> EmbeddedReplicaProcess:
        env[LOG_FILE_ENV] = log_file  # the child rotates it (log_rotation.py)
        with open(log_file, "ab") as log:  # the child writes its output here itself (see LogTailer)
            start = log.tell()
            popen = subprocess.Popen([sys.executable, "-m", *args], env=env, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc = EmbeddedReplicaProcess(popen.pid, create_time(popen.pid), log_file, self, popen)
        proc._tail = self.logs.follow(log_file, prefix_fmt.format(pid=popen.pid), from_end=False, offset=start)
        return proc

    # --- surviving a controller restart ----------------------------------------------------------
    def checkpoint_store(self) -> CheckpointStore:
        return FileCheckpointStore(os.path.join(self.session_dir, CHECKPOINT_FILE))

    def describe(self, process: ReplicaProcess) -> Optional[dict]:
        if not isinstance(process, EmbeddedReplicaProcess):
            return None
        prefix = self.logs.files[process.log_file].prefix if process.log_file in self.logs.files else ""
        return {"pid": process.pid, "create_time": process.create_time, "log_file": process.log_file,
                "prefix": prefix}

    def adopt(self, description: dict) -> Optional[ReplicaProcess]:
        pid, create_time = description["pid"], description["create_time"]
        if not same_process_alive(pid, create_time):
            return None
        proc = EmbeddedReplicaProcess(pid, create_time, description["log_file"], self)
        proc._tail = self.logs.follow(description["log_file"], description.get("prefix") or f"(pid={pid})",
                                      from_end=True)
        return proc

    def adopt_reservation(self, reservation: Reservation) -> None:
        for k, v in reservation.request.as_dict().items():
            self.free[k] = self.free.get(k, 0.0) - v
        share = reservation.request.num_gpus if reservation.request.num_gpus < 1 else 1.0
        for g in reservation.gpu_ids:
            if g < len(self.gpu_free):
                self.gpu_free[g] -= share

    def close(self) -> None:
        self.logs.close()

    def launch_proxy(self, index: int) -> ReplicaProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        name = str(index) if index >= 0 else "standby"  # a standby (-1) takes a dead proxy's index later
        return self._spawn(["shoal.http.proxy", self.session_dir, str(index)], env,
                           os.path.join(self.logs_dir, f"proxy_{name}.log"), f"(proxy {name} pid={{pid}})")

    def launch(self, replica_id: ReplicaID, reservation: Reservation, logs_dir: Optional[str] = None) -> ReplicaProcess:
        """`logs_dir`: where its log file goes (its deployment's `logging_config.logs_dir`), else the
        session's logs directory."""
        from shoal.sessions import user_env

        env = user_env(dict(os.environ))  # user code runs here: the user's own PYTHONSAFEPATH
        env["PYTHONUNBUFFERED"] = "1"
        if reservation.request.num_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in reservation.gpu_ids)
        elif self.totals["GPU"] and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a replica that asked for no GPU gets none
        d = replica_id.deployment_id
        where = self.logs_dir
        if logs_dir:
            where = os.path.abspath(os.path.expanduser(logs_dir))
            os.makedirs(where, exist_ok=True)
        log_file = os.path.join(where, f"replica_{d.app_name}_{d.name}_{replica_id.unique_id}.log")
        return self._spawn(["shoal.replica.server", self.session_dir, replica_id.unique_id], env, log_file,
                           f"({d.app_name}/{d.name} replica={replica_id.unique_id} pid={{pid}})")
