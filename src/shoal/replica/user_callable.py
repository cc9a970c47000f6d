"""Wraps the user's class or function: construction, method dispatch, reconfigure, health, teardown.

Shared by replica processes and local testing mode, so both run user code the same way, as Ray
Serve 2.60 does: the constructor (sync or async), `__del__` and async methods on the replica's event
loop; sync methods, `reconfigure` and `check_health` in a thread pool (so a slow sync method never
blocks other requests); generators, and methods that return one, streamed item by item.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import inspect
from types import AsyncGeneratorType, GeneratorType
from typing import Any, AsyncIterator, Callable, Optional

from shoal.exceptions import RayServeException

UNARY, STREAM = "unary", "stream"
_SYNC, _ASYNC, _SYNC_GEN, _ASYNC_GEN = range(4)
_GENERATOR_TYPES = (GeneratorType, AsyncGeneratorType)  # what Ray streams: `inspect.isgenerator`/`isasyncgen`


def _kind_of(fn: Callable) -> int:
    target = fn.__func__ if inspect.ismethod(fn) else fn
    if inspect.isasyncgenfunction(target):
        return _ASYNC_GEN
    if getattr(getattr(target, "_shoal_batcher", None), "is_gen", False):
        return _ASYNC_GEN  # a `@serve.batch` generator: a plain function returning an async generator
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
        # A sync constructor runs right here, on the replica's event-loop thread, as in Ray Serve: it may
        # use `asyncio.get_running_loop()` (start background tasks, make asyncio objects), and, like any
        # code on a loop, it awaits other deployments only later (`.result()` refuses to block a loop).
        ret = obj.__init__(*self.init_args, **self.init_kwargs)
        if inspect.isawaitable(ret):
            await ret
        self.obj = obj

    def available_methods(self) -> list[str]:
        """The names a handle may call, as Ray lists them: callable attributes not starting with `__`."""
        obj = self.obj
        return [n for n in dir(obj) if not n.startswith("__") and callable(getattr(obj, n, None))]

    def resolve(self, method: str) -> tuple[Callable, int]:
        cached = self._methods.get(method)
        if cached is not None:
            return cached
        if self.is_function:
            fn = self.obj  # as in Ray: a function deployment answers whatever method is named
        else:
            fn = getattr(self.obj, method, None)
            if fn is None or not callable(fn):
                raise RayServeException(
                    f"Tried to call a method '{method}' that does not exist. "
                    f"Available methods: {self.available_methods()}."
                )
        entry = (fn, _kind_of(fn))
        self._methods[method] = entry
        return entry

    async def run(self, fn: Callable, kind: int, args: tuple, kwargs: dict) -> Any:
        """Call a resolved non-generator function: async on the loop, sync in the pool; no checks."""
        if kind == _ASYNC:
            return await fn(*args, **kwargs)
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self.executor, functools.partial(ctx.run, fn, *args, **kwargs))
        if inspect.isawaitable(result):
            result = await result
        return result

    async def call(self, method: str, args: tuple, kwargs: dict) -> Any:
        """Run a unary method and return its result (`TypeError` for a generator, as in Ray)."""
        fn, kind = self.resolve(method)
        if kind == _ASYNC:
            result = await fn(*args, **kwargs)
        elif kind == _SYNC:
            result = await self.run(fn, kind, args, kwargs)
        else:
            raise _returned_generator(fn, method)
        if type(result) in _GENERATOR_TYPES:
            if isinstance(result, GeneratorType):
                result.close()
            raise _returned_generator(fn, method)
        return result

    async def call_stream(self, method: str, args: tuple, kwargs: dict) -> AsyncIterator[Any]:
        """Run a generator method, or a method that returns a generator, yielding each item as it is
        produced. Sync generators advance in the thread pool, one item per step."""
        fn, kind = self.resolve(method)
        ctx = contextvars.copy_context()
        if kind == _ASYNC_GEN:
            gen: Any = fn(*args, **kwargs)
        elif kind == _SYNC_GEN:
            gen = ctx.run(fn, *args, **kwargs)
        else:
            if kind == _ASYNC:
                gen = await fn(*args, **kwargs)
            else:
                gen = await asyncio.get_running_loop().run_in_executor(
                    self.executor, functools.partial(ctx.run, fn, *args, **kwargs))
                if inspect.isawaitable(gen):
                    gen = await gen
            if type(gen) not in _GENERATOR_TYPES:
                raise TypeError(
                    f"Called method '{_name_of(fn, method)}' with `handle.options(stream=True)` but it did "
                    "not return a generator."
                )
        async for item in self.iterate(gen, ctx):
            yield item

    async def iterate(self, gen: Any, ctx: Optional[contextvars.Context] = None) -> AsyncIterator[Any]:
        """The items of a generator: an async one on the loop, a sync one advanced in the thread pool."""
        if isinstance(gen, AsyncGeneratorType):
            try:
                async for item in gen:
                    yield item
            finally:
                await gen.aclose()
            return
        loop = asyncio.get_running_loop()
        run = (ctx or contextvars.copy_context()).run
        done = object()
        try:
            while True:
                item = await loop.run_in_executor(self.executor, run, next, gen, done)
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

    async def reconfigure(self, user_config: Any, rank: Any = None) -> None:
        """Call the user's `reconfigure(user_config)` as Ray Serve does: when a user_config is set,
        or when `reconfigure` takes a `rank` argument (it then gets `rank=` the replica's `ReplicaRank`,
        also with no user_config)."""
        fn = getattr(self.obj, "reconfigure", None) if not self.is_function else None
        wants_rank = False
        if fn is not None:
            try:
                wants_rank = "rank" in inspect.signature(fn).parameters
            except (TypeError, ValueError):
                wants_rank = False
        if user_config is None and not wants_rank:
            return
        if fn is None:
            raise RayServeException(
                f"user_config was given for deployment '{self.deployment_name}', but its class has no "
                "`reconfigure(self, user_config)` method to receive it."
            )
        call = functools.partial(fn, user_config, rank=rank) if wants_rank else functools.partial(fn, user_config)
        if inspect.iscoroutinefunction(fn):
            await call()
            return
        ctx = contextvars.copy_context()
        ret = await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(ctx.run, call))
        if inspect.isawaitable(ret):
            await ret

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


def _name_of(fn: Callable, method: str) -> str:
    """The name Ray's errors use: the function's own (`__call__` for a class's, the function's for a
    function deployment), else the method called."""
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else method


def _returned_generator(fn: Callable, method: str) -> TypeError:
    return TypeError(
        f"Method '{_name_of(fn, method)}' returned a generator. You must use `handle.options(stream=True)` "
        "to call generators on a deployment."
    )
