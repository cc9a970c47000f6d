"""CPU time per HTTP request of shoal's proxy, replica and controller processes: a noise-robust cost measure.

Wall-clock requests/s on a shared 2-core machine moves with whatever else runs; the CPU seconds a
process spends per request move far less. This deploys the benchmark's no-op deployment, runs wrk
for a fixed time, and divides each process's CPU time (user + system, from psutil) over the run by
the number of requests wrk completed. The same wrk runs against the bare uvicorn no-op app
(http_bare_uvicorn.py) give the floor: what uvicorn alone costs per request here. Use it to
compare two versions of the hot path:

    .venv/bin/python benchmarks/http_cpu.py --connections 32 --seconds 5 --repeat 3

Prints one line per run and the best (lowest) figures per process, in microseconds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from typing import Callable

import psutil

from http_workload import HOST, Ok, parse_wrk, wait_port_free, wait_ready

BARE = [sys.executable, str(__import__("pathlib").Path(__file__).with_name("http_bare_uvicorn.py")), "--serve"]


def _find(kind: str) -> psutil.Process:
    """The one descendant of this process whose command line names `kind`."""
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


def _sys(p: psutil.Process) -> float:
    return p.cpu_times().system


def _runs(url: str, procs: dict[str, psutil.Process], a: argparse.Namespace, label: str) -> dict[str, float]:
    """Warm up, then `a.repeat` wrk runs; the lowest CPU per request of each process, in µs."""
    subprocess.run(["wrk", "-t1", f"-c{a.connections}", "-d2s", url], capture_output=True)
    best = dict.fromkeys(procs, float("inf"))
    for i in range(a.repeat):
        before = {k: _cpu(p) for k, p in procs.items()}
        before_sys = {k: _sys(p) for k, p in procs.items()}
        out = subprocess.run(["wrk", "-t1", f"-c{a.connections}", f"-d{a.seconds}s", "--latency", url],
                             capture_output=True, text=True).stdout
        r = parse_wrk(out)
        us = {k: (_cpu(p) - before[k]) / r["requests"] * 1e6 for k, p in procs.items()}
        sys_us = {k: (_sys(p) - before_sys[k]) / r["requests"] * 1e6 for k, p in procs.items()}
        for k, v in us.items():
            best[k] = min(best[k], v)
        each = ", ".join(f"{k} {v:.1f} us ({sys_us[k]:.1f} in the kernel)" for k, v in us.items())
        print(f"{label} run {i}: {r['requests']} requests, {r['rps']:.0f} rps, p50 {r.get('p50_ms', 0):.3f} ms, "
              f"errors {r['errors']}; CPU/request: {each}", flush=True)
        time.sleep(0.2)
    return best


def _with_server(start: Callable[[], None], stop: Callable[[], None], body: Callable[[], dict]) -> dict:
    start()
    try:
        return body()
    finally:
        stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=18125)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-bare", action="store_true", help="skip the bare uvicorn floor")
    a = ap.parse_args()
    url = f"http://{HOST}:{a.port}/"

    from shoal import serve

    def start_shoal() -> None:
        wait_port_free(a.port)
        serve.start(http_options={"host": HOST, "port": a.port})
        serve.run(serve.deployment(max_ongoing_requests=1000)(Ok).bind(), route_prefix="/")
        wait_ready(url, 30)

    shoal = _with_server(start_shoal, serve.shutdown, lambda: _runs(
        url, {"proxy": _find("shoal.http.proxy"), "replica": _find("shoal.replica.server"),
              "controller": _find("shoal.controller")}, a, "shoal"))
    bare = None
    if not a.no_bare:
        server: list[subprocess.Popen] = []

        def start_bare() -> None:
            wait_port_free(a.port)
            server.append(subprocess.Popen(BARE + ["--port", str(a.port)]))
            wait_ready(url, 30, alive=lambda: server[0].poll() is None)

        def stop_bare() -> None:
            server[0].terminate()
            server[0].wait(timeout=10)

        bare = _with_server(start_bare, stop_bare, lambda: _runs(
            url, {"uvicorn": psutil.Process(server[0].pid)}, a, "bare"))
    line = (f"best CPU/request at {a.connections} connections: shoal proxy {shoal['proxy']:.1f} us + "
            f"replica {shoal['replica']:.1f} us = {shoal['proxy'] + shoal['replica']:.1f} us; controller "
            f"{shoal['controller']:.1f} us (it follows the log files)")
    if bare:
        line += f"; bare uvicorn {bare['uvicorn']:.1f} us"
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
