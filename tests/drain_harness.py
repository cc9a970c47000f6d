"""A real HTTP proxy process without a controller, for tests/test_proxy_drain.py and benchmarks.

Runs shoal's `ProxyApp` on the proxy's own uvicorn server (`http/proxy.py` `uvicorn_server`), listening
with SO_REUSEPORT on a port, with its `HandoverReceiver`, exactly as `run_proxy` does; only the replica
is replaced by a stub router that answers in the proxy (its pid as the body). `GET /hold` stays
unanswered until the command `release` arrives, so a test has a request in flight without timing.

    python tests/drain_harness.py PORT HANDOVER_ROOT

stdout lines: `READY <port> <pid>`, `HELD` (a /hold request arrived), `DRAINED <how>`, `EXIT`.
stdin commands: `drain <timeout_s> <min_period_s> <handover 0|1>`, `release`.
"""

from __future__ import annotations

import asyncio
import os
import sys


class _StubRouter:
    closed = False

    def __init__(self, deployment_id, held: list):
        self.deployment_id = deployment_id
        self.held = held
        self.requests_cell = None

    def assign(self, call) -> None:
        path = call.args[0][5]
        if path == "/hold":
            self.held.append(call)
            print("HELD", flush=True)
            return
        call._complete((200, [(b"content-type", b"text/plain")], str(os.getpid()).encode()))

    def cancel(self, call) -> None:
        from shoal.exceptions import RequestCancelledError

        call._complete(exc=RequestCancelledError(call.request_id))


class _StubClient:
    def __init__(self):
        self.held: list = []

    def get_router(self, deployment_id, loop):
        return _StubRouter(deployment_id, self.held)


async def main(port: int, root: str) -> None:
    from shoal.http.drain import drain_server
    from shoal.http.listener_handover import HandoverReceiver, ListenerSet, handover_dir
    from shoal.http.proxy import ProxyApp, _listen_socket, uvicorn_server
    from shoal.http.routes import Route

    loop = asyncio.get_running_loop()
    client = _StubClient()
    options = {"host": "127.0.0.1", "port": port, "keep_alive_timeout_s": 90}
    app = ProxyApp(client, options, "proxy_test")
    app.set_routes([Route("/", "app", "Ingress")])
    sock = _listen_socket("127.0.0.1", port, True)
    port = sock.getsockname()[1]
    server = uvicorn_server(app, options)
    serving = loop.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.005)
    listeners = ListenerSet(server, [sock])
    receiver = HandoverReceiver(listeners, handover_dir(port, "", root))
    receiver.start()
    print("READY", port, os.getpid(), flush=True)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        while True:
            line = (await reader.readline()).decode().split()
            if not line:
                if reader.at_eof():
                    return
                continue
            if line[0] == "release":
                for call in client.held:
                    call._complete((200, [(b"content-type", b"text/plain")], b"released"))
                client.held.clear()
            elif line[0] == "drain":  # in its own task: commands still arrive while it drains
                app.start_draining()
                tasks.append(loop.create_task(drain(float(line[1]), float(line[2]), line[3] == "1")))

    async def drain(timeout_s: float, min_period_s: float, handover: bool) -> None:
        how = await drain_server(server, listeners, receiver, timeout_s=timeout_s, min_period_s=min_period_s,
                                 handover=handover)
        print("DRAINED", how, flush=True)

    tasks: list = []
    cmd = loop.create_task(commands())
    await serving
    cmd.cancel()
    receiver.close()
    print("EXIT", flush=True)


if __name__ == "__main__":
    from shoal.client import new_event_loop

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(main(int(sys.argv[1]), sys.argv[2]))
