"""One side of the autoscaling benchmark: cold start from zero and reaction to a load step.

Run with `--framework shoal` (this venv) or `--framework ray` (.venv-ray). Prints one `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from handle_workload import _load, _shutdown  # noqa: E402


class Noop:
    async def __call__(self, x: Any = None) -> Any:
        return x


class Hold:
    """Holds each request for a while, so concurrent requests pile up on the replicas."""

    async def __call__(self, seconds: float = 1.0) -> str:
        await asyncio.sleep(seconds)
        return "done"


def _running(serve: Any, app: str) -> int:
    st = serve.status().applications[app]
    total = 0
    for dep in st.deployments.values():
        for state, n in dep.replica_states.items():
            if str(getattr(state, "value", state)) == "RUNNING":
                total += n
    return total


def cold_starts(serve: Any, rounds: int) -> list[float]:
    """Seconds from the first request at zero replicas to its answer."""
    cfg = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0, "upscale_delay_s": 0,
           "downscale_delay_s": 0.5, "downscale_to_zero_delay_s": 0.5, "look_back_period_s": 0.5,
           "metrics_interval_s": 0.1}
    handle = serve.run(serve.deployment(autoscaling_config=cfg)(Noop).bind(), name="cold", route_prefix="/cold")
    times = []
    for _ in range(rounds):
        deadline = time.monotonic() + 120
        while _running(serve, "cold") > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        t0 = time.perf_counter()
        handle.remote(1).result()
        times.append(time.perf_counter() - t0)
    serve.delete("cold")
    return times


def load_step(serve: Any) -> float:
    """Seconds from 4 concurrent long requests arriving at 1 replica to 4 replicas running."""
    cfg = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 1, "upscale_delay_s": 0,
           "downscale_delay_s": 600, "look_back_period_s": 1, "metrics_interval_s": 0.1}
    handle = serve.run(serve.deployment(autoscaling_config=cfg, max_ongoing_requests=8)(Hold).bind(),
                       name="step", route_prefix="/step")

    async def step() -> float:
        t0 = time.perf_counter()
        calls = [handle.remote(30.0) for _ in range(4)]
        while _running(serve, "step") < 4:
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
        for c in calls:
            c.cancel()
        return elapsed

    out = asyncio.run(step())
    serve.delete("step")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--framework", choices=("shoal", "ray"), required=True)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    serve, version = _load(a.framework)
    try:
        serve.start(http_options={"port": 18321})
        colds = cold_starts(serve, a.rounds)
        step = load_step(serve)
    finally:
        _shutdown(a.framework, serve)
    print("RESULT " + json.dumps({"framework": a.framework, "version": version, "cold_start_s": colds,
                                  "cold_start_median_s": statistics.median(colds), "load_step_s": step}),
          flush=True)


if __name__ == "__main__":
    main()
