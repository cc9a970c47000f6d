"""A/B of shoal's HTTP hot path across source trees: `http_workload.py` (wrk, `conc_rps`) alternated.

Why: single requests/s figures swing with this machine's load; alternating the trees round by round
and comparing per-round ratios to the first tree is what makes a cost budget ("within 10% of base")
checkable. Each side is `NAME=SRC[,ENV=VALUE...]`: SRC goes on PYTHONPATH, the ENV pairs into the
environment (e.g. `off=src,SHOAL_ACCESS_LOG=0`). Example, from the repository root, against a
worktree of an older commit:

    git worktree add --detach /tmp/base 2b5466e
    .venv/bin/python benchmarks/ab_trees.py 4 base=/tmp/base/src now=src off=src,SHOAL_ACCESS_LOG=0
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run_side(src: str, extra_env: dict, port: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(src), **extra_env)
    out = subprocess.run([sys.executable, os.path.join(HERE, "http_workload.py"), "--framework", "shoal",
                          "--port", str(port)], env=env, capture_output=True, text=True, cwd="/tmp", timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return float(json.loads(line[7:])["conc_rps"])
    raise SystemExit(f"no RESULT line from {src}:\n{out.stderr[-2000:]}")


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    rounds = int(argv[0])
    sides = []
    for arg in argv[1:]:
        name, rest = arg.split("=", 1)
        src, *envs = rest.split(",")
        sides.append((name, src, dict(e.split("=", 1) for e in envs)))
    results: dict[str, list[float]] = {name: [] for name, _, _ in sides}
    for r in range(rounds):
        for name, src, extra in (sides if r % 2 == 0 else list(reversed(sides))):
            results[name].append(run_side(src, extra, 18190))
            print(f"round {r} {name:>8} {results[name][-1]:>9.0f} req/s  load {os.getloadavg()[0]:.2f}", flush=True)
    base = sides[0][0]
    print(f"\n| tree | best req/s | median | median ratio to {base} | per-round ratios |\n| --- | --- | --- | --- | --- |")
    for name, values in results.items():
        ratios = [a / b for a, b in zip(values, results[base])]
        print(f"| {name} | {max(values):,.0f} | {statistics.median(values):,.0f} | {statistics.median(ratios):.3f} | "
              f"{', '.join(f'{x:.3f}' for x in ratios)} |")


if __name__ == "__main__":
    main(sys.argv[1:])
