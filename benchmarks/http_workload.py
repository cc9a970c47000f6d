"""One side of the HTTP benchmark: a no-op HTTP deployment on shoal or Ray Serve, load from wrk.

Run once per framework, each in its own process (and, for Ray, its own venv), as
handle_workload.py is; the only difference between the two runs is where `serve`
comes from. wrk, not a Python client, generates the load: a Python client on
these 2 cores would saturate before a fast proxy does and measure itself.
Prints one `RESULT {json}` line on stdout for http_bench.py to parse; all else
(framework logs included) is for humans.

The wrk helpers here (wait_port_free, wait_ready, measure, ...) are shared with
http_bare_uvicorn.py, so every column of the table comes from identical wrk runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from handle_workload import _load, _shutdown

HOST = "127.0.0.1"
DEFAULT_PORT = 18123  # not 8000, which tests running alongside may hold
BODY = b"ok"

_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"([\d.]+)(us|ms|s|m|h)"


class Ok:
    """A no-op HTTP model, so the numbers are the framework's proxy and replica hop alone."""

    async def __call__(self, request: Any) -> str:
        return "ok"


def add_load_args(p: argparse.ArgumentParser) -> None:
    """Options every side of the HTTP benchmark takes, so all sides run the same wrk load."""
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--connections", type=int, default=32, help="connections of the main run")
    p.add_argument("--warmup-seconds", type=int, default=2)
    p.add_argument("--seconds", type=int, default=8, help="length of the main run")
    p.add_argument("--single-seconds", type=int, default=5, help="length of the 1-connection run")
    p.add_argument("--ready-timeout", type=float, default=30.0, help="seconds to wait for a 200 'ok'")


def require_wrk() -> str:
    """wrk's version line; fails before any framework starts when wrk is missing."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found on PATH; run benchmarks/ensure_wrk.sh")
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True)  # exits 1 by design
    return (out.stdout + out.stderr).strip().splitlines()[0].split(" [")[0]


def wait_port_free(port: int, timeout_s: float = 15.0) -> None:
    """Wait until nothing holds the port, so the readiness check cannot hit a stranger.

    Each side of http_bench.py reuses one port; a previous side's processes (Ray's
    above all) may take a few seconds to let it go.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, port))
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"port {port} still in use after {timeout_s:g}s ({e}); pick another with --port"
                    ) from e
        time.sleep(0.2)


def wait_ready(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll GET `url` until it answers 200 'ok'; a proxy that is up may still 404/503 a while."""
    # No proxy handler: an http_proxy in the environment must not carry 127.0.0.1 traffic.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    last = "no attempt"
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server exited before answering {url}")
        try:
            with opener.open(url, timeout=2) as r:
                body = r.read()
                if r.status == 200 and body == BODY:
                    return
                last = f"HTTP {r.status} {body[:80]!r}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code} {e.read()[:80]!r}"
        except (OSError, http.client.HTTPException) as e:
            last = repr(e)
        time.sleep(0.1)
    raise RuntimeError(f"no 200 {BODY!r} from {url} within {timeout_s:g}s; last: {last}")


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """The numbers in wrk's text report: rate, latency percentiles, errors.

    wrk prints the "Socket errors" and "Non-2xx or 3xx" lines only when nonzero.
    """
    rps = re.search(r"^Requests/sec:\s*([\d.]+)", text, re.M)
    if rps is None:
        raise RuntimeError(f"no Requests/sec line in wrk's output:\n{text}")
    out: dict[str, Any] = {"rps": float(rps.group(1))}
    avg = re.search(rf"^\s+Latency\s+{_TIME}", text, re.M)
    if avg:
        out["avg_ms"] = _ms(avg.group(1), avg.group(2))
    for pct, value, unit in re.findall(rf"^\s+(\d+)%\s+{_TIME}\s*$", text, re.M):
        out[f"p{pct}_ms"] = _ms(value, unit)
    total = re.search(r"^\s*(\d+) requests in", text, re.M)
    out["requests"] = int(total.group(1)) if total else None
    sock = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    names = ("connect", "read", "write", "timeout")
    out["socket_errors"] = dict(zip(names, map(int, sock.groups()))) if sock else dict.fromkeys(names, 0)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    out["non2xx"] = int(non2xx.group(1)) if non2xx else 0
    out["errors"] = out["non2xx"] + sum(out["socket_errors"].values())
    return out


def run_wrk(url: str, connections: int, seconds: int) -> dict[str, Any]:
    """One wrk run (1 thread: wrk's own core stays fixed on any machine), parsed."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    print(f"$ {' '.join(cmd)}\n{proc.stdout}", file=sys.stderr, flush=True)
    return parse_wrk(proc.stdout)


def measure(url: str, a: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then the main run at `a.connections` and a 1-connection latency run."""
    run_wrk(url, a.connections, a.warmup_seconds)  # first-request paths, pools, CPU clocks
    result: dict[str, Any] = {"connections": a.connections}
    for prefix, conns, secs in (("conc", a.connections, a.seconds), ("single", 1, a.single_seconds)):
        result.update({f"{prefix}_{k}": v for k, v in run_wrk(url, conns, secs).items()})
    return result


def common_fields(framework: str, version: str, wrk: str, port: int) -> dict[str, Any]:
    """Settings every side reports, so the table can say what it compared."""
    return {
        "framework": framework,
        "version": version,
        "wrk": wrk,
        "url": f"http://{HOST}:{port}/",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def _start_on_cluster(framework: str, address: str, port: int) -> tuple[Any, str]:
    """Join the Ray cluster at `address` (ray_runtime_bench.py): shoal's Ray runtime or Ray Serve.

    One HTTP proxy each (head node), so both sides serve the same wrk load through one proxy.
    """
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    if framework == "ray":
        from ray import serve

        serve.start(http_options={"host": HOST, "port": port}, proxy_location="HeadOnly")
        return serve, ray.__version__
    import shoal
    from shoal import serve

    serve.start(http_options={"host": HOST, "port": port}, proxy_location="HeadOnly", runtime="ray")
    return serve, f"{getattr(shoal, '__version__', 'unknown')} (ray runtime, ray {ray.__version__})"


def _deploy(serve: Any, max_ongoing_requests: int, port: int) -> None:
    """Start the HTTP proxy on `port` and deploy Ok at "/", the way user code would."""
    serve.start(http_options={"host": HOST, "port": port})  # a no-op when already started
    deployment = serve.deployment(max_ongoing_requests=max_ongoing_requests)(Ok)
    serve.run(deployment.bind(), route_prefix="/")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--framework", choices=("shoal", "ray"), required=True)
    p.add_argument("--max-ongoing-requests", type=int, default=1000)
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (shoal on its Ray runtime) instead of starting alone")
    add_load_args(p)
    a = p.parse_args()

    wrk = require_wrk()
    wait_port_free(a.port)
    url = f"http://{HOST}:{a.port}/"
    t0 = time.perf_counter()
    if a.ray_address:
        serve, version = _start_on_cluster(a.framework, a.ray_address, a.port)
    else:
        serve, version = _load(a.framework)
    print(f"{a.framework} {version}: max_ongoing_requests={a.max_ongoing_requests}, {url}", file=sys.stderr)
    try:
        _deploy(serve, a.max_ongoing_requests, a.port)
        wait_ready(url, a.ready_timeout)
        startup_s = time.perf_counter() - t0
        print(f"{a.framework}: first 200 after {startup_s:.1f}s", file=sys.stderr, flush=True)
        result = common_fields(a.framework, version, wrk, a.port)
        result.update(max_ongoing_requests=a.max_ongoing_requests, startup_s=startup_s)
        result.update(measure(url, a))
    finally:
        _shutdown(a.framework, serve)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
