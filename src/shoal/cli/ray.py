"""The instance commands (`start`, `deploy`, `status`, `config`, `shutdown`) against a Ray cluster.

With `--runtime ray` (or `SHOAL_RUNTIME=ray`) there is no local instance directory and no admin
API: shoal's controller on the cluster is already a detached Ray actor (`runtime/ray.py`), so each
command joins the cluster (`--address`, default `auto`: the running one), joins that controller as a
non-owning driver through `serve.start(runtime="ray")`, makes the same controller calls the admin API
makes (`apply_config`, `status`, `app_configs`, `shutdown`), and leaves. Applications keep running
after the command returns. Configs are built in a builder process of this command (bounded by
`--build-timeout`), so the controller never imports user code; a config that fails is rejected before
`apply_config`.

While the controller actor restarts (Ray restarts it after a failure), a command waits for it: for
joining, up to `runtime.ray.START_TIMEOUT_S`; for each call, up to `SHOAL_CONTROLLER_WAIT_S` (default
30 s). Past that it fails with a message that says so, never with a traceback.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional

import click

POLL_S = 0.25


def wants_ray(runtime: Optional[str]) -> bool:
    """`--runtime ray`, or no `--runtime` and `SHOAL_RUNTIME=ray`."""
    return (runtime or os.environ.get("SHOAL_RUNTIME")) == "ray"


def cluster_address(address: Optional[str]) -> str:
    return address or os.environ.get("SHOAL_RAY_ADDRESS") or os.environ.get("RAY_ADDRESS") or "auto"


def _init_ray(address: Optional[str], for_run: bool = False) -> str:
    """Join the cluster as a driver. The admin commands never start a cluster (`auto`: the running
    one) and do not relay actors' logs; `shoal run` starts a local one when no address is given (as
    `ray.init()` does) and relays the logs of the actors it starts."""
    try:
        import ray
    except ImportError:
        raise click.ClickException("--runtime ray needs Ray: pip install 'shoal[ray]'.") from None
    from shoal.runtime.ray import NAMESPACE

    where = cluster_address(address)
    if not ray.is_initialized():
        try:
            ray.init(address=None if for_run and where == "auto" else where, namespace=NAMESPACE,
                     logging_level=logging.WARNING, log_to_driver=for_run)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise click.ClickException(f"cannot join the Ray cluster at {where}: {e}") from None
    return where


def instance_exists(address: Optional[str], for_run: bool = False) -> bool:
    """Whether shoal's controller actor lives on the cluster (joins the cluster first)."""
    import ray

    from shoal.runtime.ray import CONTROLLER_NAME, NAMESPACE

    _init_ray(address, for_run)
    try:
        ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def _join(address: Optional[str], http_options: Optional[dict] = None, **start_options: Any) -> Any:
    """The controller's client: `serve.start` on the cluster (starts shoal there if it is not running;
    `http_options` then apply, else the running instance keeps its own)."""
    from shoal import api
    from shoal import client as client_mod
    from shoal.exceptions import RayServeException

    _init_ray(address)
    try:
        api.start(http_options=http_options, runtime="ray", **start_options)
    except RayServeException as e:
        raise click.ClickException(str(e)) from None
    return client_mod.get_global_client()


def _call(client: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """A controller call: waits while the controller restarts (bounded), then fails as a CLI error."""
    from shoal.exceptions import RayServeException

    try:
        return client.call_sync(method, *args, **kwargs)
    except RayServeException as e:
        raise click.ClickException(str(e)) from None


def leave(client: Any) -> None:
    """Disconnect without stopping anything: the controller and its applications stay on the cluster."""
    from shoal import client as client_mod

    client_mod.disconnect_client(client)
    client_mod.set_global_client(None)


def _no_instance(where: str) -> click.ClickException:
    return click.ClickException(f"no shoal instance is running on the Ray cluster at {where}; start one with "
                                f"`shoal start --runtime ray --address {where}`.")


def _joined_existing(address: Optional[str]) -> Any:
    if not instance_exists(address):
        raise _no_instance(cluster_address(address))
    return _join(address)


def start(address: Optional[str], http_options: dict, proxy_location: str) -> None:
    """Start shoal on the cluster (or find it running), wait for its proxies, and return."""
    running = instance_exists(address)
    client = _join(address, http_options, proxy_location=proxy_location)
    try:
        url = _call(client, "http_url") or "disabled"
    finally:
        leave(client)
    where = cluster_address(address)
    if running:
        click.echo(f"A shoal instance is already running on the Ray cluster at {where} (HTTP: {url}).")
        return
    click.echo(f"Started shoal on the Ray cluster at {where} (a detached controller actor).\n"
               f"  HTTP:      {url}\nStop it with `shoal shutdown --runtime ray --address {where}`.")


def deploy(config_file: str, config_schema: Any, app_dir: str, wait: bool, timeout: float,
           address: Optional[str], wait_until_deployed: Callable[..., None],
           build_timeout: Optional[float] = None) -> None:
    """Build CONFIG in a builder process of this command (killed after `build_timeout` s), then make
    its applications the full set the cluster instance runs."""
    from shoal import schema
    from shoal.builder import build_specs_in_subprocess

    try:
        config = config_schema.model_dump(mode="json", exclude_unset=True)
        specs = build_specs_in_subprocess(config, os.path.abspath(app_dir), build_timeout, source=config_file)
    except schema.ConfigError as e:
        raise click.ClickException(str(e)) from None
    configs = {a.name: a.model_dump(mode="json", exclude_unset=True) for a in config_schema.applications}
    start_options = {k: getattr(config_schema, k) for k in ("proxy_location",) if k in config_schema.model_fields_set}
    wanted = config_schema.http_options.to_http_options()
    client = _join(address, wanted, **start_options)
    try:
        running = _call(client, "http_options") or {}
        changed = [k for k, v in wanted.items() if k in running and running[k] != v]
        if changed:  # as the admin API says it for a local instance
            click.echo(f"Warning: {config_file}: http_options: {', '.join(changed)} differ from the running "
                       "instance's; they take effect once it is shut down and started anew", err=True)
        try:
            client.call_sync("apply_config", specs, configs)
        except Exception as e:  # noqa: BLE001 - e.g. shoal is shutting down
            raise click.ClickException(f"{config_file}: {e}") from None
        names = [s.name for s in specs]
        click.echo(f"Sent {config_file} to the instance on the Ray cluster: {', '.join(names) or 'no applications'}.")
        if wait:
            def settle() -> None:  # so a request right after this reaches them
                for name in names:
                    _call(client, "wait_for_app", name, 10.0)

            wait_until_deployed(lambda: _call(client, "status").to_dict(), names, timeout, settle)
    finally:
        leave(client)


def status(address: Optional[str]) -> dict:
    client = _joined_existing(address)
    try:
        return _call(client, "status").to_dict()
    finally:
        leave(client)


def app_configs(address: Optional[str]) -> dict:
    client = _joined_existing(address)
    try:
        return _call(client, "app_configs")
    finally:
        leave(client)


def shutdown(address: Optional[str], yes: bool, timeout: float) -> None:
    """Delete every application and stop the controller actor (and every replica and proxy actor)."""
    from shoal import api

    where = cluster_address(address)
    if not instance_exists(address):
        click.echo(f"No shoal instance is running on the Ray cluster at {where}.")
        return
    if not yes:
        click.confirm(f"This stops the shoal instance on the Ray cluster at {where} and every application it "
                      "runs. Continue?", abort=True)
    from shoal import client as client_mod

    _join(address)
    client_mod.shutdown_client(client_mod.get_global_client(), timeout=timeout)  # waits for the actor to go
    client_mod.set_global_client(None)
    api.shutdown()  # local testing state, if any
    deadline = time.monotonic() + timeout
    while instance_exists(address):
        if time.monotonic() > deadline:
            raise click.ClickException(f"shoal's controller actor is still alive after {timeout:.0f} s.")
        time.sleep(POLL_S)
    click.echo("The shoal instance on the Ray cluster is shut down.")
