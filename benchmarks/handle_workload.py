"""One side of the handle benchmark: the same code against shoal or Ray Serve.

Run once per framework, each in its own process (and, for Ray, its own venv),
so that neither framework's imports or background threads colour the other's
numbers. The only difference between the two runs is where `serve` comes from.
Prints one `RESULT {json}` line on stdout for handle_bench.py to parse; all
else (framework logs included) is for humans.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from typing import Any


def _load(framework: str) -> tuple[Any, str]:
    """Import `serve` (and start Ray when needed); return it and the version."""
    if framework == "ray":
        import ray
        from ray import serve

        # A fixed 2 CPUs keeps Ray's worker pool the same size on any machine;
        # no dashboard and no log forwarding, so neither competes for the CPUs.
        # address="local": always a fresh local instance, never a Ray cluster that
        # something else on this machine happens to be running.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        return serve, ray.__version__
    import shoal
    from shoal import serve

    return serve, getattr(shoal, "__version__", "unknown")


def _shutdown(framework: str, serve: Any) -> None:
    serve.shutdown()
    if framework == "ray":
        import ray

        ray.shutdown()


class Echo:
    """A no-op model, so the numbers are the framework's own overhead."""

    async def __call__(self, x: Any = None) -> Any:
        return x


def _deploy(serve: Any, max_ongoing_requests: int) -> Any:
    """Deploy Echo the way user code would; return its handle."""
    deployment = serve.deployment(max_ongoing_requests=max_ongoing_requests)(Echo)
    return serve.run(deployment.bind())


def _sequential(handle: Any, seconds: float, warmup: int) -> dict[str, float]:
    """Round trips from sync code, one at a time: the per-call latency floor."""
    for _ in range(warmup):
        handle.remote(1).result()
    lat_ns: list[int] = []
    start = time.perf_counter_ns()
    deadline = start + int(seconds * 1e9)
    now = start
    while now < deadline:
        t0 = now
        handle.remote(1).result()
        now = time.perf_counter_ns()
        lat_ns.append(now - t0)
    elapsed = (now - start) / 1e9
    ms = sorted(x / 1e6 for x in lat_ns)
    return {
        "seq_calls": len(ms),
        "seq_calls_per_s": len(ms) / elapsed,
        "seq_mean_ms": statistics.fmean(ms),
        "seq_p50_ms": ms[len(ms) // 2],
        "seq_p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
    }


async def _sequential_async(handle: Any, seconds: float, warmup: int) -> dict[str, float]:
    """Round trips from asyncio code, one at a time (`await handle.remote()`)."""
    for _ in range(warmup):
        await handle.remote(1)
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        await handle.remote(1)
        n += 1
    elapsed = time.perf_counter() - start
    return {"aseq_calls_per_s": n / elapsed, "aseq_mean_ms": elapsed / n * 1e3}


async def _in_flight(handle: Any, n: int, seconds: float, min_rounds: int) -> dict[str, Any]:
    """Throughput with `n` calls outstanding at once from asyncio code.

    Runs for `seconds` but at least `min_rounds` bursts, since a slow framework
    (Ray takes seconds per 2,000-call burst on 2 cores) would otherwise give a
    one-sample number. The headline rate is the fastest burst's, as timeit
    takes the best run: Ray's router sometimes stalls for 30-90 s on a burst
    here (replicas reject past max_ongoing_requests, the router backs off),
    and a stalled burst must not inflate shoal's ratio. All burst times, the
    median rate and the overall rate are kept in the result too.
    """

    async def burst() -> float:
        t0 = time.perf_counter()
        out = await asyncio.gather(*[handle.remote(i) for i in range(n)])
        if out[-1] != n - 1:
            raise RuntimeError(f"echo returned {out[-1]!r}, expected {n - 1}")
        return time.perf_counter() - t0

    await burst()  # warm-up: the first burst pays for connection/queue set-up
    times: list[float] = []
    while len(times) < min_rounds or sum(times) < seconds:
        times.append(await burst())
    return {
        "inflight": n,
        "inflight_round_s": [round(t, 4) for t in times],
        "inflight_calls_per_s": n / min(times),
        "inflight_calls_per_s_median": n / statistics.median(times),
        "inflight_calls_per_s_overall": n * len(times) / sum(times),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=("shoal", "ray"), required=True)
    p.add_argument("--max-ongoing-requests", type=int, default=100)
    p.add_argument("--seq-seconds", type=float, default=4.0)
    p.add_argument("--seq-warmup", type=int, default=200)
    p.add_argument("--inflight", type=int, default=2000)
    p.add_argument("--inflight-seconds", type=float, default=5.0)
    p.add_argument("--inflight-min-rounds", type=int, default=3)
    a = p.parse_args()

    t0 = time.perf_counter()
    serve, version = _load(a.framework)
    handle = _deploy(serve, a.max_ongoing_requests)
    startup_s = time.perf_counter() - t0
    print(
        f"{a.framework} {version}: max_ongoing_requests={a.max_ongoing_requests}, "
        f"started in {startup_s:.1f}s",
        file=sys.stderr,
    )
    try:
        result: dict[str, Any] = {
            "framework": a.framework,
            "version": version,
            "max_ongoing_requests": a.max_ongoing_requests,
            "startup_s": startup_s,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        }
        result.update(_sequential(handle, a.seq_seconds, a.seq_warmup))

        async def from_asyncio() -> dict[str, Any]:
            out = await _sequential_async(handle, a.seq_seconds, a.seq_warmup)
            out.update(await _in_flight(handle, a.inflight, a.inflight_seconds, a.inflight_min_rounds))
            return out

        result.update(asyncio.run(from_asyncio()))
    finally:
        _shutdown(a.framework, serve)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
