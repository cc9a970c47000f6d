"""`shoal dashboard`: open the detached instance's web dashboard, or print a link to it.

The link carries a one-time login code from the admin API (see `shoal/dashboard/auth.py`), never
the instance's token. Where no graphical browser can be started (no display: an SSH session, a
container) the link is printed instead of handing it to a text-mode browser that cannot run the
page's script.
"""

from __future__ import annotations

import os
import sys
import webbrowser
from typing import Optional

import click

from shoal.cli import ray as cli_ray
from shoal.cli.common import admin_call, connect_admin, err, instance_dir_option


def _has_display() -> bool:
    """Whether `webbrowser` would start a graphical browser (or the one $BROWSER names)."""
    if os.environ.get("BROWSER"):
        return True
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


@click.command("dashboard")
@click.option("--url", "print_url", is_flag=True,
              help="Print a login link (valid once, for a few minutes) instead of opening a browser.")
@instance_dir_option
def dashboard(print_url: bool, instance_dir: Optional[str]) -> None:
    """Open the live dashboard of the detached instance (`shoal start`) in a browser."""
    if cli_ray.wants_ray(None):
        raise click.ClickException("the dashboard is served by a detached instance on this machine (`shoal start`); "
                                   "on a Ray cluster (SHOAL_RUNTIME=ray) use Ray's dashboard and shoal's metrics "
                                   "endpoint (docs/observability.md)")
    client = connect_admin(instance_dir)
    login = admin_call(client.dashboard_login)
    url, minutes = login["login_url"], login["expires_in_s"] / 60
    validity = f"the link works once, within {minutes:g} minutes; the session it opens lasts 12 hours"
    if print_url:
        click.echo(url)
        err(f"({validity}; the admin API listens on 127.0.0.1 only: over SSH, forward its port first)")
        return
    if _has_display() and webbrowser.open(url):
        err(f"Opened the dashboard in your browser ({url.split('/dashboard')[0]}/dashboard).")
        return
    err(f"No browser could be started here; open this link on this machine ({validity}):")
    click.echo(url)
