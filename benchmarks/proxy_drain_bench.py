"""Connections lost when one of two proxies sharing a port (SO_REUSEPORT) leaves under steady HTTP load,
with and without the listener handover (`http/listener_handover.py`, issue 17).

Two real proxy processes (`tests/drain_harness.py`: shoal's ProxyApp on the proxy's uvicorn server, a
stub in place of the replica) listen on one port; client threads make requests one after another, most
on a new connection each (what spreads over the sockets of the port), some on keep-alive connections.
Once both proxies answer, one drains:

- `handover`: as shoal does now: it hands its listening socket to the other proxy, then ends once
  its clients moved off;
- `close`: as before: it closes its listener at once (uvicorn's graceful shutdown), resetting the
  connections still queued in it.

Each round counts the failed requests (connection reset or refused, no answer) among all made from the
start of the load until 300 more were answered after the leaving proxy exited.

    PYTHONPATH=src python benchmarks/proxy_drain_bench.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_proxy_drain import Harness, _load  # noqa: E402


def one_round(mode: str, threads: int, keep_alive: int) -> tuple[int, int, list]:
    root = tempfile.mkdtemp(prefix="shoal-drain-bench-")
    leaving = Harness(0, root)
    staying = Harness(leaving.port, root)
    try:
        with _load(leaving.port, threads, keep_alive) as load:
            while not {leaving.pid, staying.pid} <= set(load.served_by):
                time.sleep(0.05)
            time.sleep(0.5)  # a steady load before the drain
            leaving.send("drain 30 600 1" if mode == "handover" else "drain 30 0 0")
            leaving.expect("EXIT")
            after = load.count()
            while load.count() < after + 300:
                time.sleep(0.05)
        return load.count(), len(load.failures), load.failures[:3]
    finally:
        leaving.stop()
        staying.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=4, help="clients on a new connection per request")
    parser.add_argument("--keep-alive", type=int, default=2, help="clients on keep-alive connections")
    args = parser.parse_args()
    for mode in ("close", "handover"):
        total = failed = 0
        for i in range(args.rounds):
            n, f, examples = one_round(mode, args.threads, args.keep_alive)
            total, failed = total + n, failed + f
            print(f"{mode:8s} round {i + 1}: {f} failed of {n + f} requests {examples if f else ''}", flush=True)
        print(f"{mode:8s} total: {failed} failed of {total + failed} requests", flush=True)


if __name__ == "__main__":
    main()
