"""The Ray runtime's bookkeeping for a controller restart, without a cluster: accounting of adopted
reservations, and worker `wait()` calls that a restarted controller's call supersedes."""

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
    assert rt.per_node[("app#D", "n1")] == 2
    assert rt.used["n1"] == pytest.approx({"CPU": 1.0, "w1": 0.2})
    rt.release(a)
    rt.release(b)
    rt.release(b)  # released once only
    assert rt.per_node[("app#D", "n1")] == 0
    assert rt.used["n1"] == pytest.approx({"CPU": 0.0, "w1": 0.0})


def test_a_placement_group_reservation_is_not_accounted_per_node():
    rt = _runtime()
    reservation = Reservation(ResourceRequest(num_cpus=1, placement_group_bundles=((("CPU", 1.0),),), group="g"),
                              node_id="")
    rt.adopt_reservation(reservation)
    assert rt.per_node == {} and rt.used == {}
    rt.release(reservation)
    assert rt.per_node == {}


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
