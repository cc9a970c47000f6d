"""`shoal run IMPORT_PATH|CONFIG.yaml`: deploy, and keep running until Ctrl-C or SIGTERM.

The instance is private, owned by this process; with `--runtime ray` it is the cluster's shared
instance, of which `run` removes only what it added. `--reload` rebuilds in a fresh builder process
when a file under the app dir changes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import click

from shoal.cli import ray as cli_ray
from shoal.cli.common import build_timeout_option, err, import_path_errors, is_config_file, parse_key_values
from shoal.cli.common import runtime_kwargs, runtime_options, warn
from shoal.cli.signals import Signals, StopRequested
from shoal.common import SERVE_DEFAULT_APP_NAME
from shoal.import_path import ImportPathError, describe_error, import_attribute, load_application


@dataclass
class _Target:
    """What `shoal run` deploys: the config (as data, for rebuilding) and its build."""

    config: dict
    specs: list
    http_options: dict
    watch: list[str]
    declarative: bool = True  # False for an import path: deployed as `serve.run` would
    start_options: dict = field(default_factory=dict)  # proxy_location, logging_config from the file


def _load_target(target: str, arguments: tuple[str, ...], name: str, route_prefix: Optional[str],
                 app_dir: str, build_timeout: Optional[float] = None) -> _Target:
    """Build what `shoal run` was given before anything starts: a config in a builder process (killed
    after `build_timeout` seconds), an import path in this process."""
    import warnings

    from shoal import api, schema

    watch = [os.path.abspath(app_dir)]
    if is_config_file(target):
        if arguments:
            raise click.UsageError("key=value arguments go with an import path; with a config file, put them "
                                   "under the application's `args:`.")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", schema.ConfigWarning)
            try:
                config_schema = schema.load_config_file(target)
                config = config_schema.model_dump(mode="json", exclude_unset=True)
                from shoal.builder import build_specs_in_subprocess

                specs = build_specs_in_subprocess(config, os.path.abspath(app_dir), build_timeout, source=target)
            except schema.ConfigError as e:
                raise click.ClickException(str(e)) from None
        for w in caught:
            warn(str(w.message))
        watch.append(os.path.abspath(target))
        start_options = {k: getattr(config_schema, k) for k in ("proxy_location", "logging_config")
                         if k in config_schema.model_fields_set}
        return _Target(config, specs, config_schema.http_options.to_http_options(), watch,
                       start_options=start_options)
    args = parse_key_values(arguments)
    if args:
        from shoal.schema import ConfigError, call_app_builder

        try:
            app = call_app_builder(import_attribute(target, app_dir), args, target)
        except ConfigError as e:
            raise ImportPathError(str(e)) from None
    else:
        app = load_application(target, app_dir)
    try:
        spec = api.build_app_spec(app, name, route_prefix)
    except Exception as e:  # noqa: BLE001
        raise ImportPathError(f"Could not prepare '{target}': {describe_error(e)}") from None
    from shoal.builder import add_fingerprints

    add_fingerprints([spec])  # a --reload rebuild of unchanged code then keeps the replicas
    config = {"applications": [{"name": name, "route_prefix": route_prefix, "import_path": target, "args": args}]}
    return _Target(config, [spec], {}, watch, declarative=False)


class _ProgressThread:
    """Prints deploy progress from `serve.status()` while the main thread waits for the deploy."""

    def __init__(self, client: Any, names: list[str]):
        import threading

        from shoal.cli.output import DeployProgress

        self.client = client
        self.progress = DeployProgress(click.echo, names)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="shoal-progress", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.progress.update(self.client.call_sync("status", timeout=10).to_dict())
            except Exception:  # noqa: BLE001 - shutting down, or the controller is gone
                return
            self.stopped.wait(0.25)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=2)
        try:
            self.progress.update(self.client.call_sync("status", timeout=10).to_dict())  # the final state
        except Exception:  # noqa: BLE001
            pass


def _deploy_and_wait(client: Any, loaded: _Target) -> Optional[str]:
    """Apply the specs declaratively and wait for each application; an error text, or None."""
    specs = loaded.specs
    configs = {a.get("name", SERVE_DEFAULT_APP_NAME): a for a in loaded.config.get("applications", [])
               } if loaded.declarative else {}
    client.call_sync("apply_config", specs, configs)
    progress = _ProgressThread(client, [s.name for s in specs])
    try:
        for spec in specs:
            status, message = client.call_sync("wait_for_app", spec.name)
            if status != "RUNNING":
                verb = "failed to deploy" if status == "DEPLOY_FAILED" else f"did not reach RUNNING ({status})"
                return f"Application '{spec.name}' {verb}:\n{message}"
    finally:
        progress.stop()
    return None


class _Watcher:
    """`--reload`: a thread watching files; the main thread polls `changed()`."""

    def __init__(self, paths: list[str]):
        import threading

        self.paths = [p for p in paths if os.path.exists(p)]
        self.stop_event = threading.Event()
        self.pending: set[str] = set()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="shoal-reload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import watchfiles

        def wanted(change: Any, path: str) -> bool:
            return path.endswith((".py", ".yaml", ".yml", ".json")) and "__pycache__" not in path

        for changes in watchfiles.watch(*self.paths, watch_filter=wanted, stop_event=self.stop_event,
                                        raise_interrupt=False, debounce=300):
            with self.lock:
                self.pending.update(path for _, path in changes)

    def changed(self) -> list[str]:
        with self.lock:
            out, self.pending = sorted(self.pending), set()
        return out

    def stop(self) -> None:
        self.stop_event.set()


def _rebuild(target: str, loaded: _Target, app_dir: str, build_timeout: Optional[float]) -> Optional[_Target]:
    """Rebuild after a change, in a fresh process (edited modules are imported anew)."""
    from shoal import schema
    from shoal.builder import build_specs_in_subprocess

    config = loaded.config
    source = target if is_config_file(target) else None
    try:
        if source is not None:
            config = schema.load_config_file(target).model_dump(mode="json", exclude_unset=True)
        specs = build_specs_in_subprocess(config, os.path.abspath(app_dir), build_timeout, source=source)
    except schema.ConfigError as e:
        err(f"Error: not reloaded: {e}")
        return None
    return _Target(config, specs, loaded.http_options, loaded.watch, loaded.declarative, loaded.start_options)


@click.command("run")
@click.argument("target", metavar="IMPORT_PATH|CONFIG")
@click.argument("arguments", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--name", "-n", default=SERVE_DEFAULT_APP_NAME, show_default=True,
              help="Name of the application (import path only).")
@click.option("--route-prefix", default="/", show_default=True,
              help="Route prefix of the application's ingress (import path only).")
@click.option("--app-dir", "-d", default=".", show_default=True,
              help="Directory put first on the Python path before importing.")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="SHOAL_HTTP_HOST",
              help="Address the HTTP proxy listens on.")
@click.option("--port", default=8000, show_default=True, type=int, envvar="SHOAL_HTTP_PORT",
              help="Port the HTTP proxy listens on (0: any free port).")
@click.option("--reload", "-r", "reload_", is_flag=True, help="Redeploy when a file under --app-dir changes.")
@build_timeout_option
@runtime_options
@click.pass_context
def run(ctx: click.Context, target: str, arguments: tuple[str, ...], name: str, route_prefix: str, app_dir: str,
        host: str, port: int, reload_: bool, build_timeout: Optional[float], runtime: Optional[str],
        address: Optional[str]) -> None:
    """Deploy IMPORT_PATH or the applications of CONFIG, and run until Ctrl-C or SIGTERM.

    IMPORT_PATH is 'module:attribute' or 'module.attribute', naming an Application (from
    `.bind()`), a Deployment (bound with no arguments), or a function that builds an Application
    (it receives the KEY=VALUE arguments as a dict, or as its annotated pydantic model).
    CONFIG is a YAML file in Ray Serve's format (`shoal build` writes one).
    """
    from shoal import api

    try:
        api._validate_route_prefix(route_prefix)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--route-prefix'") from None
    if not name:
        raise click.BadParameter("the application name must not be empty.", param_hint="'--name'")
    start_kwargs = runtime_kwargs(runtime, address)
    from shoal import sessions

    sessions.driver_command = " ".join(["shoal", *sys.argv[1:]])  # how `shoal status` names this instance
    with import_path_errors():
        loaded = _load_target(target, arguments, name, route_prefix, app_dir, build_timeout)
    http_options = dict(loaded.http_options)
    for key, value in (("host", host), ("port", port)):
        source = ctx.get_parameter_source(key)
        if key not in http_options or source in (click.core.ParameterSource.COMMANDLINE,
                                                 click.core.ParameterSource.ENVIRONMENT):
            http_options[key] = value
    on_ray = cli_ray.wants_ray(runtime)
    # On a cluster the instance is shared: stopping deletes this run's applications, and stops the
    # instance only if this run started it and nothing else was deployed meanwhile.
    started_here = on_ray and not cli_ray.instance_exists(address, for_run=True)
    signals = Signals()
    signals.install()
    code = 0
    watcher: Optional[_Watcher] = None
    try:
        # Spawning the controller is not interrupted half-way (that could orphan it); a signal in
        # that window is acted on right after.
        api.start(http_options=http_options, **loaded.start_options, **start_kwargs)
        from shoal import client as client_mod

        lost: list[bool] = []
        client = client_mod.get_global_client()
        client.on_controller_lost = lambda: lost.append(True)  # type: ignore[union-attr]
        signals.allow_interrupt()
        error = _deploy_and_wait(client, loaded)
        if error is not None:
            signals.defer_interrupt()
            err(f"Error: {error}")
            code = 1
        else:
            _announce(loaded)
            if reload_:
                watcher = _Watcher(loaded.watch)
            while not lost:
                time.sleep(0.2)
                changed = watcher.changed() if watcher is not None else []
                if changed:
                    click.echo(f"Files changed ({', '.join(os.path.relpath(p) for p in changed[:3])}"
                               f"{', ...' if len(changed) > 3 else ''}); redeploying.")
                    rebuilt = _rebuild(target, loaded, app_dir, build_timeout)
                    if rebuilt is not None:
                        error = _deploy_and_wait(client, rebuilt)
                        if error is not None:
                            err(f"Error: {error}")
                        else:
                            loaded = rebuilt
                            _announce(loaded)
            signals.defer_interrupt()
            err("Error: the shoal controller exited unexpectedly; stopping.")
            code = 1
    except StopRequested as stop:
        signals.defer_interrupt()
        sig = stop.args[0] if stop.args else signal.SIGINT
        err(f"Got {signal.Signals(sig).name}; shutting down.")
    except Exception as e:  # noqa: BLE001 - e.g. the controller failed to start
        signals.defer_interrupt()
        err(f"Error: {e}")
        code = 1
    finally:
        signals.defer_interrupt()
        if watcher is not None:
            watcher.stop()
        try:
            if on_ray:
                _leave_cluster(loaded, started_here)
            else:
                api.shutdown()
        finally:
            signals.restore()
    sys.exit(code)


def _leave_cluster(loaded: _Target, started_here: bool) -> None:
    """`shoal run --runtime ray` stops: delete this run's applications; stop the cluster instance only
    when this run started it and no other application is left on it."""
    from shoal import api
    from shoal import client as client_mod

    client = client_mod.get_global_client(required=False)
    if client is None:
        return
    try:
        client.call_sync("delete_apps", [s.name for s in loaded.specs], timeout=120)
        if started_here and not client.call_sync("status", timeout=30).applications:
            api.shutdown()
            return
    except Exception as e:  # noqa: BLE001 - the controller is gone: nothing left to delete
        err(f"Error: could not delete the applications: {e}")
    cli_ray.leave(client)


def _announce(loaded: _Target) -> None:
    from shoal import api

    url = api.get_http_url()
    for spec in loaded.specs:
        prefix = spec.route_prefix
        where = f" at {url}{prefix if prefix != '/' else ''}" if url and prefix else ""
        click.echo(f"Application '{spec.name}' is RUNNING (ingress: {spec.ingress}){where}. Press Ctrl-C to stop.")
