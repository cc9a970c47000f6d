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
import shutil
import subprocess
import sys
from collections import deque
from typing import Optional, TextIO, Union

from shoal.common import ReplicaID
from shoal.runtime.base import RESOURCE_EPS, ReplicaProcess, Reservation, ResourceRequest, Runtime



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


class _LogPump(asyncio.Protocol):
    """Copies a replica's output to its log file and, prefixed, to the controller's stderr."""

    def __init__(self, prefix: str, log: TextIO, tail: deque):
        self.prefix = prefix
        self.log = log
        self.tail = tail
        self.partial = b""

    def data_received(self, data: bytes) -> None:
        data = self.partial + data
        *lines, self.partial = data.split(b"\n")
        if not lines:
            return
        out = []
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            self.tail.append(line)
            self.log.write(line + "\n")
            out.append(f"{self.prefix} {line}\n")
        self.log.flush()
        sys.stderr.write("".join(out))
        sys.stderr.flush()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.partial:
            self.data_received(b"\n")
        self.log.close()


class EmbeddedReplicaProcess(ReplicaProcess):
    def __init__(self, popen: subprocess.Popen, log_file: str, tail: deque):
        self.popen = popen
        self.pid = popen.pid
        self.log_file = log_file
        self._tail = tail

    def exit_code(self) -> Optional[int]:
        return self.popen.poll()

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()

    def recent_output(self) -> str:
        return "\n".join(self._tail)


class EmbeddedRuntime(Runtime):
    name = "embedded"

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
        popen = subprocess.Popen([sys.executable, "-m", *args], env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        tail: deque = deque(maxlen=40)
        log = open(log_file, "a", encoding="utf-8")
        loop = asyncio.get_running_loop()
        prefix = prefix_fmt.format(pid=popen.pid)
        loop.create_task(loop.connect_read_pipe(lambda: _LogPump(prefix, log, tail), popen.stdout))
        return EmbeddedReplicaProcess(popen, log_file, tail)

    def launch_proxy(self, index: int) -> ReplicaProcess:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        return self._spawn(["shoal.http.proxy", self.session_dir, str(index)], env,
                           os.path.join(self.logs_dir, f"proxy_{index}.log"), f"(proxy {index} pid={{pid}})")

    def launch(self, replica_id: ReplicaID, reservation: Reservation) -> ReplicaProcess:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if reservation.request.num_gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in reservation.gpu_ids)
        elif self.totals["GPU"] and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a replica that asked for no GPU gets none
        d = replica_id.deployment_id
        log_file = os.path.join(self.logs_dir, f"replica_{d.app_name}_{d.name}_{replica_id.unique_id}.log")
        return self._spawn(["shoal.replica.server", self.session_dir, replica_id.unique_id], env, log_file,
                           f"({d.app_name}/{d.name} replica={replica_id.unique_id} pid={{pid}})")
