"""The controller actor dies (kill -9) and Ray restarts it: no client sees it fail.

On the three-node cluster (`ray_cluster.py`), under a steady handle load and a steady HTTP load, the
controller actor's process is SIGKILLed. Ray restarts the actor; the new one reloads its checkpoint
from Ray's internal KV store and adopts the replica and proxy actors, which kept serving meanwhile and
reconnect. No request fails, the replicas are the same processes, the status is RUNNING again, and a
later deploy applies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from shoal import serve
from shoal.api import get_http_url

from conftest import wait_for
from ray_cluster import ray_cluster_fixture

pytestmark = pytest.mark.slow
ray_cluster = ray_cluster_fixture()

# How long each load phase lasts: before the kill, and after the controller is back.
LOAD_S = 1.5
# A bound on every loop here, so a hang fails the test instead of stalling it.
BOUND_S = 120.0


@pytest.fixture(scope="module")
def serve_instance(ray_cluster):
    serve.start(runtime="ray", http_options={"port": 0})
    yield


# A `version`: re-running with only option changes applies them in place (unversioned, every
# `serve.run` is new code and replaces the replicas, as in Ray).
@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0.1}, version="1")
class Pid:
    def __init__(self):
        self.tag = "v1"

    def reconfigure(self, config: dict):
        self.tag = config.get("tag", "v1")

    def __call__(self, *args):
        return {"pid": os.getpid(), "replica": serve.get_replica_context().replica_id.unique_id, "tag": self.tag}


@serve.deployment(num_replicas=3, ray_actor_options={"num_cpus": 0.1})
class PidV2:  # deployed under the name "Pid": new code, so a rolling update to new replicas
    def __call__(self, *args):
        return {"pid": os.getpid(), "replica": serve.get_replica_context().replica_id.unique_id, "tag": "code-v2"}


def _controller():
    import ray

    from shoal.runtime.ray import CONTROLLER_NAME, NAMESPACE

    actor = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    return actor, ray.get(actor.info.remote(), timeout=BOUND_S)


def _replicas(handle, n: int) -> dict:
    """replica id -> pid, from calls, until `n` replicas answered."""
    seen: dict = {}

    def all_seen():
        for r in [handle.remote() for _ in range(3 * n)]:
            out = r.result(timeout_s=30)
            seen[out["replica"]] = out["pid"]
        return len(seen) >= n

    wait_for(all_seen, timeout=60, what=f"{n} replicas to answer")
    return seen


class _Load:
    """Calls in a loop on a thread until stopped; records every answer and every failure."""

    def __init__(self, call):
        self.call = call
        self.answers: list = []
        self.failures: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + BOUND_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.answers.append(self.call())
            except Exception as e:  # noqa: BLE001 - the test fails on any
                self.failures.append(repr(e))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=BOUND_S)
        assert not self._thread.is_alive()


def _kill_controller_under_load(handle, url: str, while_down=None, take_port: bool = False) -> tuple[list, list]:
    """SIGKILL the controller actor's process while a handle load and an HTTP load run; returns each
    load's answers once the controller is back (a new process) and both ran on for a while.

    `while_down` runs right after the kill. `take_port`: the port the restarted controller tries
    first is taken (it listens on a new one, which replicas, proxies and the driver must find)."""
    import ray

    from shoal.runtime import ray as shoal_ray
    from shoal.transport.connection import format_tcp_address, parse_tcp_address

    actor, before = _controller()
    held = None
    if take_port:  # bound, not listening: connecting there is refused, binding it fails
        host = parse_tcp_address(before["address"])[0]
        held = socket.socket()
        held.bind((host, 0))
        record = json.loads(shoal_ray._kv_get(shoal_ray.RECORD_KEY))
        record["address"] = format_tcp_address(host, held.getsockname()[1])
        shoal_ray._kv_put(shoal_ray.RECORD_KEY, json.dumps(record).encode())
    try:
        with httpx.Client(timeout=30) as http:
            def get():
                r = http.get(url)
                assert r.status_code == 200, (r.status_code, r.text)
                return r.json()

            loads = [_Load(lambda: handle.remote().result(timeout_s=30)), _Load(get)]
            time.sleep(LOAD_S)
            os.kill(before["pid"], signal.SIGKILL)
            if while_down is not None:
                while_down()
            after = ray.get(actor.info.remote(), timeout=BOUND_S)  # Ray retries it on the restarted actor
            assert after["pid"] != before["pid"] and after["actor_id"] == before["actor_id"]
            if held is not None:
                assert after["address"] not in (before["address"], record["address"])
            else:  # its old port was free: reconnecting went straight there
                assert after["address"] == before["address"]
            counts = [len(load.answers) for load in loads]
            wait_for(lambda: all(len(load.answers) > c for load, c in zip(loads, counts)), timeout=60,
                     what="calls to go on after the restart")
            time.sleep(LOAD_S)
            for load in loads:
                load.stop()
    finally:
        if held is not None:
            held.close()
    for load in loads:
        assert load.failures == [] and load.answers
    return loads[0].answers, loads[1].answers


def _replica_ids(deployment: str, app: str = "default") -> set:
    """The replicas the controller gives the driver's routers."""
    from shoal import client as client_mod
    from shoal.common import DeploymentID

    targets = client_mod.get_global_client()._targets.get(DeploymentID(deployment, app))
    return {r.replica_id.unique_id for r in targets.replicas} if targets else set()


def _running(n: int) -> bool:
    app = serve.status().applications.get("default")
    if app is None or app.status != "RUNNING":
        return False
    d = app.deployments["Pid"]
    return d.status == "HEALTHY" and d.replica_states == {"RUNNING": n}


def test_controller_killed_under_load_adopts_replicas_and_proxies(serve_app, ray_cluster):
    handle = serve.run(Pid.bind(), route_prefix="/pid")
    replicas = _replicas(handle, 3)
    assert len(set(replicas.values())) == 3
    proxies = serve.status().proxies
    assert len(proxies) == 3

    by_handle, by_http = _kill_controller_under_load(handle, get_http_url() + "/pid")

    # Only the replicas that ran before answered, from the same processes.
    for answer in by_handle + by_http:
        assert replicas.get(answer["replica"]) == answer["pid"]
    # The restarted controller adopted them (and the proxies): same replicas, same pids, RUNNING.
    wait_for(lambda: _running(3), timeout=60, what="the app RUNNING with its three replicas")
    assert _replicas(handle, 3) == replicas
    assert serve.status().proxies == proxies  # same proxies (node:index), each HEALTHY again

    # A later deploy applies: a config change reaches the adopted replicas in place...
    handle = serve.run(Pid.options(user_config={"tag": "v2"}).bind(), route_prefix="/pid")
    wait_for(lambda: {handle.remote().result()["tag"] for _ in range(6)} == {"v2"}, what="the new user_config")
    assert _replicas(handle, 3) == replicas
    # ...and new code rolls out to new replicas, which the restarted controller starts.
    handle = serve.run(PidV2.options(name="Pid").bind(), route_prefix="/pid")
    answers = [handle.remote().result() for _ in range(9)]
    assert {a["tag"] for a in answers} == {"code-v2"}
    assert not {a["pid"] for a in answers} & set(replicas.values())
    r = httpx.get(get_http_url() + "/pid", timeout=30)
    assert r.status_code == 200 and r.json()["tag"] == "code-v2"
    wait_for(lambda: _running(3), timeout=60, what="the updated app RUNNING")


def test_controller_restarts_twice_on_a_new_port_with_a_cli_call_meanwhile(serve_app, ray_cluster, tmp_path):
    """A second restart adopts what the first one adopted, an app deployed after a restart (in a
    placement group) survives the next one, a restarted controller that must take a new port is
    found there, a CLI command during the outage waits for it, and adopted replicas that die later
    are still noticed and replaced."""
    handle = serve.run(Pid.options(num_replicas=2).bind(), route_prefix="/pid")
    replicas = _replicas(handle, 2)
    _kill_controller_under_load(handle, get_http_url() + "/pid")
    wait_for(lambda: _running(2), timeout=60, what="the app RUNNING with its two replicas")
    other = serve.run(Pid.options(name="Other", num_replicas=1, ray_actor_options={"num_cpus": 0},
                                  placement_group_bundles=[{"CPU": 0.1}]).bind(),
                      name="other", route_prefix="/other")
    other_replicas = _replicas(other, 1)

    cli = {}

    def status_by_cli():
        cli["out"] = subprocess.run(
            [sys.executable, "-m", "shoal", "status", "-o", "json", "--runtime", "ray",
             "--address", ray_cluster.cluster.address], capture_output=True, text=True, timeout=BOUND_S,
            env={k: v for k, v in os.environ.items() if k != "SHOAL_RUNTIME"})

    _kill_controller_under_load(handle, get_http_url() + "/pid", while_down=status_by_cli, take_port=True)
    out = cli["out"]
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["applications"]["default"]["status"] in ("RUNNING", "DEPLOYING")
    wait_for(lambda: _running(2), timeout=60, what="the app RUNNING with its two replicas")
    assert _replicas(handle, 2) == replicas
    assert serve.status().applications["other"].status == "RUNNING"
    assert _replicas(other, 1) == other_replicas
    assert len(serve.status().proxies) == 3 and set(serve.status().proxies.values()) == {"HEALTHY"}

    # The restarted controller still notices an adopted replica's death (its actor's `wait` call).
    dead = next(iter(replicas))
    os.kill(replicas[dead], signal.SIGKILL)
    wait_for(lambda: dead not in _replica_ids("Pid") and len(_replica_ids("Pid")) == 2, timeout=60,
             what="the dead replica replaced")
    wait_for(lambda: _running(2), timeout=60, what="the app RUNNING again")

    # A replica that dies while the controller is down is replaced by the restarted one; the other is adopted.
    replicas = {uid: pid for uid, pid in _replicas(handle, 2).items() if uid in _replica_ids("Pid")}
    dead, alive = sorted(replicas)
    _, info = _controller()
    os.kill(info["pid"], signal.SIGKILL)
    os.kill(replicas[dead], signal.SIGKILL)
    wait_for(lambda: dead not in _replica_ids("Pid") and alive in _replica_ids("Pid")
             and len(_replica_ids("Pid")) == 2 and _running(2), timeout=60, what="the dead replica replaced")
    assert _replicas(handle, 2)[alive] == replicas[alive]


# Last: it shuts the module's instance down.
def test_shutdown_after_a_restart_leaves_nothing_behind(serve_app):
    import psutil

    from shoal.runtime import ray as shoal_ray

    handle = serve.run(Pid.options(num_replicas=2).bind(), route_prefix="/pid")
    replicas = _replicas(handle, 2)
    _kill_controller_under_load(handle, get_http_url() + "/pid")
    _, info = _controller()
    serve.shutdown()
    assert shoal_ray._kv_get(shoal_ray.RECORD_KEY) is None and shoal_ray._kv_get(shoal_ray.CHECKPOINT_KEY) is None
    wait_for(lambda: not any(psutil.pid_exists(p) for p in [*replicas.values(), info["pid"]]),
             what="the replica and controller processes to exit")
    # A new start is a new instance (new secret, nothing recovered), and serves.
    handle = serve.run(Pid.options(num_replicas=1).bind(), route_prefix="/pid")
    assert handle.remote().result()["replica"] not in replicas


def test_controller_gone_for_good_ends_its_replicas(serve_instance):
    """Killed with no restart, the controller is not coming back: its replicas give up and exit, so
    none is left behind (and the driver says shoal is not running)."""
    import psutil
    import ray

    handle = serve.run(Pid.options(num_replicas=2).bind(), route_prefix="/pid")
    replicas = _replicas(handle, 2)
    actor, _ = _controller()
    ray.kill(actor, no_restart=True)
    wait_for(lambda: not any(psutil.pid_exists(p) for p in replicas.values()), timeout=60,
             what="the replicas to exit")
    with pytest.raises(serve.RayServeException, match="not running"):
        serve.status()
    serve.shutdown()
