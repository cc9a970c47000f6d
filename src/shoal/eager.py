"""Start a request's coroutine, eagerly where Python supports it.

On Python 3.12+ the coroutine's first step runs at once inside a real Task (`eager_start`), so a fast
async method finishes without a trip around the event loop. Older Pythons get a normal Task: running
the first step outside a Task would break `asyncio.current_task()` and `asyncio.timeout()` in user code.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
from typing import Coroutine, Optional

_EAGER = sys.version_info >= (3, 12)


def start_eagerly(coro: Coroutine, loop: asyncio.AbstractEventLoop,
                  context: contextvars.Context) -> Optional[asyncio.Task]:
    """Start `coro` as a Task; None if it already finished (only possible with eager start)."""
    if _EAGER:
        task = asyncio.Task(coro, loop=loop, context=context, eager_start=True)  # type: ignore[call-arg]
        return None if task.done() else task
    return loop.create_task(coro, context=context)
