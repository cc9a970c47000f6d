"""The controller process: desired state in, replica processes out. It never carries a request.

Drivers deploy and delete applications and read status over control calls; routers subscribe to
each deployment's replica set and get it pushed on every change; replicas report ready/failed.
A reconcile loop runs every 100 ms and at once when something happens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

from shoal.common import CONTROL_LOOP_INTERVAL_S, DeploymentID, DeploymentTargets
from shoal.controller import checkpoint
from shoal.controller.autoscaler import ApplicationAutoscaler, LoadReports, ScalingLog
from shoal.controller.deployment_state import DeploymentState, ReplicaRecord
from shoal.controller.proxy_state import ProxyManager
from shoal.http.routes import Route
from shoal.controller.specs import ApplicationSpec
from shoal.exceptions import RayServeException
from shoal.runtime.base import Runtime
from shoal.status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    DeploymentStatusTrigger,
    ProxyStatus,
    ServeStatus,
)
from shoal.telemetry.exporter import MetricsHub
from shoal.transport.connection import Connection, ConnectionLost, RpcHandler

logger = logging.getLogger("shoal.controller")

# Worst first: the application shows the worst status among its deployments (Ray Serve's ranking).
# A deployment scaling because its config changed (serve.run with another num_replicas) ranks with
# UPDATING, so the app is DEPLOYING and `serve.run` waits until the change is applied; scaling by the
# autoscaler, or replacing a lost replica, leaves the app RUNNING.
_FAILED, _UNHEALTHY, _CHANGING, _STEADY = range(4)


def _deployment_rank(ds: DeploymentState) -> int:
    status = ds.status
    if status == DeploymentStatus.DEPLOY_FAILED:
        return _FAILED
    if status == DeploymentStatus.UNHEALTHY:
        return _UNHEALTHY
    if status == DeploymentStatus.UPDATING:
        return _CHANGING
    if status in (DeploymentStatus.UPSCALING, DeploymentStatus.DOWNSCALING) and ds.trigger not in (
            DeploymentStatusTrigger.AUTOSCALING, DeploymentStatusTrigger.UNSPECIFIED):
        return _CHANGING
    return _STEADY


class ApplicationState:
    def __init__(self, spec: ApplicationSpec):
        self.spec = spec
        self.deleting = False
        self.status = ApplicationStatus.DEPLOYING
        self.message = ""
        self.last_deployed_time_s = time.time()
        self.deployment_names: set[str] = set()
        # The app's entry of the config file it was deployed from (None: deployed by `serve.run`).
        self.config: Optional[dict] = None
        self.autoscaler: Optional[ApplicationAutoscaler] = None
        self.set_autoscaling_policy(spec)

    def set_autoscaling_policy(self, spec: ApplicationSpec) -> None:
        """The application-level policy of a config file's `autoscaling_policy`, if any."""
        policy = getattr(spec, "autoscaling_policy", None)
        if policy is None:
            self.autoscaler = None
        elif self.autoscaler is None:
            self.autoscaler = ApplicationAutoscaler(spec.name, policy)
        else:
            self.autoscaler.configure(policy)


class Controller(RpcHandler):
    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.apps: dict[str, ApplicationState] = {}
        self.deployments: dict[DeploymentID, DeploymentState] = {}
        self.replicas_by_uid: dict[str, ReplicaRecord] = {}
        self.subscribers: dict[DeploymentID, set[Connection]] = {}
        self.owner: Optional[Connection] = None
        self.shutting_down = False
        self.done = asyncio.Event()
        self._wake = asyncio.Event()
        self._status_changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._last_pending_log: dict[DeploymentID, float] = {}
        self._status_waiters: list[asyncio.Future] = []
        self.proxies = ProxyManager(self)
        self.load_reports = LoadReports()
        self.scaling_log = ScalingLog()  # recent autoscaling decisions, for the dashboard
        self.checkpoint_store = runtime.checkpoint_store()
        self.checkpoint_extra: dict = {}  # saved with the checkpoint: what the process main needs back
        self._checkpoint_key: Optional[tuple] = None
        self.metrics = MetricsHub(self)  # every process's metrics, served to Prometheus (telemetry/)

    # --- helpers used by deployment states ------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def status_changed(self) -> None:
        self._status_changed.set()
        self._wake.set()

    def spawn(self, coro) -> None:
        """Run a background task; its failure is logged (a replica that went away is expected)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, ConnectionLost):
                logger.debug("background call ended with %r", exc)
            else:
                logger.warning("background task failed: %r", exc)

    def publish(self, ds: DeploymentState) -> None:
        targets = ds.targets()
        for conn in self.subscribers.get(ds.id, ()):
            conn.notify("targets", targets)

    # --- the loop -----------------------------------------------------------------------------
    async def run(self) -> None:
        while not self.done.is_set():
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - the loop must never die
                logger.exception("reconcile step failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), CONTROL_LOOP_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    def reconcile(self) -> None:
        self.proxies.reconcile(self.shutting_down)
        self.metrics.tick()
        self._autoscale_apps()
        for ds in list(self.deployments.values()):
            ds.reconcile()
            if ds.is_gone():
                del self.deployments[ds.id]
                for conn in self.subscribers.get(ds.id, ()):
                    conn.notify("targets", DeploymentTargets(ds.id, exists=False))
                self._status_changed.set()
            elif ds.pending_reason:
                now = time.monotonic()
                if now - self._last_pending_log.get(ds.id, 0) > 10:
                    self._last_pending_log[ds.id] = now
                    logger.warning(ds.pending_reason)
        for name, app in list(self.apps.items()):
            self._update_app_status(app)
            if app.deleting and not any(d in self.deployments for d in self._app_deployment_ids(app)):
                del self.apps[name]
                self._status_changed.set()
        if self._status_changed.is_set():
            self._status_changed.clear()
            for fut in list(self._status_waiters):
                if not fut.done():
                    fut.set_result(None)
            self._status_waiters.clear()
        self.save_checkpoint()

    def app_autoscaled(self, app_name: str) -> bool:
        """Whether an application-level policy scales this application's deployments."""
        app = self.apps.get(app_name)
        return app is not None and app.autoscaler is not None and not app.deleting

    def _autoscale_apps(self) -> None:
        for app in self.apps.values():
            if app.autoscaler is None or app.deleting:
                continue
            states = [self.deployments.get(DeploymentID(n, app.spec.name)) for n in sorted(app.deployment_names)]
            scaled = [ds for ds in states if ds is not None and ds.autoscaler is not None and not ds.deleting]
            if scaled:
                for dep_id, desired in app.autoscaler.decide(scaled).items():
                    self.deployments[dep_id].set_autoscale_target(desired)

    # --- checkpoint and recovery (controller/checkpoint.py) -------------------------------------
    def save_checkpoint(self) -> None:
        """Write the checkpoint if anything in it changed since the last write."""
        if self.checkpoint_store is None or self.shutting_down:
            return
        key = (tuple((n, id(a.spec), id(a.config), a.deleting) for n, a in self.apps.items()),
               tuple((d, ds.checkpoint_key()) for d, ds in self.deployments.items()),
               self.proxies.checkpoint_key(), tuple(sorted(self.checkpoint_extra.items())))
        if key == self._checkpoint_key:
            return
        snap = checkpoint.ControllerSnapshot(
            apps=[checkpoint.ApplicationSnapshot(a.spec, a.config, a.deleting, a.status.value, a.message,
                                                 a.last_deployed_time_s, set(a.deployment_names))
                  for a in self.apps.values()],
            deployments=[ds.snapshot() for ds in self.deployments.values()],
            http_options=self.proxies.options, proxies=self.proxies.snapshot(), proxy_port=self.proxies.port,
            routes_version=self.proxies.version, extra=dict(self.checkpoint_extra))
        try:
            self.checkpoint_store.save(checkpoint.dumps(snap))
        except Exception:  # noqa: BLE001 - serving goes on; the next change tries again
            logger.exception("writing the controller checkpoint failed")
            return
        self._checkpoint_key = key

    def restore(self, snap: checkpoint.ControllerSnapshot) -> None:
        """Become the controller that wrote `snap`: same apps, targets and routes; live processes adopted."""
        self.checkpoint_extra = dict(snap.extra)
        self.proxies.restore(snap.http_options, snap.proxies, snap.proxy_port, snap.routes_version)
        for a in snap.apps:
            app = self.apps[a.spec.name] = ApplicationState(a.spec)
            app.config, app.deleting, app.message = a.config, a.deleting, a.message
            app.status, app.last_deployed_time_s = ApplicationStatus(a.status), a.last_deployed_time_s
            app.deployment_names = set(a.deployment_names)
        for d in snap.deployments:
            ds = self.deployments[d.deployment_id] = DeploymentState(self, d.deployment_id, d.spec)
            ds.restore(d)
        self._publish_routes()
        adopted = sum(len(ds.replicas) for ds in self.deployments.values())
        logger.info("recovered from the checkpoint: %d application(s), %d replica(s) adopted, %d proxy(ies)",
                    len(self.apps), adopted, len(self.proxies.proxies))

    async def _next_status_change(self, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._status_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass

    def _app_deployment_ids(self, app: ApplicationState) -> list[DeploymentID]:
        return [DeploymentID(n, app.spec.name) for n in app.deployment_names]

    def _update_app_status(self, app: ApplicationState) -> None:
        if app.deleting:
            status, message = ApplicationStatus.DELETING, ""
        else:
            states = [self.deployments[d] for d in self._app_deployment_ids(app) if d in self.deployments]
            worst = min(states, key=_deployment_rank) if states else None
            rank = _deployment_rank(worst) if worst is not None else _STEADY
            if rank == _STEADY:
                status, message = ApplicationStatus.RUNNING, ""
            elif rank == _FAILED:
                status = ApplicationStatus.DEPLOY_FAILED
                message = f"Deployment '{worst.id.name}' failed to deploy: {worst.message}"  # type: ignore[union-attr]
            elif rank == _UNHEALTHY:
                status = ApplicationStatus.UNHEALTHY
                message = f"Deployment '{worst.id.name}' is unhealthy: {worst.message}"  # type: ignore[union-attr]
            else:
                status = ApplicationStatus.DEPLOYING
                message = "; ".join(s.message for s in states if s.message)
        if (status, message) != (app.status, app.message):
            app.status, app.message = status, message
            self._status_changed.set()

    # --- control calls from drivers -------------------------------------------------------------
    async def rpc_hello(self, conn: Connection, role: str, pid: int, owner: bool = False,
                        unique_id: str = "", **extra: Any) -> Any:
        conn.name = f"{role}(pid={pid})"
        conn.node_id = extra.get("node_id") or ""  # its metrics belong to this node's endpoint
        if role == "metrics_exporter":
            self.metrics.exporter_hello(conn, conn.node_id, extra.get("url"))
            return None
        if role == "driver":
            if owner and self.owner is None:
                self.owner = conn
            self.proxies.configure(extra.get("http_options"))
            await self.metrics.configure(extra.get("metrics_options"))
            return {"http_options": self.proxies.options}
        if role == "proxy":
            return self.proxies.hello(conn, extra["index"], extra.get("serving_port", 0),
                                      extra.get("draining", False))
        if role == "replica":
            rec = self.replicas_by_uid.get(unique_id)
            if rec is None:
                # Unknown after a restart (started just before the last checkpoint): it exits.
                raise RayServeException(f"unknown replica {unique_id}")
            rec.conn = conn
            conn.replica = rec  # type: ignore[attr-defined]
            ds = self.deployments[rec.replica_id.deployment_id]
            ds.on_replica_node(rec, extra.get("node_id") or "")
            if extra.get("reconnect"):  # it kept serving while the controller restarted
                if extra.get("ready") and extra.get("address"):
                    rec.address = extra["address"]
                ds.on_replica_reconnected(rec, bool(extra.get("ready")), extra.get("model_ids"))
                return {"replica_id": rec.replica_id}
            return {"replica_id": rec.replica_id, "address": rec.address, "config": ds.spec.config,
                    "serialized_def": ds.spec.serialized_def,
                    "serialized_init_args": ds.spec.serialized_init_args, "python_path": ds.spec.python_path,
                    **ds.hello_info(rec)}
        return None

    async def rpc_deploy_app(self, conn: Connection, spec: ApplicationSpec) -> None:
        await self.deploy_app(spec)

    async def rpc_apply_config(self, conn: Optional[Connection], specs: list[ApplicationSpec],
                               configs: dict[str, Optional[dict]]) -> None:
        """Declarative deploy: `specs` become the full set of applications (others are deleted).

        Route prefixes are unique within the config (the schema checks it), and every app absent
        from it is deleted first, so an app may take over another's prefix in one step."""
        if self.shutting_down:
            raise RayServeException("shoal is shutting down.")
        names = {s.name for s in specs}
        await self.rpc_delete_apps(None, [n for n in self.apps if n not in names], blocking=False)  # type: ignore[arg-type]
        for spec in specs:
            await self.deploy_app(spec, check_routes=False, config=configs.get(spec.name))

    async def deploy_app(self, spec: ApplicationSpec, check_routes: bool = True,
                         config: Optional[dict] = None) -> None:
        if self.shutting_down:
            raise RayServeException("shoal is shutting down.")
        if check_routes and spec.route_prefix is not None:
            for other in self.apps.values():
                if other.spec.name != spec.name and not other.deleting and other.spec.route_prefix == spec.route_prefix:
                    raise RayServeException(
                        f"Prefix {spec.route_prefix} is being used by application \"{other.spec.name}\". "
                        f"Please specify a different route prefix."
                    )
        app = self.apps.get(spec.name)
        if app is None or app.deleting:
            if app is not None and app.deleting:
                await self._wait_app_gone(spec.name)
            app = self.apps[spec.name] = ApplicationState(spec)
        else:
            app.spec = spec
            app.last_deployed_time_s = time.time()
            app.status = ApplicationStatus.DEPLOYING
            app.set_autoscaling_policy(spec)
        app.config = config
        new_names = {d.name for d in spec.deployments}
        for old_name in app.deployment_names - new_names:
            ds = self.deployments.get(DeploymentID(old_name, spec.name))
            if ds is not None:
                ds.delete()
        for dspec in spec.deployments:
            did = DeploymentID(dspec.name, spec.name)
            ds = self.deployments.get(did)
            if ds is None or ds.deleting:
                self.deployments[did] = DeploymentState(self, did, dspec)
            else:
                ds.set_spec(dspec)
        app.deployment_names = new_names
        if app.autoscaler is not None:
            for dspec in spec.deployments:
                auto = dspec.config.autoscaling_config
                if auto is not None and auto.policy is not None and not auto.policy.is_default_policy_function():
                    logger.warning("deployment %s has its own autoscaling policy and application '%s' one: the "
                                   "application's takes precedence", DeploymentID(dspec.name, spec.name), spec.name)
        self._publish_routes()
        self.status_changed()
        self.save_checkpoint()  # before the caller hears "deployed": a restart must not forget it

    async def _wait_app_gone(self, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while name in self.apps and time.monotonic() < deadline:
            await self._next_status_change(0.2)

    def _publish_routes(self) -> None:
        self.proxies.set_routes(sorted(
            (Route(a.spec.route_prefix, a.spec.name, a.spec.ingress) for a in self.apps.values()
             if not a.deleting and a.spec.route_prefix is not None),
            key=lambda r: r.prefix))

    async def rpc_wait_for_app(self, conn: Connection, name: str, timeout: float = 3600) -> tuple:
        """Return (status, message) once the app is RUNNING (and proxies route to it), failed, or gone."""
        deadline = time.monotonic() + timeout
        while True:
            app = self.apps.get(name)
            if app is None:
                return (ApplicationStatus.NOT_STARTED.value, f"Application '{name}' does not exist.")
            if app.status == ApplicationStatus.RUNNING:
                await self.proxies.wait_started(min(10.0, max(0.0, deadline - time.monotonic())))
                await self.proxies.wait_routes(min(10.0, max(0.0, deadline - time.monotonic())))
                return (app.status.value, app.message)
            if app.status == ApplicationStatus.DEPLOY_FAILED:
                return (app.status.value, app.message)
            if time.monotonic() >= deadline:
                return (app.status.value, app.message)
            await self._next_status_change(min(1.0, deadline - time.monotonic()))

    async def rpc_delete_apps(self, conn: Connection, names: list[str], blocking: bool = True) -> None:
        for name in names:
            app = self.apps.get(name)
            if app is None:
                continue
            app.deleting = True
            for did in self._app_deployment_ids(app):
                ds = self.deployments.get(did)
                if ds is not None:
                    ds.delete()
        self._publish_routes()
        self.status_changed()
        self.save_checkpoint()
        if blocking:
            for name in names:
                await self._wait_app_gone(name)

    async def rpc_status(self, conn: Connection) -> ServeStatus:
        apps = {}
        for name, app in self.apps.items():
            deps = {}
            for did in self._app_deployment_ids(app):
                ds = self.deployments.get(did)
                if ds is not None:
                    deps[did.name] = DeploymentStatusOverview(ds.status, ds.trigger, ds.replica_state_counts(),
                                                              ds.message)
            apps[name] = ApplicationStatusOverview(app.status, app.message, app.last_deployed_time_s, deps)
        return ServeStatus(proxies=self.proxies.statuses(), applications=apps)

    async def rpc_wait_for_proxies(self, conn: Connection, timeout: float = 60) -> tuple[bool, str]:
        return await self.proxies.wait_ready(timeout)

    async def rpc_http_url(self, conn: Connection) -> Optional[str]:
        return self.proxies.url()

    async def rpc_proxy_ready(self, conn: Connection, index: int, port: int) -> None:
        self.proxies.ready(index, port)

    async def rpc_proxy_failed(self, conn: Connection, index: int, error: str) -> None:
        self.proxies.failed(index, error)

    def notify_router_metrics(self, conn: Connection, payload: dict) -> None:
        """Queued and running requests a caller process holds for autoscaled deployments."""
        if self.load_reports.update(conn, payload):
            self.wake()  # requests may be waiting with no replica: decide now, not at the next tick

    def notify_metrics(self, conn: Connection, payload: tuple) -> None:
        """A process's metrics (cumulative, about once a second while they change)."""
        self.metrics.update(conn, payload)

    async def rpc_metrics_url(self, conn: Connection) -> Optional[str]:
        """The endpoint showing the caller's metrics (on Ray: its node's)."""
        return self.metrics.url_for(getattr(conn, "node_id", ""))

    async def rpc_metrics_urls(self, conn: Connection) -> dict[str, str]:
        """Every endpoint by node id (one machine: one, under "")."""
        if not self.metrics.per_node:
            return {"": self.metrics.url} if self.metrics.url else {}
        return dict(self.metrics.node_urls)

    async def rpc_metrics_text(self, conn: Connection, node_id: Optional[str] = None) -> str:
        """The whole instance's metrics text, or one node's slice (`node_id`)."""
        return self.metrics.text(node_id)

    def notify_model_ids(self, conn: Connection, payload: tuple) -> None:
        """A replica's multiplexed models changed: routers should prefer it for those models."""
        unique_id, model_ids = payload
        rec = self.replicas_by_uid.get(unique_id)
        if rec is not None:
            rec.model_ids = frozenset(model_ids)
            ds = self.deployments.get(rec.replica_id.deployment_id)
            if ds is not None:
                ds.publish_if_changed()

    def notify_autoscaling_stats(self, conn: Connection, payload: tuple) -> None:
        """What a replica's `record_autoscaling_stats()` returned (custom autoscaling metrics)."""
        unique_id, values = payload
        rec = self.replicas_by_uid.get(unique_id)
        ds = self.deployments.get(rec.replica_id.deployment_id) if rec is not None else None
        if ds is not None and ds.autoscaler is not None:
            ds.autoscaler.metrics.record(rec.replica_id, values, time.time())  # type: ignore[union-attr]

    def notify_routes_ack(self, conn: Connection, version: int) -> None:
        self.proxies.acked(conn, version)

    async def rpc_get_ingress(self, conn: Connection, app_name: str) -> str:
        app = self.apps.get(app_name)
        if app is None or app.deleting:
            raise RayServeException(f"Application '{app_name}' does not exist.")
        return app.spec.ingress

    async def rpc_deployment_exists(self, conn: Connection, deployment_id: DeploymentID) -> bool:
        ds = self.deployments.get(deployment_id)
        return ds is not None and not ds.deleting

    def app_configs(self) -> dict[str, dict]:
        """The config entry of every app deployed from a config file, by name."""
        return {name: a.config for name, a in self.apps.items() if not a.deleting and a.config is not None}

    async def rpc_app_configs(self, conn: Connection) -> dict[str, dict]:
        return self.app_configs()

    async def rpc_http_options(self, conn: Connection) -> Optional[dict]:
        return self.proxies.options

    async def rpc_list_apps(self, conn: Connection) -> dict:
        return {name: {"route_prefix": a.spec.route_prefix, "ingress": a.spec.ingress}
                for name, a in self.apps.items() if not a.deleting}

    async def rpc_shutdown(self, conn: Connection) -> None:
        await self.shutdown()

    async def shutdown(self) -> None:
        if self.shutting_down:
            await self.done.wait()
            return
        self.shutting_down = True
        await self.rpc_delete_apps(None, list(self.apps), blocking=True)  # type: ignore[arg-type]
        self.proxies.stop()
        for rec in list(self.replicas_by_uid.values()):
            if rec.process is not None:
                rec.process.kill()
        await self.proxies.wait_exited(timeout=3.0)
        if self.checkpoint_store is not None:
            self.checkpoint_store.clear()  # nothing to recover: a restart after this starts empty
        self.metrics.close()
        self.done.set()

    # --- calls from replicas --------------------------------------------------------------------
    async def rpc_replica_ready(self, conn: Connection, unique_id: str, address: Optional[str] = None,
                                node_id: Optional[str] = None) -> None:
        rec = self.replicas_by_uid.get(unique_id)
        if rec is not None:
            # Where it listens and runs is known only now on a cluster (a free port, the node Ray chose).
            rec.address = address or rec.address
            ds = self.deployments[rec.replica_id.deployment_id]
            ds.on_replica_node(rec, node_id or "")
            ds.on_replica_ready(rec)

    async def rpc_replica_failed(self, conn: Connection, unique_id: str, error: str) -> None:
        rec = self.replicas_by_uid.get(unique_id)
        if rec is not None:
            self.deployments[rec.replica_id.deployment_id].on_replica_failed(rec, error)

    # --- router subscriptions -------------------------------------------------------------------
    def notify_subscribe(self, conn: Connection, deployment_id: DeploymentID) -> None:
        self.subscribers.setdefault(deployment_id, set()).add(conn)
        ds = self.deployments.get(deployment_id)
        conn.notify("targets", ds.targets() if ds is not None else DeploymentTargets(deployment_id, exists=False))

    def on_connection_lost(self, conn: Connection, exc: Optional[BaseException]) -> None:
        super().on_connection_lost(conn, exc)
        for subs in self.subscribers.values():
            subs.discard(conn)
        self.proxies.on_disconnect(conn)
        self.load_reports.forget(conn)
        self.metrics.forget(conn)
        rec = getattr(conn, "replica", None)
        if rec is not None:
            rec.conn = None
            ds = self.deployments.get(rec.replica_id.deployment_id)
            if ds is not None:
                ds.on_replica_disconnected(rec)
        if conn is self.owner and not self.shutting_down:
            logger.info("the driver that started shoal exited; shutting down")
            self.spawn(self.shutdown())
