"""Access lines: one per request, in the proxy's and the replica's log files, at a small cost.

The budget (issue 14): with metrics and access lines on, HTTP requests/s stays within 10% of the
tree without either. So a request pays for nothing here: it adds its raw fields to its process
component's request journal (telemetry/journal.py), which also feeds the metrics, and hands each
batch here every `JOURNAL_PERIOD_S`:

- `AccessLog.write` takes the batch's columns by slicing the flat list; `asctime` comes from one
  clock offset per batch, built once per distinct millisecond (its date part once per second), a
  latency's text from a table (below 200 ms), a status's text once per distinct status; the lines
  are rendered by one comprehension (`render`) and written in one `write` to the root logger's
  stream handlers (the process's log file: stderr), bypassing `logging` per line. The
  `shoal.access` logger's level still decides (`log_level` filters access lines as any INFO line).

Lines in the last period before a process is killed can be lost; a clean exit writes them.
"""

from __future__ import annotations

import json
import logging
import time
from itertools import repeat
from operator import is_
from typing import Any, Callable, Optional

ACCESS_LOGGER_NAME = "shoal.access"
_MILLIS = [f",{i:03d}" for i in range(1000)]
_PERF = time.perf_counter
_WALL = time.time

# A renderer turns a batch into the text to write: `render(ends, flat, width)`, `ends` the wall time
# each request ended in whole ms since the epoch, `flat` the journal's entries (t0, t1, *fields).
Render = Callable[[list, list, int], str]

# Latencies under 200 ms as text, by whole tenths of ms, per text that follows them ("ms\n"): a lookup
# instead of two int formats per line.
_TENTHS: dict[str, list] = {}


def date_parts(millis: Any) -> dict:
    """The date part of `asctime` ("2024-01-31 12:00:00") of each second in the batch: formatted
    once per second, not once per line; a line adds its `_MILLIS[m % 1000]` (",123")."""
    return {s: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s)) for s in {m // 1000 for m in millis}}


def asctimes(millis: list, before: str = "", after: str = "") -> list:
    """logging's default `asctime` ("2024-01-31 12:00:00,123") of each wall time in whole ms, between
    `before` and `after` (a line's constant text around it), each distinct one built once: at
    thousands of requests/s, lines share their millisecond."""
    built = dict.fromkeys(millis)
    dates = date_parts(built)
    for m in built:
        built[m] = f"{before}{dates[m // 1000]}{_MILLIS[m % 1000]}{after}"
    return list(map(built.__getitem__, millis))


def latency_texts(flat: list, w: int, after: str = "") -> list:
    """Each entry's latency (t1 - t0) in ms, one decimal, then `after` ("2.2ms\n")."""
    table = _TENTHS.get(after)
    if table is None:
        table = _TENTHS[after] = [f"{t // 10}.{t % 10}{after}" for t in range(2000)]
    return [table[t] if t < 2000 else f"{t // 10}.{t % 10}{after}"
            for t in [int((t1 - t0) * 10000.0 + 0.5) for t0, t1 in zip(flat[0::w], flat[1::w])]]


def as_text(col: list) -> list:
    """`str` of each value, converted once per distinct value (status codes)."""
    texts = {v: str(v) for v in set(col)}
    return list(map(texts.__getitem__, col))


class AccessLog:
    """Renders and writes a batch of journal entries `(t0, t1, *fields)` as access lines."""

    __slots__ = ("render",)

    def __init__(self, render: Render) -> None:
        self.render = render

    def write(self, flat: list, w: int) -> None:
        if not flat or not logging.getLogger(ACCESS_LOGGER_NAME).isEnabledFor(logging.INFO):
            return
        try:
            offset = _WALL() - _PERF()  # perf_counter -> wall clock, once per batch
            text = self.render([int((t1 + offset) * 1000.0) for t1 in flat[1::w]], flat, w)
        except Exception:  # noqa: BLE001 - a log line must never break serving
            logging.getLogger("shoal").exception("could not format access lines")
            return
        write_to_handlers(text)
        if _after_write is not None:
            _after_write()


_after_write: Optional[Callable[[], None]] = None


def set_after_write(hook: Optional[Callable[[], None]]) -> None:
    """Call `hook` after each batch is written (the process's log rotation check)."""
    global _after_write
    _after_write = hook


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


def _fields(flat: list, w: int) -> list:
    """The batch's columns after (t0, t1)."""
    return [flat[i::w] for i in range(2, w)]


def _json_lines(objs: Any) -> str:
    dumps = json.dumps
    return "".join([dumps(o) + "\n" for o in objs])


# --- the proxy ------------------------------------------------------------------------------------
# A proxy's journal entry: (t0, t1, route (a `Route`), method, status, request id). A request id of
# None: counted in the metrics, no access line (a 404 for no route, a 413 or a client gone before routing).
PROXY_ENTRY_WIDTH = 6


def proxy_render(encoding: str, proxy: str) -> Render:
    """A proxy's lines. TEXT has the columns of a replica's lines (`logger app#deployment replica
    request_id -- message`), the proxy (`proxy_0`) in the replica's place:
    `INFO asctime shoal.access app#Ingress proxy_0 abc123 -- GET /route 200 2.2ms`."""
    if encoding == "JSON":
        def render_json(ends: list, flat: list, w: int) -> str:
            return _json_lines(
                {"levelname": "INFO", "asctime": a, "name": ACCESS_LOGGER_NAME,
                 "message": f"{m} {r.prefix} {s} {t}ms", "request_id": rid, "route": r.prefix,
                 "application": r.app_name, "deployment": r.ingress, "component": proxy}
                for a, t, r, m, s, rid in zip(asctimes(ends), latency_texts(flat, w), *_fields(flat, w))
                if rid is not None)
        return render_json

    name = ACCESS_LOGGER_NAME

    def render_text(ends: list, flat: list, w: int) -> str:
        routes, methods, statuses, rids = _fields(flat, w)
        lat, codes = latency_texts(flat, w, "ms\n"), as_text(statuses)
        r = routes[0]
        if all(map(is_, routes, repeat(r))):  # one route in the batch (the common case): its text once
            heads, prefix = asctimes(ends, "INFO ", f" {name} {r.app_name}#{r.ingress} {proxy} "), r.prefix
            return "".join([f"{h}{rid} -- {m} {prefix} {s} {t}"
                            for h, t, m, s, rid in zip(heads, lat, methods, codes, rids) if rid is not None])
        return "".join([f"{h} {name} {r.app_name}#{r.ingress} {proxy} {rid} -- {m} {r.prefix} {s} {t}"
                        for h, t, r, m, s, rid in zip(asctimes(ends, "INFO "), lat, routes, methods, codes, rids)
                        if rid is not None])
    return render_text


# --- a replica ------------------------------------------------------------------------------------
# A replica's journal entry: (t0, t1, metrics route, failed, request id, method ("CALL" for a handle
# call), route (the method called), status ("OK"/"ERROR" for a handle call)).
REPLICA_ENTRY_WIDTH = 8


def replica_render(encoding: str, app: str, deployment: str, replica: str, worker_id: str,
                   additional_attrs: Any = ()) -> Render:
    """A replica's lines, in the columns and fields of its other log lines (serve_logging.py)."""
    if encoding == "JSON":
        extra = {k: None for k in additional_attrs or ()}

        def render_json(ends: list, flat: list, w: int) -> str:
            return _json_lines(
                {"levelname": "INFO", "asctime": a, "name": ACCESS_LOGGER_NAME,
                 "message": f"{m} {r} {s} {t}ms", "request_id": rid, "route": "" if m == "CALL" else r,
                 "application": app, "deployment": deployment, "replica": replica, "worker_id": worker_id, **extra}
                for a, t, rid, m, r, s in zip(asctimes(ends), latency_texts(flat, w), *_fields(flat, w)[2:]))
        return render_json
    head = f" {ACCESS_LOGGER_NAME} {app}#{deployment} {replica} "

    def render_text(ends: list, flat: list, w: int) -> str:
        _route, _failed, rids, methods, routes, statuses = _fields(flat, w)
        return "".join([f"{h}{rid} -- {m} {r} {s} {t}"
                        for h, t, rid, m, r, s in zip(asctimes(ends, "INFO ", head), latency_texts(flat, w, "ms\n"),
                                                      rids, methods, routes, as_text(statuses))])
    return render_text
