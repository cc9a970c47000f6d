"""Ray Serve's custom autoscaling and request-router interfaces, written as Ray's documentation writes them.

Autoscaling: `AutoscalingPolicy` (import path, function or class, `policy_kwargs`), the
`AutoscalingContext` fields, custom metrics from `record_autoscaling_stats`, application-level
policies from a config file, and a failing policy (logged once per error, the count kept).
Routing: `shoal.request_router.RequestRouter` with an async `choose_replicas` and the mixins; a
router that raises fails the request with its error instead of hanging it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import sys
import textwrap
import time
from types import SimpleNamespace

import httpx
import pytest

import routers_for_tests
from shoal import serve
from shoal.api import get_http_url
from shoal.autoscaling_policy import apply_app_level_autoscaling_config, apply_autoscaling_config
from shoal.common import DeploymentID, ReplicaID
from shoal.config import AutoscalingConfig, AutoscalingContext, AutoscalingPolicy, RequestRouterConfig
from shoal.controller.autoscaler import DeploymentAutoscaler
from shoal.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestMetadata,
    RequestRouter,
)

from conftest import wait_for
from test_handles import Signal


def _running(app: str, dep: str) -> int:
    d = serve.status().applications[app].deployments[dep]
    return d.replica_states.get(serve.ReplicaState.RUNNING, 0)


# --- autoscaling: unit ----------------------------------------------------------------------------

def test_autoscaling_context_has_rays_fields_and_lazy_values():
    calls = []
    rid = ReplicaID("r1", DeploymentID("d", "a"))
    ctx = AutoscalingContext(
        deployment_id=DeploymentID("d", "a"), deployment_name="d", app_name="a", current_num_replicas=1,
        target_num_replicas=2, running_replicas=[rid], total_num_requests=lambda: calls.append(1) or 7.0,
        total_queued_requests=3.0, aggregated_metrics={"cpu": {rid: 50.0}}, raw_metrics=None,
        capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=5, policy_state={"k": 1},
        last_scale_up_time=None, last_scale_down_time=None, current_time=None, config=AutoscalingConfig())
    assert calls == []  # lazy until read, then read once
    assert ctx.total_num_requests == 7.0 and ctx.total_num_requests == 7.0 and calls == [1]
    assert ctx.total_running_requests == 4.0
    assert ctx.aggregated_metrics["cpu"][rid] == 50.0 and ctx.raw_metrics == {}
    assert ctx.running_replicas == [rid] and ctx.policy_state == {"k": 1}
    assert abs(ctx.current_time - time.time()) < 60


def test_policy_accepts_a_path_a_function_or_a_class():
    assert AutoscalingPolicy().is_default_policy_function()
    p = AutoscalingPolicy(policy_function="routers_for_tests:ScaleTo", policy_kwargs={"replicas": 3})
    ready = p.prepared()
    assert ready.policy_function == "routers_for_tests:ScaleTo" and ready.get_serialized_policy_def()
    cls = ready.get_policy()  # a class: the controller instantiates it once with policy_kwargs
    assert isinstance(cls, type) and cls(**ready.policy_kwargs)(SimpleNamespace(policy_state={})) == (3, {"calls": 1})
    by_object = AutoscalingPolicy(policy_function=routers_for_tests.two_replicas_policy)
    assert by_object.model_dump(mode="json")["policy_function"] == "routers_for_tests.two_replicas_policy"
    fn = by_object.prepared()
    assert fn.policy_function == "routers_for_tests.two_replicas_policy"
    assert pickle.loads(pickle.dumps(ready)).get_serialized_policy_def() == ready.get_serialized_policy_def()
    with pytest.raises(ValueError, match="JSON-serializable"):
        AutoscalingPolicy(policy_function="m:f", policy_kwargs={"x": object()})
    with pytest.raises(ValueError, match="could not be imported"):
        AutoscalingPolicy(policy_function="no_such_module_xyz:f").prepared()


def test_config_files_take_an_application_level_policy():
    from shoal.schema import ConfigError, parse_config

    app = {"import_path": "a:b", "autoscaling_policy": {"policy_function": "m:f", "policy_kwargs": {"x": 1}}}
    schema = parse_config({"applications": [app]}, "c.yaml")
    assert schema.applications[0].autoscaling_policy == {"policy_function": "m:f", "policy_kwargs": {"x": 1}}
    assert not schema.config_warnings  # no longer "not supported, ignored"
    with pytest.raises(ConfigError, match=r"applications\[0\]\.autoscaling_policy\.policy_function"):
        parse_config({"applications": [{"import_path": "a:b", "autoscaling_policy": {"policy_function": "f"}}]})
    assert RequestRouterConfig(request_router_class=routers_for_tests.LowestIdRayRouter).request_router_class \
        == "routers_for_tests:LowestIdRayRouter"  # a class is accepted, as in Ray


def test_policy_module_travels_by_value(tmp_path):
    """The controller gets the policy pickled with its module's code: it need not import the module."""
    (tmp_path / "my_policy_mod_xyz.py").write_text("def f(ctx):\n    return 4, {'from': 'file'}\n")
    sys.path.insert(0, str(tmp_path))
    try:
        ready = AutoscalingPolicy(policy_function="my_policy_mod_xyz:f").prepared()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_policy_mod_xyz", None)
    assert ready.get_policy()(None) == (4, {"from": "file"})


def _ctx(cfg: AutoscalingConfig, **kw) -> AutoscalingContext:
    base = dict(deployment_name="d", app_name="a", current_num_replicas=2, target_num_replicas=2,
                total_num_requests=0.0, capacity_adjusted_min_replicas=cfg.min_replicas,
                capacity_adjusted_max_replicas=cfg.max_replicas, config=cfg)
    base.update(kw)
    return AutoscalingContext(**base)


def test_custom_decisions_get_the_deployments_delays_as_in_ray():
    cfg = AutoscalingConfig(min_replicas=1, max_replicas=10, upscale_delay_s=3600, downscale_delay_s=0)
    policy = apply_autoscaling_config(lambda ctx: (5, {"mine": True}))
    assert policy(_ctx(cfg)) == (2, {"mine": True})  # wants 5, waits for upscale_delay_s
    down = apply_autoscaling_config(lambda ctx: (1.2, {}))
    assert down(_ctx(cfg))[0] == 2  # a float is rounded up: 2, no change
    cold = apply_autoscaling_config(lambda ctx: (0, {}))
    assert cold(_ctx(cfg, current_num_replicas=0, target_num_replicas=0, total_num_requests=3.0))[0] == 1
    now = apply_autoscaling_config(lambda ctx: (4, {}))
    no_delay = AutoscalingConfig(min_replicas=1, max_replicas=10, upscale_delay_s=0)
    assert now(_ctx(no_delay))[0] == 4


def test_app_level_policy_wrapper_keys_by_deployment_id():
    cfg = AutoscalingConfig(min_replicas=1, max_replicas=10, upscale_delay_s=0)
    a, b = DeploymentID("A", "app"), DeploymentID("B", "app")
    policy = apply_app_level_autoscaling_config(
        lambda ctxs: ({d: ctx.current_num_replicas + 1 for d, ctx in ctxs.items() if d.name == "A"},
                      {a: {"seen": True}}))
    decisions, state = policy({a: _ctx(cfg), b: _ctx(cfg)})
    assert decisions == {a: 3} and state == {a: {"seen": True}, b: {}}
    with pytest.raises(KeyError):
        apply_app_level_autoscaling_config(lambda ctxs: ({DeploymentID("C", "app"): 1}, {}))({a: _ctx(cfg)})


def test_a_failing_policy_keeps_the_count_and_logs_each_error_once(caplog):
    state = {"n": 0}

    def broken(ctx):
        state["n"] += 1
        if state["n"] <= 25:
            raise RuntimeError(f"metrics backend unreachable after {state['n'] * 0.1:.1f} s")
        return "three", {}

    cfg = AutoscalingConfig(min_replicas=1, max_replicas=5, upscale_delay_s=0,
                            policy=AutoscalingPolicy(policy_function=broken))
    scaler = DeploymentAutoscaler(DeploymentID("d", "a"), cfg)
    with caplog.at_level(logging.ERROR, logger="shoal.controller"):
        results = [scaler.decide([], 2) for _ in range(30)]  # 30 control-loop ticks
    assert results == [2] * 30  # the count is kept
    # (an earlier test may have lowered the shoal loggers' level in this process: count errors only)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "autoscaling policy" in r.getMessage()]
    assert len(errors) == 2, [r.getMessage() for r in errors]  # the RuntimeError once, the bad return once
    assert "metrics backend unreachable" in errors[0].getMessage() and errors[0].exc_info
    assert "three" in errors[1].getMessage()


# --- autoscaling: real processes --------------------------------------------------------------------

def test_class_policy_with_kwargs_and_a_function_object(serve_app):
    @serve.deployment(autoscaling_config=AutoscalingConfig(
        min_replicas=1, max_replicas=4, upscale_delay_s=0,
        policy=AutoscalingPolicy(policy_function="routers_for_tests:ScaleTo", policy_kwargs={"replicas": 3})))
    class ByClass:
        def __call__(self):
            return "ok"

    def two(ctx):  # a function object defined here: it travels to the controller by value
        return 2, {}

    @serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0,
                                          "policy": {"policy_function": two}})
    class ByFunction:
        def __call__(self):
            return "ok"

    serve.run(ByClass.bind(), name="by_class", route_prefix=None)
    serve.run(ByFunction.bind(), name="by_function", route_prefix=None)
    wait_for(lambda: _running("by_class", "ByClass") == 3, timeout=60, what="the class policy's 3 replicas")
    wait_for(lambda: _running("by_function", "ByFunction") == 2, timeout=60, what="the function's 2 replicas")


def test_custom_metrics_from_record_autoscaling_stats_drive_the_policy(serve_app):
    @serve.deployment(autoscaling_config={
        "min_replicas": 1, "max_replicas": 3, "upscale_delay_s": 0, "downscale_delay_s": 0,
        "metrics_interval_s": 0.1, "look_back_period_s": 1,
        "policy": {"policy_function": "routers_for_tests:by_queue_depth_metric"}})
    class Worker:
        def __init__(self):
            self.depth = 0

        def set_depth(self, depth: int):
            self.depth = depth

        def record_autoscaling_stats(self):
            return {"queue_depth": self.depth, "const": 1}

        def __call__(self):
            return "ok"

    h = serve.run(Worker.bind(), name="metrics", route_prefix=None)
    assert _running("metrics", "Worker") == 1
    h.set_depth.remote(3).result()  # the policy asks for one replica per unit of depth
    wait_for(lambda: _running("metrics", "Worker") == 3, timeout=60, what="scale up on the custom metric")
    for _ in range(20):  # new replicas report 0; the first one keeps 3
        h.set_depth.remote(0).result()
    wait_for(lambda: _running("metrics", "Worker") == 1, timeout=60, what="scale down when it drops")


def test_a_failing_policy_leaves_the_deployment_as_it_is(serve_app):
    @serve.deployment(autoscaling_config={"min_replicas": 1, "initial_replicas": 2, "max_replicas": 4,
                                          "upscale_delay_s": 0, "downscale_delay_s": 0,
                                          "policy": {"policy_function": "routers_for_tests:always_fails"}})
    class Steady:
        def __call__(self):
            return "ok"

    h = serve.run(Steady.bind(), name="steady", route_prefix=None)
    for _ in range(10):  # a second of control-loop ticks, each calling the policy
        assert h.remote().result() == "ok"
        time.sleep(0.1)
    app = serve.status().applications["steady"]
    assert app.status == serve.ApplicationStatus.RUNNING
    assert _running("steady", "Steady") == 2


def test_application_level_policy_from_a_config_file(serve_app, tmp_path):
    """A config file's `autoscaling_policy` decides for all autoscaling deployments of the app."""
    from shoal.builder import build_specs_in_subprocess
    from shoal.client import get_global_client

    (tmp_path / "two_stage.py").write_text(textwrap.dedent("""
        from shoal import serve

        @serve.deployment
        class Stage:
            def __call__(self, x):
                return x

        @serve.deployment
        class Front:
            def __init__(self, stage):
                self.stage = stage

            async def __call__(self, x):
                return await self.stage.remote(x)

        app = Front.bind(Stage.bind())
    """))
    (tmp_path / "app_policy.py").write_text(textwrap.dedent("""
        def coordinated(contexts):
            stage = [d for d in contexts if d.name == "Stage"][0]
            front = [d for d in contexts if d.name == "Front"][0]
            calls = contexts[stage].policy_state.get("calls", 0) + 1
            return {stage: 3, front: 2}, {stage: {"calls": calls}}
    """))
    config = {"applications": [{
        "name": "coord", "route_prefix": None, "import_path": "two_stage:app",
        "autoscaling_policy": {"policy_function": "app_policy:coordinated"},
        "deployments": [
            {"name": "Stage", "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0}},
            {"name": "Front", "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0}},
        ]}]}
    specs = build_specs_in_subprocess(config, app_dir=str(tmp_path))
    assert specs[0].autoscaling_policy is not None
    client = get_global_client()
    client.call_sync("deploy_app", specs[0])
    wait_for(lambda: _running("coord", "Stage") == 3 and _running("coord", "Front") == 2, timeout=60,
             what="the application policy's counts")
    assert serve.get_app_handle("coord").remote(5).result() == 5


# --- request routers: unit ------------------------------------------------------------------------

class _Ranker(MultiplexMixin, LocalityMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [candidate_replicas]


def _fake(uid, node="n1", models=()):
    return SimpleNamespace(replica_id=ReplicaID(uid, DeploymentID("d")), node_id=node, availability_zone=None,
                           multiplexed_model_ids=set(models), max_ongoing_requests=5)


def test_mixins_rank_by_model_and_by_node():
    router = _Ranker(deployment_id=DeploymentID("d"), self_node_id="n1")
    a, b, c = _fake("a", models=("m1",)), _fake("b", node="n2"), _fake("c", node="n2", models=("m1", "m2"))
    router.update_replicas([a, b, c])
    ids = lambda ranks: [[r.replica_id.unique_id for r in rank] for rank in ranks]  # noqa: E731
    assert ids(router.rank_replicas_via_multiplex([a, b, c], "m1")) == [["a", "c"], ["b"], []]
    assert ids(router.rank_replicas_via_multiplex([a, b, c], "new")) == [[], ["b"], ["a", "c"]]
    assert ids(router.rank_replicas_via_locality([a, b, c])) == [["a"], [], ["b", "c"]]
    pr = PendingRequest([], {}, RequestMetadata("r1", multiplexed_model_id="m1"))
    assert router.apply_multiplex_routing(pr) == {a.replica_id, c.replica_id}
    assert {r.replica_id for r in router.select_available_replicas()} == {a.replica_id, b.replica_id, c.replica_id}


# --- request routers: real processes ------------------------------------------------------------------

@serve.deployment(num_replicas=3)
class Pid:
    def __call__(self, *args):
        return os.getpid()


def test_a_ray_style_router_routes_handle_and_http_requests(serve_app):
    routers_for_tests.EVENTS.clear()
    app = Pid.options(request_router_config=RequestRouterConfig(
        request_router_class="routers_for_tests:LowestIdRayRouter", request_router_kwargs={"tag": "t1"})).bind()
    h = serve.run(app)
    pids = [h.remote().result() for _ in range(20)]  # sync callers
    assert len(set(pids)) == 1  # the lowest id always has room: its rank comes first

    async def concurrently():
        return await asyncio.gather(*[h.remote() for _ in range(30)])

    burst = asyncio.run(concurrently())  # more than one replica's max_ongoing_requests at once
    assert len(burst) == 30 and all(isinstance(p, int) for p in burst)
    routed = {e[2] for e in routers_for_tests.EVENTS if e[0] == "routed"}
    assert len(routed) == 50  # on_request_routed for every request (a rejected one is routed again)
    assert {e[1] for e in routers_for_tests.EVENTS} == {"t1"}  # initialize_state got request_router_kwargs
    wait_for(lambda: {e[2] for e in routers_for_tests.EVENTS if e[0] == "completed"} == routed,
             what="on_request_completed for every request")
    url = get_http_url()
    assert {httpx.get(url + "/").json() for _ in range(5)} == {pids[0]}  # the proxy uses it too


def test_a_ray_style_router_queues_when_every_replica_is_full(serve_app):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    @serve.deployment(num_replicas=2, max_ongoing_requests=1, request_router_config={
        "request_router_class": "routers_for_tests:ModelAffinityRayRouter"})
    class Slow:
        def __init__(self, sig):
            self.sig = sig

        async def __call__(self, i):
            await self.sig.wait.remote()
            return i

    h = serve.run(Slow.bind(sig), name="slow", route_prefix=None)

    async def go():
        responses = [h.remote(i) for i in range(6)]  # 2 run, 4 wait in the caller's queue
        cancelled = responses.pop(3)
        await asyncio.sleep(0.3)
        cancelled.cancel()
        await sig.send.remote()
        return await asyncio.wait_for(asyncio.gather(*responses), 60)

    assert asyncio.run(go()) == [0, 1, 2, 4, 5]


def test_multiplexed_requests_stick_with_rays_mixins(serve_app):
    @serve.deployment(num_replicas=2, request_router_config={
        "request_router_class": "routers_for_tests:ModelAffinityRayRouter"})
    class Models:
        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str):
            return model_id

        async def __call__(self):
            await self.get_model()
            return os.getpid()

    h = serve.run(Models.bind())
    first = h.options(multiplexed_model_id="m1").remote().result()
    wait_for(lambda: {h.options(multiplexed_model_id="m1").remote().result() for _ in range(10)} == {first},
             timeout=30, what="model m1 requests to stay on the replica that loaded it")


@pytest.mark.parametrize("router, error", [("routers_for_tests:RaisingRayRouter", ValueError),
                                           ("routers_for_tests:RaisingShoalRouter", LookupError),
                                           ("routers_for_tests:BadKwargsRayRouter", RuntimeError)])
def test_a_router_that_raises_fails_the_request_with_its_error(serve_app, router, error):
    kwargs = {"x": 1} if "BadKwargs" in router else {}  # its initialize_state raises
    h = serve.run(Pid.options(num_replicas=1, request_router_config={
        "request_router_class": router, "request_router_kwargs": kwargs}).bind())
    with pytest.raises(error):
        h.remote().result(timeout_s=30)

    async def many():
        return await asyncio.gather(*[h.remote() for _ in range(5)], return_exceptions=True)

    assert all(isinstance(r, error) for r in asyncio.run(asyncio.wait_for(many(), 30)))
    assert httpx.get(get_http_url() + "/", timeout=30).status_code == 500


def test_a_router_class_that_cannot_be_imported_fails_the_deploy(serve_app):
    app = Pid.options(request_router_config={"request_router_class": "no_such_module_xyz:Router"}).bind()
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        serve.run(app)


def test_a_ray_style_router_moves_on_when_its_replica_dies(serve_app):
    import signal

    h = serve.run(Pid.options(num_replicas=2, request_router_config={
        "request_router_class": "routers_for_tests:LowestIdRayRouter"}).bind())
    first = h.remote().result()
    os.kill(first, signal.SIGKILL)

    def other_replica_answers():
        try:
            return h.remote().result(timeout_s=30) != first
        except serve.ReplicaDiedError:
            return False  # sent before the loss was noticed: fails, never re-sent

    wait_for(other_replica_answers, timeout=60, what="a request served by the surviving replica")
    assert all(h.remote().result(timeout_s=30) != first for _ in range(10))
