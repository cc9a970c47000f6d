"""Size-based rotation of a process's log file (replicas, proxies, a detached controller).

These processes write their stdout and stderr (print, tracebacks, the logging handlers, the access
lines) straight to one file, `SHOAL_LOG_FILE` in their environment. When it reaches the size limit,
the process renames it `<file>.1` (older backups shift to `.2`, ... up to the count; the oldest is
deleted), opens a fresh `<file>` and points fds 1 and 2 at it: everything that writes to stdout or
stderr follows without knowing. The controller's `LogTailer` notices the new file and follows it.

The size is checked every `CHECK_PERIOD_S` on the process's loop and after each batch of access
lines (one `fstat`, not one per line), so a file can overshoot the limit by what one period writes.

Knobs, in the environment of the process that starts shoal (Ray's names work too, as in Ray the
defaults are 512 MiB and 5 backups): `SHOAL_LOG_ROTATION_MAX_BYTES` (`RAY_ROTATION_MAX_BYTES`) and
`SHOAL_LOG_ROTATION_BACKUP_COUNT` (`RAY_ROTATION_BACKUP_COUNT`). Either at 0 turns rotation off (as
Python's `RotatingFileHandler` reads them).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Mapping, Optional

LOG_FILE_ENV = "SHOAL_LOG_FILE"
MAX_BYTES_ENVS = ("SHOAL_LOG_ROTATION_MAX_BYTES", "RAY_ROTATION_MAX_BYTES")
BACKUP_COUNT_ENVS = ("SHOAL_LOG_ROTATION_BACKUP_COUNT", "RAY_ROTATION_BACKUP_COUNT")
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
DEFAULT_BACKUP_COUNT = 5
CHECK_PERIOD_S = 1.0

logger = logging.getLogger("shoal.logs")


def _int_env(names: tuple, default: int, environ: Mapping[str, str]) -> int:
    for name in names:
        raw = environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"{name}={raw!r}: expected a whole number >= 0 (0 turns log rotation off)")
        return value
    return default


def rotation_settings(environ: Optional[Mapping[str, str]] = None) -> tuple[int, int]:
    """(max bytes, backup count) from the environment; a clear ValueError for a bad value."""
    env = os.environ if environ is None else environ
    return (_int_env(MAX_BYTES_ENVS, DEFAULT_MAX_BYTES, env),
            _int_env(BACKUP_COUNT_ENVS, DEFAULT_BACKUP_COUNT, env))


class RotatingOutput:
    """Rotates the file that this process's fds 1 and 2 write to."""

    def __init__(self, path: str, max_bytes: int, backup_count: int):
        self.path = path
        self.max_bytes = max_bytes
        self.backup_count = backup_count
        self.loop: Any = None

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.backup_count > 0

    def attach(self) -> None:
        """Point fds 1 and 2 at the file's current path: a process started on a file that has since
        been rotated away (a controller its supervisor restarted) writes to the live one."""
        self._redirect()

    def start(self, loop: Any) -> None:
        """Check the size every `CHECK_PERIOD_S` on `loop`."""
        self.loop = loop
        if self.enabled:
            loop.call_later(CHECK_PERIOD_S, self._tick)

    def _tick(self) -> None:
        self.check()
        self.loop.call_later(CHECK_PERIOD_S, self._tick)

    def check(self) -> None:
        """Rotate if the file has reached the limit."""
        if not self.enabled:
            return
        try:
            if os.fstat(2).st_size >= self.max_bytes:
                self.rotate()
        except OSError:
            logger.exception("could not rotate %s", self.path)

    def rotate(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        for i in range(self.backup_count - 1, 0, -1):
            older = f"{self.path}.{i}"
            if os.path.exists(older):
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, self.path + ".1")
        self._redirect()

    def _redirect(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)


def setup_rotation(loop: Any) -> Optional[RotatingOutput]:
    """In a process started on a log file (`SHOAL_LOG_FILE`): rotate it by size on `loop`."""
    path = os.environ.get(LOG_FILE_ENV)
    if not path:
        return None
    max_bytes, backup_count = rotation_settings()
    out = RotatingOutput(path, max_bytes, backup_count)
    out.attach()
    out.start(loop)
    if out.enabled:
        from shoal.access_log import set_after_write

        set_after_write(out.check)
    return out
