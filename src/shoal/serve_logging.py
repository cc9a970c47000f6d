"""The serve loggers, and how `logging_config` sets them.

User code logs through `logging.getLogger("ray.serve")` (Ray Serve's documented logger, so code that
moves to shoal keeps working) and shoal through `shoal.*`: together the *serve loggers*.

- In a replica, `log_level` of its deployment's `logging_config` (the deployment's own, else its
  application's: `serve.run(logging_config=...)`, a config file's application) is their level, set at
  start and again when a redeploy changes it (reconfigure, no restart). Without one: INFO.
- In local testing mode the application's `logging_config` (the last one given) sets them in the
  driver, and `ray.serve` gets a stderr handler when logging is not configured at all (as in Ray).
- `serve.start(logging_config=...)` (a config file's top-level one with `shoal run`) sets them in the
  controller and the HTTP proxies (`SHOAL_LOG_LEVEL` in their environment).

In a replica, every record its log handlers write carries the request it was written for (from the
request context, so also in the deployments a request reaches by handle: the request id travels with
each handle call) and the replica: `request_id`, `route`, `application`, `deployment`, `replica`,
`worker_id` (the pid); `encoding: JSON` writes them as one JSON object per line, with the record
attributes named in `additional_log_standard_attrs`. With `SHOAL_ACCESS_LOG=1` (off by default for
now: see ACCESS_LOG_ENV), `enable_access_log` (default on) writes one
`shoal.access` line per request: `METHOD ROUTE STATUS LATENCYms` (handle calls: `CALL method OK|ERROR`),
gathered and written in batches (`AccessLog`).
The proxies write one per HTTP request under the same switch, unless
`serve.start(logging_config={"enable_access_log": False})` (which sets `SHOAL_ACCESS_LOG=0` for them). See docs/observability.md, "Logs".
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

from shoal.context import _request_context

SERVE_LOGGER_NAMES = ("ray.serve", "shoal")
SYSTEM_LOG_LEVEL_ENV = "SHOAL_LOG_LEVEL"
# Access lines are opt-in for now: `SHOAL_ACCESS_LOG=1` in the environment of `serve.start` / `shoal
# start` turns them on (proxies and replicas; `enable_access_log: False` still turns a deployment's off).
# On by default they cost 10-12% of the HTTP path's requests/s, above the 10% budget (issue 14).
ACCESS_LOG_ENV = "SHOAL_ACCESS_LOG"
ACCESS_LOGGER_NAME = "shoal.access"
DEFAULT_LOG_LEVEL = "INFO"
_FORMAT = "%(levelname)s %(asctime)s %(name)s -- %(message)s"


def apply_log_level(logging_config: Optional[Any]) -> None:
    """Set the serve loggers' level from a `LoggingConfig` (None: the default, INFO)."""
    level = getattr(logging_config, "log_level", None) or DEFAULT_LOG_LEVEL
    for name in SERVE_LOGGER_NAMES:
        logging.getLogger(name).setLevel(level)


def configure_local_testing(logging_config: Optional[Any]) -> None:
    apply_log_level(logging_config)
    logger = logging.getLogger("ray.serve")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(_FORMAT))
        logger.addHandler(handler)


def apply_system_log_level() -> None:
    """In the controller and the proxies: the level `serve.start(logging_config=...)` asked for."""
    level = os.environ.get(SYSTEM_LOG_LEVEL_ENV)
    if level:
        for name in SERVE_LOGGER_NAMES:
            logging.getLogger(name).setLevel(int(level) if level.isdigit() else level)


def system_access_log_enabled() -> bool:
    """In the proxies: whether `serve.start(logging_config=...)` left the access log on."""
    return os.environ.get(ACCESS_LOG_ENV, "0") == "1"


# --- replicas -------------------------------------------------------------------------------------
_REPLICA_TEXT_FORMAT = "%(levelname)s %(asctime)s %(name)s %(application)s#%(deployment)s %(replica)s " \
                       "%(request_id)s -- %(message)s"


class ServeContextFilter(logging.Filter):
    """Puts the request (from the request context) and the replica on each record a handler writes:
    the work is per record, none per request."""

    def __init__(self, application: str, deployment: str, replica: str):
        super().__init__()
        self.application = application
        self.deployment = deployment
        self.replica = replica
        self.worker_id = str(os.getpid())

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _request_context.get()
        record.request_id = ctx.request_id
        record.route = ctx.route
        record.application = self.application
        record.deployment = self.deployment
        record.replica = self.replica
        record.worker_id = self.worker_id
        return True


_JSON_FIELDS = ("request_id", "route", "application", "deployment", "replica", "worker_id")


class JSONFormatter(logging.Formatter):
    """One JSON object per line: levelname, asctime, message, the context fields, and the record
    attributes named in `additional_log_standard_attrs`."""

    def __init__(self, additional_attrs: Any = ()):
        super().__init__()
        self.additional_attrs = tuple(additional_attrs or ())

    def format(self, record: logging.LogRecord) -> str:
        out = {"levelname": record.levelname, "asctime": self.formatTime(record), "name": record.name,
               "message": record.getMessage()}
        for k in _JSON_FIELDS:
            out[k] = getattr(record, k, "")
        for k in self.additional_attrs:
            out[k] = getattr(record, k, None)
        if record.exc_info:
            out["exc_text"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


# --- access lines ---------------------------------------------------------------------------------
ACCESS_FLUSH_PERIOD_S = 0.2
_MILLIS = [f",{i:03d}" for i in range(1000)]


def _asctimes(times: list) -> list:
    """logging's default `asctime` ("2024-01-31 12:00:00,123") of each wall time, the date part
    formatted once per second."""
    out = []
    last, date = -1, ""
    for t in times:
        sec = int(t)
        if sec != last:
            last, date = sec, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sec))
        out.append(date + _MILLIS[int((t - sec) * 1000.0)])
    return out


class AccessLog:
    """Access lines, off the hot path: a request appends its `width` fields (the first its wall time)
    to one flat list (nothing that outlives the request for the cyclic GC to follow); a timer on the
    process's loop (one per period, not per request) formats the lines gathered meanwhile and writes
    them to the root logger's stream handlers in one write, when the `shoal.access` logger is enabled
    for INFO (so `log_level` filters them as it filters any INFO line).

    The lines are formatted with `fmt`, a %-format of one line (the first field as asctime), applied
    to the whole batch at once; or, when `fmt` is None, by `line(fields)`."""

    def __init__(self, loop: Any, width: int, fmt: Optional[str] = None, line: Any = None,
                 period_s: float = ACCESS_FLUSH_PERIOD_S):
        self.loop = loop
        self.width = width
        self.fmt = fmt
        self.line = line
        self.period_s = period_s
        self.pending: list = []
        self.scheduled = False

    def add(self, fields: tuple) -> None:
        self.pending += fields
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
            flat[0::w] = _asctimes(flat[0::w])
            if self.fmt is not None:
                text = (self.fmt * (len(flat) // w)) % tuple(flat)
            else:
                line = self.line
                text = "".join([line(flat[i:i + w]) + "\n" for i in range(0, len(flat), w)])
        except Exception:  # noqa: BLE001 - a log line must never break serving
            logging.getLogger("shoal").exception("could not format access lines")
            return
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


# A proxy's entry: (wall time, method, route, status, latency ms, request id, app, ingress deployment).
PROXY_ACCESS_WIDTH = 8
PROXY_ACCESS_FORMAT = (f"INFO %s {ACCESS_LOGGER_NAME} -- %s %s %s %.1fms request_id=%s application=%s "
                       "deployment=%s\n")
# A replica's: (wall time, request id, method ("CALL" for a handle call), route (the method called),
# status ("OK"/"ERROR" for a handle call), latency ms).
REPLICA_ACCESS_WIDTH = 6


def replica_access_log(loop: Any, logging_config: Optional[Any], replica_id: Any) -> AccessLog:
    """The access log of a replica, its lines in the replica's encoding."""
    dep = replica_id.deployment_id
    app, name, replica, pid = dep.app_name, dep.name, replica_id.unique_id, str(os.getpid())
    if (getattr(logging_config, "encoding", None) or "TEXT") == "JSON":
        extra = {k: None for k in getattr(logging_config, "additional_log_standard_attrs", None) or ()}

        def json_line(e: list) -> str:
            out = {"levelname": "INFO", "asctime": e[0], "name": ACCESS_LOGGER_NAME,
                   "message": f"{e[2]} {e[3]} {e[4]} {e[5]:.1f}ms", "request_id": e[1],
                   "route": "" if e[2] == "CALL" else e[3], "application": app, "deployment": name,
                   "replica": replica, "worker_id": pid}
            if extra:
                out.update(extra)
            return json.dumps(out)

        return AccessLog(loop, REPLICA_ACCESS_WIDTH, line=json_line)
    prefix = f"{ACCESS_LOGGER_NAME} {app}#{name} {replica}".replace("%", "%%")
    return AccessLog(loop, REPLICA_ACCESS_WIDTH, fmt=f"INFO %s {prefix} %s -- %s %s %s %.1fms\n")


def configure_replica(logging_config: Optional[Any], replica_id: Any) -> bool:
    """Set the serve loggers' level, the context filter and the formatter (`encoding`) on the root
    handlers of a replica; returns whether its access log is on."""
    apply_log_level(logging_config)
    dep = replica_id.deployment_id
    encoding = getattr(logging_config, "encoding", None) or "TEXT"
    extra = getattr(logging_config, "additional_log_standard_attrs", None) or ()
    formatter = JSONFormatter(extra) if encoding == "JSON" else logging.Formatter(_REPLICA_TEXT_FORMAT)
    ctx_filter = ServeContextFilter(dep.app_name, dep.name, replica_id.unique_id)
    for handler in logging.getLogger().handlers:
        for f in [f for f in handler.filters if isinstance(f, ServeContextFilter)]:
            handler.removeFilter(f)
        handler.addFilter(ctx_filter)
        handler.setFormatter(formatter)
    if not system_access_log_enabled():
        return False
    return bool(getattr(logging_config, "enable_access_log", True)) if logging_config is not None else True
