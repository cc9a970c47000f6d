"""Autoscaling policies: functions from an `AutoscalingContext` to `(replicas, policy_state)`.

`default_autoscaling_policy(ctx)` follows Ray Serve's queue-length policy with two changes that fix
its known weaknesses: delays are measured in wall-clock seconds (not control-loop ticks), and a
rising load is judged on the newest sample, not only on the look-back average, so upscaling reacts
in `upscale_delay_s` rather than after the average catches up. From zero replicas, any waiting
request scales up at once.

Custom policies are Ray Serve's: a function (or a class, instantiated once with `policy_kwargs`,
then called) named in `autoscaling_config={"policy": {"policy_function": "my_module:my_policy"}}`
or, for a whole application, in a config file's `autoscaling_policy`. As in Ray, what a custom
policy returns then goes through the deployment's `upscaling_factor` / `downscaling_factor`, its
`upscale_delay_s` / `downscale_delay_s` / `downscale_to_zero_delay_s`, and its replica bounds
(`apply_autoscaling_config`). An application-level policy gets `{DeploymentID: AutoscalingContext}`
and returns `({DeploymentID: replicas}, {DeploymentID: policy_state})`.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Callable, Dict, Optional, Tuple

from shoal.common import DeploymentID
from shoal.config import AutoscalingConfig, AutoscalingContext, TimeSeries, TimeStampedValue  # noqa: F401


# --- the default policy -------------------------------------------------------------------------

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


replica_queue_length_autoscaling_policy = default_autoscaling_policy


# --- what Ray applies to a custom policy's answer -----------------------------------------------

_DELAY_EPS_S = 1e-6


def _apply_factors(desired: float, running: int, cfg: AutoscalingConfig) -> int:
    """Move from `running` toward `desired` by the up- or downscaling factor."""
    if running == 0:
        return math.ceil(desired)
    delta = desired - running
    factor = cfg.get_upscaling_factor() if delta > 0 else cfg.get_downscaling_factor()
    scaled = math.ceil(running + factor * delta)
    if math.ceil(desired) < running and scaled == running:
        scaled -= 1  # a factor below 1 must not keep a smaller count from ever being reached
    return scaled


def _apply_delays(desired: int, target: int, cfg: AutoscalingConfig, delay: dict, now: float) -> int:
    """Change the target only once the wish to go the same way has lasted the delay (wall clock).
    `delay` is this deployment's own bookkeeping ({"dir": +1/-1, "since": t}), updated in place."""
    if desired > target:
        if delay.get("dir") != 1:
            delay.update(dir=1, since=now)
        if now - delay["since"] + _DELAY_EPS_S >= cfg.upscale_delay_s:
            delay.clear()
            return desired
        return target
    if desired < target:
        if delay.get("dir") != -1:
            delay.update(dir=-1, since=now)
        if target == 1:
            wait = cfg.downscale_to_zero_delay_s if cfg.downscale_to_zero_delay_s is not None else cfg.downscale_delay_s
        else:
            wait = cfg.downscale_delay_s
            desired = max(1, desired)  # to zero only by way of one replica
        if now - delay["since"] + _DELAY_EPS_S >= wait:
            delay.clear()
            return desired
        return target
    delay.clear()
    return target


def _cold_start(ctx: AutoscalingContext) -> Optional[int]:
    """No replica running and requests waiting: scale up now, whatever the policy says."""
    if ctx.current_num_replicas == 0 and ctx.total_num_requests > 0:
        return max(math.ceil(ctx.config.get_upscaling_factor()), ctx.target_num_replicas)
    return None


def _finish(desired: Any, ctx: AutoscalingContext, delay: dict) -> int:
    if isinstance(desired, bool) or not isinstance(desired, (int, float)):
        raise TypeError(f"an autoscaling policy must return (number of replicas, policy_state), "
                        f"got {desired!r} ({type(desired).__name__}) as the number of replicas")
    scaled = _apply_factors(desired, ctx.current_num_replicas, ctx.config)
    if ctx.current_num_replicas == 0 and scaled > 0:
        return scaled
    return _apply_delays(max(0, scaled), ctx.target_num_replicas, ctx.config, delay, time.time())


def apply_autoscaling_config(policy: Callable) -> Callable[[AutoscalingContext], Tuple[int, dict]]:
    """Wrap a custom deployment-level policy with the deployment's factors and delays (Ray's
    `_apply_autoscaling_config`). The caller clips the result to the replica bounds."""
    delay: dict = {}

    @functools.wraps(policy)
    def wrapped(ctx: AutoscalingContext) -> Tuple[int, dict]:
        cold = _cold_start(ctx)
        if cold is not None:
            return cold, ctx.policy_state
        out = policy(ctx)
        desired, state = _split(out)
        return _finish(desired, ctx, delay), state

    return wrapped


def apply_app_level_autoscaling_config(policy: Callable) -> Callable[
        [Dict[DeploymentID, AutoscalingContext]], Tuple[Dict[DeploymentID, int], Dict[DeploymentID, dict]]]:
    """The same for an application-level policy, deployment by deployment."""
    delays: Dict[DeploymentID, dict] = {}

    @functools.wraps(policy)
    def wrapped(contexts: Dict[DeploymentID, AutoscalingContext]):
        out = policy(contexts)
        decisions, states = _split(out)
        if not isinstance(decisions, dict):
            raise TypeError("an application-level autoscaling policy must return "
                            "({DeploymentID: replicas}, {DeploymentID: policy_state})")
        states = states or {}
        if not isinstance(states, dict):
            raise TypeError("an application-level autoscaling policy must return its policy_state as "
                            "{DeploymentID: dict}")
        final: Dict[DeploymentID, int] = {}
        for dep_id, value in decisions.items():
            if dep_id not in contexts:
                raise KeyError(f"the application-level autoscaling policy returned a decision for {dep_id!r}, "
                               "which is not an autoscaling deployment of this application")
            ctx = contexts[dep_id]
            cold = _cold_start(ctx)
            final[dep_id] = cold if cold is not None else _finish(value, ctx, delays.setdefault(dep_id, {}))
        for dep_id in list(delays):
            if dep_id not in contexts:
                del delays[dep_id]
        return final, {d: dict(states.get(d) or {}) for d in contexts}

    return wrapped


def _split(out: Any) -> Tuple[Any, Any]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"an autoscaling policy must return a tuple (replicas, policy_state), got {out!r}")
    desired, state = out
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise TypeError(f"an autoscaling policy must return its policy_state as a dict, got {type(state).__name__}")
    return desired, state


def instantiate(fn_or_class: Any, policy_kwargs: Optional[dict] = None) -> Callable:
    """A class-based policy is instantiated once, with `policy_kwargs`, then called like a function."""
    import inspect

    if inspect.isclass(fn_or_class):
        return fn_or_class(**(policy_kwargs or {}))
    if not callable(fn_or_class):
        raise TypeError(f"autoscaling policy {fn_or_class!r} is not callable")
    return fn_or_class


def load_policy(config: AutoscalingConfig) -> Callable[[AutoscalingContext], tuple[int, dict]]:
    """The policy a deployment's config names, ready to call: the default one, or the custom one
    wrapped with the deployment's factors and delays."""
    policy = config.policy
    if policy is None or policy.is_default_policy_function():
        return default_autoscaling_policy
    return apply_autoscaling_config(instantiate(policy.get_policy(), policy.policy_kwargs))
