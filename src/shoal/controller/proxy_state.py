"""The HTTP proxies the controller runs: start, restart, route table distribution, readiness."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from shoal.controller.checkpoint import ProxySnapshot
from shoal.exceptions import RayServeException
from shoal.http.routes import Route
from shoal.status import ProxyStatus

if TYPE_CHECKING:
    from shoal.controller.controller import Controller
    from shoal.runtime.base import ReplicaProcess
    from shoal.transport.connection import Connection

logger = logging.getLogger("shoal.controller")
RESTART_BACKOFF_S = 1.0
# How long a draining proxy's requests may run on once it stops serving (after its minimum draining
# period, `http/drain.py`) before it is killed.
DRAIN_TIMEOUT_S = 30.0
SPARE = -1  # the index a standby proxy says hello with


@dataclass
class ProxyRecord:
    index: int
    process: Optional["ReplicaProcess"] = None
    conn: Optional["Connection"] = None
    status: ProxyStatus = ProxyStatus.STARTING
    port: int = 0
    error: str = ""
    acked_version: int = -1
    started_at: float = field(default_factory=time.monotonic)


class ProxyManager:
    def __init__(self, controller: "Controller"):
        self.controller = controller
        self.options: Optional[dict] = None
        self.proxies: dict[int, ProxyRecord] = {}
        self.routes: list[Route] = []
        self.version = 0
        self.port = 0
        self.count = 1  # proxies to run: `num_proxies` on one machine, one per node on a cluster
        # Proxies draining because their node no longer needs one: (record, kill deadline), until they exit.
        self.retiring: list[tuple[ProxyRecord, float]] = []
        self._changed = asyncio.Event()
        # A standby proxy, started and connected but not listening: when a proxy dies it takes over its
        # index at once (milliseconds), where a fresh process needs its whole start-up (~1 s).
        self.spare: Optional[ProxyRecord] = None
        self.use_spare = (controller.runtime.name == "embedded"
                          and os.environ.get("SHOAL_SPARE_PROXY", "1").lower() not in ("0", "off", "false"))

    @property
    def enabled(self) -> bool:
        return self.options is not None and self.options.get("proxy_location", "EveryNode") != "Disabled"

    def configure(self, http_options: Optional[dict]) -> None:
        """Set options once (the first driver's) and start the proxies."""
        if self.options is not None or http_options is None:
            return
        self.options = http_options
        if not self.enabled:
            return
        self.port = int(http_options.get("port", 8000))
        n = self.count = self.controller.runtime.proxy_count(http_options)
        # With port 0 the first proxy picks the port; the others share it once it is known.
        first = [0] if self.port == 0 and n > 1 else range(n)
        for i in first:
            self._launch(i)

    def _launch(self, index: int) -> None:
        rec = self.proxies.get(index) or ProxyRecord(index)
        rec.status, rec.error, rec.conn, rec.started_at = ProxyStatus.STARTING, "", None, time.monotonic()
        rec.process = self.controller.runtime.launch_proxy(index)
        self.proxies[index] = rec

    def _launch_spare(self) -> None:
        if self.use_spare and self.enabled and self.spare is None and not self.controller.shutting_down:
            self.spare = ProxyRecord(SPARE, self.controller.runtime.launch_proxy(SPARE))

    def _replace(self, index: int, why: str) -> None:
        """Proxy `index` is gone: the standby takes over its index and port, or a new process starts."""
        spare = self.spare
        if spare is None or spare.conn is None or (self.port == 0 and not self.proxies):
            logger.warning("HTTP proxy %d %s; restarting it", index, why)
            self._launch(index)
            return
        logger.warning("HTTP proxy %d %s; the standby proxy (pid %s) takes over", index, why,
                       getattr(spare.process, "pid", "?"))
        self.spare = None
        rec = ProxyRecord(index, spare.process, spare.conn, ProxyStatus.STARTING)
        spare.conn.proxy = rec  # type: ignore[attr-defined]
        self.proxies[index] = rec
        self.controller.spawn(spare.conn.call("take_over", index, self.port, self.count > 1))
        self._launch_spare()

    def hello(self, conn: "Connection", index: int, serving_port: int = 0, draining: bool = False) -> dict:
        """A proxy starts, or (`serving_port` set) one that kept serving reconnects after a controller restart.

        One that was draining then goes on draining and ends by itself: it is no record's proxy any
        more (its index may be a new proxy's), so it gets the route table and nothing else."""
        rec = None if draining else self.spare if index == SPARE else self.proxies.get(index)
        if draining:
            logger.info("HTTP proxy %d reconnected while draining; it ends once drained", index)
        elif rec is None:
            raise RayServeException(f"unknown HTTP proxy {index}")  # it exits: nobody would manage it
        if rec is not None:
            rec.conn = conn
            conn.proxy = rec  # type: ignore[attr-defined]
        if rec is not None and serving_port and rec.status != ProxyStatus.HEALTHY:
            rec.status, rec.port, rec.error = ProxyStatus.HEALTHY, serving_port, ""
            self._signal()
        # The route table comes with the reply: a proxy (re)started after apps were deployed must
        # route at once, and it installs its notification handler only once this call returns.
        reuse_port = self.count > 1 or self.controller.runtime.proxy_count_may_grow(self.options)  # type: ignore[arg-type]
        return {"http_options": self.options, "port": self.port, "num_proxies": self.count,
                "reuse_port": reuse_port, "routes": (self.routes, self.version)}

    def ready(self, index: int, port: int) -> None:
        rec = self.proxies[index]
        rec.status, rec.port = ProxyStatus.HEALTHY, port
        if self.port == 0:
            self.port = port
            for i in range(1, self.count):
                if i not in self.proxies:
                    self._launch(i)
        if all(r.status == ProxyStatus.HEALTHY for r in self.proxies.values()) and len(self.proxies) >= self.count:
            self._launch_spare()  # once the serving proxies are up: their start-up gets the cores first
        self._signal()

    def failed(self, index: int, error: str) -> None:
        rec = self.proxies[index]
        rec.status, rec.error = ProxyStatus.UNHEALTHY, error
        logger.error("HTTP proxy %d failed: %s", index, error)
        self._signal()

    def acked(self, conn: "Connection", version: int) -> None:
        rec = getattr(conn, "proxy", None)
        if rec is not None:
            rec.acked_version = max(rec.acked_version, version)
            self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self.controller.status_changed()

    def set_routes(self, routes: list[Route]) -> None:
        if routes == self.routes:
            return
        self.routes = routes
        self.version += 1
        for rec in self._all():
            if rec.conn is not None:
                rec.conn.notify("routes", (routes, self.version))

    def routes_applied(self) -> bool:
        """Every healthy proxy has the current route table."""
        return all(r.acked_version >= self.version for r in self.proxies.values()
                   if r.status == ProxyStatus.HEALTHY)

    async def wait_ready(self, timeout: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout
        while True:
            if not self.enabled:
                return True, ""
            errors = [r.error for r in self.proxies.values() if r.status == ProxyStatus.UNHEALTHY]
            if errors:
                return False, errors[0]
            n = self.count
            healthy = [r for r in self.proxies.values() if r.status == ProxyStatus.HEALTHY]
            if len(healthy) >= n:
                return True, ""
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, "the HTTP proxy did not start in time"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    async def wait_started(self, timeout: float) -> None:
        """Wait (at most `timeout`) until no proxy is still starting: one started for a node that
        just got replicas serves once an app is RUNNING."""
        await self._wait_while(lambda: any(r.status == ProxyStatus.STARTING for r in self.proxies.values()),
                               timeout)

    async def wait_routes(self, timeout: float) -> None:
        await self._wait_while(lambda: not self.routes_applied(), timeout)

    async def _wait_while(self, condition, timeout: float) -> None:
        """Wait (at most `timeout`) while `condition()` holds, looking again on each change."""
        deadline = time.monotonic() + timeout
        while condition() and time.monotonic() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 0.2)
            except asyncio.TimeoutError:
                pass

    def reconcile(self, shutting_down: bool) -> None:
        for rec in list(self.proxies.values()):
            code = rec.process.exit_code() if rec.process is not None else None
            if code is None or shutting_down:
                continue
            if rec.status == ProxyStatus.UNHEALTHY and rec.error:
                continue  # could not bind: restarting will not help
            if time.monotonic() - rec.started_at < RESTART_BACKOFF_S:
                continue
            if self._left_with_its_node(rec):
                continue
            out = rec.process.recent_output().strip()[-2000:] if rec.process else ""
            self._replace(rec.index, f"exited with code {code}" + (f". Its last output:\n{out}" if out else ""))
        spare = self.spare
        if spare is not None and spare.process is not None and spare.process.exit_code() is not None \
                and not shutting_down:
            self.spare = None
            if time.monotonic() - spare.started_at >= RESTART_BACKOFF_S:
                logger.warning("the standby HTTP proxy exited with code %s; starting another",
                               spare.process.exit_code())
                self._launch_spare()
        self._reap_retiring()
        if not shutting_down:
            self._follow_nodes()

    def _follow_nodes(self, fresh: bool = False) -> None:
        """Run as many proxies as the runtime says (on a cluster, one per node that needs one): a node
        that gets replicas gets one (`launch_proxy` picks the node) before they can be ready, and the
        proxy of a node that no longer needs one is drained (`surplus_proxies`). Every tick: the
        runtime answers from what it knows (a cluster runtime caches its node list); `fresh` asks
        the cluster now."""
        if not self.enabled or self.port == 0 or self.controller.shutting_down:
            return  # with port 0, the first proxy's port must be known before others start
        runtime = self.controller.runtime
        for index in runtime.surplus_proxies(self.options):  # type: ignore[arg-type]
            self._retire(index)
        want = runtime.proxy_count(self.options, fresh=fresh)  # type: ignore[arg-type]
        if want != self.count:
            logger.info("HTTP proxies: %d wanted now (were %d)", want, self.count)
            self.count = want
        index = 0
        while len(self.proxies) < want:
            while index in self.proxies:
                index += 1
            self._launch(index)

    def _retire(self, index: int) -> None:
        """Drain proxy `index` (`http/drain.py`): it answers health checks with 503, hands its listener
        to another proxy on its host or keeps serving for the minimum draining period, finishes its
        requests (at most DRAIN_TIMEOUT_S more) and exits. DRAINING in the status until then."""
        from shoal.http.drain import handover_enabled, min_draining_period_s

        rec = self.proxies.pop(index, None)
        if rec is None:
            return
        logger.info("HTTP proxy %d: its node no longer needs a proxy; draining it", index)
        if rec.conn is not None and rec.status == ProxyStatus.HEALTHY:
            min_period = min_draining_period_s()
            rec.status = ProxyStatus.DRAINING
            self.controller.spawn(rec.conn.call("drain", DRAIN_TIMEOUT_S, min_period, handover_enabled()))
            self.retiring.append((rec, time.monotonic() + min_period + DRAIN_TIMEOUT_S + 5.0))
        elif rec.process is not None:
            rec.process.kill()
            self.retiring.append((rec, time.monotonic()))
        self._signal()

    def _reap_retiring(self) -> None:
        now = time.monotonic()
        left = []
        for rec, deadline in self.retiring:
            if rec.process is None or rec.process.exit_code() is not None:
                continue
            if now >= deadline:
                rec.process.kill()
            left.append((rec, deadline))
        if len(left) != len(self.retiring):
            self.retiring = left
            self._signal()  # a DRAINING proxy left the status

    def _left_with_its_node(self, rec: ProxyRecord) -> bool:
        """Proxy `rec` ended and the runtime wants fewer proxies now (its node left the cluster):
        forget it rather than start it again elsewhere."""
        self._follow_nodes(fresh=True)
        if len(self.proxies) <= self.count:
            return False
        logger.info("HTTP proxy %d ended with its node; one proxy per node, so it is not replaced", rec.index)
        self.proxies.pop(rec.index, None)
        self._signal()
        return True

    def on_disconnect(self, conn: "Connection") -> None:
        rec = getattr(conn, "proxy", None)
        if rec is None or rec.conn is not conn:
            return
        rec.conn = None
        if rec.index == SPARE or self.controller.shutting_down or self.proxies.get(rec.index) is not rec:
            return  # the standby, or a proxy drained away
        if rec.status == ProxyStatus.HEALTHY:
            # Its control connection closes only when its process ends: replace it now, not at the next tick.
            if rec.process is not None:
                rec.process.kill()
            if not self._left_with_its_node(rec):
                self._replace(rec.index, "died")

    def stop(self) -> None:
        for rec in self._all():
            if rec.process is not None:
                rec.process.terminate()

    def _all(self) -> list[ProxyRecord]:
        return (list(self.proxies.values()) + ([self.spare] if self.spare is not None else [])
                + [rec for rec, _ in self.retiring])

    async def wait_exited(self, timeout: float) -> None:
        """Wait for stopped proxies to exit (so their port is free), killing stragglers."""
        deadline = time.monotonic() + timeout
        procs = [r.process for r in self._all() if r.process is not None]
        while any(p.exit_code() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for p in procs:
            if p.exit_code() is None:
                p.kill()
        while any(p.exit_code() is None for p in procs) and time.monotonic() < deadline + 2:
            await asyncio.sleep(0.01)

    # --- checkpoint -----------------------------------------------------------------------------
    def checkpoint_key(self) -> tuple:
        return (id(self.options), self.port, self.version,
                tuple((r.index, id(r.process), r.port, r.status) for r in self.proxies.values()))

    def snapshot(self) -> list[ProxySnapshot]:
        describe = self.controller.runtime.describe
        return [ProxySnapshot(r.index, describe(r.process) if r.process is not None else None, r.port,
                              r.status.value) for r in self.proxies.values()]

    def restore(self, options: Optional[dict], proxies: list[ProxySnapshot], port: int, version: int) -> None:
        """Adopt the proxies a previous controller ran (they kept serving); relaunch the ones gone."""
        self.options, self.port, self.version = options, port, version
        if not self.enabled:
            return
        self.count = self.controller.runtime.proxy_count(options)  # type: ignore[arg-type]
        for snap in proxies:
            process = self.controller.runtime.adopt(snap.process) if snap.process else None
            if process is None:
                logger.warning("HTTP proxy %d did not survive the controller restart; starting it again", snap.index)
                self._launch(snap.index)
                continue
            # Still serving with the route table it has; it reconnects and gets the current one.
            self.proxies[snap.index] = ProxyRecord(snap.index, process, None, ProxyStatus(snap.status), snap.port)
        self._launch_spare()  # the old standby left with its controller

    def statuses(self) -> dict[str, ProxyStatus]:
        """Serving proxies, and draining ones (DRAINING) until they exit; a serving proxy wins a key
        both have (its node got replicas again while its old proxy drained)."""
        draining = [rec for rec, _ in self.retiring if rec.status == ProxyStatus.DRAINING
                    and (rec.process is None or rec.process.exit_code() is None)]
        return {f"{getattr(r.process, 'node_id', '') or 'local'}:{r.index}": r.status
                for r in draining + list(self.proxies.values())}

    def url(self) -> Optional[str]:
        if not self.enabled or not self.port:
            return None
        host = self.options.get("host", "127.0.0.1")  # type: ignore[union-attr]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.port}"
