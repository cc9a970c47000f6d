"""The Ray runtime without a cluster: accounting of adopted reservations, the scheduling options a
replica's actor gets, and worker `wait()` calls that a restarted controller's call supersedes."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("ray")

from shoal.runtime import ray as shoal_ray  # noqa: E402
from shoal.runtime.base import Reservation, ResourceRequest  # noqa: E402


def _runtime() -> "shoal_ray.RayRuntime":
    return shoal_ray.RayRuntime("tcp://127.0.0.1:1", b"s" * 32, "controller-id")


def test_adopted_reservations_count_until_released():
    rt = _runtime()
    request = ResourceRequest(num_cpus=0.5, resources=(("w1", 0.1),), group="app#D")
    a, b = Reservation(request, node_id="n1"), Reservation(request, node_id="n1")
    rt.adopt_reservation(a)
    rt.adopt_reservation(b)
    assert rt.placement.count("app#D", "n1") == 2
    assert rt.placement.used("n1") == pytest.approx({"CPU": 1.0, "w1": 0.2})
    rt.release(a)
    rt.release(b)
    rt.release(b)  # released once only
    assert rt.placement.count("app#D", "n1") == 0
    assert rt.placement.used("n1") == {}


def test_a_placement_group_reservation_is_not_accounted_per_node():
    rt = _runtime()
    reservation = Reservation(ResourceRequest(num_cpus=1, placement_group_bundles=((("CPU", 1.0),),), group="g"),
                              node_id="")
    rt.adopt_reservation(reservation)
    assert rt.placement.count("g", "") == 0 and rt.placement.used("") == {}
    rt.release(reservation)


class _FakeActor:
    class _Method:
        def remote(self):
            return self

        def future(self):
            import concurrent.futures

            return concurrent.futures.Future()  # never done: the actor "runs"

    wait = _Method()


class _FakeWorkerClass:
    def __init__(self):
        self.options_seen: list[dict] = []

    def options(self, **opts):
        self.options_seen.append(opts)
        return self

    def remote(self, *args):
        return _FakeActor()


def _launch_options(rt, reservation) -> dict:
    from shoal.common import DeploymentID, ReplicaID

    rt.worker = fake = _FakeWorkerClass()
    rt.launch(ReplicaID("r1", DeploymentID("D", "app")), reservation)
    return fake.options_seen[-1]


def test_a_reserved_node_is_a_soft_preference_and_a_waiting_replica_is_launched_for_ray_to_place():
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    rt = _runtime()
    request = ResourceRequest(num_cpus=1, group="app#D")
    opts = _launch_options(rt, Reservation(request, node_id="a" * 56))
    strategy = opts["scheduling_strategy"]
    assert isinstance(strategy, NodeAffinitySchedulingStrategy)
    assert strategy.soft and strategy._spill_on_unavailable and opts["num_cpus"] == 1
    # Waiting for a node: launched all the same (Ray's autoscaler sees a pending actor), spread by Ray.
    opts = _launch_options(rt, Reservation(request, node_id="", waiting="CPU: 1 (every node ... is full)"))
    assert opts["scheduling_strategy"] == "SPREAD" and opts["num_cpus"] == 1
    # A replica without resources always fits: pinned, since Ray ignores a soft preference for it.
    opts = _launch_options(rt, Reservation(ResourceRequest(group="app#D"), node_id="b" * 56))
    assert not opts["scheduling_strategy"].soft


def test_max_replicas_per_node_is_a_resource_ray_enforces():
    rt = _runtime()
    request = ResourceRequest(num_cpus=1, max_replicas_per_node=2, group="app#D")
    opts = _launch_options(rt, Reservation(request, node_id=""))
    assert opts["resources"] == {shoal_ray.IMPLICIT_RESOURCE_PREFIX + "app#D": 0.5}


def test_a_newer_wait_call_supersedes_the_older_one(monkeypatch):
    monkeypatch.setattr(shoal_ray, "_ended", threading.Event())
    monkeypatch.setattr(shoal_ray, "_waits", threading.Condition())
    worker = object.__new__(shoal_ray.ShoalWorker)
    results: list = []

    def call():
        results.append(shoal_ray.ShoalWorker.wait(worker))

    first = threading.Thread(target=call, daemon=True)
    first.start()
    first.join(0.2)
    assert first.is_alive()  # blocks while the actor runs
    second = threading.Thread(target=call, daemon=True)
    second.start()
    first.join(10)
    assert not first.is_alive() and results == ["superseded"]  # the dead controller's call lets go
    exits: list = []
    monkeypatch.setattr(shoal_ray.ray.actor, "exit_actor", lambda: exits.append(1))
    shoal_ray._set_ended()  # shoal's main ended: the newest call ends the actor through Ray
    second.join(10)
    assert not second.is_alive() and exits == [1]
