"""What the CLI prints about status: the `shoal status` table and deploy progress lines.

Both read `serve.status()` as plain data (`ServeStatus.to_dict()`, enum values as their names), so
they work the same on a driver's own instance and on a detached one reached over the admin API.
"""

from __future__ import annotations

import textwrap
from typing import Callable, Iterable, Optional

_STATE_ORDER = ["RUNNING", "STARTING", "UPDATING", "RECOVERING", "STOPPING", "PENDING_MIGRATION"]


def replica_summary(states: dict) -> str:
    """`{"RUNNING": 2, "STARTING": 1}` -> `2 running, 1 starting` (`no replicas` when empty)."""
    parts = [f"{states[s]} {s.lower()}" for s in _STATE_ORDER if states.get(s)]
    parts += [f"{n} {s.lower()}" for s, n in states.items() if s not in _STATE_ORDER and n]
    return ", ".join(parts) or "no replicas"


def _first_line(message: str, width: int = 100) -> str:
    line = message.strip().splitlines()[0] if message.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def status_table(status: dict) -> str:
    """A readable table: one row per application, then one per deployment below it."""
    rows = [("APPLICATION / DEPLOYMENT", "STATUS", "REPLICAS", "MESSAGE")]
    for app_name, app in sorted(status.get("applications", {}).items()):
        rows.append((app_name, app["status"], "", _first_line(app.get("message", ""))))
        for dep_name, d in sorted(app.get("deployments", {}).items()):
            rows.append((f"  {dep_name}", d["status"], replica_summary(d.get("replica_states", {})),
                         _first_line(d.get("message", ""))))
    if len(rows) == 1:
        body = "No applications."
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        body = "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip()
                         for r in rows)
    proxies = status.get("proxies", {})
    counts: dict[str, int] = {}
    for s in proxies.values():
        counts[s] = counts.get(s, 0) + 1
    proxy_line = "Proxies: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none")
    return f"{proxy_line}\n\n{body}"


class DeployProgress:
    """Prints a line whenever a deployment's status or replica counts change, and the reason when
    it fails or waits for resources; `outcome` says when the applications are settled."""

    def __init__(self, echo: Callable[[str], None], app_names: Optional[Iterable[str]] = None):
        self.echo = echo
        self.app_names = set(app_names) if app_names is not None else None
        self.seen: dict[str, str] = {}

    def _wanted(self, status: dict) -> dict:
        apps = status.get("applications", {})
        return {n: a for n, a in apps.items() if self.app_names is None or n in self.app_names}

    def update(self, status: dict) -> None:
        for app_name, app in sorted(self._wanted(status).items()):
            for dep_name, d in sorted(app.get("deployments", {}).items()):
                key = f"{app_name}/{dep_name}"
                line = f"{key}: {d['status']}, {replica_summary(d.get('replica_states', {}))}"
                message = d.get("message", "")
                if message and d["status"] != "DEPLOY_FAILED":  # the app line below carries that one
                    line += f" -- {_first_line(message, 200)}"
                if self.seen.get(key) != line:
                    self.seen[key] = line
                    self.echo(line)
            line = f"{app_name}: {app['status']}"
            if self.seen.get(app_name) != line:
                self.seen[app_name] = line
                if app["status"] in ("DEPLOY_FAILED", "UNHEALTHY") and app.get("message"):
                    line += ":\n" + textwrap.indent(app["message"].rstrip(), "  ")
                self.echo(line)

    def outcome(self, status: dict) -> Optional[bool]:
        """True when every application is RUNNING with every deployment HEALTHY, False when one
        failed to deploy (or is missing), None while still deploying."""
        apps = self._wanted(status)
        if self.app_names is not None and set(apps) != self.app_names:
            return None
        if any(a["status"] == "DEPLOY_FAILED" for a in apps.values()):
            return False
        settled = all(a["status"] == "RUNNING" and all(d["status"] == "HEALTHY" for d in a["deployments"].values())
                      for a in apps.values())
        return True if settled else None
