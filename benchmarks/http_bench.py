"""Compare shoal's HTTP path with Ray Serve's under wrk, with bare uvicorn as the ceiling.

http_workload.py runs once per framework, each in its own subprocess: shoal under
.venv, Ray under .venv-ray (made by setup_ray_venv.sh, so Ray never enters
shoal's venv). http_bare_uvicorn.py runs the same wrk load against a bare uvicorn
no-op app: no framework, no replica hop, so its column is the most a serving
framework could reach here. Sides run one after another, never at once, all on
the same port, alternating over `--rounds` rounds; each side keeps its best value
per metric (see handle_bench.best_of for why), while error counts are summed over
all rounds. A side that fails is shown as n/a with its error.

wrk (1 thread) takes one of the machine's cores for itself, so on 2 cores the
server side has the other one: compare ratios more than absolute values, and
check that nothing else was running (`uptime`) before reading much into a number.

Extra arguments go to every side unchanged, e.g.
    python benchmarks/http_bench.py --rounds 3 --seconds 10 --port 18124
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handle_bench import Side, _fmt, _tail, ray_python, run_command

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
WORKLOAD = BENCH / "http_workload.py"
BARE = BENCH / "http_bare_uvicorn.py"
ENSURE_WRK = BENCH / "ensure_wrk.sh"
SHOAL_PY = ROOT / ".venv" / "bin" / "python"
SIDE_TIMEOUT_S = 240  # Ray takes ~35 s; a side that never answers gives up after --ready-timeout


@dataclass(frozen=True)
class HttpMetric:
    key: str
    label: str  # "{c}": the main run's connection count
    higher_is_better: bool
    limit: float | None = None  # absolute target for shoal, where the issue sets one
    summed: bool = False  # error counts: every round's errors matter, not the best round's


METRICS = (
    HttpMetric("conc_rps", "requests/s at {c} connections", True, 15_000.0),
    HttpMetric("conc_p50_ms", "p50 latency at {c} connections (ms)", False),
    HttpMetric("conc_p90_ms", "p90 latency at {c} connections (ms)", False),
    HttpMetric("conc_p99_ms", "p99 latency at {c} connections (ms)", False),
    HttpMetric("conc_errors", "non-2xx + socket errors at {c} connections (all rounds)", False, summed=True),
    HttpMetric("single_rps", "requests/s at 1 connection", True),
    HttpMetric("single_p50_ms", "p50 latency at 1 connection (ms)", False, 0.35),
    HttpMetric("single_p90_ms", "p90 latency at 1 connection (ms)", False),
    HttpMetric("single_p99_ms", "p99 latency at 1 connection (ms)", False),
    HttpMetric("single_errors", "non-2xx + socket errors at 1 connection (all rounds)", False, summed=True),
    HttpMetric("startup_s", "start-up to first HTTP 200 (s)", False),
)


def ensure_wrk() -> None:
    """Install wrk when missing (ensure_wrk.sh), or stop: without it no side can run."""
    if shutil.which("wrk"):
        return
    print("wrk not found; running ensure_wrk.sh...", file=sys.stderr, flush=True)
    done = subprocess.run(["bash", str(ENSURE_WRK)], capture_output=True, text=True)
    if done.returncode != 0 or not shutil.which("wrk"):
        sys.exit(f"could not install wrk:\n{_tail(done.stderr + done.stdout)}")


def run_side(name: str, cmd: list[str]) -> Side:
    """Run one side in a fresh process group and parse its RESULT line."""
    return run_command(name, cmd, SIDE_TIMEOUT_S)


def _error_detail(r: dict[str, Any]) -> dict[str, int]:
    """One round's errors by kind, both wrk runs together."""
    detail = {"non2xx": r["conc_non2xx"] + r["single_non2xx"]}
    for kind, n in r["conc_socket_errors"].items():
        detail[kind] = n + r["single_socket_errors"][kind]
    return detail


def best_of(sides: list[Side]) -> Side:
    """Merge rounds of one side: best value per metric, errors summed.

    handle_bench.best_of does the same for the handle metrics; it is tied to those.
    """
    ok = [s for s in sides if s.result]
    if not ok:
        return sides[-1]
    results: list[dict[str, Any]] = [s.result for s in ok if s.result]
    merged = dict(results[0])
    for m in METRICS:
        values = [r[m.key] for r in results if r.get(m.key) is not None]
        if values:
            merged[m.key] = sum(values) if m.summed else max(values) if m.higher_is_better else min(values)
    merged["conc_rps_rounds"] = [r["conc_rps"] for r in results]
    merged["errors_by_round"] = [_error_detail(r) for r in results]
    merged["rounds"] = len(ok)
    merged["failed_rounds"] = len(sides) - len(ok)
    return Side(ok[0].name, result=merged)


def _verdict(m: HttpMetric, value: float | None) -> tuple[str, bool]:
    """The target cell for shoal's value, and whether it passes (no target: passes)."""
    if m.limit is None:
        return "", True
    op, unit = (">=", "/s") if m.higher_is_better else ("<=", " ms")
    met = value is not None and (value >= m.limit if m.higher_is_better else value <= m.limit)
    word = "n/a" if value is None else "PASS" if met else "FAIL"
    return f"{op} {m.limit:,g}{unit}: {word}", met


def table(shoal: Side, ray: Side, bare: Side) -> tuple[str, bool]:
    """Markdown table of all sides and the shoal/Ray ratio; second value: all targets met."""
    ray_label = f"Ray Serve {ray.result['version']}" if ray.result else "Ray Serve"
    bare_label = f"bare {bare.result['version']} (ceiling)" if bare.result else "bare uvicorn (ceiling)"
    conns = next((s.result["connections"] for s in (shoal, ray, bare) if s.result), "?")
    rows = [
        f"| metric | shoal | {ray_label} | ratio | target | {bare_label} |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    all_pass = True
    for m in METRICS:
        s, r, b = (side.result.get(m.key) if side.result else None for side in (shoal, ray, bare))
        ratio = None
        if s and r and not m.summed:
            ratio = s / r if m.higher_is_better else r / s
        verdict, met = _verdict(m, s)
        all_pass &= met
        ratio_s = f"{ratio:.1f}x" if ratio is not None else "n/a"
        rows.append(
            f"| {m.label.format(c=conns)} | {_fmt(s)} | {_fmt(r)} | {ratio_s} | {verdict} | {_fmt(b)} |"
        )
    return "\n".join(rows), all_pass


def _notes(sides: tuple[Side, ...]) -> None:
    """Print what the table cannot show: failures, errors, failed rounds, spread."""
    for side in sides:
        if side.error:
            print(f"\n{side.name} side n/a: {side.error}", flush=True)
            continue
        r = side.result or {}
        if r.get("failed_rounds"):
            print(f"\nnote: {side.name} failed {r['failed_rounds']} of its rounds", flush=True)
        if r.get("conc_errors") or r.get("single_errors"):
            print(f"\nnote: {side.name} had errors; by round: {r['errors_by_round']}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per side; best kept")
    p.add_argument("--max-ongoing-requests", type=int, default=1000, help="for shoal and Ray alike")
    p.add_argument("--skip-ray", action="store_true", help="leave out the Ray Serve side")
    p.add_argument("--skip-bare", action="store_true", help="leave out the bare uvicorn side")
    p.add_argument("--strict", action="store_true", help="exit 1 unless every target passes")
    args, extra = p.parse_known_args()

    ensure_wrk()
    shoal_py = SHOAL_PY if SHOAL_PY.exists() else Path(sys.executable)
    ray_py = None if args.skip_ray else ray_python()
    framework_extra = ["--max-ongoing-requests", str(args.max_ongoing_requests), *extra]
    runs: dict[str, list[Side]] = {"shoal": [], "ray": [], "bare-uvicorn": []}
    for _ in range(max(1, args.rounds)):
        # shoal first, Ray last in each round, so no process Ray leaves behind can slow the others.
        runs["shoal"].append(
            run_side("shoal", [str(shoal_py), str(WORKLOAD), "--framework", "shoal", *framework_extra])
        )
        if not args.skip_bare:
            runs["bare-uvicorn"].append(run_side("bare-uvicorn", [str(shoal_py), str(BARE), *extra]))
        if ray_py:
            runs["ray"].append(
                run_side("ray", [str(ray_py), str(WORKLOAD), "--framework", "ray", *framework_extra])
            )

    def merged(name: str, why_missing: str) -> Side:
        return best_of(runs[name]) if runs[name] else Side(name, error=why_missing)

    shoal = merged("shoal", "no run")
    ray = merged("ray", "skipped (--skip-ray)" if args.skip_ray else "no .venv-ray")
    bare = merged("bare-uvicorn", "skipped (--skip-bare)")
    sides = (shoal, ray, bare)
    _notes(sides)

    any_result = next((s.result for s in sides if s.result), None)
    if any_result:
        spread = ", ".join(
            f"{s.name} {[round(x) for x in s.result['conc_rps_rounds']]}" for s in sides if s.result
        )
        print(
            f"\nmax_ongoing_requests={args.max_ongoing_requests} (shoal and Ray), {any_result['wrk']} "
            f"with 1 thread, {any_result['cpus']} CPUs, best of {args.rounds} alternating rounds "
            f"(requests/s per round: {spread}); "
            "throughput ratio = shoal/Ray, latency ratio = Ray/shoal"
        )
    text, all_pass = table(shoal, ray, bare)
    print("\n" + text, flush=True)
    if args.strict and not all_pass:
        sys.exit(1)


if __name__ == "__main__":
    main()
