"""Access lines: one per request, in the proxy's and the replica's log files, at a small cost.

The budget (issue 14): with metrics and access lines on, HTTP requests/s stays within 10% of the
tree without either. So a request pays for nothing here: it adds its raw fields to its process
component's request journal (telemetry/journal.py), which also feeds the metrics, and hands each
batch here every `JOURNAL_PERIOD_S`:

- `AccessLog.write` takes the batch's columns by slicing the flat list; `asctime` comes from one
  clock offset per batch, built once per millisecond with the line's constant text around it (its
  date part once per second), a latency's text from a table (below 200 ms) over the latencies the
  metrics used too, a status's text once per distinct status; the lines
  are rendered by one comprehension (`render`) and written in one `write` to the root logger's
  stream handlers (the process's log file: stderr), bypassing `logging` per line. The
  `shoal.access` logger's level still decides (`log_level` filters access lines as any INFO line).

Lines in the last period before a process is killed can be lost; a clean exit writes them.
"""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left
from itertools import islice, repeat
from operator import is_, le
from typing import Any, Callable, Optional

ACCESS_LOGGER_NAME = "shoal.access"
_MILLIS = [f",{i:03d}" for i in range(1000)]
_PERF = time.perf_counter
_WALL = time.time

# A renderer turns a batch into the text to write: `render(flat, width, secs, offset)`, `flat` the
# journal's entries (t0, t1, *fields), `secs` their latencies, `offset` the wall clock's lead over
# `perf_counter` (t1 + offset: when a request ended).
Render = Callable[[list, int, list, float], str]

# Latencies under 200 ms as text, by whole tenths of ms, per text that follows them ("ms\n"): a lookup
# instead of two int formats per line.
_TENTHS: dict[str, list] = {}


def date_parts(seconds: Any) -> dict:
    """The date part of `asctime` ("2024-01-31 12:00:00") of each of these whole seconds."""
    return {s: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s)) for s in seconds}


def asctimes(t1s: list, offset: float, before: str = "", after: str = "") -> list:
    """logging's default `asctime` ("2024-01-31 12:00:00,123") of each `perf_counter` time (+ offset:
    wall time), between `before` and `after` (a line's constant text around it), each distinct
    millisecond's text built once. The journal's times come in order: then each millisecond's lines
    are found by one `bisect` (at thousands of requests/s a batch has fewer milliseconds than lines)
    and nothing is computed per line."""
    n = len(t1s)
    first, last = int((t1s[0] + offset) * 1000.0), int((t1s[-1] + offset) * 1000.0)
    if 0 <= last - first < n and all(map(le, t1s, islice(t1s, 1, None))):
        dates = date_parts(range(first // 1000, last // 1000 + 1))
        out: list = []
        i = 0
        for m in range(first, last + 1):
            j = bisect_left(t1s, (m + 1) / 1000.0 - offset, i)
            if j > i:
                out += repeat(f"{before}{dates[m // 1000]}{_MILLIS[m % 1000]}{after}", j - i)
                i = j
        if i < n:  # rounding at the last millisecond's end
            out += repeat(out[-1] if out else f"{before}{dates[last // 1000]}{_MILLIS[last % 1000]}{after}", n - i)
        return out
    millis = [int((t1 + offset) * 1000.0) for t1 in t1s]
    built = dict.fromkeys(millis)
    dates = date_parts({m // 1000 for m in built})
    for m in built:
        built[m] = f"{before}{dates[m // 1000]}{_MILLIS[m % 1000]}{after}"
    return list(map(built.__getitem__, millis))


def latency_texts(secs: list, after: str = "") -> list:
    """Each latency in ms, one decimal, then `after` ("2.2ms\n")."""
    table = _TENTHS.get(after)
    if table is None:
        table = _TENTHS[after] = [f"{t // 10}.{t % 10}{after}" for t in range(2000)]
    return [table[t] if (t := int(x * 10000.0 + 0.5)) < 2000 else f"{t // 10}.{t % 10}{after}" for x in secs]


def as_text(col: list) -> list:
    """`str` of each value, converted once per distinct value (status codes)."""
    texts = {v: str(v) for v in set(col)}
    return list(map(texts.__getitem__, col))


class AccessLog:
    """Renders and writes a batch of journal entries `(t0, t1, *fields)` as access lines."""

    __slots__ = ("render",)

    def __init__(self, render: Render) -> None:
        self.render = render

    def write(self, flat: list, w: int, secs: list) -> None:
        if not flat or not logging.getLogger(ACCESS_LOGGER_NAME).isEnabledFor(logging.INFO):
            return
        try:
            offset = _WALL() - _PERF()  # perf_counter -> wall clock, once per batch
            text = self.render(flat, w, secs, offset)
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
        def render_json(flat: list, w: int, secs: list, offset: float) -> str:
            return _json_lines(
                {"levelname": "INFO", "asctime": a, "name": ACCESS_LOGGER_NAME,
                 "message": f"{m} {r.prefix} {s} {t}ms", "request_id": rid, "route": r.prefix,
                 "application": r.app_name, "deployment": r.ingress, "component": proxy}
                for a, t, r, m, s, rid in zip(asctimes(flat[1::w], offset), latency_texts(secs), *_fields(flat, w))
                if rid is not None)
        return render_json

    name = ACCESS_LOGGER_NAME

    def render_text(flat: list, w: int, secs: list, offset: float) -> str:
        routes, methods, statuses, rids = _fields(flat, w)
        lat, codes = latency_texts(secs, "ms\n"), as_text(statuses)
        r = routes[0]
        if all(map(is_, routes, repeat(r))):  # one route in the batch (the common case): its text once
            heads = asctimes(flat[1::w], offset, "INFO ", f" {name} {r.app_name}#{r.ingress} {proxy} ")
            prefix = r.prefix
            return "".join([f"{h}{rid} -- {m} {prefix} {s} {t}"
                            for h, t, m, s, rid in zip(heads, lat, methods, codes, rids) if rid is not None])
        return "".join([f"{h} {name} {r.app_name}#{r.ingress} {proxy} {rid} -- {m} {r.prefix} {s} {t}"
                        for h, t, r, m, s, rid in zip(asctimes(flat[1::w], offset, "INFO "), lat, routes, methods,
                                                      codes, rids)
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

        def render_json(flat: list, w: int, secs: list, offset: float) -> str:
            return _json_lines(
                {"levelname": "INFO", "asctime": a, "name": ACCESS_LOGGER_NAME,
                 "message": f"{m} {r} {s} {t}ms", "request_id": rid, "route": "" if m == "CALL" else r,
                 "application": app, "deployment": deployment, "replica": replica, "worker_id": worker_id, **extra}
                for a, t, rid, m, r, s in zip(asctimes(flat[1::w], offset), latency_texts(secs), *_fields(flat, w)[2:]))
        return render_json
    head = f" {ACCESS_LOGGER_NAME} {app}#{deployment} {replica} "

    def render_text(flat: list, w: int, secs: list, offset: float) -> str:
        _route, _failed, rids, methods, routes, statuses = _fields(flat, w)
        return "".join([f"{h}{rid} -- {m} {r} {s} {t}"
                        for h, t, rid, m, r, s in zip(asctimes(flat[1::w], offset, "INFO ", head),
                                                      latency_texts(secs, "ms\n"), rids, methods, routes,
                                                      as_text(statuses))])
    return render_text
