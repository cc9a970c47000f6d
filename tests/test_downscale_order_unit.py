"""Which replicas stop first on downscale (controller/downscale.py), as Ray Serve: those on draining
nodes, then those not serving yet, then by node (the emptiest first, the head's last) so the cluster
compacts and empty nodes go idle. The ranking alone, then as the reconcile step uses it (no processes).
"""

from __future__ import annotations

from types import SimpleNamespace

from shoal.common import DeploymentID
from shoal.config import DeploymentConfig
from shoal.controller.deployment_state import DeploymentState
from shoal.controller.downscale import StopCandidate as C
from shoal.controller.downscale import stop_order
from shoal.controller.specs import DeploymentSpec
from shoal.runtime.base import Reservation, ResourceRequest
from shoal.runtime.embedded import EmbeddedRuntime
from shoal.status import ReplicaState


def test_draining_then_not_serving_then_serving():
    order = stop_order([
        C("run", node="a", serving=True, started=1),
        C("starting", node="a", serving=False, started=2),
        C("moving", node="d", serving=True, draining=True, started=3),
        C("unplaced", node="", serving=False, placed=False, started=4),
    ], {"a": 2, "d": 1})
    assert order == ["moving", "unplaced", "starting", "run"]


def test_not_serving_yet_unplaced_then_waiting_for_a_node_then_starting_on_one_newest_first():
    order = stop_order([
        C("on_node_old", node="a", started=1),
        C("on_node_new", node="a", started=5),
        C("waiting", node="", started=2),
        C("unplaced", node="", placed=False, started=3),
    ], {})
    assert order == ["unplaced", "waiting", "on_node_new", "on_node_old"]


def test_serving_replicas_stop_on_the_emptiest_node_first_and_the_heads_last():
    # Head h holds 1, node a 2, node b 1 (of this deployment), node b also 2 of another: 3 in all.
    order = stop_order([
        C("h1", node="h", serving=True, started=0),
        C("a1", node="a", serving=True, started=1),
        C("a2", node="a", serving=True, started=2),
        C("b1", node="b", serving=True, started=3),
    ], {"h": 1, "a": 2, "b": 3}, head_node="h")
    assert order == ["a2", "a1", "b1", "h1"]  # a empties first (newest first there), the head last
    # Scaling 4 -> 1 leaves the head's replica: every other node is left without this deployment.
    assert order[-1] == "h1"


def test_the_head_is_last_even_when_it_is_the_emptiest():
    order = stop_order([C("h", node="h", serving=True), C("w", node="w", serving=True)],
                       {"h": 1, "w": 5}, head_node="h")
    assert order == ["w", "h"]


def test_outdated_serving_replicas_go_before_current_ones():
    order = stop_order([C("new", node="a", serving=True, started=2),
                        C("old", node="b", serving=True, outdated=True, started=1)], {"a": 1, "b": 9})
    assert order == ["old", "new"]


def test_one_machine_no_head_newest_serving_first():
    order = stop_order([C(str(i), node="local", serving=True, started=i) for i in range(4)], {"local": 4})
    assert order == ["3", "2", "1", "0"]


def test_equal_nodes_are_ordered_by_node_so_one_empties_before_the_other():
    order = stop_order([C("a1", node="a", serving=True, started=1), C("b1", node="b", serving=True, started=2),
                        C("a2", node="a", serving=True, started=3), C("b2", node="b", serving=True, started=4)],
                       {"a": 2, "b": 2})
    assert order == ["a2", "a1", "b2", "b1"]


def test_the_embedded_runtime_has_no_head_node():
    assert EmbeddedRuntime.head_node(object.__new__(EmbeddedRuntime)) is None


# --- as the reconcile step uses it ------------------------------------------------------------------

class _FakeController:
    def __init__(self, head=None, draining=frozenset()):
        self.replicas_by_uid = {}
        self.runtime = SimpleNamespace(release=lambda reservation: None, head_node=lambda: head,
                                       draining_nodes=lambda: draining)

    def publish(self, ds):
        pass

    def status_changed(self):
        pass

    def wake(self):
        pass


def _state(controller, name: str, n: int) -> DeploymentState:
    spec = DeploymentSpec(name, b"", b"", DeploymentConfig(num_replicas=n))
    return DeploymentState(controller, DeploymentID(name, "app"), spec)


def _running(ds: DeploymentState, node: str, started: float):
    rec = ds._new_replica()
    rec.placed = True
    rec.reservation = Reservation(ResourceRequest(num_cpus=1), node_id=node)
    rec.state = ReplicaState.RUNNING
    rec.start_time = started
    return rec


def test_scaling_down_to_one_keeps_the_replica_on_the_head():
    ctl = _FakeController(head="head")
    ds = _state(ctl, "D", 4)
    on_head = _running(ds, "head", 0)  # the oldest: the head had room first
    w1a, w1b = _running(ds, "w1", 1), _running(ds, "w1", 2)
    w2 = _running(ds, "w2", 3)
    ds.target = 1
    ds._scale(now=0.0)
    assert on_head.state == ReplicaState.RUNNING
    assert all(r.state == ReplicaState.STOPPING for r in (w1a, w1b, w2))


def test_scaling_down_counts_every_deployments_replicas_per_node():
    ctl = _FakeController(head="head")
    ds = _state(ctl, "D", 2)
    other = _state(ctl, "Other", 2)
    _running(other, "w1", 0), _running(other, "w1", 0)  # w1 is busy with another deployment
    on_w1 = _running(ds, "w1", 1)
    on_w2 = _running(ds, "w2", 2)
    ds.target = 1
    ds._scale(now=0.0)
    # w2 has one replica in all, w1 three: w2's goes, so w2 can be removed.
    assert on_w2.state == ReplicaState.STOPPING and on_w1.state == ReplicaState.RUNNING


def test_a_replica_on_a_draining_node_stops_first():
    ctl = _FakeController(head="head", draining=frozenset({"w1"}))
    ds = _state(ctl, "D", 3)
    _running(ds, "head", 0)
    on_draining = _running(ds, "w1", 1)
    starting = [ds._new_replica() for _ in range(2)]  # its replacement and one more, not placed yet
    ds._scale(now=0.0)  # 3 wanted, 1 more for the one moving: 4 active, nothing to stop
    assert on_draining.state == ReplicaState.RUNNING
    ds.target = 2  # one too many now: the one leaving the draining node goes, not one still starting
    ds._scale(now=0.0)
    assert on_draining.state == ReplicaState.STOPPING
    assert all(r.state == ReplicaState.STARTING for r in starting)


def test_the_ray_runtime_names_the_node_with_rays_head_resource(monkeypatch):
    import pytest

    pytest.importorskip("ray")
    from shoal.runtime import ray as shoal_ray

    nodes = [{"NodeID": "w1", "Resources": {"CPU": 2.0}},
             {"NodeID": "h", "Resources": {"CPU": 1.0, shoal_ray.HEAD_RESOURCE: 1.0}}]
    monkeypatch.setattr(shoal_ray, "_alive_nodes", lambda: (nodes, frozenset()))
    rt = shoal_ray.RayRuntime("tcp://127.0.0.1:1", b"s" * 32, "controller-id")
    assert rt.head_node() == "h"
