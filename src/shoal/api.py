"""The top-level functions of `shoal.serve`: start, run, delete, status, handles, shutdown."""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import uuid
from typing import Any, Optional, Union

from shoal import client as client_mod
from shoal.common import SERVE_DEFAULT_APP_NAME, DeploymentID
from shoal.config import HTTPOptions, validate_model
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
        logs_dir = None
        if isinstance(logging_config, dict):
            logs_dir = logging_config.get("logs_dir")
        elif logging_config is not None:
            logs_dir = getattr(logging_config, "logs_dir", None)
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
            client = client_mod.start_controller(http_options=opts, logs_dir=logs_dir, metrics_options=metrics)
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


def _force_local_testing_mode() -> bool:
    return any(os.environ.get(k) == "1" for k in ("SHOAL_FORCE_LOCAL_TESTING_MODE", "RAY_SERVE_FORCE_LOCAL_TESTING_MODE"))


def run(target: Application, blocking: bool = False, name: str = SERVE_DEFAULT_APP_NAME,
        route_prefix: Optional[str] = "/", logging_config: Any = None,
        _local_testing_mode: bool = False, runtime: Optional[str] = None,
        address: Optional[str] = None) -> DeploymentHandle:
    """Deploy an application, wait until it is RUNNING, and return a handle to its ingress.

    `runtime` and `address` are passed to `start()` when shoal is not running yet."""
    if isinstance(target, Deployment):
        raise TypeError("serve.run expects an Application; call `.bind()` on the deployment first.")
    if not isinstance(target, Application):
        raise TypeError(f"serve.run expects an Application (from Deployment.bind()), got {type(target).__name__}.")
    if not isinstance(name, str) or not name:
        raise ValueError("Application name must be a non-empty string.")
    _validate_route_prefix(route_prefix)
    if _local_testing_mode or _force_local_testing_mode():
        from shoal.local_testing import run_local

        return run_local(target, name)
    spec = build_app_spec(target, name, route_prefix)
    for d in spec.deployments:
        if d.config.version is None:  # each run is a new code version (see DeploymentSpec.code_nonce)
            d.code_nonce = uuid.uuid4().hex
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
    start(runtime=runtime, address=address)
    client = client_mod.get_global_client()
    client.call_sync("deploy_app", spec)  # type: ignore[union-attr]
    status, message = client.call_sync("wait_for_app", spec.name)  # type: ignore[union-attr]
    if status == ApplicationStatus.DEPLOY_FAILED.value:
        raise DeployFailedError(f"Application '{spec.name}' failed to deploy:\n{message}")
    if status != ApplicationStatus.RUNNING.value:
        raise RayServeException(f"Application '{spec.name}' did not reach RUNNING (status {status}): {message}")
    return DeploymentHandle(spec.ingress, spec.name)


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
    return DeploymentHandle(ingress, name)


def get_deployment_handle(deployment_name: str, app_name: Optional[str] = None) -> DeploymentHandle:
    from shoal.context import _replica_context

    if app_name is None:
        if _replica_context is None:
            raise RayServeException("Please specify an application name when getting a deployment handle "
                                    "outside of a replica.")
        app_name = _replica_context.app_name
    from shoal.handle import _running_loop
    from shoal.local_testing import is_local_app

    if is_local_app(app_name):
        return DeploymentHandle(deployment_name, app_name)
    client = client_mod.get_global_client(required=False)
    if client is None:
        raise RayServeException("shoal is not running: call serve.start() or serve.run() first.")
    if _running_loop() is client.loop:
        return DeploymentHandle(deployment_name, app_name)  # can't block the replica's loop to check
    if not _call(client, "deployment_exists", DeploymentID(deployment_name, app_name)):
        raise RayServeException(f"Deployment '{deployment_name}' in application '{app_name}' does not exist.")
    return DeploymentHandle(deployment_name, app_name)


def _call(client: "client_mod.ServeClient", method: str, *args: Any) -> Any:
    """A controller call from sync code, also when that code runs on the client's own loop thread."""
    from shoal.handle import _running_loop

    if _running_loop() is client.loop:
        raise RuntimeError(f"serve.{method} cannot block the replica's event loop; call it from a sync method "
                           "or the constructor of a sync deployment.")
    return client.call_sync(method, *args)
