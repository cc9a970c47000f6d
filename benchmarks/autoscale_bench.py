"""Autoscaling speed, shoal vs Ray Serve: cold start from zero, and a load step to new replicas.

Target (issue 5): cold start from zero under 1.5 s for a no-op deployment with upscale_delay_s=0
on a 2-core machine (Ray Serve 2.60 took 10.7 s here for the same).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from handle_bench import ray_python  # noqa: E402

WORKLOAD = ROOT / "benchmarks" / "autoscale_workload.py"


def run(python: str, framework: str, rounds: int, timeout_s: float) -> dict | None:
    """One side in its own process group; n/a (None) when it fails or runs out of time."""
    import os
    import signal

    print(f"running {framework} side...", file=sys.stderr, flush=True)
    proc = subprocess.Popen([python, str(WORKLOAD), "--framework", framework, "--rounds", str(rounds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        print(f"{framework} side did not finish within {timeout_s:.0f} s (n/a)", file=sys.stderr)
        return None
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"{framework} side failed:\n{(err + out)[-2000:]}", file=sys.stderr)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="cold starts measured per side")
    p.add_argument("--ray-timeout", type=float, default=420,
                   help="seconds for the Ray side (its scale-down to zero takes minutes)")
    args = p.parse_args()
    shoal = run(sys.executable, "shoal", args.rounds, 300)
    ray_py = None if args.skip_ray else ray_python()
    ray = run(str(ray_py), "ray", 1, args.ray_timeout) if ray_py else None

    def cell(r: dict | None, key: str) -> str:
        return f"{r[key]:.2f}" if r else "n/a"

    print("\n| metric | shoal | Ray Serve | target |")
    print("| --- | ---: | ---: | --- |")
    ok = shoal is not None and shoal["cold_start_median_s"] < 1.5
    print(f"| cold start from zero, median of rounds (s) | {cell(shoal, 'cold_start_median_s')} | "
          f"{cell(ray, 'cold_start_median_s')} | < 1.5 s: {'PASS' if ok else 'FAIL'} |")
    print(f"| load step: 1 -> 4 replicas running (s) | {cell(shoal, 'load_step_s')} | {cell(ray, 'load_step_s')} | |")
    if shoal:
        print(f"\nshoal cold starts (s): {[round(t, 3) for t in shoal['cold_start_s']]}")
    if ray:
        print(f"Ray Serve {ray['version']} cold starts (s): {[round(t, 3) for t in ray['cold_start_s']]}")


if __name__ == "__main__":
    main()
