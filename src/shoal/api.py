"""The top-level functions of `shoal.serve`: start, run, run_many, delete, status, handles, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import sys
import threading
import time
import uuid
from typing import Any, Optional, Sequence, Union

from pydantic import BaseModel

from shoal import client as client_mod
from shoal.common import SERVE_DEFAULT_APP_NAME, DeploymentID
from shoal.config import HTTPOptions, LoggingConfig, validate_model
from shoal.controller.specs import ApplicationSpec, DeploymentSpec
from shoal.deployment import Application, Deployment, deployment_names
from shoal.exceptions import DeployFailedError, RayServeException
from shoal.handle import DeploymentHandle
from shoal.router.base import load_router_class
from shoal.status import ApplicationStatus, ServeStatus
from shoal.transport import serialization as ser

logger = logging.getLogger("shoal")
_start_lock = threading.Lock()


RUNTIMES = ("embedded", "ray")


def _choose_runtime(runtime: Optional[str], address: Optional[str]) -> tuple[str, Optional[str]]:
    runtime = runtime or os.environ.get("SHOAL_RUNTIME") or "embedded"
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}: choose one of {', '.join(RUNTIMES)}.")
    return runtime, address or os.environ.get("SHOAL_RAY_ADDRESS") or None


def start(http_options: Union[None, dict, HTTPOptions] = None, proxy_location: Any = None,
          logging_config: Any = None, runtime: Optional[str] = None, address: Optional[str] = None,
          metrics_export_port: Optional[int] = None, metrics_export_host: Optional[str] = None,
          **_ignored: Any) -> None:
    """Start shoal, or do nothing if it already runs.

    `runtime="embedded"` (the default) runs a controller process on this machine. `runtime="ray"`
    joins the Ray cluster at `address` (`"auto"`: the running one; None: `ray.init()`'s default, or
    the cluster this process already joined) and starts or joins shoal's detached controller there.
    `SHOAL_RUNTIME` and `SHOAL_RAY_ADDRESS` choose the same without code changes.

    The instance's Prometheus metrics are served at `http://127.0.0.1:8080/metrics`:
    `metrics_export_port` (0: any free port, -1: off) and `metrics_export_host` change that, as do
    `SHOAL_METRICS_EXPORT_PORT` and `SHOAL_METRICS_EXPORT_HOST` (see docs/observability.md).
    """
    explicit = runtime
    runtime, address = _choose_runtime(runtime, address)
    with _start_lock:
        running = client_mod.get_global_client(required=False)
        if running is not None:
            if explicit is not None and explicit != running.runtime:
                raise RayServeException(f"shoal already runs on the {running.runtime} runtime in this process; "
                                        f"call serve.shutdown() before starting it on the {explicit} runtime.")
            return
        if isinstance(http_options, HTTPOptions):
            http_options = http_options.model_dump(exclude_unset=True)
        http_options = dict(http_options or {})
        for key, env in (("host", "SHOAL_HTTP_HOST"), ("port", "SHOAL_HTTP_PORT")):
            if key not in http_options and os.environ.get(env):
                http_options[key] = os.environ[env]  # lets tests and ops pick a port without code changes
        opts = validate_model(HTTPOptions, http_options or {}, "http_options").model_dump()
        system_logging = to_logging_config(logging_config, "logging_config")
        logs_dir = system_logging.logs_dir if system_logging is not None else None
        if proxy_location is not None:
            opts["proxy_location"] = getattr(proxy_location, "value", proxy_location)
        from shoal.telemetry.exporter import export_options

        metrics = export_options(metrics_export_port, metrics_export_host)
        if runtime == "ray":
            try:
                from shoal.runtime.ray import connect_driver
            except ImportError as e:
                raise RayServeException("The ray runtime needs Ray: pip install 'shoal[ray]'.") from e
            client = connect_driver(address, opts, metrics)
        else:
            client = client_mod.start_controller(
                http_options=opts, logs_dir=logs_dir, metrics_options=metrics,
                log_level=system_logging.log_level if system_logging is not None else None,
                access_log=system_logging.enable_access_log if system_logging is not None else True,
                log_encoding=system_logging.encoding if system_logging is not None else None)
        client_mod.set_global_client(client)
        ok, error = client.call_sync("wait_for_proxies", 60)
        if not ok:
            client_mod.shutdown_client(client)
            client_mod.set_global_client(None)
            raise RayServeException(f"The HTTP proxy could not start: {error}")


def get_http_url() -> Optional[str]:
    """The base URL the HTTP proxy listens on (None when HTTP is disabled or shoal is not running)."""
    client = client_mod.get_global_client(required=False)
    return None if client is None else client.call_sync("http_url")


def _validate_route_prefix(route_prefix: Optional[str]) -> None:
    if route_prefix is None:
        return
    if not isinstance(route_prefix, str) or not route_prefix.startswith("/"):
        raise ValueError(f"Invalid route_prefix {route_prefix!r}: it must start with '/'.")
    if route_prefix != "/" and route_prefix.endswith("/"):
        raise ValueError(f"Invalid route_prefix {route_prefix!r}: it must not end with '/' unless it is '/'.")
    if re.search(r"[{}]", route_prefix):
        raise ValueError(f"Invalid route_prefix {route_prefix!r}: it must not contain wildcards ('{{' or '}}').")


DEFAULT_ROUTER_CLASS = "shoal.router.pow2:PowerOfTwoChoicesRequestRouter"


def _with_prepared_policy(config: Any, where: str) -> Any:
    """The config with its custom autoscaling policy imported and pickled for the controller."""
    auto = config.autoscaling_config
    if auto is None or auto.policy is None:
        return config
    try:
        policy = auto.policy.prepared()
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if policy is auto.policy:
        return config
    return config.model_copy(update={"autoscaling_config": auto.model_copy(update={"policy": policy})})


def build_app_spec(target: Application, name: str, route_prefix: Optional[str]) -> ApplicationSpec:
    """Walk the bound graph: one spec per deployment, nested applications replaced by handles."""
    specs: dict[str, DeploymentSpec] = {}
    names = deployment_names(target)

    def to_handle(app: Application) -> DeploymentHandle:
        visit(app)
        return DeploymentHandle(names[id(app)], name)

    def replace(value: Any) -> Any:
        if isinstance(value, Application):
            return to_handle(value)
        if isinstance(value, list):
            return [replace(v) for v in value]
        if isinstance(value, tuple):
            return tuple(replace(v) for v in value)
        if isinstance(value, dict):
            return {k: replace(v) for k, v in value.items()}
        return value

    def visit(app: Application) -> None:
        dname = names[id(app)]
        if dname in specs:
            return
        d = app.deployment
        args = replace(d.init_args)
        kwargs = replace(d.init_kwargs)
        where = f"deployment '{dname}'"
        try:
            serialized_def = ser.dumps_callable(d.func_or_class)
        except Exception as e:  # noqa: BLE001
            raise TypeError(f"Could not serialize the code of {where}: {e}") from e
        router_class = d.config.request_router_config.request_router_class
        if router_class != DEFAULT_ROUTER_CLASS:
            try:  # as in Ray, a router class that cannot be imported fails the deploy, not each request
                load_router_class(router_class)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"{where}: request_router_class '{router_class}' could not be loaded: "
                                 f"{type(e).__name__}: {e}") from None
        specs[dname] = DeploymentSpec(
            name=dname, serialized_def=serialized_def,
            serialized_init_args=ser.dumps_call_args(tuple(args), kwargs, f"the constructor of {where}"),
            config=_with_prepared_policy(d.config, where), user_configured_options=d._user_configured,
            python_path=tuple(sys.path),
        )

    visit(target)
    return ApplicationSpec(name=name, route_prefix=route_prefix, ingress=names[id(target)],
                           deployments=list(specs.values()))


def _new_code_versions(spec: ApplicationSpec) -> None:
    """As in Ray, each `serve.run` of an unversioned deployment is a new code version: its replicas
    are replaced (see DeploymentSpec.code_nonce); a `version` keeps them."""
    for d in spec.deployments:
        if d.config.version is None:
            d.code_nonce = uuid.uuid4().hex


def _force_local_testing_mode() -> bool:
    return any(os.environ.get(k) == "1" for k in ("SHOAL_FORCE_LOCAL_TESTING_MODE", "RAY_SERVE_FORCE_LOCAL_TESTING_MODE"))


def _check_run_target(target: Any, name: Any, route_prefix: Optional[str], external_scaler_enabled: bool) -> None:
    if isinstance(target, Deployment):
        raise TypeError("serve.run expects an Application; call `.bind()` on the deployment first.")
    if not isinstance(target, Application):
        raise TypeError(f"serve.run expects an Application (from Deployment.bind()), got {type(target).__name__}.")
    if not isinstance(name, str) or not name:
        raise ValueError("Application name must be a non-empty string.")
    _validate_route_prefix(route_prefix)
    if external_scaler_enabled:
        raise ValueError("external_scaler_enabled=True is not supported by shoal: its autoscaler runs in the "
                         "controller (`autoscaling_config`), with no external scaling API.")


def to_logging_config(value: Any, what: str = "logging_config") -> Optional[LoggingConfig]:
    """A `LoggingConfig` from what the user gave (None, a dict, or one already)."""
    if value is None or isinstance(value, LoggingConfig):
        return value
    if isinstance(value, BaseModel):  # e.g. another library's LoggingConfig with the same fields
        value = value.model_dump(exclude_unset=True)
    if not isinstance(value, dict):
        raise TypeError(f"{what} must be a LoggingConfig or a dict, got {type(value).__name__}.")
    return validate_model(LoggingConfig, value, what)  # type: ignore[return-value]


def _apply_app_logging_config(spec: ApplicationSpec, logging_config: Optional[LoggingConfig]) -> None:
    """An application's `logging_config` is each of its deployments' that sets none of its own (Ray's rule)."""
    if logging_config is None:
        return
    for d in spec.deployments:
        if d.config.logging_config is None:  # a copy: the Deployment's own config stays as the user made it
            d.config = d.config.model_copy(update={"logging_config": logging_config})


def run(target: Application, blocking: bool = False, name: str = SERVE_DEFAULT_APP_NAME,
        route_prefix: Optional[str] = "/", logging_config: Any = None,
        _local_testing_mode: bool = False, external_scaler_enabled: bool = False,
        controller_options: Any = None, runtime: Optional[str] = None,
        address: Optional[str] = None) -> DeploymentHandle:
    """Deploy an application, wait until it is RUNNING, and return a handle to its ingress.

    `logging_config` applies to each deployment of the application that has none of its own.
    `runtime` and `address` are passed to `start()` when shoal is not running yet."""
    _check_run_target(target, name, route_prefix, external_scaler_enabled)
    logging_config = to_logging_config(logging_config)
    if _local_testing_mode or _force_local_testing_mode():
        from shoal.local_testing import run_local

        return run_local(target, name, logging_config)
    spec = build_app_spec(target, name, route_prefix)
    _new_code_versions(spec)
    _apply_app_logging_config(spec, logging_config)
    if not blocking:
        return _deploy(spec, runtime, address)
    with _SigtermAsInterrupt():  # installed first: a SIGTERM during the deploy also shuts down cleanly
        try:
            handle = _deploy(spec, runtime, address)
        except KeyboardInterrupt:
            shutdown()
            return DeploymentHandle(spec.ingress, name)
        _block_until_interrupted()
    return handle


def _deploy(spec: ApplicationSpec, runtime: Optional[str] = None, address: Optional[str] = None) -> DeploymentHandle:
    return _deploy_many([spec], runtime, address)[0]


def _deploy_many(specs: list[ApplicationSpec], runtime: Optional[str] = None, address: Optional[str] = None,
                 wait: bool = True) -> list[DeploymentHandle]:
    start(runtime=runtime, address=address)
    client = client_mod.get_global_client()
    from shoal.handle import _running_loop

    if _running_loop() is client.loop:  # type: ignore[union-attr]
        raise RayServeException(
            "serve.run() was called on a replica's event loop, where it cannot wait for the deploy: often a "
            "script's module-level serve.run(), run again because a replica imported the script as a module "
            "(its deployments live there, or a file beside it is named like a library it imports). Put it "
            "under `if __name__ == \"__main__\":`.")
    for spec in specs:
        client.call_sync("deploy_app", spec)  # type: ignore[union-attr]
    for spec in specs if wait else ():
        status, message = client.call_sync("wait_for_app", spec.name)  # type: ignore[union-attr]
        if status == ApplicationStatus.DEPLOY_FAILED.value:
            raise DeployFailedError(f"Application '{spec.name}' failed to deploy:\n{message}")
        if status != ApplicationStatus.RUNNING.value:
            raise RayServeException(f"Application '{spec.name}' did not reach RUNNING (status {status}): {message}")
    for spec in specs:  # a handle from before this deploy may hold an older replica set for a moment
        for key in [k for k in client.handle_cache if k[1] == spec.name]:  # type: ignore[union-attr]
            del client.handle_cache[key]  # type: ignore[union-attr]
    return [_cached_handle(client, spec.ingress, spec.name) for spec in specs]  # type: ignore[arg-type]


@dataclasses.dataclass
class RunTarget:
    """One application for `serve.run_many`: what `serve.run` takes for one."""

    target: Application
    name: str = SERVE_DEFAULT_APP_NAME
    route_prefix: Optional[str] = "/"
    logging_config: Any = None
    external_scaler_enabled: bool = False


def run_many(targets: Sequence[RunTarget], blocking: bool = False, wait_for_ingress_deployment_creation: bool = True,
             wait_for_applications_running: bool = True, _local_testing_mode: bool = False,
             controller_options: Any = None, runtime: Optional[str] = None,
             address: Optional[str] = None) -> list[DeploymentHandle]:
    """Deploy several applications at once and return the handles to their ingresses, in order.

    All are sent before any is waited for, so they start side by side. With
    `wait_for_applications_running=False` the handles come back at once (calls through them wait
    for replicas). Names and route prefixes must be unique among the targets."""
    targets = list(targets)
    if not targets:
        raise ValueError("No applications provided.")
    names: set[str] = set()
    prefixes: set[str] = set()
    for t in targets:
        if not isinstance(t, RunTarget):
            raise TypeError(f"serve.run_many expects RunTarget objects, got {type(t).__name__}.")
        _check_run_target(t.target, t.name, t.route_prefix, t.external_scaler_enabled)
        if t.name in names:
            raise ValueError(f"Application name '{t.name}' appears more than once in the targets.")
        if t.route_prefix is not None and t.route_prefix in prefixes:
            raise ValueError(f"Route prefix '{t.route_prefix}' appears more than once in the targets.")
        names.add(t.name)
        if t.route_prefix is not None:
            prefixes.add(t.route_prefix)
    configs = [to_logging_config(t.logging_config) for t in targets]
    if _local_testing_mode or _force_local_testing_mode():
        from shoal.local_testing import run_local

        return [run_local(t.target, t.name, lc) for t, lc in zip(targets, configs)]
    specs = []
    for t, lc in zip(targets, configs):
        spec = build_app_spec(t.target, t.name, t.route_prefix)
        _new_code_versions(spec)
        _apply_app_logging_config(spec, lc)
        specs.append(spec)
    if not blocking:
        return _deploy_many(specs, runtime, address, wait=wait_for_applications_running)
    with _SigtermAsInterrupt():
        try:
            handles = _deploy_many(specs, runtime, address, wait=wait_for_applications_running)
        except KeyboardInterrupt:
            shutdown()
            return [DeploymentHandle(s.ingress, s.name) for s in specs]
        _block_until_interrupted()
    return handles


def _run(target: Application, *, _blocking: bool = True, name: str = SERVE_DEFAULT_APP_NAME,
         route_prefix: Optional[str] = "/", logging_config: Any = None, _local_testing_mode: bool = False,
         external_scaler_enabled: bool = False, controller_options: Any = None) -> DeploymentHandle:
    """Ray's internal variant of `run`: `_blocking=False` returns without waiting for RUNNING."""
    return _run_many([RunTarget(target, name, route_prefix, logging_config, external_scaler_enabled)],
                     wait_for_applications_running=_blocking, _local_testing_mode=_local_testing_mode)[0]


def _run_many(targets: Sequence[RunTarget], wait_for_ingress_deployment_creation: bool = True,
              wait_for_applications_running: bool = True, _local_testing_mode: bool = False,
              controller_options: Any = None) -> list[DeploymentHandle]:
    """Ray's internal variant of `run_many` (never blocks until Ctrl-C)."""
    return run_many(targets, False, wait_for_ingress_deployment_creation, wait_for_applications_running,
                    _local_testing_mode)


class _SigtermAsInterrupt:
    """While serving in the foreground, SIGTERM stops shoal as Ctrl-C does (replicas drain)."""

    def __enter__(self) -> "_SigtermAsInterrupt":
        import signal

        self.previous = None
        if threading.current_thread() is threading.main_thread():
            def on_sigterm(signum: int, frame: Any) -> None:
                raise KeyboardInterrupt

            self.previous = signal.signal(signal.SIGTERM, on_sigterm)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _block_until_interrupted() -> None:
    """Serve until Ctrl-C or SIGTERM, then shut down cleanly."""
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        logger.info("Got a signal to stop; shutting down shoal.")
        shutdown()


def shutdown() -> None:
    """Delete every application and stop the controller and all replicas."""
    from shoal.local_testing import shutdown_local

    shutdown_local()
    client = client_mod.get_global_client(required=False)
    if client is None:
        return
    client_mod.shutdown_client(client)
    client_mod.set_global_client(None)


async def shutdown_async() -> None:
    """`shutdown()` for async code: the event loop keeps running while shoal stops."""
    from shoal.handle import _running_loop

    client = client_mod.get_global_client(required=False)
    if client is not None and _running_loop() is client.loop:
        raise RuntimeError("serve.shutdown_async() cannot stop shoal from inside one of its replicas.")
    await asyncio.get_running_loop().run_in_executor(None, shutdown)


def delete(name: str, _blocking: bool = True) -> None:
    """Delete one application (idempotent); its replicas drain and run `__del__`."""
    client = client_mod.get_global_client(required=False)
    if client is None:
        return
    client.call_sync("delete_apps", [name], blocking=_blocking)


def status() -> ServeStatus:
    client = client_mod.get_global_client(required=False)
    if client is None:
        return ServeStatus()
    return client.call_sync("status")


def get_app_handle(name: str) -> DeploymentHandle:
    from shoal.local_testing import local_app_ingress

    local = local_app_ingress(name)
    if local is not None:
        return local
    client = client_mod.get_global_client(required=False)
    if client is None:
        raise RayServeException(f"Application '{name}' does not exist (shoal is not running).")
    ingress = _call(client, "get_ingress", name)
    return _cached_handle(client, ingress, name)


def _cached_handle(client: "client_mod.ServeClient", deployment_name: str, app_name: str,
                   checked: bool = False) -> DeploymentHandle:
    """The handle this process already gave out for the deployment, or a new one kept for next time
    (as Ray Serve's client does: one per deployment, app and whether its existence was checked)."""
    key = (deployment_name, app_name, checked)
    handle = client.handle_cache.get(key)
    if handle is None:
        handle = client.handle_cache.setdefault(key, DeploymentHandle(deployment_name, app_name))
    return handle


def get_deployment_handle(deployment_name: str, app_name: Optional[str] = None, _check_exists: bool = True,
                          _record_telemetry: bool = True) -> DeploymentHandle:
    """A handle to a deployment by name; inside a replica `app_name` defaults to the replica's app.

    Handles are kept per name: asking again returns the same handle (without asking the controller)."""
    from shoal.context import _replica_context

    if app_name is None:
        if _replica_context is None:
            raise RayServeException("Please specify an application name when getting a deployment handle "
                                    "outside of a replica.")
        app_name = _replica_context.app_name
    from shoal.handle import _running_loop
    from shoal.local_testing import is_local_app, local_handle

    if is_local_app(app_name):
        return local_handle(deployment_name, app_name)
    client = client_mod.get_global_client(required=False)
    if client is None:
        raise RayServeException("shoal is not running: call serve.start() or serve.run() first.")
    if not _check_exists or _running_loop() is client.loop:  # (can't block the replica's loop to check)
        return _cached_handle(client, deployment_name, app_name)
    cached = client.handle_cache.get((deployment_name, app_name, True))
    if cached is not None:
        return cached
    if not _call(client, "deployment_exists", DeploymentID(deployment_name, app_name)):
        raise RayServeException(f"Deployment '{deployment_name}' in application '{app_name}' does not exist.")
    return _cached_handle(client, deployment_name, app_name, checked=True)


def _call(client: "client_mod.ServeClient", method: str, *args: Any) -> Any:
    """A controller call from sync code, also when that code runs on the client's own loop thread."""
    from shoal.handle import _running_loop

    if _running_loop() is client.loop:
        raise RuntimeError(f"serve.{method} cannot block the replica's event loop; call it from a sync method "
                           "or the constructor of a sync deployment.")
    return client.call_sync(method, *args)
