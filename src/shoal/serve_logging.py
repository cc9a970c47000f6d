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
attributes named in `additional_log_standard_attrs`. `enable_access_log` (default on) writes one
`shoal.access` line per request (access_log.py): `METHOD ROUTE STATUS LATENCYms` (handle calls:
`CALL method OK|ERROR`). The proxies write one per HTTP request, in the encoding of
`serve.start(logging_config=...)`, unless it says `enable_access_log: False`. `SHOAL_ACCESS_LOG=0` in
the environment of the process that starts shoal turns every access line off. See
docs/observability.md, "Logs".
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

from shoal.access_log import AccessLog, replica_render
from shoal.context import _request_context

SERVE_LOGGER_NAMES = ("ray.serve", "shoal")
# What `serve.start(logging_config=...)` asks of the controller and the proxies, in their environment.
SYSTEM_LOG_LEVEL_ENV = "SHOAL_LOG_LEVEL"
SYSTEM_LOG_ENCODING_ENV = "SHOAL_LOG_ENCODING"
SYSTEM_ACCESS_LOG_ENV = "SHOAL_SYSTEM_ACCESS_LOG"  # "0": the proxies write no access lines
# The user's switch: "0" turns every access line off (proxies and replicas), whatever `logging_config` says.
ACCESS_LOG_ENV = "SHOAL_ACCESS_LOG"
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


def configure_system_logging(component: str) -> None:
    """In the controller and the proxies: the level and encoding `serve.start(logging_config=...)`
    asked for. JSON lines name the `component` (e.g. `proxy_0`) where a replica's name its replica."""
    level = os.environ.get(SYSTEM_LOG_LEVEL_ENV)
    if level:
        for name in SERVE_LOGGER_NAMES:
            logging.getLogger(name).setLevel(int(level) if level.isdigit() else level)
    if system_log_encoding() == "JSON":
        formatter = JSONFormatter(fields={"component": component, "worker_id": str(os.getpid())})
        for handler in logging.getLogger().handlers:
            handler.setFormatter(formatter)


def system_log_encoding() -> str:
    return "JSON" if os.environ.get(SYSTEM_LOG_ENCODING_ENV) == "JSON" else "TEXT"


def access_log_allowed() -> bool:
    """False when `SHOAL_ACCESS_LOG=0` turned every access line off."""
    return os.environ.get(ACCESS_LOG_ENV, "1") != "0"


def system_access_log_enabled() -> bool:
    """In the proxies: whether `serve.start(logging_config=...)` (and SHOAL_ACCESS_LOG) left the access log on."""
    return access_log_allowed() and os.environ.get(SYSTEM_ACCESS_LOG_ENV, "1") != "0"


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

    def __init__(self, additional_attrs: Any = (), fields: Optional[dict] = None):
        super().__init__()
        self.additional_attrs = tuple(additional_attrs or ())
        self.fields = fields  # fixed fields (a proxy's): then the record's context fields are not read

    def format(self, record: logging.LogRecord) -> str:
        out = {"levelname": record.levelname, "asctime": self.formatTime(record), "name": record.name,
               "message": record.getMessage()}
        if self.fields is not None:
            out.update(self.fields)
        else:
            for k in _JSON_FIELDS:
                out[k] = getattr(record, k, "")
        for k in self.additional_attrs:
            out[k] = getattr(record, k, None)
        if record.exc_info:
            out["exc_text"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def replica_access_log(logging_config: Optional[Any], replica_id: Any) -> AccessLog:
    """The access log of a replica, its lines in the replica's encoding (access_log.py)."""
    dep = replica_id.deployment_id
    render = replica_render(getattr(logging_config, "encoding", None) or "TEXT", dep.app_name, dep.name,
                            replica_id.unique_id, str(os.getpid()),
                            getattr(logging_config, "additional_log_standard_attrs", None) or ())
    return AccessLog(render)


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
    if not access_log_allowed():
        return False
    return bool(getattr(logging_config, "enable_access_log", True)) if logging_config is not None else True
