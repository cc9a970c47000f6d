"""SIGINT/SIGTERM handling for the foreground commands (`shoal run`, `shoal llm serve`).

They spawn a controller and must not be interrupted half-way through that (it could be orphaned),
yet Ctrl-C must stop them at any other time; a second Ctrl-C must not cut the clean-up short.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any, Optional


class StopRequested(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM while it may be interrupted."""


class Signals:
    """A request to stop is remembered while the main thread must not be interrupted, and raised as
    `StopRequested` otherwise."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.interruptible = False
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is not None and not self.interruptible:
            return  # already stopping: a second Ctrl-C does not cut the clean-up short
        self.received = signum
        if self.interruptible:
            self.interruptible = False
            raise StopRequested(signum)

    def allow_interrupt(self) -> None:
        self.interruptible = True
        if self.received is not None:
            self.interruptible = False
            raise StopRequested(self.received)

    def defer_interrupt(self) -> None:
        self.interruptible = False
