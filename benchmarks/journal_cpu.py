"""CPU time per request of the metrics and access-line work (the request journal), in-process.

Runs the proxy's and a replica's hot-path code (the lines that add a request to the journal, as in
http/proxy.py and replica/server.py) `--requests` times, taking a batch every `--batch` entries as
the 0.2 s timer would (4,000: 20k requests/s), the access lines written to /dev/null, and subtracts
an empty loop. A few seconds of one core, no sockets: usable on a busy machine where wrk figures
swing. Prints the best of `--repeat` per component, in microseconds per request:

    PYTHONPATH=src .venv/bin/python benchmarks/journal_cpu.py

Before the journal (commit 3990928: `ProxyStats.record` + `AccessLog.add` per request) the same
loop measured proxy 0.38 / 1.24 µs and replica 0.26 / 1.08 µs (access lines off / on); see
docs/observability.md, "Cost".
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Callable

from shoal.access_log import PROXY_ENTRY_WIDTH, REPLICA_ENTRY_WIDTH, AccessLog, proxy_render, replica_render
from shoal.http.routes import Route
from shoal.telemetry.journal import Journal, journal_for
from shoal.telemetry.serve_metrics import ProxyStats, ReplicaStats

_now = time.perf_counter
HTTP_METHOD = "__call__"


class _NoTimer:
    """A loop whose timer never fires: the benchmark takes the batches itself."""

    def call_later(self, *args: object) -> None:
        pass


class _Server:
    journal: Journal


def proxy_loop(n: int, batch: int, lines: bool) -> float:
    route = Route("/", "default", "Ingress")
    scope = {"method": "GET"}
    self = _Server()
    self.journal = journal_for(ProxyStats(lambda: 0), _NoTimer(), PROXY_ENTRY_WIDTH,
                               AccessLog(proxy_render("TEXT", "proxy_0")) if lines else None)
    t = _now()
    for i in range(n):
        t0 = _now()
        status, request_id = 200, "3f1e2a4b-aaaa-bbbb-cccc-1234567890ab"
        journal = self.journal  # as in ProxyApp.http
        journal.pending += (t0, _now(), route, scope["method"], status, request_id)
        if not journal.scheduled:
            journal.schedule()
        if i % batch == batch - 1:
            self.journal.flush()
    return _now() - t


def replica_loop(n: int, batch: int, lines: bool) -> float:
    route, method, args = "/", HTTP_METHOD, [["http", 0, 0, "GET"]]
    self = _Server()
    self.journal = journal_for(ReplicaStats("D", "r", "app", lambda: 0), _NoTimer(), REPLICA_ENTRY_WIDTH,
                               AccessLog(replica_render("TEXT", "app", "D", "r", "1")) if lines else None)
    t = _now()
    for i in range(n):
        t0 = _now()
        failed, request_id, status = False, "3f1e2a4b-aaaa-bbbb-cccc-1234567890ab", 200
        journal = self.journal  # as in ReplicaServer._handle
        if method == HTTP_METHOD:
            journal.pending += (t0, _now(), route, failed, request_id,
                                args[0][3] if args[0][0] == "http" else "WEBSOCKET", route,
                                500 if failed else (status or 200))
        else:
            journal.pending += (t0, _now(), route, failed, request_id, "CALL", method, "ERROR" if failed else "OK")
        if not journal.scheduled:
            journal.schedule()
        if i % batch == batch - 1:
            self.journal.flush()
    return _now() - t


def empty_loop(n: int, batch: int, lines: bool) -> float:
    t = _now()
    for i in range(n):
        t0 = _now()  # noqa: F841 - the start's clock read, which the request paths had before metrics
        status, request_id = 200, "x"  # noqa: F841
        if i % batch == batch - 1:
            pass
    return _now() - t


def best(fn: Callable[[int, int, bool], float], args: argparse.Namespace, lines: bool) -> float:
    return min(fn(args.requests, args.batch, lines) for _ in range(args.repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=4000, help="entries per batch (requests/s x 0.2 s)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    handler = logging.StreamHandler(open(os.devnull, "w"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    for lines in (False, True):
        base = best(empty_loop, args, lines)
        p = (best(proxy_loop, args, lines) - base) / args.requests * 1e6
        r = (best(replica_loop, args, lines) - base) / args.requests * 1e6
        print(f"access lines {'on ' if lines else 'off'}: proxy {p:.3f} µs/request, replica {r:.3f} µs/request, "
              f"both {p + r:.3f}")


if __name__ == "__main__":
    main()
