"""shoal on its Ray runtime against Ray Serve, on the same three-node Ray cluster, under the same wrk load.

One Ray cluster (a head and two worker nodes on this machine, ray.cluster_utils) lives for the
whole run; each side is a driver that joins it (http_workload.py --ray-address), deploys the
no-op HTTP model behind one proxy on the head node, measures with wrk, and shuts its framework
down again. Sides alternate over `--rounds` rounds; each keeps its best value per metric.

Everything runs under .venv-ray's interpreter (made by setup_ray_venv.sh): a cluster's processes
must share one Python and one Ray, and Ray Serve's dependencies stay out of shoal's venv. shoal
reaches those processes through PYTHONPATH (its src/, plus the one dependency .venv-ray lacks,
cloudpickle, taken from shoal's venv), so both sides run on the same Ray and the same uvicorn.

    python benchmarks/ray_runtime_bench.py --rounds 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from handle_bench import Side, _fmt, _tail, ray_python, run_command
from http_bench import best_of, ensure_wrk

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
WORKLOAD = BENCH / "http_workload.py"
SHOAL_PY = ROOT / ".venv" / "bin" / "python"
TARGET_RATIO = 10.0  # issue 8: at least 10x Ray Serve's requests/s at 32 connections
SIDE_TIMEOUT_S = 300

CLUSTER = """
import sys
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
for _ in range(2):
    c.add_node(num_cpus=2)
c.wait_for_nodes()
print(c.address, flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
c.shutdown()
"""

ROWS = (
    ("conc_rps", "requests/s at {c} connections", True),
    ("conc_p50_ms", "p50 latency at {c} connections (ms)", False),
    ("conc_p99_ms", "p99 latency at {c} connections (ms)", False),
    ("conc_errors", "non-2xx + socket errors at {c} connections (all rounds)", None),
    ("single_rps", "requests/s at 1 connection", True),
    ("single_p50_ms", "p50 latency at 1 connection (ms)", False),
    ("startup_s", "start-up to first HTTP 200 on the running cluster (s)", False),
)


def _pythonpath() -> str:
    """src/ and a folder holding only shoal's venv's cloudpickle (Ray vendors its own under another name)."""
    py = SHOAL_PY if SHOAL_PY.exists() else Path(sys.executable)
    where = subprocess.run([str(py), "-c", "import cloudpickle, os; print(os.path.dirname(cloudpickle.__file__))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    shim = Path(tempfile.mkdtemp(prefix="shoal-bench-path-"))
    (shim / "cloudpickle").symlink_to(where)
    return os.pathsep.join([str(ROOT / "src"), str(shim)])


def table(shoal: Side, ray: Side) -> tuple[str, bool]:
    conns = next((s.result["connections"] for s in (shoal, ray) if s.result), "?")
    ray_label = f"Ray Serve {ray.result['version']}" if ray.result else "Ray Serve"
    rows = [f"| metric | shoal (Ray runtime) | {ray_label} | ratio | target |", "| --- | ---: | ---: | ---: | --- |"]
    passed = False
    for key, label, higher in ROWS:
        s, r = (side.result.get(key) if side.result else None for side in (shoal, ray))
        ratio = None if higher is None or not s or not r else (s / r if higher else r / s)
        verdict = ""
        if key == "conc_rps":
            passed = ratio is not None and ratio >= TARGET_RATIO
            verdict = f">= {TARGET_RATIO:g}x Ray Serve: {'n/a' if ratio is None else 'PASS' if passed else 'FAIL'}"
        rows.append(f"| {label.format(c=conns)} | {_fmt(s)} | {_fmt(r)} | "
                    f"{'n/a' if ratio is None else f'{ratio:.1f}x'} | {verdict} |")
    return "\n".join(rows), passed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per side; best kept")
    p.add_argument("--max-ongoing-requests", type=int, default=1000, help="for shoal and Ray alike")
    p.add_argument("--strict", action="store_true", help="exit 1 unless shoal reaches the target ratio")
    args, extra = p.parse_known_args()

    ensure_wrk()
    ray_py = ray_python()
    if ray_py is None:
        sys.exit("no .venv-ray: run benchmarks/setup_ray_venv.sh")
    os.environ["PYTHONPATH"] = _pythonpath()  # inherited by the cluster and by both sides
    # A private Ray temp dir, so no other ray.init() on this machine joins (or trips over) this cluster.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="shoal-ray-", dir="/tmp")
    print("starting a Ray cluster (head + 2 worker nodes)...", file=sys.stderr, flush=True)
    cluster = subprocess.Popen([str(ray_py), "-c", CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, cwd=ROOT, start_new_session=True)
    address = cluster.stdout.readline().strip()  # type: ignore[union-attr]
    if not address:
        sys.exit("the Ray cluster did not start")
    runs: dict[str, list[Side]] = {"shoal": [], "ray": []}
    try:
        for _ in range(max(1, args.rounds)):
            for name in ("shoal", "ray"):
                runs[name].append(run_command(name, [
                    str(ray_py), str(WORKLOAD), "--framework", name, "--ray-address", address,
                    "--max-ongoing-requests", str(args.max_ongoing_requests), *extra], SIDE_TIMEOUT_S))
    finally:
        cluster.stdin.close()  # type: ignore[union-attr]
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.kill()
        shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    shoal, ray = (best_of(runs[n]) for n in ("shoal", "ray"))
    for side in (shoal, ray):
        if side.error:
            print(f"\n{side.name} side n/a: {_tail(side.error)}", flush=True)
    if shoal.result and ray.result:
        print(f"\nsame cluster ({address}: head + 2 worker nodes, 2 CPUs each, on {os.cpu_count()} cores), "
              f"one proxy per side on the head node, max_ongoing_requests={args.max_ongoing_requests}, "
              f"best of {args.rounds} alternating rounds (requests/s per round: shoal "
              f"{[round(x) for x in shoal.result['conc_rps_rounds']]}, Ray "
              f"{[round(x) for x in ray.result['conc_rps_rounds']]})")
    text, passed = table(shoal, ray)
    print("\n" + text, flush=True)
    if args.strict and not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
