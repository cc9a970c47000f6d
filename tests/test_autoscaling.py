"""Autoscaling on real processes: up with load, down after the delay, from and to zero, custom policies."""

from __future__ import annotations

import asyncio

import pytest

from shoal import serve
from shoal.autoscaling_policy import AutoscalingContext, default_autoscaling_policy
from shoal.config import AutoscalingConfig

from conftest import wait_for
from test_handles import Signal


def _replicas(app: str, dep: str) -> int:
    d = serve.status().applications[app].deployments[dep]
    return d.replica_states.get(serve.ReplicaState.RUNNING, 0)


def test_load_scales_up_then_down_after_the_delay(serve_app):
    sig = serve.run(Signal.bind(), name="signal", route_prefix=None)

    @serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 1,
                                          "upscale_delay_s": 0, "downscale_delay_s": 1,
                                          "look_back_period_s": 0.5})
    class Scaled:
        def __init__(self, sig):
            self.sig = sig

        async def __call__(self):
            await self.sig.wait.remote()

    h = serve.run(Scaled.bind(sig), name="scaled", route_prefix="/scaled")
    assert _replicas("scaled", "Scaled") == 1
    waiting = [h.remote() for _ in range(3)]  # three in flight, one per replica wanted
    wait_for(lambda: _replicas("scaled", "Scaled") == 3, timeout=60, what="scale up to 3")
    sig.send.remote().result()
    [r.result(timeout_s=30) for r in waiting]
    wait_for(lambda: _replicas("scaled", "Scaled") == 1, timeout=30, what="scale back down to 1")
    assert serve.status().applications["scaled"].status == serve.ApplicationStatus.RUNNING


def test_scale_from_zero_serves_waiting_requests(serve_app):
    @serve.deployment(autoscaling_config={"min_replicas": 0, "max_replicas": 2, "initial_replicas": 0,
                                          "downscale_delay_s": 0.5, "downscale_to_zero_delay_s": 0.5,
                                          "look_back_period_s": 0.5})
    class Lazy:
        def __call__(self, x):
            return x * 2

    h = serve.run(Lazy.bind(), name="lazy", route_prefix="/lazy")
    assert _replicas("lazy", "Lazy") == 0  # RUNNING with no replica at all

    async def burst():
        return await asyncio.gather(*[h.remote(i) for i in range(5)])

    assert asyncio.run(burst()) == [0, 2, 4, 6, 8]  # they waited for the first replica, none lost
    assert h.remote(21).result(timeout_s=30) == 42
    wait_for(lambda: _replicas("lazy", "Lazy") == 0, timeout=30, what="scale back to zero")
    assert h.remote(1).result(timeout_s=30) == 2  # and up again


def test_custom_policy_from_import_path(serve_app):
    # As in Ray, a custom policy's answer waits for the deployment's upscale_delay_s (30 s by default).
    @serve.deployment(autoscaling_config={"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0,
                                          "policy": {"policy_function": "routers_for_tests:two_replicas_policy"}})
    class Custom:
        def __call__(self):
            return "ok"

    serve.run(Custom.bind(), name="custom", route_prefix="/custom")
    wait_for(lambda: _replicas("custom", "Custom") == 2, timeout=60, what="the custom policy's count")


def _ctx(**kw) -> AutoscalingContext:
    cfg = AutoscalingConfig(**kw.pop("config", {}))
    base = dict(deployment_name="d", app_name="a", config=cfg, current_num_replicas=2, target_num_replicas=2,
                total_num_requests=4, current_num_requests=4, total_queued_requests=0,
                capacity_adjusted_min_replicas=cfg.min_replicas, capacity_adjusted_max_replicas=cfg.max_replicas,
                policy_state={}, current_time=100.0)
    base.update(kw)
    return AutoscalingContext(**base)


@pytest.mark.parametrize("load, expected", [(4, 2), (8, 4), (12, 5), (2, 2), (0, 2)])
def test_policy_math_without_delays(load, expected):
    cfg = {"min_replicas": 1, "max_replicas": 5, "target_ongoing_requests": 2, "upscale_delay_s": 0,
           "downscale_delay_s": 0}
    desired, _ = default_autoscaling_policy(_ctx(config=cfg, total_num_requests=load, current_num_requests=load))
    # Down-scaling never jumps below the load's need; 0 or 2 requests on 2 replicas goes down by one step.
    assert desired == (expected if load >= 4 else 1)


def test_policy_delays_are_wall_clock():
    cfg = {"min_replicas": 1, "max_replicas": 5, "upscale_delay_s": 10, "downscale_delay_s": 20}
    d, state = default_autoscaling_policy(_ctx(config=cfg, total_num_requests=20, current_num_requests=20))
    assert d == 2 and "up_since" in state  # wants more, waits
    d, state = default_autoscaling_policy(_ctx(config=cfg, total_num_requests=20, current_num_requests=20,
                                               policy_state=state, current_time=105.0))
    assert d == 2
    d, _ = default_autoscaling_policy(_ctx(config=cfg, total_num_requests=20, current_num_requests=20,
                                           policy_state=state, current_time=110.0))
    assert d == 5
    d, state = default_autoscaling_policy(_ctx(config=cfg, total_num_requests=0, current_num_requests=0))
    assert d == 2 and "down_since" in state
    d, _ = default_autoscaling_policy(_ctx(config=cfg, total_num_requests=0, current_num_requests=0,
                                           policy_state=state, current_time=121.0))
    assert d == 1


def test_cold_start_has_no_delay():
    cfg = {"min_replicas": 0, "max_replicas": 5, "upscale_delay_s": 30}
    d, _ = default_autoscaling_policy(_ctx(config=cfg, current_num_replicas=0, target_num_replicas=0,
                                           total_num_requests=0, current_num_requests=3))
    assert d == 1
