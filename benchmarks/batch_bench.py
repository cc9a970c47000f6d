"""Measure what `@serve.batch` gains on a small PyTorch model, and what the default router costs.

Part 1, dynamic batching. One small MLP (768 -> 3072 -> 3072 -> 16, float32, fixed seed), served
three ways, each by one replica whose torch uses one intra-op thread (OMP_NUM_THREADS and
MKL_NUM_THREADS set to 1 before torch loads, and `torch.set_num_threads(1)`), so the figures are
about batching, not about intra-op threads:

- unbatched, `async def __call__(self, x)` running the model on one input directly on the replica's
  event loop. This is what a user porting a Ray Serve model would typically write, and it runs the
  model where the batched handler runs it: one forward pass at a time, on the loop. The batching
  target is measured against this one.
- unbatched, plain `def __call__(self, x)`: shoal runs sync methods in a thread pool, so up to 32
  forward passes run at once on both cores. Shown for reference: it is the other thing a user might
  write, and what threads alone buy on this machine.
- batched, `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)` on `async def __call__`.

Each request carries 768 float32 values as 3 KiB of bytes and returns 16 floats, so pickling costs
little next to the model. 32 client tasks on one asyncio loop in this process call the handle in a
closed loop for a fixed time; the three sides take turns over several rounds (so drift in this
VM's speed hits all of them alike); requests/s is the median round, p50/p99 come from all rounds'
latencies together. All deployments use max_ongoing_requests=64, so no side queues in the caller.
Target: batched >= 4x the async unbatched side.

Part 2, routing overhead. A no-op deployment (`async def __call__(self): return None`) with
num_replicas=1 and with num_replicas=8, max_ongoing_requests=256 on both (so no request ever waits
in the caller's queue), driven by 256 client tasks from one asyncio loop for a fixed time, turn
about. The figure is the caller process's CPU time (time.process_time: every thread of this process)
per completed request, which is what routing, framing and pickling cost the caller; the difference
between 8 and 1 replicas is the cost of spreading requests over 8 replicas: the power-of-two choice
(which 1 replica skips) and 8 connections instead of 1 (fewer frames per read and write syscall).
Replicas reserve no CPU by default, so 8 fit on 2 cores; they compete with the caller for the
CPUs, which shows in throughput and latency more than in the caller's CPU time per request. Finally
`PowerOfTwoChoicesRequestRouter.choose_replica` is timed in-process over 1 and 8 fake candidates,
to isolate the policy itself.

Numbers from one machine are noisy (other load, CPU frequency, 2 small cores in CI): rerun before
reading much into a near-miss. The whole run takes about 1.5 minutes with the defaults. A
measurement whose calls stop coming back is reported as a stall, with the caller's router state,
after STALL_S seconds, instead of hanging the run.

torch is installed (CPU build 2.13.0, into this interpreter's venv) by ensure_torch.sh next to
this file, which this script runs when `import torch` fails; pass --no-install to be told instead.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import time
import timeit
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from shoal import serve

ROOT = Path(__file__).resolve().parent.parent
ENSURE_TORCH = ROOT / "benchmarks" / "ensure_torch.sh"

D_IN, HIDDEN, D_OUT = 768, 3072, 16
CLIENTS = 32
MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.005
MODEL_MAX_ONGOING = 64
BATCH_TARGET = 4.0

ROUTE_INFLIGHT = 256
ROUTE_REPLICAS = (1, 8)

# A measurement whose calls have not all come back this long after its deadline is reported as a
# stall (with the caller's router state) instead of hanging the run.
STALL_S = 30.0


# --- the model deployments (they travel to the replicas by value) --------------------------------------

class _MLP:
    """The model and its forward pass over a list of requests; shared by the three deployments."""

    def __init__(self) -> None:
        import warnings

        warnings.filterwarnings("ignore", message=".*NumPy.*")  # the CPU wheel warns when numpy is absent
        # torch.set_num_threads(1) alone is not enough: with OpenMP it binds the calling thread (this
        # constructor runs in a worker thread) and threads made later, not the replica's event-loop
        # thread, where the async handlers run. The variables, set before torch loads, cover every thread.
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)
        torch.manual_seed(0)
        self.torch = torch
        self.model = torch.nn.Sequential(
            torch.nn.Linear(D_IN, HIDDEN), torch.nn.GELU(),
            torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.GELU(),
            torch.nn.Linear(HIDDEN, D_OUT),
        ).eval()
        self.sizes: list[int] = []

    def forward(self, xs: list[bytes]) -> list[list[float]]:
        torch = self.torch
        if torch.get_num_threads() != 1:  # belt and braces, per calling thread (see __init__)
            torch.set_num_threads(1)
        x = torch.frombuffer(bytearray(b"".join(xs)), dtype=torch.float32).view(len(xs), D_IN)
        with torch.inference_mode():
            return self.model(x).tolist()

    async def model_ms(self) -> dict[int, float]:
        """The forward pass alone, on the replica's loop thread, at batch 1 and 32 (best of 3 runs).

        Key 0 holds the intra-op thread count that thread saw.
        """
        out: dict[int, float] = {0: self.torch.get_num_threads()}
        for b, n in ((1, 100), (MAX_BATCH_SIZE, 20)):
            xs = [array("f", [0.5] * D_IN).tobytes()] * b
            for _ in range(5):
                self.forward(xs)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(n):
                    self.forward(xs)
                best = min(best, (time.perf_counter() - t0) / n)
            out[b] = best * 1e3
        return out

    def batch_sizes(self) -> list[int]:
        return self.sizes


class UnbatchedAsync(_MLP):
    async def __call__(self, x: bytes) -> list[float]:
        return self.forward([x])[0]


class UnbatchedSync(_MLP):
    def __call__(self, x: bytes) -> list[float]:
        return self.forward([x])[0]


class Batched(_MLP):
    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def __call__(self, xs: list[bytes]) -> list[list[float]]:
        self.sizes.append(len(xs))
        return self.forward(xs)


class Noop:
    async def __call__(self) -> None:
        return None


# --- the client side: one function for every deployment ------------------------------------------------

@dataclass
class Round:
    calls: int
    wall_s: float
    cpu_s: float
    latencies_s: list[float]


async def closed_loop(handle: Any, args: tuple, clients: int, seconds: float) -> Round:
    """`clients` tasks each await one call at a time until `seconds` have passed."""
    lat: list[float] = []
    waiting = [0]  # calls sent and not answered yet
    loop_deadline = time.perf_counter() + seconds

    async def client() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= loop_deadline:
                return
            waiting[0] += 1
            await handle.remote(*args)
            waiting[0] -= 1
            lat.append(time.perf_counter() - t0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    everyone = asyncio.gather(*[client() for _ in range(clients)])
    done, _ = await asyncio.wait({everyone}, timeout=seconds + STALL_S)
    if not done:
        state = router_state(handle)  # before cancelling, which changes it
        everyone.add_done_callback(lambda f: None if f.cancelled() else f.exception())  # retrieved: no warning
        everyone.cancel()
        raise Stalled(f"{waiting[0]} calls still unanswered {STALL_S:g} s after the deadline "
                      f"({len(lat):,} completed); caller's router: {state}")
    everyone.result()  # a call's error ends the run
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Round(len(lat), wall, cpu, lat)


class Stalled(RuntimeError):
    pass


def router_state(handle: Any) -> str:
    """What this loop's router holds (private attributes: for the stall report only)."""
    try:
        router = handle._routers.get(asyncio.get_running_loop())
        if router is None:
            return "none made for this loop"
        replicas = ", ".join(
            f"{e.replica_id.unique_id} inflight={e.inflight} blocked={e.blocked} "
            f"open={e.conn is not None and not e.conn.closed}" for e in router.ready)
        return (f"queued={len(router.pending)} warming={router._warming} background={router._background} "
                f"known={sorted(router.entries)} ready=[{replicas}]")
    except Exception as e:  # noqa: BLE001 - diagnostics must not hide the stall
        return f"unavailable ({e!r})"


@dataclass
class SideResult:
    name: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return statistics.median(r.calls / r.wall_s for r in self.rounds)

    @property
    def cpu_us(self) -> float:
        return statistics.median(r.cpu_s / r.calls * 1e6 for r in self.rounds)

    def pct_ms(self, q: float) -> float:
        lat = sorted(x for r in self.rounds for x in r.latencies_s)
        return lat[min(len(lat) - 1, int(len(lat) * q))] * 1e3


def take_turns(sides: dict[str, tuple[Any, tuple]], clients: int, seconds: float, rounds: int,
               warmup_s: float) -> dict[str, SideResult]:
    """Run every side for `seconds`, in turn, `rounds` times; each side warms up before each turn."""
    results = {name: SideResult(name) for name in sides}

    async def main() -> None:
        for r in range(rounds):
            for name, (handle, args) in sides.items():
                # Longer the first time: connections, the replica's first batches, allocator warm-up.
                await closed_loop(handle, args, clients, warmup_s if r == 0 else warmup_s / 3)
                res = await closed_loop(handle, args, clients, seconds)
                results[name].rounds.append(res)
                print(f"  round {r + 1}/{rounds} {name}: {res.calls / res.wall_s:,.0f} req/s, "
                      f"caller CPU {res.cpu_s / res.calls * 1e6:.1f} µs/request",
                      file=sys.stderr, flush=True)

    asyncio.run(main())
    return results


# --- part 1 -------------------------------------------------------------------------------------------

def have_torch(install: bool) -> bool:
    ok = [sys.executable, "-c", "import torch"]
    if subprocess.run(ok, capture_output=True).returncode == 0:
        return True
    if not install:
        print(f"NOTE: torch is not installed; run `bash {ENSURE_TORCH.relative_to(ROOT)}` "
              "(or drop --no-install) for the batching part.", file=sys.stderr)
        return False
    print("torch is missing; running ensure_torch.sh ...", file=sys.stderr, flush=True)
    env = dict(os.environ, PYTHON=sys.executable)
    if subprocess.run(["bash", str(ENSURE_TORCH)], env=env).returncode != 0:
        print("NOTE: could not install torch; skipping the batching part.", file=sys.stderr)
        return False
    return subprocess.run(ok, capture_output=True).returncode == 0


def batching_part(seconds: float, rounds: int) -> tuple[str, bool]:
    print("deploying the model three ways ...", file=sys.stderr, flush=True)
    handles = {}
    for name, cls in (("unbatched async", UnbatchedAsync), ("unbatched sync", UnbatchedSync),
                      ("batched", Batched)):
        app = name.replace(" ", "_")
        dep = serve.deployment(name=cls.__name__, max_ongoing_requests=MODEL_MAX_ONGOING)(cls)
        handles[name] = serve.run(dep.bind(), name=app, route_prefix=None)
    model_ms = handles["unbatched async"].model_ms.remote().result()
    model_ms = {int(k): v for k, v in model_ms.items()}
    payload = (array("f", [0.5] * D_IN).tobytes(),)
    results = take_turns({n: (h, payload) for n, h in handles.items()}, CLIENTS, seconds, rounds, warmup_s=1.5)
    sizes = handles["batched"].batch_sizes.remote().result()
    for name in handles:
        serve.delete(name.replace(" ", "_"))

    base = results["unbatched async"].per_s
    gain = results["batched"].per_s / base
    ideal = MAX_BATCH_SIZE * model_ms[1] / model_ms[MAX_BATCH_SIZE]
    labels = {
        "unbatched async": "unbatched, `async def __call__` (model on the loop)",
        "unbatched sync": "unbatched, `def __call__` (thread pool; reference only)",
        "batched": f"batched, `@serve.batch({MAX_BATCH_SIZE}, {BATCH_WAIT_TIMEOUT_S})`",
    }
    rows = [
        f"| deployment ({CLIENTS} concurrent clients, 1 replica) | requests/s | p50 ms | p99 ms | vs async unbatched |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, res in results.items():
        rows.append(f"| {labels[name]} | {res.per_s:,.0f} | {res.pct_ms(0.5):.1f} | {res.pct_ms(0.99):.1f} "
                    f"| {res.per_s / base:.2f}x |")
    passed = gain >= BATCH_TARGET
    mean_batch = statistics.fmean(sizes) if sizes else 0.0
    notes = (
        f"model alone in the replica ({model_ms[0]:.0f} intra-op thread): batch 1 {model_ms[1]:.2f} ms, batch {MAX_BATCH_SIZE} "
        f"{model_ms[MAX_BATCH_SIZE]:.2f} ms (ideal batching gain {ideal:.1f}x); "
        f"mean batch size formed {mean_batch:.1f} over {len(sizes):,} batches\n"
        f"batching gain {gain:.2f}x (target >= {BATCH_TARGET:g}x): {'PASS' if passed else 'FAIL'}"
    )
    return "\n".join(rows) + "\n\n" + notes, passed


# --- part 2 -------------------------------------------------------------------------------------------

class _View:
    """A fake candidate with the ReplicaView interface (as in tests/test_routing.py)."""

    def __init__(self, rid: int, queue_len: int = 0, cap: int = ROUTE_INFLIGHT):
        self.replica_id, self.queue_len, self.max_ongoing_requests = rid, queue_len, cap
        self.multiplexed_model_ids: frozenset = frozenset()
        self.node_id = "local"

    def has_capacity(self) -> bool:
        return self.queue_len < self.max_ongoing_requests


class _Req:
    multiplexed_model_id = ""
    queued_for_s = 0.0


def choose_replica_us(n_candidates: int) -> float:
    """Best-of-5 time of one `choose_replica` call over n uneven, unsaturated fake candidates."""
    from shoal.router.pow2 import PowerOfTwoChoicesRequestRouter

    router = PowerOfTwoChoicesRequestRouter()
    views = [_View(i, queue_len=(i * 7) % 32) for i in range(n_candidates)]
    req = _Req()
    number = 100_000
    best = min(timeit.repeat(lambda: router.choose_replica(views, req), number=number, repeat=5))
    return best / number * 1e6


def routing_part(seconds: float, rounds: int) -> str:
    print("deploying the no-op deployment with 1 and 8 replicas ...", file=sys.stderr, flush=True)
    sides = {}
    for n in ROUTE_REPLICAS:
        dep = serve.deployment(name="Noop", num_replicas=n, max_ongoing_requests=ROUTE_INFLIGHT)(Noop)
        sides[f"{n} replica{'s' if n > 1 else ''}"] = (serve.run(dep.bind(), name=f"noop{n}", route_prefix=None), ())
    results = take_turns(sides, ROUTE_INFLIGHT, seconds, rounds, warmup_s=1.0)
    for n in ROUTE_REPLICAS:
        serve.delete(f"noop{n}")
    policy = {n: choose_replica_us(n) for n in ROUTE_REPLICAS}

    rows = [
        f"| no-op deployment, {ROUTE_INFLIGHT} in flight from one asyncio loop | caller CPU µs/request "
        "| requests/s | p50 ms | p99 ms | `choose_replica` µs (in-process) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (name, res), n in zip(results.items(), ROUTE_REPLICAS):
        rows.append(f"| {name} | {res.cpu_us:.1f} | {res.per_s:,.0f} | {res.pct_ms(0.5):.1f} "
                    f"| {res.pct_ms(0.99):.1f} | {policy[n]:.2f} |")
    one, eight = (results[k] for k in sides)
    notes = (
        f"routing overhead of 8 replicas vs 1: {eight.cpu_us - one.cpu_us:+.1f} µs of caller CPU per request "
        f"({eight.cpu_us / one.cpu_us - 1:+.0%}); the power-of-two policy itself "
        f"{policy[8]:.2f} µs per choice over 8 candidates ({policy[1]:.2f} µs over 1)"
    )
    return "\n".join(rows) + "\n\n" + notes


# --- main ---------------------------------------------------------------------------------------------

def machine() -> str:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        torch_v = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_v = "not installed"
    import shoal

    return (f"{os.cpu_count()} CPUs{f' ({cpu})' if cpu else ''}, Python {platform.python_version()}, "
            f"torch {torch_v}, shoal {getattr(shoal, '__version__', 'unknown')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per side per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the sides take turns; median kept")
    p.add_argument("--only", choices=("batching", "routing"), help="run one part")
    p.add_argument("--no-install", action="store_true", help="do not run ensure_torch.sh when torch is missing")
    p.add_argument("--strict", action="store_true", help="exit 1 unless the batching target passes")
    a = p.parse_args()

    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    torch_ok = a.only == "routing" or have_torch(not a.no_install)
    serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy process competing for the CPUs
    batching: Optional[str] = None
    passed: Optional[bool] = None
    routing: Optional[str] = None
    try:
        if a.only != "routing" and torch_ok:
            try:
                batching, passed = batching_part(a.seconds, max(1, a.rounds))
            except Stalled as e:
                batching = f"n/a: a measurement stalled: {e}"
                print(f"STALL in the batching part: {e}", file=sys.stderr, flush=True)
        if a.only != "batching":
            try:
                routing = routing_part(a.seconds, max(1, a.rounds))
            except Stalled as e:
                routing = f"n/a: a measurement stalled: {e}"
                print(f"STALL in the routing part: {e}", file=sys.stderr, flush=True)
    finally:
        serve.shutdown()

    print(f"\n{machine()}; {a.seconds:g} s per side per round, {a.rounds} rounds taken in turn, "
          f"median round shown; run took {time.perf_counter() - t0:.0f} s; 1-min load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other work on the machine skews the figures)",
          flush=True)
    if a.only != "routing":
        print("\n## dynamic batching\n\n" + (batching or "n/a: torch is not installed (see ensure_torch.sh)"))
    if routing:
        print("\n## routing overhead of the default router\n\n" + routing, flush=True)
    if a.strict and not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
