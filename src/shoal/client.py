"""The process-wide link to the controller: spawns or joins it, and feeds routers their replica sets.

Every process that calls deployments (driver, proxy, replica) has one `ServeClient`. Its I/O loop
is the replica's main loop inside a replica, and a daemon thread in a driver. Routers live on the
loop of the code that calls through them; the client pushes each deployment's replica set to them.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any, Callable, Optional

from shoal import keeper
from shoal.common import DeploymentID, DeploymentTargets
from shoal.exceptions import RayServeException
from shoal.handle import _running_loop
from shoal.router.router import Router
from shoal.sync_loop import SyncLoop
from shoal.transport.connection import TCP_PREFIX, Connection, ConnectionLost, RpcHandler, connect

logger = logging.getLogger(__name__)

CONTROLLER_SOCKET = "controller.sock"


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.new_event_loop()


class _IoThread:
    """A daemon thread running an event loop for sync callers in a driver."""

    def __init__(self) -> None:
        self.loop = new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="shoal-io", daemon=True)
        self.thread.start()
        ready.wait()

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class ClientHandler(RpcHandler):
    """Serves what the controller sends this process: replica sets, and control calls for a replica."""

    def __init__(self, client: "ServeClient", extra: Any = None):
        self.client = client
        self.extra = extra

    def __getattr__(self, name: str) -> Any:
        if name.startswith("rpc_") and self.extra is not None:
            return getattr(self.extra, name)
        raise AttributeError(name)

    def notify_targets(self, conn: Connection, targets: DeploymentTargets) -> None:
        self.client._on_targets(targets)

    def notify_routes(self, conn: Connection, payload: Any) -> None:
        if self.client.on_routes is not None:
            self.client.on_routes(*payload)
        else:  # a proxy still starting: it applies the newest table once it can
            self.client.pending_routes = payload

    def on_connection_lost(self, conn: Connection, exc: Optional[BaseException]) -> None:
        super().on_connection_lost(conn, exc)
        self.client._on_connection_lost(conn)


class _GiveUp(Exception):
    """The controller cannot come back (its keeper is gone, or it keeps dying)."""


# What a new client uses for its `controller_recoverable` and `resolve_address`, when set: a runtime
# whose replicas and proxies have no keeper (the Ray runtime: Ray restarts the controller actor) sets
# them in the process before `run_replica` / `run_proxy` create their client.
default_controller_recoverable: Optional[Callable[[], bool]] = None
default_resolve_address: Optional[Callable[[], str]] = None


class ServeClient:
    def __init__(self, loop: asyncio.AbstractEventLoop, session_dir: str, io_thread: Optional[_IoThread] = None,
                 controller_proc: Optional[subprocess.Popen] = None):
        self.loop = loop
        self.session_dir = session_dir
        # A session directory holds the controller's Unix socket; a `tcp://` address is a cluster's controller.
        self.controller_address = (session_dir if session_dir.startswith(TCP_PREFIX)
                                   else os.path.join(session_dir, CONTROLLER_SOCKET))
        self.runtime = "embedded"
        self.after_shutdown: Optional[Any] = None  # called with the timeout once the controller was told to stop
        self.io_thread = io_thread
        self.controller_proc = controller_proc
        self.conn: Optional[Connection] = None
        self.closed = False
        # Called once the controller is gone for good (nothing will restart it): a replica or proxy exits,
        # `shoal run` stops. A controller that restarts is reconnected to without anyone noticing.
        self.on_controller_lost = None
        # Reconnecting after a controller restart (see _reconnect): what this process tells the new
        # controller about itself, what it does with the reply, and how it learns whether to keep trying.
        self.hello_state: Optional[Callable[[], dict]] = None
        self.on_reconnected: Optional[Callable[[Any], None]] = None
        self.restart_controller: Optional[Callable[[], None]] = None  # a driver that owns its controller
        # blocking; run off the loop
        self.controller_recoverable: Callable[[], bool] = default_controller_recoverable or keeper.keeper_alive
        self.resolve_address: Optional[Callable[[], str]] = default_resolve_address  # blocking; where it is now
        self.controller_wait_s = float(os.environ.get("SHOAL_CONTROLLER_WAIT_S") or 30.0)
        self.gave_up = False
        self.stopping = False  # shutdown asked for: the controller's exit is expected, not restarted
        self._connected = threading.Event()
        self._reconnecting = False
        self._role = ""
        self._hello: dict = {}
        self._extra_handler: Any = None
        self._controller_cmd: Optional[list[str]] = None
        self._controller_env: Optional[dict] = None
        self._restarts: list[float] = []
        self.on_routes = None  # set by an HTTP proxy: called with (routes, version)
        self.pending_routes: Optional[tuple] = None  # (routes, version) that came before on_routes was set
        self._lock = threading.Lock()
        self._targets: dict[DeploymentID, DeploymentTargets] = {}
        self._routers: dict[DeploymentID, "weakref.WeakSet[Router]"] = {}
        self._last_report: dict = {}
        self._report_scheduled = True  # until connected: nothing to report to yet
        # In a driver, sync callers drive their own loop (no thread hop per call); see sync_loop.py.
        # asyncio's own loop, not uvloop: uvloop re-installs signal handling on every run in the
        # main thread (~30 us), and this loop is run once or twice per call.
        self.sync_loop: Optional[SyncLoop] = SyncLoop(asyncio.new_event_loop()) if io_thread is not None else None
        # The handles `serve.run`/`get_app_handle`/`get_deployment_handle` gave out, one per
        # (deployment, app): asking again returns the same handle, with the routers it already has.
        self.handle_cache: dict = {}

    # --- connecting ---------------------------------------------------------------------------
    async def connect(self, role: str, extra_handler: Any = None, **hello: Any) -> Any:
        from shoal import common

        # Its node: on a cluster, this process's metrics are exported by that node's endpoint.
        hello.setdefault("node_id", common.LOCAL_NODE_ID)
        self._role, self._extra_handler, self._hello = role, extra_handler, hello
        self.conn = await connect(self.controller_address, handler=ClientHandler(self, extra_handler), name="controller")
        reply = await self.conn.call("hello", role=role, pid=os.getpid(), **hello)
        self._connected.set()
        self.start_load_reports()
        self._start_metrics()
        return reply

    def _start_metrics(self) -> None:
        """Push this process's metrics to the controller about once a second (shoal/telemetry)."""
        from shoal.telemetry.registry import start_pushing
        from shoal.telemetry.serve_metrics import routers_source

        start_pushing(self, [routers_source(self)])

    def _on_connection_lost(self, conn: Connection) -> None:
        """The controller connection closed: the controller died or is restarting (I/O loop)."""
        if conn is not self.conn:
            return
        self.conn = None
        self._connected.clear()
        if not self.closed and not self.stopping and not self._reconnecting:
            self._reconnecting = True
            self.loop.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Reconnect to the controller that replaces the one that died, for as long as one may come.

        Routers keep their replica sets meanwhile, so requests flow on. Once connected, this process
        says who it is (`hello_state`: a replica its state, a proxy its port), resubscribes its
        deployments and hands the reply to `on_reconnected`.
        """
        loop = asyncio.get_running_loop()
        delay = 0.01
        logger.warning("lost the connection to the shoal controller; reconnecting")
        try:
            while not self.closed:
                try:
                    if self.restart_controller is not None:
                        self.restart_controller()
                    elif not await loop.run_in_executor(None, self.controller_recoverable):
                        raise _GiveUp("the shoal controller is gone and nothing will restart it")
                    address = (await loop.run_in_executor(None, self.resolve_address)
                               if self.resolve_address is not None else self.controller_address)
                    conn = await asyncio.wait_for(
                        connect(address, handler=ClientHandler(self, self._extra_handler), name="controller"), 5)
                except _GiveUp as e:
                    self._give_up(str(e))
                    return
                except (OSError, asyncio.TimeoutError, ConnectionError) as e:
                    logger.debug("controller not reachable yet: %r", e)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.25)
                    continue
                except Exception as e:  # noqa: BLE001 - a hook failed (e.g. Ray busy): try again, never stop trying
                    logger.warning("reconnecting to the shoal controller: %r", e)
                    await asyncio.sleep(0.25)
                    continue
                self.conn = conn
                hello = dict(self._hello, **(self.hello_state() if self.hello_state is not None else {}))
                try:
                    reply = await asyncio.wait_for(
                        conn.call("hello", role=self._role, pid=os.getpid(), reconnect=True, **hello), 10)
                except (ConnectionError, asyncio.TimeoutError):
                    conn.close()
                    self.conn = None
                    continue
                except Exception as e:  # noqa: BLE001 - the new controller does not know this process
                    conn.close()
                    self._give_up(f"the restarted shoal controller refused this process: {e}")
                    return
                if conn.closed:
                    continue
                with self._lock:
                    deployments = list(self._routers)
                for dep in deployments:
                    conn.notify("subscribe", dep)
                self._last_report = {}
                self._connected.set()
                logger.info("reconnected to the shoal controller")
                if self.on_reconnected is not None:
                    self.on_reconnected(reply)
                return
        finally:
            self._reconnecting = False

    def _give_up(self, why: str) -> None:
        logger.error("%s", why)
        self.gave_up = True
        self._connected.set()  # wake waiting callers: they fail at once
        if self.on_controller_lost is not None:
            self.on_controller_lost()

    def _restart_owned_controller(self) -> None:
        """A driver's own controller died: start a new one on the same session (it recovers there)."""
        proc = self.controller_proc
        if proc is None or proc.poll() is None:
            return  # still exiting, or not ours: just reconnect
        if proc.returncode == 0:
            raise _GiveUp("the shoal controller shut down")
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < 60] + [now]
        if len(self._restarts) > 5:
            raise _GiveUp("the shoal controller died 5 times within a minute; not restarting it again")
        logger.warning("the shoal controller exited (code %s); restarting it", proc.returncode)
        self.controller_proc = subprocess.Popen([*self._controller_cmd, "--recover"],  # type: ignore[misc]
                                                env=self._controller_env, stdin=subprocess.DEVNULL,
                                                start_new_session=True)

    def _not_reachable(self) -> RayServeException:
        if self.gave_up or self.closed:
            return RayServeException("shoal is not running: its controller exited and could not be restarted.")
        return RayServeException(
            f"The shoal controller is restarting and did not answer within {self.controller_wait_s:g} s "
            "(SHOAL_CONTROLLER_WAIT_S); applications keep serving meanwhile. Try again shortly.")

    async def _call_now(self, method: str, args: tuple, kwargs: dict) -> Any:
        conn = self.conn
        if conn is None:
            raise ConnectionLost("not connected to the controller")
        return await conn.call(method, *args, **kwargs)

    def call_sync(self, method: str, *args: Any, timeout: Optional[float] = None, **kwargs: Any) -> Any:
        """Call the controller from sync code (not from the I/O loop itself).

        While the controller restarts the call waits for the new one (at most `controller_wait_s`),
        then goes to it: every control call is safe to repeat."""
        if self.closed:
            raise RayServeException("shoal is not running: call serve.start() or serve.run() first.")
        while True:
            if not self._connected.wait(self.controller_wait_s) or self.gave_up or self.closed:
                raise self._not_reachable()
            fut = asyncio.run_coroutine_threadsafe(self._call_now(method, args, kwargs), self.loop)
            try:
                return fut.result(timeout)
            except ConnectionLost:
                time.sleep(0.01)  # the connection-lost callback clears `_connected` on the loop

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call the controller from async code; waits for a restarting one up to `controller_wait_s`."""
        if asyncio.get_running_loop() is not self.loop:
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self.call(method, *args, **kwargs), self.loop))
        return await self._call_across_restarts(method, args, kwargs, time.monotonic() + self.controller_wait_s)

    async def control_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """A replica's or proxy's call to the controller: waits across restarts for as long as one may come."""
        return await self._call_across_restarts(method, args, kwargs, None)

    async def _call_across_restarts(self, method: str, args: tuple, kwargs: dict, deadline: Optional[float]) -> Any:
        while True:
            if self.gave_up or self.closed:
                raise self._not_reachable()
            if self.conn is not None:
                try:
                    return await self._call_now(method, args, kwargs)
                except ConnectionLost:
                    pass
            if deadline is not None and time.monotonic() > deadline:
                raise self._not_reachable()
            await asyncio.sleep(0.02)

    # --- routers ------------------------------------------------------------------------------
    def get_router(self, deployment_id: DeploymentID, loop: Optional[asyncio.AbstractEventLoop]) -> Router:
        """A new router for `deployment_id` on `loop` (the I/O loop for sync callers)."""
        if self.closed:
            raise RayServeException("shoal is not running: call serve.start() or serve.run() first.")
        if loop is None and self.sync_loop is not None:
            router = Router(deployment_id, self.sync_loop.loop)
            router.sync_loop = self.sync_loop
            self.sync_loop.add_router(router)
        else:
            router = Router(deployment_id, loop or self.loop)
        router.on_queued_without_replicas = self._report_soon
        if loop is not None and loop is not self.loop:
            self._close_routers_of_closed_loops()
        with self._lock:
            routers = self._routers.get(deployment_id)
            first = routers is None
            if first:
                routers = self._routers[deployment_id] = weakref.WeakSet()
            routers.add(router)
            known = self._targets.get(deployment_id)
        if first:
            self.loop.call_soon_threadsafe(self._subscribe, deployment_id)
        elif known is not None:
            self._deliver(router, known)
        return router

    def _close_routers_of_closed_loops(self) -> None:
        """Routers die with their event loop (each `asyncio.run` has its own): free their sockets."""
        with self._lock:
            dead = [r for rs in self._routers.values() for r in rs if r.loop.is_closed() and not r.closed]
        for router in dead:
            router.close()

    # --- autoscaling load reports ---------------------------------------------------------------
    _REPORT_PERIOD_S = 0.25

    def start_load_reports(self) -> None:
        """Report queued/running requests of autoscaled deployments to the controller (I/O loop)."""
        self._report_scheduled = False
        self.loop.call_later(self._REPORT_PERIOD_S, self._periodic_report)

    def _periodic_report(self) -> None:
        if self.closed:
            return
        self._send_report()
        self.loop.call_later(self._REPORT_PERIOD_S, self._periodic_report)

    def _report_soon(self, router: Router) -> None:
        """A request waits with no replica: tell the controller now (cold start from zero)."""
        if router.autoscaling and not self._report_scheduled:
            self._report_scheduled = True
            self.loop.call_soon_threadsafe(self._send_report)

    def _send_report(self) -> None:
        self._report_scheduled = False
        with self._lock:
            groups = {d: list(rs) for d, rs in self._routers.items()}
        payload = {}
        for dep_id, routers in groups.items():
            loads = [r.load() for r in routers if r.autoscaling and not r.closed]
            if loads:
                payload[dep_id] = (sum(q for q, _ in loads), sum(n for _, n in loads))
        # Send what changed, and keep repeating non-zero loads (the controller averages over time).
        report = {d: v for d, v in payload.items() if v != (0, 0) or self._last_report.get(d) != v}
        if report and self.conn is not None:
            self.conn.notify("router_metrics", report)
        self._last_report = payload

    def _subscribe(self, deployment_id: DeploymentID) -> None:
        if self.conn is not None:
            self.conn.notify("subscribe", deployment_id)

    def _deliver(self, router: Router, targets: DeploymentTargets) -> None:
        try:
            if _running_loop() is router.loop:
                router.update(targets)
            elif router.sync_loop is not None:
                router.sync_loop.call_soon_threadsafe(router.update, targets)
            else:
                router.loop.call_soon_threadsafe(router.update, targets)
        except RuntimeError:  # the router's loop is closed: the router is gone with it
            router.closed = True

    def _on_targets(self, targets: DeploymentTargets) -> None:
        with self._lock:
            self._targets[targets.deployment_id] = targets
            routers = list(self._routers.get(targets.deployment_id, ()))
        for router in routers:
            if not router.closed:
                self._deliver(router, targets)

    def close_routers(self) -> None:
        with self._lock:
            routers = [r for rs in self._routers.values() for r in rs]
            self._routers.clear()
            self._targets.clear()
        for r in routers:
            r.closed = True
            if r.sync_loop is not None:
                continue  # closed below, by running its loop
            try:
                r.loop.call_soon_threadsafe(r.close)
            except RuntimeError:
                pass
        if self.sync_loop is not None:
            self.sync_loop.close()


_global_client: Optional[ServeClient] = None
_global_lock = threading.Lock()


def get_global_client(required: bool = True) -> Optional[ServeClient]:
    client = _global_client
    if client is None or client.closed:
        if required:
            raise RayServeException("shoal is not running: call serve.start() or serve.run() first.")
        return None
    return client


def set_global_client(client: Optional[ServeClient]) -> None:
    global _global_client
    _global_client = client


def _session_root() -> str:
    root = os.path.join(tempfile.gettempdir(), f"shoal-{os.getuid()}")
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.lstat(root)
    if st.st_uid != os.getuid() or not os.path.isdir(root) or os.path.islink(root):
        raise RayServeException(f"{root} is not a directory owned by this user; refusing to put sockets there.")
    if st.st_mode & 0o077:
        os.chmod(root, 0o700)  # sockets inside are 0600 anyway; nobody else may even list them
    return root


def start_controller(http_options: Optional[dict] = None, logs_dir: Optional[str] = None,
                     log_level: Any = None, metrics_options: Optional[dict] = None,
                     access_log: bool = True, log_encoding: Optional[str] = None) -> ServeClient:
    """Spawn a private controller process for this driver and connect to it."""
    from shoal import sessions
    from shoal.log_rotation import LOG_FILE_ENV, rotation_settings
    from shoal.serve_logging import SYSTEM_ACCESS_LOG_ENV, SYSTEM_LOG_ENCODING_ENV, SYSTEM_LOG_LEVEL_ENV

    rotation_settings()  # a bad SHOAL_LOG_ROTATION_* / RAY_ROTATION_* value fails here, not in every replica

    root = _session_root()
    session_dir = tempfile.mkdtemp(prefix=time.strftime("s%Y%m%d-%H%M%S-"), dir=root)
    os.chmod(session_dir, 0o700)
    sessions.record_driver(session_dir)  # `shoal status` finds it; the clean-up leaves it alone meanwhile
    sessions.sweep_in_background(root)  # session directories of instances that have exited
    # The driver's import path reaches the controller, proxies and replicas, with the user's directories
    # last, so a user module cannot shadow a library there (replicas restore the driver's order).
    env = sessions.system_env()
    env.setdefault("PYTHONUNBUFFERED", "1")
    if log_level is not None:
        env[SYSTEM_LOG_LEVEL_ENV] = str(log_level)
    env.pop(LOG_FILE_ENV, None)  # this controller writes to the driver's terminal, not to a log file
    if not access_log:
        env[SYSTEM_ACCESS_LOG_ENV] = "0"  # the proxies' access log
    if log_encoding is not None:
        env[SYSTEM_LOG_ENCODING_ENV] = log_encoding  # the controller's and the proxies' lines
    env.update(keeper.keeper_env())  # this driver restarts the controller should it die (see keeper.py)
    cmd = [sys.executable, "-m", "shoal.controller", "--session-dir", session_dir]
    if logs_dir:
        cmd += ["--logs-dir", logs_dir]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    io = _IoThread()
    client = ServeClient(io.loop, session_dir, io_thread=io, controller_proc=proc)
    client._controller_cmd, client._controller_env = cmd, env
    client.restart_controller = client._restart_owned_controller
    sock = os.path.join(session_dir, CONTROLLER_SOCKET)
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        if proc.poll() is not None:
            io.stop()
            raise RayServeException(f"The shoal controller exited during start-up (exit code {proc.returncode}); "
                                    "see its output above.")
        if time.monotonic() > deadline:
            proc.kill()
            io.stop()
            raise RayServeException("The shoal controller did not start within 60 s.")
        time.sleep(0.005)
    asyncio.run_coroutine_threadsafe(
        client.connect("driver", owner=True, http_options=http_options, metrics_options=metrics_options),
        io.loop).result(30)
    atexit.register(_shutdown_at_exit, client)
    return client


def _shutdown_at_exit(client: ServeClient) -> None:
    if not client.closed:
        shutdown_client(client, timeout=10)


def _kill_recorded_processes(client: ServeClient) -> None:
    """The controller could not be reached to shut down: stop what its checkpoint says runs, so
    nothing is left behind (the embedded runtime; a cluster's controller is Ray's to restart)."""
    if client.controller_proc is None:
        return
    from shoal.controller import checkpoint
    from shoal.runtime.base import FileCheckpointStore
    from shoal.runtime.embedded import CHECKPOINT_FILE, kill_described

    if client.controller_proc.poll() is None:
        client.controller_proc.kill()
    snap = checkpoint.load(FileCheckpointStore(os.path.join(client.session_dir, CHECKPOINT_FILE)))
    if snap is None:
        return
    for desc in checkpoint.process_descriptions(snap):
        kill_described(desc)


def disconnect_client(client: ServeClient) -> None:
    """Close this side only: a controller this process does not own (Ray) keeps running, and so do
    its applications."""
    if client.closed:
        return
    client.closed = True
    client.close_routers()
    if client.conn is not None:
        client.loop.call_soon_threadsafe(client.conn.close)
    if client.io_thread is not None:
        client.io_thread.stop()


def shutdown_client(client: ServeClient, timeout: float = 60) -> None:
    """Ask the controller to stop everything, wait for it to exit, and tear down this side."""
    if client.closed:
        return
    try:
        client.call_sync("shutdown", timeout=timeout)
        client.stopping = True
    except Exception as e:  # noqa: BLE001 - controller already gone is fine
        logger.debug("controller shutdown call failed: %r", e)
        client.stopping = True
        _kill_recorded_processes(client)
    client.closed = True
    client.close_routers()
    if client.after_shutdown is not None:
        client.after_shutdown(timeout)
    proc = client.controller_proc
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if client.conn is not None:
        client.loop.call_soon_threadsafe(client.conn.close)
    if client.io_thread is not None:
        client.io_thread.stop()
