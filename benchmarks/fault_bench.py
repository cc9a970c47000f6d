"""Service through a process's death, shoal vs Ray Serve: `kill -9` of the controller, then of the
HTTP proxy, under steady HTTP load.

For each kill it prints the requests that failed, the longest gap between two successful responses
(the time nobody was served), and how long until the killed part answers again: the controller a
`serve.status()` call, the proxy a request. Targets (issue 12): controller kill: 0 failed, no gap over
100 ms, controller answering within 2 s; proxy kill: port answering again within 0.5 s (requests in
flight on the killed proxy are lost).

Each framework runs in its own process (`--worker shoal|ray`), Ray Serve in `.venv-ray`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

CLIENTS = 4          # concurrent HTTP client loops
SETTLE_S = 2.0       # load before the kill
AFTER_S = 4.0        # load after the kill
WINDOW_BEFORE_S = 1.0


class Load:
    """CLIENTS threads sending GETs back to back over keep-alive connections (the standard library's
    client, so both frameworks' venvs run it); records (completion time, ok) of every request."""

    def __init__(self, url: str):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path or "/"
        self.results: list[tuple[float, bool]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(CLIENTS)]

    def _loop(self) -> None:
        import http.client

        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("GET", self.path)
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                if conn is not None:
                    conn.close()
                conn = None
            self.results.append((time.monotonic(), ok))
            if not ok:
                time.sleep(0.002)  # a refused port fails at once: do not spin

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def figures(self, killed_at: float) -> dict:
        window = [(t, ok) for t, ok in self.results if t >= killed_at - WINDOW_BEFORE_S]
        ok_times = sorted(t for t, ok in window if ok)
        gaps = [b - a for a, b in zip(ok_times, ok_times[1:])]
        after = [t for t in ok_times if t > killed_at]
        return {"failed": sum(1 for _, ok in window if not ok), "served": len(ok_times),
                "longest_gap_ms": 1000 * max(gaps) if gaps else None,
                "first_ok_after_kill_s": (after[0] - killed_at) if after else None}


def _kill_under_load(url: str, pid: int, answers: Callable[[], Any]) -> dict:
    """Kill `pid` under load; time until `answers()` returns after the kill."""
    with Load(url) as load:
        time.sleep(SETTLE_S)
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        answers()
        answered_s = time.monotonic() - killed_at
        time.sleep(max(0.0, AFTER_S - answered_s))
    return dict(load.figures(killed_at), answered_s=answered_s)


def _first_ok(url: str) -> None:
    import urllib.request

    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.005)


# --- the two sides -------------------------------------------------------------------------------
def _shoal_side() -> dict:
    import psutil

    from shoal import serve
    from shoal.api import get_http_url
    from shoal.client import get_global_client

    @serve.deployment(num_replicas=2, max_ongoing_requests=100)
    class Noop:
        def __call__(self, request: Any) -> str:
            return "ok"

    serve.start(http_options={"port": 0})
    serve.run(Noop.bind(), route_prefix="/")
    url = get_http_url() + "/"
    client = get_global_client()
    out = {"controller": _kill_under_load(url, client.controller_proc.pid, serve.status)}

    def proxy_pid() -> int:
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "shoal.http.proxy" in cmd and client.session_dir in cmd and p.status() != psutil.STATUS_ZOMBIE:
                return p.pid
        raise RuntimeError("no proxy process")

    out["proxy"] = _kill_under_load(url, proxy_pid(), lambda: _first_ok(url))
    serve.shutdown()
    return out


def _ray_side() -> dict:
    import ray
    from ray import serve

    @serve.deployment(num_replicas=2, max_ongoing_requests=100)
    class Noop:
        def __call__(self, request: Any) -> str:
            return "ok"

    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"port": 8123})
    serve.run(Noop.bind(), route_prefix="/")
    url = "http://127.0.0.1:8123/"

    def actor_pid(class_name: str) -> int:
        """Ray names each actor's worker process `ray::<Class>...` (no dashboard needed to find it)."""
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ValueError):
                continue
            if cmd.startswith(f"ray::{class_name}"):
                return int(entry)
        raise RuntimeError(f"no {class_name} actor process")

    def status_answers() -> None:
        while True:
            try:
                serve.status()
                return
            except Exception:  # noqa: BLE001 - the controller is restarting
                time.sleep(0.01)

    out = {"controller": _kill_under_load(url, actor_pid("ServeController"), status_answers)}
    out["proxy"] = _kill_under_load(url, actor_pid("ProxyActor"), lambda: _first_ok(url))
    serve.shutdown()
    ray.shutdown()
    return out


def worker(framework: str) -> None:
    result = _shoal_side() if framework == "shoal" else _ray_side()
    if framework == "ray":
        import ray
        result["version"] = ray.__version__
    print("RESULT " + json.dumps(result), flush=True)


# --- the table -----------------------------------------------------------------------------------
def run_side(python: str, framework: str, timeout_s: float) -> Optional[dict]:
    """One side in its own process group (handle_bench.run_command); None (n/a) when it fails."""
    from handle_bench import run_command

    side = run_command(framework, [python, __file__, "--worker", framework], timeout_s)
    if side.result is None:
        print(f"{framework} side failed:\n{side.error}", file=sys.stderr)
    return side.result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=["shoal", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--skip-ray", action="store_true")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    from handle_bench import ray_python

    shoal = run_side(sys.executable, "shoal", 300)
    ray_py = None if args.skip_ray else ray_python()
    ray = run_side(str(ray_py), "ray", 420) if ray_py else None

    def cell(side: Optional[dict], kill: str, key: str, fmt: str) -> str:
        if side is None or side[kill].get(key) is None:
            return "n/a"
        return format(side[kill][key], fmt)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    ray_name = f"Ray Serve {ray['version']}" if ray else "Ray Serve"
    print(f"\n| kill -9 of | metric | shoal | {ray_name} | target |")
    print("| --- | --- | ---: | ---: | --- |")
    c = shoal["controller"] if shoal else None
    px = shoal["proxy"] if shoal else None
    rows = [
        ("controller", "requests failed", "failed", "d",
         f"0: {verdict(bool(c) and c['failed'] == 0)}"),
        ("controller", "longest gap in service (ms)", "longest_gap_ms", ".0f",
         f"<= 100 ms: {verdict(bool(c) and (c['longest_gap_ms'] or 1e9) <= 100)}"),
        ("controller", "until the controller answers again (s)", "answered_s", ".2f",
         f"< 2 s: {verdict(bool(c) and c['answered_s'] < 2)}"),
        ("controller", "requests served in the window", "served", "d", ""),
        ("proxy", "requests failed", "failed", "d", "in-flight ones lost"),
        ("proxy", "longest gap in service (ms)", "longest_gap_ms", ".0f", ""),
        ("proxy", "until the port answers again (s)", "answered_s", ".2f",
         f"< 0.5 s: {verdict(bool(px) and px['answered_s'] < 0.5)}"),
    ]
    for kill, label, key, fmt, target in rows:
        print(f"| {kill} | {label} | {cell(shoal, kill, key, fmt)} | {cell(ray, kill, key, fmt)} | {target} |")
    print(f"\n{CLIENTS} HTTP clients back to back on a 2-replica no-op deployment; the window runs from "
          f"{WINDOW_BEFORE_S:g} s before the kill to {AFTER_S:g} s after it (or after the killed part answers). "
          "A client whose connection is refused tries again every 2 ms, so during an outage the failed "
          "count counts attempts.")


if __name__ == "__main__":
    main()
