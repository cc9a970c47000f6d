"""Memory limits, the machine memory monitor and slow-start messages (issue 12, fault tolerance).

The first tests drive `MemoryMonitor` and `status_notes` with fake replicas and fake /proc readings
(no processes); the rest run real controllers and replica processes, each test with its own
controller started under the environment it needs. Memory stays in the hundreds of MB.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from types import SimpleNamespace

import pytest

from shoal import serve
from shoal import client as client_mod
from shoal.api import build_app_spec
from shoal.common import DeploymentID
from shoal.controller import status_notes
from shoal.controller.memory_monitor import MemoryMonitor, MemorySettings, read_meminfo, read_rss
from shoal.exceptions import ReplicaDiedError, ReplicaOutOfMemoryError
from shoal.status import ReplicaState

from conftest import wait_for

MiB = 2**20


# --- the monitor's decisions, with fake replicas -------------------------------------------------

class _Proc:
    def __init__(self, pid: int):
        self.pid = pid
        self.code = None

    def exit_code(self):
        return self.code

    def kill(self):
        self.code = -9


class _Controller:
    def __init__(self):
        self.deployments = {}
        self.spawned = []
        self.done = asyncio.Event()

    def spawn(self, coro):
        self.spawned.append(coro)
        coro.close()  # the abort call needs a replica; here it is enough to know it was made

    def wake(self):
        pass

    def status_changed(self):
        pass


class _Deployment:
    """What the monitor and status notes read of a DeploymentState (hashable, as the real one is)."""

    def __init__(self, controller, name: str, memory: float):
        self.id = DeploymentID(name, "app")
        self.controller = controller
        self.replicas = {}
        self.request = SimpleNamespace(memory=memory)
        self.code_version, self.reconfigure_version = "c1", "r1"
        self.failed = []

    def on_replica_failed(self, rec, error):
        self.failed.append((rec.unique_id, error))


def _fake_deployment(controller, name: str, memory: float, rss: list, state=ReplicaState.RUNNING):
    ds = _Deployment(controller, name, memory)
    for uid, pid in rss:
        ds.replicas[uid] = SimpleNamespace(unique_id=uid, state=state, process=_Proc(pid), conn=None,
                                           reservation=None, start_time=time.time(), placed=True)
    controller.deployments[ds.id] = ds
    return ds


def _monitor(controller, rss: dict, meminfo=(10 * 2**30, 8 * 2**30), **settings):
    return MemoryMonitor(controller, MemorySettings(**settings), rss_reader=lambda pid: rss.get(pid),
                         meminfo_reader=lambda: meminfo)


def test_limit_needs_two_consecutive_samples_above_it(caplog):
    c = _Controller()
    ds = _fake_deployment(c, "D", 200 * MiB, [("r1", 11)])
    rss = {11: 300 * MiB}
    mon = _monitor(c, rss)
    with caplog.at_level(logging.WARNING, logger="shoal.controller"):
        mon.tick()  # one sample above: a spike, tolerated
        assert not c.spawned
        rss[11] = 150 * MiB
        mon.tick()  # back below: the count starts again
        rss[11] = int(312.4 * MiB)
        mon.tick()
        assert not c.spawned
        mon.tick()
    assert len(c.spawned) == 1
    assert "replica r1 of app/D exceeded its memory limit of 200.0 MiB (RSS 312.4 MiB); replacing it" in caplog.text
    assert "exceeded its memory limit of 200.0 MiB (RSS 312.4 MiB)" in status_notes.notes(ds)
    mon.tick()  # being replaced: not replaced twice
    assert len(c.spawned) == 1


def test_limit_switch_off_and_no_limit():
    c = _Controller()
    _fake_deployment(c, "Limited", 100 * MiB, [("r1", 11)])
    _fake_deployment(c, "Unlimited", 0, [("r2", 12)])
    mon = _monitor(c, {11: 500 * MiB, 12: 900 * MiB}, enforce_limits=False)
    for _ in range(5):
        mon.tick()
    assert not c.spawned
    mon = _monitor(c, {11: 50 * MiB, 12: 900 * MiB})  # on: the unlimited replica is never replaced
    for _ in range(5):
        mon.tick()
    assert not c.spawned


def test_starting_replica_over_its_limit_fails_its_start_with_the_reason():
    c = _Controller()
    ds = _fake_deployment(c, "D", 100 * MiB, [("r1", 11)], state=ReplicaState.STARTING)
    mon = _monitor(c, {11: 500 * MiB})
    mon.tick()
    mon.tick()
    assert [uid for uid, _ in ds.failed] == ["r1"]
    assert "exceeded its memory limit of 100.0 MiB (RSS 500.0 MiB)" in ds.failed[0][1]


def test_machine_monitor_replaces_the_largest_replica_one_at_a_time(caplog):
    c = _Controller()
    small = _fake_deployment(c, "Small", 0, [("s1", 11)])
    big = _fake_deployment(c, "Big", 0, [("b1", 12), ("b2", 13)])
    rss = {11: 100 * MiB, 12: 300 * MiB, 13: 700 * MiB}
    meminfo = [10 * 2**30, 2 * 2**30]  # 80% used
    mon = MemoryMonitor(c, MemorySettings(usage_threshold=0.9), rss_reader=lambda pid: rss.get(pid),
                        meminfo_reader=lambda: tuple(meminfo))
    mon.tick()
    assert not c.spawned
    meminfo[1] = int(0.4 * 2**30)  # 96% used
    with caplog.at_level(logging.WARNING, logger="shoal.controller"):
        mon.tick()
    assert len(c.spawned) == 1
    assert "replacing replica b2 of app/Big" in caplog.text and "96.0%" in caplog.text
    assert "low on memory" in status_notes.notes(big) and "RSS 700.0 MiB" in status_notes.notes(big)
    assert status_notes.notes(small) == ""
    mon.tick()  # the replica it replaced has not exited yet: nobody else
    assert len(c.spawned) == 1
    big.replicas["b2"].process.kill()
    del big.replicas["b2"]
    mon.tick()  # still above the threshold: the next largest
    assert len(c.spawned) == 2 and "replacing replica b1" in caplog.text
    assert "(2 replicas of this deployment replaced for memory so far.)" in status_notes.notes(big)
    big.code_version = "c2"  # redeployed with new code: the old reason is gone
    assert status_notes.notes(big) == ""


def test_settings_from_env():
    s = MemorySettings.from_env({})
    assert (s.enforce_limits, s.usage_threshold, s.interval_s) == (True, 0.95, 0.5)
    s = MemorySettings.from_env({"SHOAL_MEMORY_LIMITS": "off", "SHOAL_MEMORY_USAGE_THRESHOLD": "off"})
    assert not s.active
    s = MemorySettings.from_env({"SHOAL_MEMORY_USAGE_THRESHOLD": "0.8", "SHOAL_MEMORY_MONITOR_INTERVAL_S": "2"})
    assert (s.enforce_limits, s.usage_threshold, s.interval_s) == (True, 0.8, 2.0)
    assert MemorySettings.from_env({"SHOAL_MEMORY_USAGE_THRESHOLD": "95"}).usage_threshold == 0.95


def test_proc_readers():
    assert read_rss(os.getpid()) > 10 * MiB
    assert read_rss(2**22 + 12345) is None  # no such process
    total, available = read_meminfo()
    assert 0 < available <= total


def test_slow_start_sentences():
    c = _Controller()
    ds = _fake_deployment(c, "D", 0, [("r1", 11), ("r2", 12), ("r3", 13)], state=ReplicaState.STARTING)
    now = time.time()
    ds.replicas["r1"].start_time = now - 40
    assert status_notes.slow_start_message(ds, now, 30) == (
        "Deployment 'D' in application 'app' has 1 replica that has taken more than 30s to initialize. "
        "This may be caused by a slow __init__ or reconfigure method.")
    ds.replicas["r2"].start_time = now - 31
    ds.replicas["r3"].start_time = now - 31
    ds.replicas["r3"].placed = False
    msg = status_notes.slow_start_message(ds, now, 30)
    assert "has 2 replicas that have taken more than 30s to initialize" in msg
    assert "has 1 replica that has taken more than 30s to be scheduled" in msg
    ds.replicas["r1"].state = ds.replicas["r2"].state = ds.replicas["r3"].state = ReplicaState.RUNNING
    assert status_notes.slow_start_message(ds, now, 30) == ""


# --- real processes ------------------------------------------------------------------------------

@pytest.fixture
def start_shoal(monkeypatch):
    """Start a controller of its own under the given environment (the monitor reads it at start)."""

    def start(**env: str) -> None:
        serve.shutdown()
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        serve.start(http_options={"port": 0})

    yield start
    serve.shutdown()


@serve.deployment(ray_actor_options={"memory": 200 * MiB})
class Hungry:
    def __init__(self):
        self.blobs = []

    def pid(self) -> int:
        return os.getpid()

    async def grow(self, mb: int, hold: bool = False) -> int:
        self.blobs.append(b"x" * (mb * MiB))  # written, so resident
        if hold:
            await asyncio.sleep(3600)
        return os.getpid()

    async def grow_until_stopped(self, step_mb: int, cap_mb: int) -> None:
        for _ in range(cap_mb // step_mb):
            self.blobs.append(b"x" * (step_mb * MiB))
            await asyncio.sleep(0.1)
        await asyncio.sleep(3600)


def _deployment_message(app: str, deployment: str) -> str:
    app_status = serve.status().applications.get(app)
    if app_status is None or deployment not in app_status.deployments:
        return ""
    return app_status.deployments[deployment].message


def test_memory_hungry_replica_is_replaced_with_the_reason_in_status(start_shoal):
    start_shoal(SHOAL_MEMORY_USAGE_THRESHOLD="off")
    h = serve.run(Hungry.bind(), name="hungry", route_prefix=None)
    pid = h.pid.remote().result(timeout_s=60)
    assert h.grow.remote(50).result(timeout_s=60) == pid
    assert h.grow.remote(50).result(timeout_s=60) == pid
    # ~40 MB of interpreter + 100 MB so far; 100 MB more stays above the 200 MiB limit.
    with pytest.raises(ReplicaOutOfMemoryError, match=r"exceeded its memory limit of 200\.0 MiB \(RSS ") as info:
        h.grow.remote(100, hold=True).result(timeout_s=60)
    assert isinstance(info.value, ReplicaDiedError)
    message = wait_for(lambda: _deployment_message("hungry", "Hungry"), timeout=30, what="a status message")
    assert "exceeded its memory limit of 200.0 MiB (RSS " in message
    new_pid = h.pid.remote().result(timeout_s=60)  # waits for the replacement if it is still starting
    assert new_pid != pid
    wait_for(lambda: serve.status().applications["hungry"].deployments["Hungry"].status.value == "HEALTHY",
             timeout=60, what="the replacement to be healthy")
    assert "exceeded its memory limit" in _deployment_message("hungry", "Hungry")  # the reason stays


def test_memory_limit_switch_off_keeps_the_replica(start_shoal):
    start_shoal(SHOAL_MEMORY_LIMITS="off", SHOAL_MEMORY_USAGE_THRESHOLD="off", SHOAL_MEMORY_MONITOR_INTERVAL_S="0.1")
    h = serve.run(Hungry.bind(), name="hungry", route_prefix=None)
    pid = h.pid.remote().result(timeout_s=60)
    assert h.grow.remote(250).result(timeout_s=60) == pid  # well above the 200 MiB limit
    time.sleep(2)  # 20 samples: with enforcement on, it would have been replaced after 2
    assert h.pid.remote().result(timeout_s=60) == pid
    assert _deployment_message("hungry", "Hungry") == ""


@serve.deployment
class Growing(Hungry.func_or_class):  # the same methods, no memory limit
    pass


def test_machine_monitor_replaces_the_largest_replica(start_shoal):
    total, available = read_meminfo()
    # Just above what the machine uses now plus this test's controller, proxy and replica (~40 MB
    # each): the replica growing by 25 MiB steps crosses it after a few steps (the cap leaves room
    # for other processes on the machine to free a few hundred MB meanwhile).
    threshold = (total - available + 300 * MiB) / total
    start_shoal(SHOAL_MEMORY_USAGE_THRESHOLD=f"{threshold:.6f}", SHOAL_MEMORY_LIMITS="off",
                SHOAL_MEMORY_MONITOR_INTERVAL_S="0.2")
    spec = build_app_spec(Growing.bind(), "machine", None)
    client_mod.get_global_client().call_sync("deploy_app", spec)  # no wait: start-up may already cross it
    h = serve.get_deployment_handle("Growing", "machine")
    pid = h.pid.remote().result(timeout_s=60)
    with pytest.raises(ReplicaOutOfMemoryError, match="low on memory"):
        h.grow_until_stopped.remote(25, 700).result(timeout_s=120)
    message = wait_for(lambda: _deployment_message("machine", "Growing"), timeout=30, what="a status message")
    assert "because the machine is low on memory" in message and "it was the largest replica (RSS " in message
    assert h.pid.remote().result(timeout_s=60) != pid


@serve.deployment
class SlowStart:
    def __init__(self):
        time.sleep(3600)

    def __call__(self):
        return "never"


def test_slow_constructor_shows_in_status(start_shoal):
    start_shoal(SHOAL_SLOW_STARTUP_WARNING_S="1", SHOAL_MEMORY_USAGE_THRESHOLD="off")
    spec = build_app_spec(SlowStart.bind(), "slow", None)
    client_mod.get_global_client().call_sync("deploy_app", spec)  # serve.run would wait forever
    message = wait_for(lambda: _deployment_message("slow", "SlowStart"), timeout=30, what="a status message")
    assert message == ("Deployment 'SlowStart' in application 'slow' has 1 replica that has taken more than 1s "
                       "to initialize. This may be caused by a slow __init__ or reconfigure method.")
    status = serve.status().applications["slow"]
    assert status.status.value == "DEPLOYING" and status.deployments["SlowStart"].status.value == "UPDATING"
    assert "taken more than 1s to initialize" in status.message
