"""Wraps the user's class or function: construction, method dispatch, reconfigure, health, teardown.

Shared by replica processes and local testing mode, so both run user code the same way:
async methods on the replica's event loop, sync methods in a thread pool (so a slow sync method
never blocks other requests), generators streamed item by item.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
from typing import Any, AsyncIterator, Callable, Optional

from shoal.exceptions import RayServeException

UNARY, STREAM = "unary", "stream"
_SYNC, _ASYNC, _SYNC_GEN, _ASYNC_GEN = range(4)


def _kind_of(fn: Callable) -> int:
    target = fn.__func__ if inspect.ismethod(fn) else fn
    if inspect.isasyncgenfunction(target):
        return _ASYNC_GEN
    if inspect.isgeneratorfunction(target):
        return _SYNC_GEN
    if inspect.iscoroutinefunction(target):
        return _ASYNC
    call = getattr(target, "__call__", None)
    if call is not None and not inspect.isfunction(target) and not inspect.ismethod(target):
        return _kind_of(call)
    return _SYNC


class UserCallable:
    def __init__(self, func_or_class: Any, init_args: tuple, init_kwargs: dict, deployment_name: str,
                 max_ongoing_requests: int = 5):
        self.func_or_class = func_or_class
        self.init_args = init_args
        self.init_kwargs = init_kwargs
        self.deployment_name = deployment_name
        self.is_function = inspect.isfunction(func_or_class) or inspect.isbuiltin(func_or_class)
        self.obj: Any = None
        self._methods: dict[str, tuple[Callable, int]] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(4, min(max_ongoing_requests, 64)), thread_name_prefix=f"shoal-{deployment_name}"
        )

    async def initialize(self) -> None:
        """Run the constructor (`async def __init__` allowed)."""
        if self.is_function:
            self.obj = self.func_or_class
            return
        cls = self.func_or_class
        obj = cls.__new__(cls)
        init = obj.__init__
        if inspect.iscoroutinefunction(init):
            await init(*self.init_args, **self.init_kwargs)
        else:
            # A sync constructor runs in a worker thread, like sync methods: it may load a model for
            # minutes or call other deployments with `.result()` without blocking the replica's loop.
            ctx = contextvars.copy_context()
            loop = asyncio.get_running_loop()
            ret = await loop.run_in_executor(
                self.executor, functools.partial(ctx.run, init, *self.init_args, **self.init_kwargs))
            if inspect.isawaitable(ret):
                await ret
        self.obj = obj

    def available_methods(self) -> list[str]:
        if self.is_function:
            return ["__call__"]
        names = [n for n in dir(self.obj) if not n.startswith("_") and callable(getattr(self.obj, n, None))]
        if callable(getattr(type(self.obj), "__call__", None)):
            names.append("__call__")
        return sorted(set(names))

    def resolve(self, method: str) -> tuple[Callable, int]:
        cached = self._methods.get(method)
        if cached is not None:
            return cached
        if self.is_function:
            if method != "__call__":
                raise RayServeException(
                    f"Tried to call a method '{method}' that does not exist on function deployment "
                    f"'{self.deployment_name}'. Available methods: ['__call__']."
                )
            fn = self.obj
        else:
            fn = getattr(self.obj, method, None)
            if fn is None or not callable(fn) or (method == "__call__" and not hasattr(type(self.obj), "__call__")):
                raise RayServeException(
                    f"Tried to call a method '{method}' that does not exist on deployment "
                    f"'{self.deployment_name}'. Available methods: {self.available_methods()}."
                )
        entry = (fn, _kind_of(fn))
        self._methods[method] = entry
        return entry

    def check_call_kind(self, method: str, kind: int, stream: bool) -> None:
        is_gen = kind in (_SYNC_GEN, _ASYNC_GEN)
        if is_gen and not stream:
            raise TypeError(
                f"Method '{method}' is a generator function. You must use `handle.options(stream=True)` "
                "to call generators on a deployment."
            )
        if stream and not is_gen:
            raise TypeError(
                f"Method '{method}' must be a generator function to be called with "
                f"`handle.options(stream=True)`, but '{method}' is not."
            )

    async def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        """Run a unary method and return its result."""
        fn, kind = self.resolve(method)
        self.check_call_kind(method, kind, False)
        if kind == _ASYNC:
            return await fn(*args, **kwargs)
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.executor, functools.partial(ctx.run, fn, *args, **kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    async def call_stream(self, method: str, args: tuple, kwargs: dict) -> AsyncIterator[Any]:
        """Run a generator method, yielding each item as it is produced."""
        fn, kind = self.resolve(method)
        self.check_call_kind(method, kind, True)
        if kind == _ASYNC_GEN:
            async for item in fn(*args, **kwargs):
                yield item
            return
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        gen = ctx.run(fn, *args, **kwargs)
        done = object()

        def step() -> Any:
            return ctx.run(next, gen, done)

        try:
            while True:
                item = await loop.run_in_executor(self.executor, step)
                if item is done:
                    return
                yield item
        finally:
            gen.close()

    async def _maybe_call(self, name: str, *args: Any) -> bool:
        fn = getattr(self.obj, name, None) if not self.is_function else None
        if fn is None:
            return False
        if inspect.iscoroutinefunction(fn):
            await fn(*args)
        else:
            ret = await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args))
            if inspect.isawaitable(ret):
                await ret
        return True

    async def reconfigure(self, user_config: Any) -> None:
        if user_config is None:
            return
        if not await self._maybe_call("reconfigure", user_config):
            raise RayServeException(
                f"user_config was given for deployment '{self.deployment_name}', but its class has no "
                "`reconfigure(self, user_config)` method to receive it."
            )

    async def check_health(self) -> None:
        await self._maybe_call("check_health")

    def has_method(self, name: str) -> bool:
        return not self.is_function and callable(getattr(self.obj, name, None))

    async def call_hook(self, name: str) -> Any:
        """Call the user's `name()` (sync ones in the thread pool) and return what it returns."""
        fn = getattr(self.obj, name)
        if inspect.iscoroutinefunction(fn):
            return await fn()
        ret = await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        return await ret if inspect.isawaitable(ret) else ret

    async def teardown(self) -> None:
        """Run the user's `__del__` (sync or async) once, as Ray Serve does on shutdown."""
        if self.obj is None or self.is_function:
            return
        fn = getattr(type(self.obj), "__del__", None)
        if fn is None:
            return
        ret = fn(self.obj)
        if inspect.isawaitable(ret):
            await ret
        # The process exits right after, so the interpreter never calls `__del__` a second time.
