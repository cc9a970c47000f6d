"""Access lines: one per request, in the proxy's and the replica's log files, at a small cost.

The budget (issue 14): with metrics and access lines on, HTTP requests/s stays within 10% of the
tree without either. So a request pays only for a few list slots; everything else happens once
per batch, on a timer of the process's loop:

- hot path: `AccessLog.add` extends one flat list by the request's raw fields (its arrival time on
  the `perf_counter` clock and its latency, both already taken by the metrics' `record`, then
  strings it already holds). No clock read, no formatting, no `LogRecord`, nothing that outlives
  the request for the cyclic GC to follow.
- every `ACCESS_FLUSH_PERIOD_S`: the batch's columns are sliced out of the flat list, the wall
  times derived from one clock offset, `asctime` built with the date part once a second, and the
  lines rendered by one comprehension (`render`) and written in one `write` to the root logger's
  stream handlers (the process's log file: stderr), bypassing `logging` per line. The `shoal.access`
  logger's level still decides (`log_level` filters access lines as any INFO line).

Lines in the last period before a process is killed can be lost; a clean exit flushes them.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from typing import Any, Callable, Optional

ACCESS_LOGGER_NAME = "shoal.access"
ACCESS_FLUSH_PERIOD_S = 0.2
_MILLIS = [f",{i:03d}" for i in range(1000)]
_PERF = time.perf_counter
_WALL = time.time

# A renderer turns the batch's columns into the text to write: first the wall time each request ended,
# in whole ms since the epoch, then the latencies in ms, then the other fields as added.
Render = Callable[[list, list], str]


def date_parts(millis: list) -> dict:
    """The date part of `asctime` ("2024-01-31 12:00:00") of each second in the batch: formatted
    once per second, not once per line; a line adds its `_MILLIS[m % 1000]` (",123")."""
    return {s: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s)) for s in {m // 1000 for m in millis}}


def asctimes(millis: list) -> list:
    """logging's default `asctime` ("2024-01-31 12:00:00,123") of each wall time in whole ms."""
    dates = date_parts(millis)
    return [dates[m // 1000] + _MILLIS[m % 1000] for m in millis]


def tenths(latencies: list) -> list:
    """Latencies in ms as whole tenths: `f"{t // 10}.{t % 10}"` formats them faster than `:.1f`."""
    return [int(x * 10.0 + 0.5) for x in latencies]


class AccessLog:
    """Gathers access entries and writes them in batches (see the module docstring).

    An entry is `(t0, ms, *fields)`: `t0` the request's arrival on the `perf_counter` clock, `ms`
    its latency, then `width - 2` fields that `render` reads as columns."""

    def __init__(self, loop: Any, width: int, render: Render, period_s: float = ACCESS_FLUSH_PERIOD_S):
        self.loop = loop
        self.width = width
        self.render = render
        self.period_s = period_s
        self.pending: list = []
        self.scheduled = False
        _LIVE.add(self)

    def add(self, entry: tuple) -> None:
        self.pending += entry
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_later(self.period_s, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        flat, self.pending = self.pending, []
        if not flat or not logging.getLogger(ACCESS_LOGGER_NAME).isEnabledFor(logging.INFO):
            return
        w = self.width
        try:
            offset = _WALL() - _PERF()  # perf_counter -> wall clock, once per batch
            ends = [int((t0 + ms * 0.001 + offset) * 1000.0) for t0, ms in zip(flat[0::w], flat[1::w])]
            text = self.render(ends, [flat[i::w] for i in range(1, w)])
        except Exception:  # noqa: BLE001 - a log line must never break serving
            logging.getLogger("shoal").exception("could not format access lines")
            return
        write_to_handlers(text)
        if _after_write is not None:
            _after_write()


_LIVE: "weakref.WeakSet[AccessLog]" = weakref.WeakSet()
_after_write: Optional[Callable[[], None]] = None


def set_after_write(hook: Optional[Callable[[], None]]) -> None:
    """Call `hook` after each batch is written (the process's log rotation check)."""
    global _after_write
    _after_write = hook


def flush_all() -> None:
    """Write what every access log of this process has gathered (before it exits)."""
    for log in list(_LIVE):
        try:
            log.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def write_to_handlers(text: str) -> None:
    """One write of `text` to each stream handler of the root logger (the process's log file)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler):
            h.acquire()
            try:
                h.stream.write(text)
                h.flush()
            except Exception:  # noqa: BLE001
                pass
            finally:
                h.release()


def _json_lines(objs: Any) -> str:
    dumps = json.dumps
    return "".join([dumps(o) + "\n" for o in objs])


# --- the proxy ------------------------------------------------------------------------------------
# An entry: (t0, ms, method, route prefix, status, request id, application, ingress deployment).
PROXY_ACCESS_WIDTH = 8


def proxy_render(encoding: str, proxy: str) -> Render:
    """A proxy's lines. TEXT has the columns of a replica's lines (`logger app#deployment replica
    request_id -- message`), the proxy (`proxy_0`) in the replica's place:
    `INFO asctime shoal.access app#Ingress proxy_0 abc123 -- GET /route 200 2.2ms`."""
    if encoding == "JSON":
        def render_json(ends: list, c: list) -> str:
            return _json_lines(
                {"levelname": "INFO", "asctime": a, "name": ACCESS_LOGGER_NAME,
                 "message": f"{m} {r} {s} {t // 10}.{t % 10}ms", "request_id": rid, "route": r, "application": app,
                 "deployment": dep, "component": proxy}
                for a, t, m, r, s, rid, app, dep in zip(asctimes(ends), tenths(c[0]), *c[1:]))
        return render_json

    name = ACCESS_LOGGER_NAME

    def render_text(ends: list, c: list) -> str:
        dates, millis = date_parts(ends), _MILLIS
        return "".join([f"INFO {dates[e // 1000]}{millis[e % 1000]} {name} {app}#{dep} {proxy} {rid} -- "
                        f"{m} {r} {s} {t // 10}.{t % 10}ms\n"
                        for e, t, m, r, s, rid, app, dep in zip(ends, tenths(c[0]), *c[1:])])
    return render_text


# --- a replica ------------------------------------------------------------------------------------
# An entry: (t0, ms, request id, method ("CALL" for a handle call), route (the method called), status
# ("OK"/"ERROR" for a handle call)).
REPLICA_ACCESS_WIDTH = 6


def replica_render(encoding: str, app: str, deployment: str, replica: str, worker_id: str,
                   additional_attrs: Any = ()) -> Render:
    """A replica's lines, in the columns and fields of its other log lines (serve_logging.py)."""
    if encoding == "JSON":
        extra = {k: None for k in additional_attrs or ()}

        def render_json(ends: list, c: list) -> str:
            return _json_lines(
                {"levelname": "INFO", "asctime": a, "name": ACCESS_LOGGER_NAME,
                 "message": f"{m} {r} {s} {t // 10}.{t % 10}ms", "request_id": rid, "route": "" if m == "CALL" else r,
                 "application": app, "deployment": deployment, "replica": replica, "worker_id": worker_id, **extra}
                for a, t, rid, m, r, s in zip(asctimes(ends), tenths(c[0]), *c[1:]))
        return render_json
    prefix = f"{ACCESS_LOGGER_NAME} {app}#{deployment} {replica}"

    def render_text(ends: list, c: list) -> str:
        dates, millis = date_parts(ends), _MILLIS
        return "".join([f"INFO {dates[e // 1000]}{millis[e % 1000]} {prefix} {rid} -- "
                        f"{m} {r} {s} {t // 10}.{t % 10}ms\n"
                        for e, t, rid, m, r, s in zip(ends, tenths(c[0]), *c[1:])])
    return render_text
