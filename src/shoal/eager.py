"""Run a coroutine's first step at once, making a Task only if it has to wait.

Most requests to a fast async method finish without ever waiting; starting them eagerly saves a
Task and a trip around the event loop per request (Python 3.12's eager tasks, for 3.10+).
"""

from __future__ import annotations

import asyncio
import contextvars
import types
from typing import Any, Coroutine, Optional


@types.coroutine
def _resume(coro: Coroutine, yielded: Any):
    """Drive a coroutine that already ran its first step, as a Task would have."""
    send, throw = coro.send, coro.throw
    while True:
        try:
            value = yield yielded
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as e:  # noqa: BLE001 - cancellation and errors go into the coroutine
            try:
                yielded = throw(e)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                yielded = send(value)
            except StopIteration as stop:
                return stop.value


def start_eagerly(coro: Coroutine, loop: asyncio.AbstractEventLoop,
                  context: contextvars.Context) -> Optional[asyncio.Task]:
    """Run `coro` until it first waits; return the Task that continues it, or None if it finished."""
    try:
        yielded = context.run(coro.send, None)
    except StopIteration:
        return None
    return loop.create_task(_resume(coro, yielded), context=context)
