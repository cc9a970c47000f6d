"""The replica process: serves requests from routers on its socket, and control calls from the controller.

The socket is a Unix socket on one machine, or an authenticated TCP port (`tcp://*:0`: this node's
address, any free port) when the replica runs on a cluster; the replica reports where it listens.

Start-up: connect to the controller, fetch the deployment spec (with this replica's rank), listen,
run the constructor and `reconfigure`, pass one health check, then report ready (or the traceback of
what failed). The replica exits when the
controller asks it to stop, or when the controller is gone for good (its keeper died too); a
controller that dies and restarts finds it serving and reconnected.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any, Optional

from shoal.access_log import REPLICA_ENTRY_WIDTH
from shoal.common import ReplicaID
from shoal.eager import start_eagerly
from shoal.context import ReplicaContext, RequestContext, _request_context, _set_replica_context
from shoal.http.ingress import ASGIIngress, is_ingress
from shoal.replica.http_adapter import HTTP_METHOD, HTTPAdapter
from shoal.replica.user_callable import UserCallable
from shoal.serve_logging import configure_replica, replica_access_log
from shoal.telemetry.journal import journal_for
from shoal.telemetry.serve_metrics import CALLER, ReplicaStats
from shoal.transport import serialization as ser
from shoal.transport.connection import TCP_PREFIX, Connection, parse_tcp_address, serve_tcp, serve_unix
from shoal.transport.framing import Kind, pack

logger = logging.getLogger("shoal.replica")
_CAPACITY_FRAME = pack(Kind.CAPACITY, 0)
_now = time.perf_counter
_ROOT_PATH = 8  # where the wire scope (http/scope.py) holds root_path: the route prefix appended


class ReplicaServer:
    """Handles data-plane requests (on the replica socket) and control calls (from the controller)."""

    def __init__(self, replica_id: ReplicaID, spec: dict):
        self.replica_id = replica_id
        self.spec = spec
        self.config = spec["config"]
        self.max_ongoing = self.config.max_ongoing_requests
        self.ongoing = 0
        self.rejected: set[Connection] = set()
        self.conns: set[Connection] = set()  # data connections (routers)
        self.stopping = False
        self.abort_error: Optional[BaseException] = None  # set by `abort_requests`: what in-flight requests fail with
        self.callable: Optional[UserCallable] = None
        self.http: Optional[HTTPAdapter] = None
        self.ingress: Optional[ASGIIngress] = None
        self.idle = asyncio.Event()
        self.idle.set()
        self.loop = asyncio.get_event_loop()
        self._where = f"replica {replica_id.unique_id} of deployment '{replica_id.deployment_id.name}'"
        self.rank = spec.get("rank")
        self.world_size = spec.get("world_size", 1)
        self._reconfigure_lock = asyncio.Lock()  # user_config and rank changes reach `reconfigure` in order
        dep = replica_id.deployment_id
        self.stats = ReplicaStats(dep.name, replica_id.unique_id, dep.app_name, lambda: self.ongoing)
        # One journal entry per request: the metrics and the access lines (if on: set by
        # `configure_logging`, which `run_replica` calls next) read them per batch (telemetry/journal.py).
        self.journal = journal_for(self.stats, self.loop, REPLICA_ENTRY_WIDTH)

    def set_context(self, servable: Any) -> None:
        """Publish what `serve.get_replica_context()` returns (a new object each time, as in Ray)."""
        _set_replica_context(ReplicaContext(self.replica_id, servable, self.config, self.rank, self.world_size))

    def configure_logging(self, logging_config: Any) -> None:
        on = configure_replica(logging_config, self.replica_id)
        self.journal.flush()
        self.journal.lines = replica_access_log(logging_config, self.replica_id) if on else None

    # --- data plane ---------------------------------------------------------------------------
    def on_request(self, conn: Connection, rid: int, body: bytes) -> None:
        if self.ongoing >= self.max_ongoing or self.stopping:
            conn.reply(Kind.REJECT, rid)
            self.rejected.add(conn)
            return
        if self.ongoing == 0:
            self.idle.clear()
        self.ongoing += 1
        task = start_eagerly(self._handle(conn, rid, body), self.loop, contextvars.copy_context())
        if task is not None:
            conn.tasks[rid] = task

    async def _handle(self, conn: Connection, rid: int, body: bytes) -> None:
        t0 = _now()
        route = ""  # the metrics' route: the HTTP route prefix; handle calls have none (as in Ray)
        failed = True  # an exception or a cancellation counts as an error, as in Ray
        method = request_id = ""
        status: Any = None  # an HTTP response's status, for the access log
        try:
            method, stream, model_id, request_id, args, kwargs = ser.loads(body)
            uc = self.callable
            if method == HTTP_METHOD:
                route = args[0][_ROOT_PATH] or "/"
                _request_context.set(RequestContext(request_id, model_id, self.replica_id.deployment_id.app_name,
                                                    route))
                status = await self.http.handle(conn, rid, *args)  # type: ignore[union-attr]
            else:
                _request_context.set(RequestContext(request_id, model_id, self.replica_id.deployment_id.app_name))
                if stream:
                    async for item in uc.call_stream(method, args, kwargs):  # type: ignore[union-attr]
                        conn.reply(Kind.ITEM, rid, ser.dumps(item))
                    conn.reply(Kind.END, rid)
                else:
                    result = await uc.call(method, args, kwargs)  # type: ignore[union-attr]
                    conn.reply(Kind.OK, rid, ser.dumps(result))
            failed = False
        except asyncio.CancelledError:
            if self.abort_error is not None:  # cancelled by `abort_requests`: the caller learns why
                conn.reply(Kind.ERROR, rid, ser.dumps_exception(self.abort_error, self._where))
        except BaseException as e:  # noqa: BLE001 - every user error goes back to the caller
            if getattr(e, "quiet_in_logs", False):  # an expected error, e.g. a client's bad request
                logger.info("request %s to %s: %s: %s", rid, self._where, type(e).__name__, e)
            else:
                logger.exception("request %s to %s failed", rid, self._where)
            conn.reply(Kind.ERROR, rid, ser.dumps_exception(e, self._where))
        finally:
            journal = self.journal  # Journal.add, inlined: the hot path (raw fields; see telemetry/journal.py)
            if method == HTTP_METHOD:
                journal.pending += (t0, _now(), route, failed, request_id,
                                    args[0][3] if args[0][0] == "http" else "WEBSOCKET", route,
                                    500 if failed else (status or 200))
            else:
                journal.pending += (t0, _now(), route, failed, request_id, "CALL", method, "ERROR" if failed else "OK")
            if not journal.scheduled:
                journal.schedule()
            conn.tasks.pop(rid, None)
            self.ongoing -= 1
            if self.ongoing == 0:
                self.idle.set()
            if self.rejected and not self.stopping:
                for c in self.rejected:
                    c.send(_CAPACITY_FRAME)
                self.rejected.clear()

    def on_cancel(self, conn: Connection, rid: int) -> None:
        task = conn.tasks.get(rid)
        if task is not None:
            task.cancel()

    def on_notify(self, conn: Connection, topic: str, payload: Any) -> None:
        pass

    def on_push(self, conn: Connection, rid: int, body: bytes) -> None:
        inbox = conn.inboxes.get(rid)
        if inbox is not None:
            inbox.push(ser.loads(body))

    def on_connection_made(self, conn: Connection) -> None:
        self.conns.add(conn)
        if self.stopping:
            conn.notify("draining", 0)

    def on_connection_lost(self, conn: Connection, exc: Optional[BaseException]) -> None:
        self.conns.discard(conn)
        self.rejected.discard(conn)
        for task in list(conn.tasks.values()):
            task.cancel()

    # --- control plane (called by the controller) ----------------------------------------------
    async def rpc_check_health(self, conn: Connection) -> None:
        await self.callable.check_health()  # type: ignore[union-attr]

    async def rpc_reconfigure(self, conn: Connection, config: Any) -> None:
        async with self._reconfigure_lock:
            user_config_changed = config.user_config != self.config.user_config
            if config.logging_config != self.config.logging_config:
                self.configure_logging(config.logging_config)
            self.config = config
            self.max_ongoing = config.max_ongoing_requests
            self.set_context(self.callable.obj)  # type: ignore[union-attr]
            if user_config_changed:  # as in Ray: other option changes do not call the user's reconfigure
                await self.callable.reconfigure(config.user_config, self.rank)  # type: ignore[union-attr]
        if self.rejected:
            for c in self.rejected:
                c.send(_CAPACITY_FRAME)
            self.rejected.clear()

    async def rpc_update_rank(self, conn: Connection, rank: Any, world_size: int) -> None:
        """The controller moved this replica to another rank (ranks stay dense) or the deployment's
        replica count changed. A new rank reaches the user's `reconfigure` (see UserCallable.reconfigure)."""
        async with self._reconfigure_lock:
            rank_changed = rank != self.rank
            self.rank, self.world_size = rank, world_size
            self.set_context(self.callable.obj if self.callable is not None else None)
            if rank_changed and self.callable is not None:
                await self.callable.reconfigure(self.config.user_config, rank)

    async def rpc_num_ongoing(self, conn: Connection) -> int:
        return self.ongoing

    async def rpc_graceful_shutdown(self, conn: Connection, wait_loop_s: float) -> None:
        """Finish in-flight requests, run `__del__`, then exit.

        The controller already told routers to stop sending here, but a request may be on its way.
        So each data connection first gets a `draining` notice naming the highest request id running
        on it (its ids only grow): from then on this replica rejects every request it reads, and a
        router may safely send elsewhere any request with a higher id that a lost connection leaves
        unanswered (see router.py). The connections are closed, their replies written, before exit.
        """
        self._drain()
        await asyncio.sleep(min(wait_loop_s, 0.05) if self.ongoing == 0 else 0)
        await self.idle.wait()
        await self._teardown()
        _flush_metrics()  # the last counts reach the controller before this process ends
        conns = [c for c in self.conns if not c.closed]
        for c in conns:
            c.close()
        if conns:  # transports close once their buffered replies are written
            await asyncio.wait([c.closed_future for c in conns], timeout=5.0)
        asyncio.get_running_loop().call_later(0.01, _exit, 0)

    async def rpc_abort_requests(self, conn: Connection, message: str) -> int:
        """The controller is about to kill this replica (memory, `controller/memory_monitor.py`):
        fail the requests in flight with `ReplicaOutOfMemoryError(message)` and take no new ones."""
        from shoal.exceptions import ReplicaOutOfMemoryError

        self._drain()  # what callers sent and this replica never ran goes elsewhere, not lost with it
        self.abort_error = ReplicaOutOfMemoryError(message)
        tasks = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "cr_code", None) is _HANDLE_CODE]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the error replies' writes go out before this reply
        return len(tasks)

    def _drain(self) -> None:
        """Take no new request, and tell every caller so: each data connection gets a `draining`
        notice naming the highest request id running on it (see `rpc_graceful_shutdown`)."""
        self.stopping = True
        for c in self.conns:
            c.notify("draining", max(c.tasks, default=0))

    async def _teardown(self) -> None:
        if self.ingress is not None:
            try:
                await self.ingress.shutdown()
            except Exception:  # noqa: BLE001
                logger.exception("lifespan shutdown of %s raised", self._where)
        if self.callable is not None:
            try:
                await self.callable.teardown()
            except Exception:  # noqa: BLE001
                logger.exception("__del__ of %s raised", self._where)


_HANDLE_CODE = ReplicaServer._handle.__code__  # how `abort_requests` finds the request tasks


def _report_model_ids(client: Any, unique_id: str, loop: asyncio.AbstractEventLoop) -> dict:
    """Tell the controller which multiplexed models this replica holds (coalesced, at most every 0.1 s)."""
    from shoal import multiplex

    state: dict = {"latest": frozenset(), "sent": frozenset(), "scheduled": False}

    def push() -> None:
        state["scheduled"] = False
        if state["latest"] != state["sent"] and client.conn is not None:
            state["sent"] = state["latest"]
            client.conn.notify("model_ids", (unique_id, tuple(sorted(state["latest"]))))

    def on_ids(ids: frozenset) -> None:
        state["latest"] = ids
        if not state["scheduled"]:
            state["scheduled"] = True
            loop.call_later(0.1, push)

    multiplex.set_model_ids_listener(on_ids)
    return state


async def _initial_health_check(uc: UserCallable, timeout: float) -> None:
    """As in Ray Serve, a replica counts as started only once it passes one health check: a failure
    (or no answer within health_check_timeout_s) is a start failure, reported and retried as a
    constructor failure is."""
    try:
        await asyncio.wait_for(uc.check_health(), timeout)
    except asyncio.TimeoutError:
        raise RuntimeError(f"The replica's initial health check did not finish within "
                           f"health_check_timeout_s={timeout:g}s.") from None
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"The replica failed its initial health check: {type(e).__name__}: {e}") from e


# How long `record_autoscaling_stats()` may take (Ray's RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S).
RECORD_AUTOSCALING_STATS_TIMEOUT_S = float(os.environ.get("RAY_SERVE_RECORD_AUTOSCALING_STATS_TIMEOUT_S", 10.0))


async def _report_autoscaling_stats(client: Any, server: ReplicaServer, unique_id: str) -> None:
    """Ray's custom autoscaling metrics: while the deployment autoscales, call the user's
    `record_autoscaling_stats()` every `min(metrics_interval_s, look_back_period_s / 5)` seconds and
    send what it returns (`{name: number}`) to the controller. A result of the wrong shape turns the
    reports off (as in Ray); a failure or a time-out is logged and skips one report."""
    uc = server.callable
    while True:
        auto = server.config.autoscaling_config
        if auto is None:
            await asyncio.sleep(1.0)
            continue
        await asyncio.sleep(max(0.05, min(auto.metrics_interval_s, auto.look_back_period_s * 0.2)))
        if server.stopping:
            return
        try:
            values = await asyncio.wait_for(uc.call_hook("record_autoscaling_stats"),  # type: ignore[union-attr]
                                            RECORD_AUTOSCALING_STATS_TIMEOUT_S)
        except asyncio.TimeoutError:
            logger.error("record_autoscaling_stats of %s timed out after %.0f s", server._where,
                         RECORD_AUTOSCALING_STATS_TIMEOUT_S)
            continue
        except Exception as e:  # noqa: BLE001
            logger.error("record_autoscaling_stats of %s failed: %r", server._where, e)
            continue
        bad = (f"returned {type(values).__name__}" if not isinstance(values, dict) else next(
            (f"returned {type(v).__name__} for '{k}'" for k, v in values.items()
             if not isinstance(k, str) or not isinstance(v, (int, float))), None))
        if bad:
            logger.error("record_autoscaling_stats of %s %s, expected Dict[str, int | float]; custom autoscaling "
                         "metrics are turned off for this replica", server._where, bad)
            return
        if client.conn is not None and values:
            client.conn.notify("autoscaling_stats", (unique_id, {k: float(v) for k, v in values.items()}))


def _flush_metrics() -> None:
    from shoal.client import get_global_client
    from shoal.telemetry.registry import flush

    client = get_global_client(required=False)
    if client is not None:
        flush(client)


def _exit(code: int) -> None:
    from shoal.common import exit_process

    exit_process(code)


async def run_replica(session_dir: str, unique_id: str) -> None:
    from shoal.client import ServeClient, set_global_client

    loop = asyncio.get_running_loop()
    client = ServeClient(loop, session_dir)
    set_global_client(client)
    holder: dict = {}

    class _Control:
        def __getattr__(self, name: str) -> Any:
            return getattr(holder["server"], name)

    # Its node, said at once: on a cluster, the node the scheduler chose may not be the one reserved.
    spec = await client.connect("replica", extra_handler=_Control(), unique_id=unique_id,
                                node_id=os.environ.get("SHOAL_NODE_ID") or "")
    models = _report_model_ids(client, unique_id, loop)
    replica_id: ReplicaID = spec["replica_id"]
    CALLER["handle"] = f"{replica_id.deployment_id.app_name}#{replica_id.deployment_id.name}"  # router metrics
    server = ReplicaServer(replica_id, spec)
    # The serve loggers' level (`ray.serve`, `shoal`), the request fields on every line, the encoding.
    server.configure_logging(spec["config"].logging_config)
    holder["server"] = server
    address = spec["address"]
    status = {"ready": False, "address": address}
    # The controller may die and come back: this replica keeps serving and tells the new one where it
    # stands. Only once nothing will restart the controller does it exit (see keeper.py).
    client.hello_state = lambda: {"ready": status["ready"], "address": status["address"],
                                  "model_ids": tuple(sorted(models["latest"]))}
    orphaned = asyncio.Event()
    client.on_controller_lost = lambda: orphaned.set() if status["ready"] else loop.call_soon(_exit, 0)
    if address.startswith(TCP_PREFIX):  # reachable from other nodes: a port of our own, authenticated peers
        host, port = parse_tcp_address(address)
        listener: Any = await serve_tcp(os.environ.get("SHOAL_NODE_IP", "127.0.0.1") if host == "*" else host,
                                        port, lambda: server, name=str(replica_id))
        address = status["address"] = listener.address
    else:
        listener = await serve_unix(address, lambda: server, name=str(replica_id))
    try:
        # The driver's import path, in its order, ahead of what this process started with: user code
        # imports by name here as it did there (shoal's own modules are already imported).
        python_path = list(spec["python_path"])
        sys.path[:] = python_path + [p for p in sys.path if p not in python_path]
        func_or_class = ser.loads_callable(spec["serialized_def"])
        init_args, init_kwargs = ser.loads(spec["serialized_init_args"])
        uc = UserCallable(func_or_class, init_args, init_kwargs, replica_id.deployment_id.name,
                          server.config.max_ongoing_requests)
        server.set_context(None)  # the constructor may read its rank and world_size
        await uc.initialize()
        server.set_context(uc.obj)
        async with server._reconfigure_lock:
            await uc.reconfigure(server.config.user_config, server.rank)
        server.callable = uc
        asgi_app = None
        if is_ingress(uc.obj):  # @serve.ingress: the ASGI app serves HTTP, bound to this instance
            server.ingress = await ASGIIngress.create(uc.obj)
            await server.ingress.startup()
            asgi_app = server.ingress.app
        server.http = HTTPAdapter(uc, asgi_app)
        await _initial_health_check(uc, server.config.health_check_timeout_s)
    except BaseException as e:  # noqa: BLE001 - report the traceback to the controller
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        sys.stderr.write(tb)
        await client.control_call("replica_failed", unique_id, tb)
        _exit(1)
    status["ready"] = True
    await client.control_call("replica_ready", unique_id, address=address,
                              node_id=os.environ.get("SHOAL_NODE_ID") or None)
    stats_task = None
    if uc.has_method("record_autoscaling_stats"):
        stats_task = loop.create_task(_report_autoscaling_stats(client, server, unique_id))  # noqa: F841
    await orphaned.wait()
    listener.close()
    await server._teardown()
    _exit(0)


def main() -> None:
    session_dir, unique_id = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the driver, which shuts us down
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s -- %(message)s")
    from shoal.client import new_event_loop
    from shoal.log_rotation import setup_rotation

    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    setup_rotation(loop)  # its log file rotates by size (log_rotation.py)
    loop.run_until_complete(run_replica(session_dir, unique_id))


if __name__ == "__main__":
    main()
