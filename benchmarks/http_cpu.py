"""CPU time per HTTP request of shoal's proxy and replica processes: a noise-robust cost measure.

Wall-clock requests/s on a shared 2-core machine moves with whatever else runs; the CPU seconds a
process spends per request move far less. This deploys the benchmark's no-op deployment, runs wrk
for a fixed time, and divides each process's CPU time (user + system, from psutil) over the run by
the number of requests wrk completed. Use it to compare two versions of the hot path:

    .venv/bin/python benchmarks/http_cpu.py --connections 32 --seconds 5 --repeat 3

Prints one line per repeat and the best (lowest) figures, per process, in microseconds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import psutil

from http_workload import HOST, Ok, parse_wrk, wait_port_free, wait_ready


def _find(kind: str) -> psutil.Process:
    """The one child process of this driver's session running `python -m <kind>`."""
    for p in psutil.Process().children(recursive=True):
        try:
            if kind in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise RuntimeError(f"no {kind} process found")


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=18125)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    from shoal import serve

    wait_port_free(a.port)
    url = f"http://{HOST}:{a.port}/"
    serve.start(http_options={"host": HOST, "port": a.port})
    serve.run(serve.deployment(max_ongoing_requests=1000)(Ok).bind(), route_prefix="/")
    try:
        wait_ready(url, 30)
        proxy, replica = _find("shoal.http.proxy"), _find("shoal.replica.server")
        subprocess.run(["wrk", "-t1", f"-c{a.connections}", "-d2s", url], capture_output=True)  # warm-up
        best = {"proxy": float("inf"), "replica": float("inf")}
        for i in range(a.repeat):
            before = _cpu(proxy), _cpu(replica)
            out = subprocess.run(["wrk", "-t1", f"-c{a.connections}", f"-d{a.seconds}s", "--latency", url],
                                 capture_output=True, text=True).stdout
            after = _cpu(proxy), _cpu(replica)
            r = parse_wrk(out)
            n = r["requests"]
            us = {"proxy": (after[0] - before[0]) / n * 1e6, "replica": (after[1] - before[1]) / n * 1e6}
            for k in best:
                best[k] = min(best[k], us[k])
            print(f"run {i}: {n} requests, {r['rps']:.0f} rps, p50 {r.get('p50_ms', 0):.3f} ms, errors "
                  f"{r['errors']}; CPU/request: proxy {us['proxy']:.1f} us, replica {us['replica']:.1f} us",
                  flush=True)
            time.sleep(0.2)
        print(f"best CPU/request at {a.connections} connections: proxy {best['proxy']:.1f} us, "
              f"replica {best['replica']:.1f} us", flush=True)
    finally:
        serve.shutdown()


if __name__ == "__main__":
    sys.exit(main())
