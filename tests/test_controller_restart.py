"""The data plane outlives the controller: `kill -9` of the controller under load fails no request.

A driver restarts the controller it owns; a supervisor restarts a detached instance's. The new
controller recovers from the checkpoint and adopts the replicas and proxies, which kept serving with
the replica sets and routes they had. Real processes, real sockets, real HTTP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import psutil
import pytest

from conftest import wait_for
from shoal import serve
from shoal.api import get_http_url
from shoal.client import get_global_client
from test_cli import _alive, _env, _wait_all_gone
from test_cli_instance import inst  # noqa: F401 - a fixture


class Load:
    """Steady traffic through a handle and over HTTP, from two threads, until stopped."""

    def __init__(self, handle, url: str):
        """`handle`: a deployment handle to call too, or None for HTTP load only."""
        self.handle, self.url = handle, url
        self.ok: list[float] = []  # completion times
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._http)]
        if handle is not None:  # a CLI-driven instance has no driver to hold a handle: HTTP only
            self._threads.append(threading.Thread(target=self._handles))

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _handles(self) -> None:
        while not self._stop.is_set():
            try:
                self.handle.remote().result(timeout_s=30)
                self.ok.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - every failure is what the test counts
                self.failures.append(f"handle: {e!r}")
            time.sleep(0.005)

    def _http(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                try:
                    r = client.get(self.url)
                    if r.status_code == 200:
                        self.ok.append(time.monotonic())
                    else:
                        self.failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.failures.append(f"HTTP: {e!r}")
                time.sleep(0.005)

    def served_since(self, t: float) -> int:
        return sum(1 for x in list(self.ok) if x > t)


@serve.deployment(num_replicas=3, version="1")  # versioned: a later serve.run with more replicas keeps these
class Pid:
    def __call__(self, request=None) -> int:
        return os.getpid()


def _pids(handle, n: int) -> set:
    return wait_for(lambda: (lambda s: s if len(s) == n else None)({handle.remote().result() for _ in range(60)}),
                    what=f"{n} replicas answering")


def _session_processes(session_dir: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if session_dir in " ".join(p.info["cmdline"] or []) and _alive(p):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture
def owned_instance():
    """A driver-owned instance; `serve.shutdown()` after the test must leave none of its processes."""
    serve.start(http_options={"port": 0})
    client = get_global_client()
    yield client
    procs = _session_processes(client.session_dir)
    serve.shutdown()
    _wait_all_gone(procs + _session_processes(client.session_dir), timeout=30)


def test_kill_controller_under_load_fails_nothing(owned_instance):
    client = owned_instance
    handle = serve.run(Pid.bind(), name="pid", route_prefix="/pid")
    url = get_http_url() + "/pid"
    before = _pids(handle, 3)
    old = client.controller_proc.pid
    with Load(handle, url) as load:
        wait_for(lambda: load.served_since(0) > 20, what="load running")
        killed_at = time.monotonic()
        os.kill(old, signal.SIGKILL)
        # Control calls wait for the restarted controller and answer.
        status = serve.status()
        assert status.applications["pid"].status == serve.ApplicationStatus.RUNNING
        assert client.controller_proc.pid != old
        wait_for(lambda: load.served_since(killed_at + 1.0) > 20, what="load served after the restart")
    assert load.failures == []
    assert _pids(handle, 3) == before  # adopted, not restarted
    # The recovered controller applies a later deploy: one more replica, the others kept as they are.
    serve.run(Pid.options(num_replicas=4).bind(), name="pid", route_prefix="/pid")
    after = _pids(handle, 4)
    assert before < after
    assert httpx.get(url, timeout=10).status_code == 200


def test_autoscaling_resumes_after_a_restart(owned_instance):
    @serve.deployment
    class Gate:
        def __init__(self):
            import asyncio
            self.event = asyncio.Event()

        async def wait(self):
            await self.event.wait()

        def open(self):
            self.event.set()

    @serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                                          "upscale_delay_s": 0, "downscale_delay_s": 1, "look_back_period_s": 0.5})
    class Scaled:
        def __init__(self, gate):
            self.gate = gate

        async def __call__(self):
            await self.gate.wait.remote()

    gate = serve.run(Gate.bind(), name="gate", route_prefix=None)
    handle = serve.run(Scaled.bind(gate), name="scaled", route_prefix=None)
    os.kill(owned_instance.controller_proc.pid, signal.SIGKILL)

    def running() -> int:
        return serve.status().applications["scaled"].deployments["Scaled"].replica_states.get(
            serve.ReplicaState.RUNNING, 0)

    assert running() == 1
    waiting = [handle.remote() for _ in range(3)]
    wait_for(lambda: running() == 3, timeout=60, what="scale up to 3 after the restart")
    gate.open.remote().result()
    [r.result(timeout_s=30) for r in waiting]
    wait_for(lambda: running() == 1, timeout=60, what="scale back down to 1")


def test_replica_ranks_survive_a_restart(owned_instance):
    @serve.deployment(num_replicas=3, version="1")
    class Ranked:
        def __call__(self):
            ctx = serve.get_replica_context()
            return os.getpid(), ctx.rank.rank, ctx.world_size

    handle = serve.run(Ranked.bind(), name="ranked", route_prefix=None)

    def ranks(n: int, without: int = 0) -> dict:
        def poll():
            try:
                seen = {pid: (rank, size) for pid, rank, size in (handle.remote().result(timeout_s=10)
                                                                  for _ in range(20 * n))}
            except Exception:  # noqa: BLE001 - a replica the test just killed
                return None
            return seen if len(seen) == n and without not in seen else None
        return wait_for(poll, timeout=60, what=f"{n} replicas answering")

    first = ranks(3)
    # Replace rank 0, so the ranks no longer follow the order the replicas were made in.
    victim = next(pid for pid, (rank, _) in first.items() if rank == 0)
    os.kill(victim, signal.SIGKILL)
    before = ranks(3, without=victim)
    assert sorted(before.values()) == [(0, 3), (1, 3), (2, 3)]
    os.kill(owned_instance.controller_proc.pid, signal.SIGKILL)
    assert serve.status().applications["ranked"].status == serve.ApplicationStatus.RUNNING
    # The restarted controller knows every replica's rank: scaling up (serve.run returns once every
    # replica knows its rank and the new world size) keeps them and gives the new replica rank 3.
    serve.run(Ranked.options(num_replicas=4).bind(), name="ranked", route_prefix=None)
    after = ranks(4)
    assert {pid: rank for pid, (rank, _) in after.items() if pid in before} == \
        {pid: rank for pid, (rank, _) in before.items()}
    assert sorted(after.values()) == [(0, 4), (1, 4), (2, 4), (3, 4)]


DRIVER = """
import os, sys, time
from shoal import serve

@serve.deployment(num_replicas=2)
class Pid:
    def __call__(self):
        return os.getpid()

h = serve.run(Pid.bind(), route_prefix="/pid")
[h.remote().result() for _ in range(10)]
from shoal.client import get_global_client
c = get_global_client()
print(c.session_dir, c.controller_proc.pid, flush=True)
time.sleep(600)
"""


def test_no_process_outlives_both_driver_and_controller(tmp_path):
    """Nothing is left to restart the controller: replicas and proxies exit instead of serving on, orphaned."""
    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(DRIVER))
    driver = subprocess.Popen([sys.executable, str(script)], cwd=str(tmp_path), env=_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        session_dir, controller = driver.stdout.readline().split()
        procs = _session_processes(session_dir)
        assert len(procs) >= 4  # controller, proxy, two replicas
        os.kill(driver.pid, signal.SIGKILL)
        os.kill(int(controller), signal.SIGKILL)
        _wait_all_gone(procs, timeout=30)
    finally:
        driver.kill()
        driver.wait()


CONFIG = """
applications:
- name: pid
  route_prefix: /pid
  import_path: pidapp:app
  deployments:
  - name: Pid
    num_replicas: {replicas}
"""

PID_MODULE = """
import os
from shoal import serve

@serve.deployment
class Pid:
    def __call__(self, request):
        return os.getpid()

app = Pid.bind()
"""


def _http_pids(url: str, n: int) -> set:
    def collect():
        pids = {httpx.get(url, timeout=10).json() for _ in range(60)}
        return pids if len(pids) == n else None

    return wait_for(collect, what=f"{n} replicas answering over HTTP")


def _start_with_pid_app(inst, replicas: int) -> tuple[dict, str]:  # noqa: F811 - the fixture
    """`shoal start`, then `shoal deploy` of the pid app; the instance's record and the app's URL."""
    inst.write("pidapp.py", PID_MODULE)
    inst.write("serve.yaml", CONFIG.format(replicas=replicas))
    inst.cli("start")
    inst.cli("deploy", "serve.yaml")
    return inst.info, inst.http_url() + "/pid"


def test_detached_instance_survives_a_controller_kill(inst):  # noqa: F811 - the fixture
    info, url = _start_with_pid_app(inst, replicas=2)
    before = _http_pids(url, 2)
    supervisor = psutil.Process(info["supervisor_pid"])
    with Load(None, url) as load:
        wait_for(lambda: load.served_since(0) > 20, what="load running")
        killed_at = time.monotonic()
        os.kill(info["pid"], signal.SIGKILL)
        # `shoal status` waits for the restarted controller, then reports the app running.
        status = inst.status()
        assert status["applications"]["pid"]["status"] == "RUNNING", status
        assert inst.info["pid"] != info["pid"] and inst.info["admin_url"] == info["admin_url"]
        wait_for(lambda: load.served_since(killed_at + 1.0) > 20, what="load served after the restart")
    assert load.failures == []
    assert _http_pids(url, 2) == before
    inst.write("serve.yaml", CONFIG.format(replicas=3))
    inst.cli("deploy", "serve.yaml")
    assert before < _http_pids(url, 3)
    procs = _session_processes(info["session_dir"]) + [supervisor]
    inst.cli("shutdown", "-y")
    _wait_all_gone(procs, timeout=30)


def test_control_calls_during_an_outage_fail_clearly_then_recover(inst):  # noqa: F811 - the fixture
    info, url = _start_with_pid_app(inst, replicas=1)
    supervisor = psutil.Process(info["supervisor_pid"])
    supervisor.suspend()  # the restart is held back
    try:
        os.kill(info["pid"], signal.SIGKILL)
        wait_for(lambda: not psutil.pid_exists(info["pid"]) or psutil.Process(info["pid"]).status() == "zombie",
                 what="the controller gone")
        assert httpx.get(url, timeout=10).status_code == 200  # the data plane serves on
        inst.env["SHOAL_CONTROLLER_WAIT_S"] = "1"
        done = inst.cli("status", check=1)
        assert "restarting" in done.stderr and "did not come back within 1 s" in done.stderr, done.stderr
    finally:
        supervisor.resume()
    inst.env["SHOAL_CONTROLLER_WAIT_S"] = "60"
    assert inst.status()["applications"]["pid"]["status"] == "RUNNING"
    inst.cli("shutdown", "-y")
