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

`encoding` and `enable_access_log` reach the replica with the rest of its config; shoal writes plain
text lines and keeps no access log yet.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

SERVE_LOGGER_NAMES = ("ray.serve", "shoal")
SYSTEM_LOG_LEVEL_ENV = "SHOAL_LOG_LEVEL"
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
