"""shoal's node choice on a Ray cluster (runtime/ray_placement.py), with node views as Ray reports them."""

from __future__ import annotations

import time

import pytest

from shoal.runtime.base import Reservation, ResourceRequest
from shoal.runtime.ray_placement import NodeView, Placement

ONE_CPU = ResourceRequest(num_cpus=1, group="app#D")


def _node(name: str, cpus: float, available: float | None = None) -> NodeView:
    return NodeView(name, {"CPU": cpus, "memory": 1e9},
                    None if available is None else {"CPU": available, "memory": 1e9})


def test_replicas_spread_over_nodes_with_room():
    p = Placement()
    nodes = [_node("a", 2, 2), _node("b", 2, 2)]
    seen = time.monotonic()
    first, second = p.choose(ONE_CPU, nodes, seen), p.choose(ONE_CPU, nodes, seen)
    assert {first.node_id, second.node_id} == {"a", "b"}
    assert not first.waiting and not second.waiting


def test_a_node_filled_by_other_ray_work_has_no_room_for_shoal():
    p = Placement()
    res = p.choose(ONE_CPU, [_node("a", 4, available=0)], time.monotonic())
    assert res.node_id == "" and res.waiting == "CPU: 1 (every node that could hold it is full)"
    assert p.count("app#D", "") == 1  # held while it waits for a node


def test_reservations_made_since_ray_reported_count_against_its_view():
    p = Placement()
    nodes, seen = [_node("a", 4, available=1)], time.monotonic()
    assert p.choose(ONE_CPU, nodes, seen).node_id == "a"
    assert p.choose(ONE_CPU, nodes, seen).waiting  # Ray's 1 free CPU is taken by the first
    # A newer report counts the first replica in Ray's own numbers: nothing is subtracted twice.
    assert p.choose(ONE_CPU, [_node("a", 4, available=3)], time.monotonic() + 1).node_id == "a"


def test_shoal_reservations_bound_a_stale_ray_view():
    p = Placement()
    seen = time.monotonic()
    nodes = [_node("a", 1, available=1)]
    assert p.choose(ONE_CPU, nodes, seen).node_id == "a"
    # Ray's report is newer than the reservation but does not count it yet (its actor not leased).
    assert p.choose(ONE_CPU, nodes, time.monotonic() + 1).waiting


def test_a_request_no_node_is_big_enough_for_waits_for_a_bigger_one():
    res = Placement().choose(ResourceRequest(num_cpus=8, resources=(("gpu_island", 1.0),), group="g"),
                             [_node("a", 4, 4)], time.monotonic())
    assert res.node_id == "" and res.waiting == "CPU: 8, gpu_island: 1 (no node of the Ray cluster has that much now)"


def test_max_replicas_per_node_waits_for_another_node():
    p = Placement()
    request = ResourceRequest(num_cpus=0.5, max_replicas_per_node=1, group="app#D")
    nodes, seen = [_node("a", 4, 4), _node("b", 4, 4)], time.monotonic()
    assert {p.choose(request, nodes, seen).node_id for _ in range(2)} == {"a", "b"}
    res = p.choose(request, nodes, seen)
    assert res.node_id == "" and "max_replicas_per_node" in res.waiting


def test_placed_moves_the_accounting_to_where_the_replica_runs():
    p = Placement()
    res = p.choose(ONE_CPU, [_node("a", 1, 0)], time.monotonic())
    assert res.waiting
    p.placed(res, "new-node")
    assert res.node_id == "new-node" and res.waiting == ""
    assert p.count("app#D", "new-node") == 1 and p.used("new-node") == pytest.approx({"CPU": 1.0})
    # Ray's report from before the move does not count it: its room is less by this replica.
    assert p.room(_node("new-node", 2, available=2), time.monotonic() - 1)["CPU"] == pytest.approx(1.0)
    p.release(res)
    assert p.count("app#D", "new-node") == 0


def test_a_replica_without_resources_always_gets_a_node():
    p = Placement()
    res = p.choose(ResourceRequest(group="g"), [_node("a", 0, 0)], time.monotonic())
    assert res.node_id == "a" and not res.waiting


def test_reservations_are_accounted_per_object():
    p = Placement()
    a, b = Reservation(ONE_CPU, node_id="a"), Reservation(ONE_CPU, node_id="a")
    p.adopt(a)
    p.adopt(b)
    p.release(a)
    assert p.count("app#D", "a") == 1
