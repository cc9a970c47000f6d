"""Reference side of the HTTP benchmark: a bare uvicorn no-op ASGI app, the ceiling.

No framework and no replica hop: one uvicorn process (uvloop + httptools, access
log off) answering "ok" itself. A serving framework puts a proxy and a hop to a
replica process in front of the same work, so this is the most either could
reach on this machine, and shows how much of the gap to it is the framework's.
The server runs in a child process, as shoal's and Ray's proxies do, under the
same wrk runs as http_workload.py (whose helpers this imports). Prints one
`RESULT {json}` line on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from http_workload import (
    BODY,
    HOST,
    add_load_args,
    common_fields,
    measure,
    require_wrk,
    wait_port_free,
    wait_ready,
)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_HEADERS = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer every HTTP request with 200 "ok", as the benchmark's deployments do."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def serve_forever(port: int) -> None:
    """uvicorn's fastest single-process setup: uvloop, httptools, no access log."""
    uvicorn.run(
        app,
        host=HOST,
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        lifespan="off",
        log_level="warning",
    )


def _stop(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_load_args(p)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child's mode
    a = p.parse_args()
    if a.serve:
        serve_forever(a.port)
        return

    wrk = require_wrk()
    wait_port_free(a.port)
    url = f"http://{HOST}:{a.port}/"
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(a.port)])
    try:
        wait_ready(url, a.ready_timeout, alive=lambda: server.poll() is None)
        result = common_fields("bare-uvicorn", f"uvicorn {uvicorn.__version__}", wrk, a.port)
        result.update(max_ongoing_requests=None, startup_s=time.perf_counter() - t0)
        result.update(measure(url, a))
    finally:
        _stop(server)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
