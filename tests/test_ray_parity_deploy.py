"""Deploying as Ray Serve does (issue 13): the initial health check, serve.run waiting for config
changes, a new code version per serve.run, deployments bound twice, and replica ranks.

The naming and rank bookkeeping are checked directly; everything else on real replica processes.
"""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

from shoal import serve
from shoal.api import build_app_spec
from shoal.common import DeploymentID
from shoal.config import DeploymentConfig, ReplicaRank
from shoal.controller.deployment_state import DeploymentState, _dense
from shoal.controller.specs import DeploymentSpec
from shoal.exceptions import DeployFailedError
from shoal.schema import ServeApplicationSchema, apply_overrides, graph_deployments
from shoal.transport import serialization as ser

from conftest import wait_for


# --- deployments bound twice ------------------------------------------------------------------------

@serve.deployment
class Down:
    def __init__(self, tag):
        self.tag = tag

    def __call__(self):
        return self.tag


@serve.deployment
class Ingress:
    def __init__(self, first, second):
        self.first, self.second = first, second

    async def __call__(self):
        return await self.first.remote(), await self.second.remote()


def _handle_names(spec, name):
    d = next(d for d in spec.deployments if d.name == name)
    args, _ = ser.loads(d.serialized_init_args)
    return [a.deployment_name for a in args]


def test_a_deployment_bound_twice_is_renamed_children_first():
    spec = build_app_spec(Ingress.bind(Down.bind(1), Down.bind(2)), "app", "/")
    assert [d.name for d in spec.deployments] == ["Down", "Down_1", "Ingress"]
    assert spec.ingress == "Ingress"
    assert _handle_names(spec, "Ingress") == ["Down", "Down_1"]
    assert ser.loads(spec.deployments[1].serialized_init_args) == ((2,), {})


def test_one_bound_application_used_twice_is_one_deployment():
    shared = Down.bind(1)
    spec = build_app_spec(Ingress.bind(shared, shared), "app", "/")
    assert [d.name for d in spec.deployments] == ["Down", "Ingress"]
    assert _handle_names(spec, "Ingress") == ["Down", "Down"]


def test_the_ingress_is_renamed_when_a_child_took_its_name():
    @serve.deployment
    class Node:
        def __init__(self, child=None):
            self.child = child

    spec = build_app_spec(Node.bind(Node.bind()), "app", "/")
    assert [d.name for d in spec.deployments] == ["Node", "Node_1"]
    assert spec.ingress == "Node_1" and _handle_names(spec, "Node_1") == ["Node"]


def test_config_overrides_and_shoal_build_use_the_new_names():
    app = Ingress.bind(Down.bind(1), Down.bind(2))
    schema = ServeApplicationSchema.model_validate(
        {"import_path": "mod:app", "deployments": [{"name": "Down_1", "num_replicas": 2}]})
    overridden = {d.name: d for d in graph_deployments(apply_overrides(app, schema))}
    assert sorted(overridden) == ["Down", "Down_1", "Ingress"]
    assert overridden["Down_1"].num_replicas == 2 and overridden["Down"].num_replicas == 1


def test_both_bindings_serve(serve_app):
    h = serve.run(Ingress.bind(Down.bind("a"), Down.bind("b")), name="twice", route_prefix="/twice")
    assert h.remote().result() == ("a", "b")
    assert sorted(serve.status().applications["twice"].deployments) == ["Down", "Down_1", "Ingress"]
    assert serve.get_deployment_handle("Down_1", "twice").remote().result() == "b"


# --- the initial health check -----------------------------------------------------------------------

def test_a_replica_must_pass_one_health_check_to_start(serve_app):
    @serve.deployment(health_check_period_s=60)
    class NeverHealthy:
        def check_health(self):
            raise ValueError("the model did not load")

        def __call__(self):
            return "served"

    with pytest.raises(DeployFailedError) as e:
        serve.run(NeverHealthy.bind(), name="sick", route_prefix="/sick")
    assert "initial health check" in str(e.value) and "the model did not load" in str(e.value)
    app = serve.status().applications["sick"]
    assert app.status == serve.ApplicationStatus.DEPLOY_FAILED
    dep = app.deployments["NeverHealthy"]
    assert dep.status_trigger == serve.DeploymentStatusTrigger.REPLICA_STARTUP_FAILED
    assert serve.ReplicaState.RUNNING not in dep.replica_states


# --- serve.run waits for what it changed ------------------------------------------------------------

def test_serve_run_returns_once_a_scale_up_is_applied(serve_app):
    @serve.deployment(version="1")
    class Scaled:
        def __call__(self):
            return os.getpid()

    serve.run(Scaled.options(num_replicas=1).bind(), name="scaled", route_prefix="/scaled")
    serve.run(Scaled.options(num_replicas=3).bind(), name="scaled", route_prefix="/scaled")
    dep = serve.status().applications["scaled"].deployments["Scaled"]
    assert dep.replica_states == {serve.ReplicaState.RUNNING: 3}
    assert dep.status == serve.DeploymentStatus.HEALTHY


# --- a new code version per serve.run ---------------------------------------------------------------

def test_rerunning_an_unversioned_app_replaces_its_replicas(serve_app, tmp_path):
    unloaded = tmp_path / "unloaded"

    @serve.deployment
    class Model:
        def __call__(self):
            return os.getpid()

        def __del__(self):
            with open(unloaded, "a") as f:
                f.write(f"{os.getpid()}\n")

    first = serve.run(Model.bind(), name="model", route_prefix="/model").remote().result()
    second = serve.run(Model.bind(), name="model", route_prefix="/model").remote().result()
    assert first != second
    assert unloaded.read_text().split() == [str(first)]  # the old replica unloaded before serve.run returned

    # With a version, an unchanged redeploy keeps the replicas.
    kept = serve.run(Model.options(version="7").bind(), name="model", route_prefix="/model").remote().result()
    assert serve.run(Model.options(version="7").bind(), name="model", route_prefix="/model").remote().result() == kept


# --- replica ranks ----------------------------------------------------------------------------------

@serve.deployment(version="1")
class Ranked:
    def __init__(self):
        ctx = serve.get_replica_context()
        self.at_init = (ctx.rank, ctx.world_size)
        self.reconfigured = []

    def reconfigure(self, user_config, rank: ReplicaRank):
        self.reconfigured.append(rank)

    def __call__(self):
        ctx = serve.get_replica_context()
        return os.getpid(), ctx.rank, ctx.world_size, self.at_init, list(self.reconfigured)


def _by_pid(handle, n: int, timeout: float = 30) -> dict:
    """pid -> the latest answer, once exactly n replicas answered a round of calls."""
    def poll():
        seen = {}
        try:
            for _ in range(20 * n):
                r = handle.remote().result(timeout_s=10)
                seen[r[0]] = r
        except Exception:  # noqa: BLE001 - a replica just killed by the test
            return None
        return seen if len(seen) == n else None
    return wait_for(poll, timeout=timeout, what=f"{n} replicas answering")


def _check_dense(answers: dict, n: int) -> dict:
    ranks = {pid: r[1] for pid, r in answers.items()}
    assert sorted(r.rank for r in ranks.values()) == list(range(n))
    assert {(r.node_rank, r.local_rank == r.rank) for r in ranks.values()} == {(0, True)}  # one node
    assert {r[2] for r in answers.values()} == {n}
    for r in answers.values():
        assert r[4] and r[4][-1] == r[1]  # `reconfigure(user_config, rank=...)` saw each rank it got
    return ranks


def test_ranks_are_dense_and_follow_scaling(serve_app):
    h = serve.run(Ranked.options(num_replicas=3).bind(), name="ranks", route_prefix="/ranks")
    answers = _by_pid(h, 3)
    first = _check_dense(answers, 3)
    for r in answers.values():
        assert r[3] == (r[1], 3)  # the constructor already knew its rank and the world size
        assert r[4] == [r[1]]  # reconfigure ran once at start, with the rank (no user_config needed)

    h = serve.run(Ranked.options(num_replicas=5).bind(), name="ranks", route_prefix="/ranks")
    up = _check_dense(_by_pid(h, 5), 5)
    assert all(up[pid] == rank for pid, rank in first.items())  # old replicas kept their ranks

    h = serve.run(Ranked.options(num_replicas=2).bind(), name="ranks", route_prefix="/ranks")
    down = _check_dense(_by_pid(h, 2), 2)

    # A lost replica's replacement takes its rank; the other keeps its own.
    victim = next(pid for pid, r in down.items() if r.rank == 0)
    survivor = next(pid for pid in down if pid != victim)
    os.kill(victim, signal.SIGKILL)
    after = _check_dense(wait_for(lambda: (lambda a: a if victim not in a else None)(_by_pid(h, 2)), timeout=60,
                                  what="the lost replica's replacement"), 2)
    assert after[survivor] == down[survivor]


def test_local_testing_mode_gives_rank_zero():
    @serve.deployment
    class Local:
        def reconfigure(self, user_config, rank):
            self.rank = rank

        def __call__(self):
            return self.rank

    try:
        h = serve.run(Local.bind(), _local_testing_mode=True)
        assert h.remote().result() == ReplicaRank(rank=0, node_rank=0, local_rank=0)
    finally:
        serve.shutdown()


# --- rank bookkeeping on several nodes (the controller's own structures, no processes) --------------

class _FakeController:
    def __init__(self):
        self.replicas_by_uid = {}
        self.runtime = SimpleNamespace(release=lambda reservation: None)

    def publish(self, ds):
        pass

    def status_changed(self):
        pass


def _state(n: int) -> DeploymentState:
    spec = DeploymentSpec("D", b"", b"", DeploymentConfig(num_replicas=n))
    return DeploymentState(_FakeController(), DeploymentID("D", "app"), spec)


def _place(ds: DeploymentState, node: str):
    rec = ds._new_replica()
    rec.rank_node = node
    rec.rank = ds._assign_rank(node)
    return rec


def test_ranks_count_nodes_and_replicas_per_node():
    ds = _state(4)
    a0, b0, a1, b1 = (_place(ds, n) for n in "abab")
    assert [(r.rank.rank, r.rank.node_rank, r.rank.local_rank) for r in (a0, b0, a1, b1)] == \
        [(0, 0, 0), (1, 1, 0), (2, 0, 1), (3, 1, 1)]
    # A new replica takes the lowest free rank, and the lowest free local rank of its node.
    ds._forget(b0)
    b2 = _place(ds, "b")
    assert (b2.rank.rank, b2.rank.node_rank, b2.rank.local_rank) == (1, 1, 0)
    # Node a empties: once steady, the ranks are made dense again with as few moves as possible.
    ds._forget(a0)
    ds._forget(a1)
    ds.target = 2
    ds._compact_ranks()
    # b2 kept rank 1 (in range) and b1 moved from 3 to the free 0; node b became node 0; both kept
    # their local ranks on b (already 0 and 1).
    assert (b1.rank.rank, b1.rank.node_rank, b1.rank.local_rank) == (0, 0, 1)
    assert (b2.rank.rank, b2.rank.node_rank, b2.rank.local_rank) == (1, 0, 0)
    c = _place(ds, "c")
    assert (c.rank.rank, c.rank.node_rank, c.rank.local_rank) == (2, 1, 0)


def test_dense_keeps_ranks_in_range():
    assert _dense({"x": 0, "y": 4, "z": 2}) == {"x": 0, "z": 2, "y": 1}
    assert _dense({"x": 3, "y": 5}) == {"x": 0, "y": 1}
    assert _dense({}) == {}
