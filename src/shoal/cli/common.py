"""What several commands share: the `--runtime`/`--address` and `--build-timeout` options, argument
parsing, messages on stderr, and import-path errors shown as one line."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Optional

import click

from shoal.import_path import ImportPathError


def err(message: str) -> None:
    click.echo(message, err=True)


def warn(message: str) -> None:
    click.echo(f"Warning: {message}", err=True)


@contextlib.contextmanager
def import_path_errors() -> Iterator[None]:
    """An `ImportPathError` becomes a one-line `Error: ...` and exit code 1, never a traceback."""
    try:
        yield
    except ImportPathError as e:
        raise click.ClickException(str(e)) from None


def is_config_file(target: str) -> bool:
    return target.endswith((".yaml", ".yml", ".json")) or os.path.isfile(target)


def parse_key_values(arguments: tuple[str, ...]) -> dict[str, str]:
    """`key=value` command-line arguments -> the args dict a builder function receives."""
    args: dict[str, str] = {}
    for item in arguments:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"Invalid argument {item!r}: expected key=value.")
        args[key] = value
    return args


def runtime_kwargs(runtime: Optional[str], address: Optional[str]) -> dict[str, Any]:
    """`--runtime` / `--address` as keyword arguments for `serve.start`, only those given."""
    return {k: v for k, v in (("runtime", runtime), ("address", address)) if v is not None}


def runtime_options(f: Any) -> Any:
    f = click.option("--address", "-a", default=None,
                     help="Address of the Ray cluster (with --runtime ray; default: $SHOAL_RAY_ADDRESS, else the "
                          "running cluster).")(f)
    return click.option("--runtime", type=click.Choice(["embedded", "ray"]), default=None,
                        help="Where replicas run (default: $SHOAL_RUNTIME, else embedded: processes on this "
                             "machine).")(f)


def build_timeout_option(f: Any) -> Any:
    return click.option("--build-timeout", type=click.FloatRange(0, math.inf, min_open=True, max_open=True),
                        default=None, envvar="SHOAL_BUILD_TIMEOUT_S", show_default="$SHOAL_BUILD_TIMEOUT_S, else 120",
                        help="Seconds that building a config's applications (importing them, calling their "
                             "builders) may take; then the builder process is killed and the command fails.")(f)


def instance_dir_option(f: Any) -> Any:
    return click.option("--instance-dir", default=None, envvar="SHOAL_INSTANCE_DIR",
                        help="Directory recording the detached instance (default /tmp/shoal-<uid>/instance).")(f)


def resolve_instance_dir(given: Optional[str]) -> str:
    """The detached instance's directory: `--instance-dir` made absolute, else the default."""
    from shoal import instance

    return os.path.abspath(given) if given else instance.default_instance_dir()


def connect_admin(given_dir: Optional[str]) -> Any:
    """An `AdminClient` of the detached instance, or a CLI error saying none runs there."""
    from shoal.admin_client import AdminClient, NoInstanceError

    try:
        return AdminClient.connect(resolve_instance_dir(given_dir))
    except NoInstanceError as e:
        raise click.ClickException(str(e)) from None


def admin_call(fn: Any, *args: Any, prefix: str = "", **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)` on an `AdminClient`, its `AdminError` turned into a CLI error (each problem
    on a line, after `prefix`)."""
    from shoal.admin_client import AdminError

    try:
        return fn(*args, **kwargs)
    except AdminError as e:
        raise click.ClickException("\n".join(prefix + p for p in e.problems)) from None
