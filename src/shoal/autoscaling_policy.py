"""Autoscaling policies: pure functions from load to a replica count (Ray Serve's default, fixed).

`default_autoscaling_policy(ctx)` follows Ray Serve's queue-length policy with two changes that fix
its known weaknesses: delays are measured in wall-clock seconds (not control-loop ticks), and a
rising load is judged on the newest sample, not only on the look-back average, so upscaling reacts
in `upscale_delay_s` rather than after the average catches up. From zero replicas, any waiting
request scales up at once.

Custom policies take the same `AutoscalingContext` and return `(desired_replicas, policy_state)`;
name one in `autoscaling_config={"policy": {"policy_function": "my_module:my_policy"}}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from shoal.config import AutoscalingConfig


@dataclass
class AutoscalingContext:
    deployment_name: str
    app_name: str
    config: AutoscalingConfig
    current_num_replicas: int        # running replicas
    target_num_replicas: int         # the current target
    total_num_requests: float        # queued + running, aggregated over the look-back window
    current_num_requests: float      # queued + running, newest sample
    total_queued_requests: float
    capacity_adjusted_min_replicas: int
    capacity_adjusted_max_replicas: int
    policy_state: dict = field(default_factory=dict)
    current_time: float = 0.0


def _desired_for_load(running: int, load: float, cfg: AutoscalingConfig) -> int:
    error_ratio = load / (cfg.target_ongoing_requests * running)
    factor = cfg.get_upscaling_factor() if error_ratio >= 1 else cfg.get_downscaling_factor()
    desired = math.ceil(running * (1 + (error_ratio - 1) * factor))
    if math.ceil(running * error_ratio) < running and desired == running:
        desired -= 1  # a small drop in load still lets the count come down
    return desired


def default_autoscaling_policy(ctx: AutoscalingContext) -> tuple[int, dict]:
    cfg = ctx.config
    state = dict(ctx.policy_state)
    lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    current = ctx.target_num_replicas
    if ctx.current_num_replicas == 0:
        # Cold start: no delay, the requests are waiting.
        if max(ctx.total_num_requests, ctx.current_num_requests) > 0:
            return max(math.ceil(1 * cfg.get_upscaling_factor()), current, lo, 1), {}
        return max(current, lo), state
    up = _desired_for_load(ctx.current_num_replicas, max(ctx.total_num_requests, ctx.current_num_requests), cfg)
    down = _desired_for_load(ctx.current_num_replicas, ctx.total_num_requests, cfg)
    desired = up if up > current else down
    desired = max(lo, min(hi, desired))
    now = ctx.current_time
    if desired > current:
        since = state.get("up_since", now)
        state = {"up_since": since}
        if now - since >= cfg.upscale_delay_s:
            return desired, {}
        return current, state
    if desired < current:
        since = state.get("down_since", now)
        state = {"down_since": since}
        to_zero = current == 1 and desired == 0
        delay = cfg.downscale_to_zero_delay_s if to_zero and cfg.downscale_to_zero_delay_s is not None \
            else cfg.downscale_delay_s
        if not to_zero and desired == 0:
            desired = 1  # zero only by way of one replica
        if now - since >= delay:
            return desired, {}
        return current, state
    return current, {}


def load_policy(config: AutoscalingConfig) -> Callable[[AutoscalingContext], tuple[int, dict]]:
    """The policy function a deployment's config names (the default one if none)."""
    spec: Optional[dict[str, Any]] = config.policy
    path = (spec or {}).get("policy_function")
    if not path or path in ("ray.serve.autoscaling_policy:default_autoscaling_policy",
                            "shoal.autoscaling_policy:default_autoscaling_policy"):
        return default_autoscaling_policy
    import importlib

    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    if not callable(fn):
        raise TypeError(f"autoscaling policy_function '{path}' is not callable.")
    return fn
