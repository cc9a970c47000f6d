"""The `shoal` command line (also `python -m shoal`), mirroring Ray Serve's `serve` CLI.

`shoal run IMPORT_PATH` deploys an application and keeps it running until Ctrl-C or SIGTERM.
More subcommands (start, deploy, status, shutdown, config, build) join the `main` group later.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
import traceback
from types import FrameType
from typing import Any, Optional

import click

from shoal import __version__
from shoal.common import SERVE_DEFAULT_APP_NAME
from shoal.deployment import Application, Deployment


class ImportPathError(click.ClickException):
    """An import path that does not lead to an application; shown as one line, exit code 1."""

    exit_code = 1


def _split_import_path(import_path: str) -> tuple[str, str]:
    """`pkg.module:attr` or `pkg.module.attr` -> (module, attribute path)."""
    if ":" in import_path:
        module, _, attr = import_path.partition(":")
    else:
        module, _, attr = import_path.rpartition(".")
    if not module or not attr or ":" in attr:
        raise ImportPathError(
            f"Invalid import path '{import_path}': expected 'module:attribute' or 'module.attribute'.")
    return module, attr


def _where(e: BaseException) -> str:
    """' (at file:line)' for the innermost frame of an exception raised by user code."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames or isinstance(e, SyntaxError):  # a SyntaxError names its file and line itself
        return ""
    last = frames[-1]
    return f" (at {last.filename}:{last.lineno})"


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}{_where(e)}"


def _import_module(module: str, import_path: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        # Only a missing module named by the path itself is "not found"; a missing dependency of
        # the user's module is an error inside that module.
        if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            raise ImportPathError(
                f"Could not import '{import_path}': module '{module}' not found "
                f"(searched the app dir and the Python path; is --app-dir right?).") from None
        raise ImportPathError(f"Could not import '{import_path}': importing module '{module}' failed: "
                              f"{_describe(e)}") from None
    except Exception as e:  # noqa: BLE001 - any error in the user's module becomes one clear line
        raise ImportPathError(f"Could not import '{import_path}': importing module '{module}' failed: "
                              f"{_describe(e)}") from None


def import_attribute(import_path: str, app_dir: Optional[str] = ".") -> Any:
    """Import what `module:attr` / `module.attr` names (attr may be dotted), with `app_dir` first on
    `sys.path` (it stays there, so replicas, which get the driver's `sys.path`, import it too)."""
    if app_dir is not None:
        path = os.path.abspath(app_dir)
        if not os.path.isdir(path):
            raise ImportPathError(f"Could not import '{import_path}': app dir '{app_dir}' is not a directory.")
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
        importlib.invalidate_caches()
    module_name, attr_path = _split_import_path(import_path)
    obj: Any = _import_module(module_name, import_path)
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportPathError(f"Could not import '{import_path}': module '{module_name}' has no attribute "
                                  f"'{attr_path}'.") from None
    return obj


def load_application(import_path: str, app_dir: Optional[str] = ".") -> Application:
    """Import `import_path` and turn what it names into an Application.

    The attribute may be an Application (from `.bind()`), a Deployment (bound with no arguments),
    or a builder function called with no arguments that returns an Application.
    """
    obj = import_attribute(import_path, app_dir)
    if isinstance(obj, Application):
        return obj
    if isinstance(obj, Deployment):
        try:
            return obj.bind()
        except Exception as e:  # noqa: BLE001
            raise ImportPathError(f"Could not bind deployment '{import_path}': {_describe(e)}") from None
    if isinstance(obj, type):
        raise ImportPathError(
            f"'{import_path}' is a class, not an application: decorate it with @serve.deployment and "
            f"point at `{obj.__name__}.bind()` (or at the deployment itself).")
    if callable(obj):
        try:
            built = obj()
        except Exception as e:  # noqa: BLE001
            raise ImportPathError(f"The application builder '{import_path}' failed when called with no "
                                  f"arguments: {_describe(e)}") from None
        if isinstance(built, Application):
            return built
        raise ImportPathError(f"The application builder '{import_path}' returned {type(built).__name__}, "
                              f"not an Application (from Deployment.bind()).")
    raise ImportPathError(f"'{import_path}' is a {type(obj).__name__}, not an application: expected an "
                          f"Application (from Deployment.bind()), a Deployment, or a builder function.")


class _StopRequested(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM while it may be interrupted."""


class _Signals:
    """SIGINT/SIGTERM handling for `shoal run`: a request to stop is remembered while the main thread
    must not be interrupted (spawning the controller), and raised as `_StopRequested` otherwise."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.interruptible = False
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is not None and not self.interruptible:
            return  # already stopping: a second Ctrl-C does not cut the clean-up short
        self.received = signum
        if self.interruptible:
            self.interruptible = False
            raise _StopRequested(signum)

    def allow_interrupt(self) -> None:
        self.interruptible = True
        if self.received is not None:
            self.interruptible = False
            raise _StopRequested(self.received)

    def defer_interrupt(self) -> None:
        self.interruptible = False


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="shoal", message="%(prog)s %(version)s")
def main() -> None:
    """shoal: Ray Serve's programming model on one machine."""


@main.command("run")
@click.argument("import_path")
@click.option("--name", "-n", default=SERVE_DEFAULT_APP_NAME, show_default=True,
              help="Name of the application.")
@click.option("--route-prefix", default="/", show_default=True,
              help="Route prefix of the application's ingress.")
@click.option("--app-dir", "-d", default=".", show_default=True,
              help="Directory put first on the Python path before importing IMPORT_PATH.")
@click.option("--host", default="127.0.0.1", show_default=True, envvar="SHOAL_HTTP_HOST",
              help="Address the HTTP proxy listens on.")
@click.option("--port", default=8000, show_default=True, type=int, envvar="SHOAL_HTTP_PORT",
              help="Port the HTTP proxy listens on (0: any free port).")
def run(import_path: str, name: str, route_prefix: str, app_dir: str, host: str, port: int) -> None:
    """Deploy the application at IMPORT_PATH and run it until Ctrl-C or SIGTERM.

    IMPORT_PATH is 'module:attribute' or 'module.attribute', naming an Application (from
    `.bind()`), a Deployment (bound with no arguments), or a function that builds an Application.
    """
    from shoal import api

    try:
        api._validate_route_prefix(route_prefix)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="'--route-prefix'") from None
    if not name:
        raise click.BadParameter("the application name must not be empty.", param_hint="'--name'")
    app = load_application(import_path, app_dir)
    signals = _Signals()
    signals.install()
    code = 0
    try:
        # Spawning the controller is not interrupted half-way (that could orphan it); a signal in
        # that window is acted on right after.
        api.start(http_options={"host": host, "port": port})
        from shoal import client as client_mod

        lost: list[bool] = []
        client = client_mod.get_global_client()
        client.on_controller_lost = lambda: lost.append(True)  # type: ignore[union-attr]
        signals.allow_interrupt()
        try:
            api.run(app, name=name, route_prefix=route_prefix)
        except _StopRequested:
            raise
        except Exception as e:  # noqa: BLE001 - a failed deploy is reported, not a traceback
            signals.defer_interrupt()
            _err(f"Error: {e}")
            code = 1
        else:
            url = api.get_http_url()
            where = f" at {url}{route_prefix if route_prefix != '/' else ''}" if url and route_prefix else ""
            click.echo(f"Application '{name}' is RUNNING (ingress: {app.deployment.name}){where}. "
                       "Press Ctrl-C to stop.")
            while not lost:
                time.sleep(0.2)
            signals.defer_interrupt()
            _err("Error: the shoal controller exited unexpectedly; stopping.")
            code = 1
    except _StopRequested as stop:
        signals.defer_interrupt()
        sig = stop.args[0] if stop.args else signal.SIGINT
        _err(f"Got {signal.Signals(sig).name}; shutting down.")
    except Exception as e:  # noqa: BLE001 - e.g. the controller failed to start
        signals.defer_interrupt()
        _err(f"Error: {e}")
        code = 1
    finally:
        signals.defer_interrupt()
        try:
            api.shutdown()
        finally:
            signals.restore()
    sys.exit(code)


from shoal.llm.cli import llm as _llm_commands  # noqa: E402 - registered after `main` exists

main.add_command(_llm_commands)


if __name__ == "__main__":  # pragma: no cover
    main()
