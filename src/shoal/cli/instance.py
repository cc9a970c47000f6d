"""The CLI commands that drive a detached instance over its admin API, and `shoal build`.

`shoal start` spawns a controller that outlives the command (see `instance.py`); `deploy`,
`status`, `config` and `shutdown` find it through the instance directory (`--instance-dir`,
`$SHOAL_INSTANCE_DIR`) and talk to its admin REST API (`controller/admin_api.py`) with the token
from that directory. With `--runtime ray` (or `SHOAL_RUNTIME=ray`) the same commands drive the
instance on a Ray cluster instead (`cli/ray.py`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any, Optional

import click
import yaml

from shoal import instance
from shoal.cli import ray as cli_ray
from shoal.cli.common import (admin_call, build_timeout_option, connect_admin, import_path_errors,
                              instance_dir_option, resolve_instance_dir, runtime_options, warn)
from shoal.import_path import load_application

POLL_S = 0.25


@click.command("start")
@click.option("--http-host", default="127.0.0.1", show_default=True, envvar="SHOAL_HTTP_HOST",
              help="Address the HTTP proxy listens on.")
@click.option("--http-port", default=8000, show_default=True, type=int, envvar="SHOAL_HTTP_PORT",
              help="Port the HTTP proxy listens on (0: any free port).")
@click.option("--proxy-location", type=click.Choice(["Disabled", "HeadOnly", "EveryNode"]), default="EveryNode",
              show_default=True)
@click.option("--admin-port", default=0, type=int, envvar="SHOAL_ADMIN_PORT", show_default=True,
              help="Port of the admin API on 127.0.0.1 (0: any free port, recorded in the instance dir).")
@instance_dir_option
@runtime_options
def start(http_host: str, http_port: int, proxy_location: str, admin_port: int, instance_dir: Optional[str],
          runtime: Optional[str], address: Optional[str]) -> None:
    """Start a detached shoal instance that keeps running after this command returns."""
    from shoal.config import HTTPOptions, validate_model

    try:
        opts = validate_model(HTTPOptions, {"host": http_host, "port": http_port}, "http_options").model_dump()
    except (TypeError, ValueError) as e:
        raise click.UsageError(str(e)) from None
    if cli_ray.wants_ray(runtime):
        return cli_ray.start(address, opts, proxy_location)
    where = resolve_instance_dir(instance_dir)
    running = instance.read_info(where)
    if running is not None:
        click.echo(f"A shoal instance is already running (pid {running.pid}, admin API {running.admin_url}).")
        return
    opts["proxy_location"] = proxy_location
    try:
        info = instance.start_detached(where, opts, admin_port, runtime, address)
    except instance.StartError as e:
        raise click.ClickException(str(e)) from None
    client = connect_admin(where)
    deadline = time.monotonic() + 60
    while True:
        apps = admin_call(client.applications)
        proxies = apps["status"]["proxies"]
        if proxy_location == "Disabled" or (proxies and all(s == "HEALTHY" for s in proxies.values())):
            break
        if time.monotonic() > deadline:
            raise click.ClickException(f"the HTTP proxy did not become healthy within 60 s; see "
                                       f"{info.session_dir}/logs/")
        time.sleep(0.05)
    http = apps.get("http_url") or "disabled"
    click.echo(f"Started a detached shoal instance (controller pid {info.pid}).\n"
               f"  HTTP:      {http}\n  admin API: {info.admin_url} (token in {where}/token)\n"
               f"  logs:      {info.session_dir}/logs\nStop it with `shoal shutdown`.")


@click.command("deploy")
@click.argument("config_file", metavar="CONFIG")
@click.option("--app-dir", "-d", default=".", show_default=True,
              help="Directory put first on the Python path when importing the applications.")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Show progress until every application is RUNNING (or failed).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait with --wait.")
@build_timeout_option
@instance_dir_option
@runtime_options
def deploy(config_file: str, app_dir: str, wait: bool, timeout: float, build_timeout: Optional[float],
           instance_dir: Optional[str], runtime: Optional[str], address: Optional[str]) -> None:
    """Make the applications of CONFIG the full set the instance runs (apps not in it are deleted).

    A config that is invalid or whose applications cannot be built (within --build-timeout) is
    rejected as a whole and the running applications stay as they are. A newer deploy stops the
    build of one still in progress, which then fails as superseded.
    """
    from shoal import schema
    from shoal.builder import build_timeout_s

    build_timeout = build_timeout_s(build_timeout)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", schema.ConfigWarning)
        try:
            config_schema = schema.load_config_file(config_file)
        except schema.ConfigError as e:
            raise click.ClickException(str(e)) from None
    for w in caught:
        warn(str(w.message))
    if cli_ray.wants_ray(runtime):
        return cli_ray.deploy(config_file, config_schema, app_dir, wait, timeout, address, wait_until_deployed,
                              build_timeout)
    client = connect_admin(instance_dir)
    if address is not None and client.info.address != address:  # (`--runtime ray` went to cli_ray above)
        raise click.ClickException(f"--address {address} does not match the running instance's "
                                   f"({client.info.address}); `shoal shutdown` and `shoal start` it anew.")
    body = config_schema.model_dump(mode="json", exclude_unset=True)
    reply = admin_call(client.deploy, body, os.path.abspath(app_dir), build_timeout, prefix=f"{config_file}: ")
    for note in reply.get("warnings", []):
        if not any(note in str(w.message) for w in caught):
            warn(f"{config_file}: {note}")
    names = reply.get("applications", [])
    click.echo(f"Sent {config_file} to the instance: {', '.join(names) or 'no applications'}.")
    if not wait:
        return
    wait_until_deployed(lambda: admin_call(client.status), names, timeout,
                        lambda: admin_call(client.status, wait_routes=True))  # a request right after reaches them


def wait_until_deployed(get_status: Any, names: list[str], timeout: float, settle: Any) -> None:
    """Print progress from `get_status()` until the applications `names` are RUNNING (then `settle()`),
    one failed, or `timeout` passes (the last two are errors)."""
    from shoal.cli.output import DeployProgress

    progress = DeployProgress(click.echo, names)
    deadline = time.monotonic() + timeout
    while True:
        status = get_status()
        progress.update(status)
        outcome = progress.outcome(status)
        if outcome is True:
            settle()
            click.echo("All applications are RUNNING.")
            return
        if outcome is False:
            raise click.ClickException("some applications failed to deploy (see above).")
        if time.monotonic() > deadline:
            raise click.ClickException(f"still deploying after {timeout:.0f} s; see `shoal status`.")
        time.sleep(POLL_S)


@click.command("status")
@click.option("--output", "-o", "output", type=click.Choice(["table", "yaml", "json"]), default="table",
              show_default=True, help="table: for people; yaml/json: the shape of serve.status().")
@click.option("--name", "-n", default=None, help="Only this application.")
@click.option("--pid", type=int, default=None,
              help="The `shoal run` (or serve.run script) process whose instance to show, when several run.")
@instance_dir_option
@runtime_options
def status(output: str, name: Optional[str], pid: Optional[int], instance_dir: Optional[str],
           runtime: Optional[str], address: Optional[str]) -> None:
    """Show the status of the instance's proxies, applications and deployments.

    The instance is the detached one (`shoal start`; the one of --instance-dir when given), else the
    one of a running `shoal run` (or of a script that called serve.run): the newest, or that of --pid."""
    from shoal.cli.output import status_table

    if cli_ray.wants_ray(runtime):
        data = cli_ray.status(address)
    elif pid is None and (instance_dir is not None
                          or instance.read_info(resolve_instance_dir(instance_dir)) is not None):
        data = admin_call(connect_admin(instance_dir).status)
    else:
        data = _driver_instance_status(instance_dir, pid)
    if name is not None:
        data["applications"] = {k: v for k, v in data["applications"].items() if k == name}
    if output == "json":
        click.echo(json.dumps(data, indent=2))
    elif output == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip())
    else:
        click.echo(status_table(data))


def _driver_instance_status(instance_dir: Optional[str], pid: Optional[int]) -> dict:
    """The status of an instance a driver owns (`shoal run`), read from its controller's socket."""
    from shoal import sessions

    runs = sessions.running_driver_sessions()
    if pid is not None:
        chosen = [r for r in runs if r.pid == pid]
        if not chosen:
            raise click.ClickException(f"no running `shoal run` or serve.run process with pid {pid} owns a shoal "
                                       f"instance (running: {', '.join(str(r.pid) for r in runs) or 'none'}).")
    elif not runs:
        raise click.ClickException(f"no shoal instance is running: none started with `shoal start` (looked in "
                                   f"{resolve_instance_dir(instance_dir)}), and no `shoal run` or serve.run script "
                                   "is running.")
    else:
        chosen = runs
    info = chosen[0]
    others = [r for r in runs if r is not info]
    note = f"the instance of {sessions.describe(info)}"
    if others:
        note += f"; {len(others)} more run (pids {', '.join(str(r.pid) for r in others)}: pick one with --pid)"
    click.echo(f"shoal: {note}", err=True)
    try:
        return sessions.read_status(info.session_dir, float(os.environ.get("SHOAL_CONTROLLER_WAIT_S") or 30.0))
    except Exception as e:  # noqa: BLE001 - it exited meanwhile, or its controller does not answer
        raise click.ClickException(f"could not read the status of {sessions.describe(info)}: {e!r}") from None


@click.command("config")
@click.option("--name", "-n", default=None, help="Only this application.")
@instance_dir_option
@runtime_options
def config(name: Optional[str], instance_dir: Optional[str], runtime: Optional[str], address: Optional[str]) -> None:
    """Print the config each application was deployed with (YAML documents separated by ---)."""
    if cli_ray.wants_ray(runtime):
        apps = cli_ray.app_configs(address)
    else:
        apps = admin_call(connect_admin(instance_dir).applications)["applications"]
    if name is not None:
        if name not in apps:
            raise click.ClickException(f"no application '{name}' deployed from a config "
                                       f"(deployed: {', '.join(apps) or 'none'}).")
        apps = {name: apps[name]}
    click.echo("\n---\n\n".join(yaml.safe_dump(a, sort_keys=False, default_flow_style=False).rstrip()
                                for a in apps.values()) or "No applications deployed from a config.")


@click.command("shutdown")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for every process to exit.")
@instance_dir_option
@runtime_options
def shutdown(yes: bool, timeout: float, instance_dir: Optional[str], runtime: Optional[str],
             address: Optional[str]) -> None:
    """Delete every application and stop the detached instance."""
    if cli_ray.wants_ray(runtime):
        return cli_ray.shutdown(address, yes, timeout)
    where = resolve_instance_dir(instance_dir)
    info = instance.read_info(where)
    if info is None:
        click.echo(f"No shoal instance is running (looked in {where}).")
        return
    if not yes:
        click.confirm(f"This stops the shoal instance (pid {info.pid}) and every application it runs. Continue?",
                      abort=True)
    admin = connect_admin(instance_dir)
    admin_call(admin.shutdown)
    info = admin.info  # the controller may have been restarted since `info` was read
    deadline = time.monotonic() + timeout
    while any(instance.pid_alive(p) for p in (info.pid, info.supervisor_pid) if p):
        if time.monotonic() > deadline:
            raise click.ClickException(f"the instance (pid {info.pid}) did not exit within {timeout:.0f} s.")
        time.sleep(0.05)
    instance.remove_info(where, info.pid)
    click.echo("The shoal instance is shut down.")


@click.command("build")
@click.argument("import_paths", nargs=-1, required=True, metavar="IMPORT_PATH...")
@click.option("--app-dir", "-d", default=".", show_default=True,
              help="Directory put first on the Python path before importing.")
@click.option("--output-path", "-o", default=None, help="Write the config here instead of to stdout.")
def build(import_paths: tuple[str, ...], app_dir: str, output_path: Optional[str]) -> None:
    """Write a config file for the applications at IMPORT_PATH... with every option their code sets."""
    from shoal.schema import build_config, to_yaml

    with import_path_errors():
        apps = [load_application(p, app_dir) for p in import_paths]
    text = to_yaml(build_config(apps, list(import_paths)))
    if output_path is None:
        sys.stdout.write(text)
    else:
        with open(output_path, "w", encoding="utf-8") as f:
            f.write(text)
        click.echo(f"Wrote {output_path}.")


COMMANDS = (start, deploy, status, config, shutdown, build)

