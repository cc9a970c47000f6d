"""`@serve.batch`: callers pass one item each; the decorated function receives them as lists.

How a batch forms (per wrapped function, per instance for methods, per event loop):

- Each call appends one request (its arguments, its request context, one future, or one stream for
  async-generator functions) to a deque and awaits its own future. No task is made per call. For an
  async-generator function the request is queued when the function is *called* (the wrapper is a plain
  function returning the caller's async generator), as in Ray Serve: callers that create several
  generators and then consume them one after another still share one batch.
- A runner task, started when a request arrives and none is running, takes requests from the front
  of the deque until the batch holds `max_batch_size` of them (or, with `batch_size_fn`, until the
  next one would push the summed size over `max_batch_size`: that one waits at the front for the
  next batch), or until `batch_wait_timeout_s` has passed since the first request of the batch
  arrived. Requests whose caller was cancelled meanwhile are dropped. The runner ends when the
  deque is empty, so an idle batched function holds no task.
- A batch runs under `max_concurrent_batches`: with 1 (the default) the runner runs each batch
  itself, then forms the next from whatever queued up meanwhile; with more, each batch runs in its
  own task and the runner forms the next batch while a slot is free.
- A batch whose requests asked for different multiplexed model ids runs as one call per model id
  (started in order of first appearance, running concurrently, together counting as one batch for
  `max_concurrent_batches`), each with `serve.get_multiplexed_model_id()` returning that id.
- Inside the batched function the request context is empty (as in Ray Serve: the function serves many
  requests); `get_batch_request_contexts()` gives each request's context.

Arguments become per-argument lists: calls `f(x, y=z)` batch into `f([x1, x2], y=[z1, z2])`.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import math
import time
import types
import weakref
from typing import Any, Callable, Optional

from shoal import context as _context
from shoal.context import RequestContext, _batch_request_context, _request_context
from shoal.exceptions import RayServeException

__all__ = ["batch", "get_batch_request_contexts"]

logger = logging.getLogger("shoal.batching")
_monotonic = time.monotonic  # queue times and deadlines (the loop's own clock may differ)


def get_batch_request_contexts() -> list[RequestContext]:
    """The request contexts of the callers in the batch being run (one per list element), else `[]`.

    Call it from inside a `@serve.batch` function: element `i` belongs to the caller whose item is
    element `i` of the argument lists.
    """
    return list(_batch_request_context.get() or ())


# Ray Serve's (private) name for the same thing, so ported code keeps working.
_get_serve_batch_request_context = get_batch_request_contexts


# --- option validation ------------------------------------------------------------------------------

def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r} ({type(value).__name__}).")
    if isinstance(value, float):
        if not value.is_integer():
            raise TypeError(f"{name} must be an integer >= 1, got {value!r} (a float that is not a whole number).")
        value = int(value)
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


def _timeout(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number >= 0 (seconds), got {value!r} ({type(value).__name__}).")
    if math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0 (seconds), got {value!r}.")
    return float(value)


def _size_fn(value: Any) -> Optional[Callable]:
    if value is not None and not callable(value):
        raise TypeError(f"batch_size_fn must be a callable or None, got {value!r} ({type(value).__name__}).")
    return value


class _Settings:
    """The options of one decorated function; the runtime setters change them for all its queues."""

    __slots__ = ("max_batch_size", "batch_wait_timeout_s", "max_concurrent_batches", "batch_size_fn", "checked")

    def __init__(self, max_batch_size: int, batch_wait_timeout_s: float, max_concurrent_batches: int,
                 batch_size_fn: Optional[Callable]):
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_concurrent_batches = max_concurrent_batches
        self.batch_size_fn = batch_size_fn
        self.checked = False  # the max_ongoing_requests check ran


# --- per-caller sinks -------------------------------------------------------------------------------

class _Stream:
    """One caller's share of an async-generator batch: items in order, then end or an error."""

    __slots__ = ("loop", "items", "waiter", "ended", "error", "closed", "owner")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: collections.deque = collections.deque()
        self.waiter: Optional[asyncio.Future] = None
        self.ended = False    # the producer has no more items for this caller
        self.error: Optional[BaseException] = None
        self.closed = False   # the caller stopped listening (cancelled, closed or dropped its generator)
        self.owner: Any = None  # a weak reference to the caller's generator

    def dropped(self, _ref: Any = None) -> None:
        self.closed = True

    def done(self) -> bool:
        return self.closed or self.ended

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def push(self, item: Any) -> None:
        self.items.append(item)
        self._wake()

    def end(self, error: Optional[BaseException] = None) -> None:
        if not self.ended:
            self.ended = True
            self.error = error
            self._wake()


async def _receive(stream: Optional[_Stream], enqueue: Optional[Callable[[], _Stream]]) -> Any:
    """The async generator a caller of a batched generator function gets: its items, in order."""
    if stream is None:
        stream = enqueue()  # type: ignore[misc]
    items = stream.items
    try:
        while True:
            if items:
                yield items.popleft()
            elif stream.ended:
                if stream.error is not None:
                    raise stream.error
                return
            else:
                waiter = stream.waiter = stream.loop.create_future()
                await waiter
    finally:
        stream.closed = True


def _fail(sink: Any, error: BaseException) -> None:
    if isinstance(sink, _Stream):
        sink.end(error)
    elif not sink.done():
        sink.set_exception(error)


def _is_stop(value: Any) -> bool:
    return (value is StopIteration or value is StopAsyncIteration
            or isinstance(value, (StopIteration, StopAsyncIteration)))


def _being_cancelled() -> bool:
    """Whether the running task was asked to stop (as opposed to user code raising CancelledError)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return task is None or cancelling is None or cancelling() > 0


def _wake_future(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


# --- the queue of one (function or instance, event loop) --------------------------------------------
#
# A queued request is a tuple (args, kwargs, request context, sink, monotonic time it was queued); the sink
# is the caller's asyncio.Future, or its _Stream for async-generator functions.

class _BatchQueue:
    def __init__(self, call: Callable, settings: _Settings, loop: asyncio.AbstractEventLoop,
                 is_gen: bool, name: str, signature: Optional[inspect.Signature]):
        self.call = call          # the user's function, bound to its instance for methods
        self.settings = settings
        self.loop = loop
        self.is_gen = is_gen
        self.name = name
        self.signature = signature  # without `self`; used only when callers pass different shapes
        self.items: collections.deque[tuple] = collections.deque()
        self.waiter: Optional[asyncio.Future] = None  # the runner waits on it for more requests
        self.need = 1               # wake the runner once this many requests are queued
        self.runner: Optional[asyncio.Task] = None
        self.active = 0             # batches running
        self.tasks: set[asyncio.Task] = set()
        self.head_size: Optional[tuple] = None  # (request, size) of a request deferred by batch_size_fn
        self.metrics: Any = None  # Ray's batching metrics, made with the first batch (telemetry/serve_metrics.py)

    def put(self, req: tuple) -> None:
        items = self.items
        items.append(req)
        w = self.waiter
        if w is not None:
            if len(items) >= self.need:
                self.waiter = None
                if not w.done():
                    w.set_result(None)
        elif self.runner is None and self.active < self.settings.max_concurrent_batches:
            self.runner = self.loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            while self.items:
                settings = self.settings
                if self.active >= settings.max_concurrent_batches:
                    return  # the batch that finishes next starts a runner again
                batch = await self._form_batch()
                if not batch:
                    continue
                self._record_formed(batch, settings.max_batch_size)
                self.active += 1
                if settings.max_concurrent_batches == 1:
                    await self._execute(batch, False)
                else:
                    task = self.loop.create_task(self._execute(batch, True))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
        finally:
            self.runner = None

    async def _form_batch(self) -> list[tuple]:
        settings = self.settings
        loop = self.loop
        items = self.items
        batch: list[tuple] = []
        total = 0
        deadline = 0.0
        while True:
            max_size = settings.max_batch_size
            size_fn = settings.batch_size_fn
            if size_fn is None:
                while items and len(batch) < max_size:
                    req = items.popleft()
                    if not req[3].done():  # else its caller went away before the batch started
                        if not batch:
                            deadline = req[4] + settings.batch_wait_timeout_s
                        batch.append(req)
                if len(batch) >= max_size:
                    return batch
            else:
                while items:
                    req = items[0]
                    if req[3].done():
                        items.popleft()
                        continue
                    head = self.head_size
                    if head is not None and head[0] is req:
                        size = head[1]
                    else:
                        try:
                            size = self._size_of(size_fn, req)
                        except Exception as e:  # noqa: BLE001 - the error belongs to that caller
                            items.popleft()
                            _fail(req[3], e)
                            continue
                    if size > max_size:
                        items.popleft()
                        _fail(req[3], RuntimeError(
                            f"A request to '{self.name}' has size {size} (from batch_size_fn), larger than "
                            f"max_batch_size={max_size}: it can never fit in a batch."))
                        continue
                    if total + size > max_size:
                        self.head_size = (req, size)
                        return batch  # it stays at the front and starts the next batch
                    items.popleft()
                    if not batch:
                        deadline = req[4] + settings.batch_wait_timeout_s
                    batch.append(req)
                    total += size
                    if total >= max_size:
                        return batch
            if not batch:
                return batch
            remaining = deadline - _monotonic()
            if remaining <= 0:
                return batch
            # Wait for more requests, or the deadline.
            waiter = loop.create_future()
            self.need = max(1, max_size - len(batch)) if size_fn is None else 1
            self.waiter = waiter
            timer = loop.call_later(remaining, _wake_future, waiter) if remaining != math.inf else None
            try:
                await waiter
            finally:
                self.waiter = None
                if timer is not None:
                    timer.cancel()

    def _record_formed(self, batch: list[tuple], max_size: int) -> None:
        try:
            if self.metrics is None:
                from shoal.telemetry.serve_metrics import BatchMetrics

                self.metrics = BatchMetrics(self.name.rsplit(".", 1)[-1])
            self.metrics.formed(len(batch), max_size, _monotonic() - batch[0][4], len(self.items))
        except Exception:  # noqa: BLE001 - metrics never fail a batch
            logger.debug("batch metrics failed", exc_info=True)

    @staticmethod
    def _size_of(size_fn: Callable, req: tuple) -> Any:
        args, kwargs = req[0], req[1]
        if args:
            item = args[0]
        elif kwargs:
            item = next(iter(kwargs.values()))
        else:
            item = None
        size = size_fn([item])
        if isinstance(size, bool) or not isinstance(size, (int, float)) or not size >= 0:
            raise TypeError(f"batch_size_fn must return a number >= 0, got {size!r}.")
        return size

    async def _execute(self, batch: list[tuple], recheck: bool) -> None:
        started = _monotonic()
        try:
            model_id = batch[0][2].multiplexed_model_id
            for req in batch:
                if req[2].multiplexed_model_id != model_id:
                    break
            else:
                await self._run_group(batch, recheck)
                return
            groups: dict[str, list[tuple]] = {}
            for req in batch:
                groups.setdefault(req[2].multiplexed_model_id, []).append(req)
            # One call per model id, all at once: each in its own task, so each has its own context
            # (its model id), and a slow model does not hold up the others. Cancelling this batch
            # cancels them all.
            loop = self.loop
            await asyncio.gather(*[loop.create_task(self._run_group(group, recheck))
                                   for group in groups.values()])
        finally:
            if self.metrics is not None:
                self.metrics.executed(_monotonic() - started)
            self.active -= 1
            if self.items and self.runner is None and self.active < self.settings.max_concurrent_batches:
                self.runner = self.loop.create_task(self._run())

    def _arguments(self, group: list[tuple]) -> tuple[list, tuple, dict]:
        """Per-argument lists for `group`: returns (group, args, kwargs), without calls that failed."""
        arg_tuples = [req[0] for req in group]
        kw_dicts = [req[1] for req in group]
        if len(set(map(len, arg_tuples))) == 1:
            if not any(kw_dicts):
                return group, tuple(map(list, zip(*arg_tuples))), {}
            if len(set(map(frozenset, kw_dicts))) == 1:
                return (group, tuple(map(list, zip(*arg_tuples))),
                        {k: [kw[k] for kw in kw_dicts] for k in kw_dicts[0]})
        return self._normalized_arguments(group)

    def _normalized_arguments(self, group: list[tuple]) -> tuple[list, tuple, dict]:
        """Callers passed the same arguments in different ways (positional or keyword, defaults left
        out): bind each call to the signature, so each parameter becomes one list."""
        sig = self.signature
        ok: list[tuple] = []
        bound_calls = []
        for req in group:
            try:
                if sig is None:
                    raise TypeError("the batched function's signature is unknown")
                bound = sig.bind(*req[0], **req[1])
                bound.apply_defaults()
            except TypeError as e:
                _fail(req[3], TypeError(f"Bad arguments for batched function '{self.name}': {e}"))
                continue
            ok.append(req)
            bound_calls.append(bound)
        if not ok:
            return ok, (), {}
        shapes = {(len(b.args), frozenset(b.kwargs)) for b in bound_calls}
        if len(shapes) != 1:
            err = TypeError(
                f"Calls batched together for '{self.name}' passed different numbers of arguments "
                "(to *args or **kwargs), so they cannot be turned into one list per argument.")
            for req in ok:
                _fail(req[3], err)
            return [], (), {}
        args = tuple(map(list, zip(*[b.args for b in bound_calls])))
        kwargs = {k: [b.kwargs[k] for b in bound_calls] for k in bound_calls[0].kwargs}
        return ok, args, kwargs

    async def _run_group(self, group: list[tuple], recheck: bool) -> None:
        if recheck:
            group = [req for req in group if not req[3].done()]
            if not group:
                return
        group, args, kwargs = self._arguments(group)
        if not group:
            return
        # The function serves many requests: its own request context is empty (as in Ray Serve), the
        # requests' contexts are in the batch context (and get_multiplexed_model_id() reads it).
        token = _request_context.set(RequestContext())
        ctx_token = _batch_request_context.set([req[2] for req in group])
        try:
            if self.is_gen:
                await self._run_generator(group, args, kwargs)
            else:
                await self._run_function(group, args, kwargs)
        finally:
            _batch_request_context.reset(ctx_token)
            _request_context.reset(token)

    async def _run_function(self, group: list[tuple], args: tuple, kwargs: dict) -> None:
        futures = [req[3] for req in group]
        try:
            results = await self.call(*args, **kwargs)
        except asyncio.CancelledError:
            for fut in futures:
                fut.cancel()
            if _being_cancelled():
                raise
            return  # the function itself raised CancelledError: its callers got it, the queue goes on
        except Exception as e:  # noqa: BLE001 - every caller of the batch gets the error
            for fut in futures:
                if not fut.done():
                    fut.set_exception(e)
            return
        err = self._output_error(results, len(futures), False)
        if err is not None:
            for fut in futures:
                if not fut.done():
                    fut.set_exception(err)
            return
        for fut, value in zip(futures, results):
            try:
                fut.set_result(value)
            except asyncio.InvalidStateError:
                pass  # that caller was cancelled while the batch ran

    def _output_error(self, out: Any, n: int, gen: bool) -> Optional[Exception]:
        """The error every caller of a batch of `n` gets when the function's output (its return value, or
        one yield of a generator) is not one element per input, else None.

        Not a sequence at all (no length; or a str, bytes or dict, whose elements are not per-input
        results): `TypeError`, as in Ray Serve, where taking its length fails. A sequence of the wrong
        length: `RayServeException` ("doesn't preserve batch size").
        """
        if type(out) is list or type(out) is tuple:  # the common case first
            if len(out) == n:
                return None
        else:
            try:
                m = len(out)
            except TypeError:
                m = None
            if m is None or isinstance(out, (str, bytes, bytearray, dict)):
                verb, did = ("yield", "yielded") if gen else ("return", "returned")
                return TypeError(
                    f"The batched {'generator' if gen else 'function'} '{self.name}' {did} {_describe(out)}, "
                    f"but it must {verb} a list with one element per input (the batch has {n}).")
            if m == n:
                return None
        if gen:
            return RayServeException(
                f"Batched generator doesn't preserve batch size. The input list has length {n} but it "
                f"yielded {_describe(out)}. Each yield of '{self.name}' must be a list with one element "
                "per input.")
        return RayServeException(
            f"Batched function doesn't preserve batch size. The input list has length {n} but the returned "
            f"value is {_describe(out)}. '{self.name}' must return a list with one element per input.")

    async def _run_generator(self, group: list[tuple], args: tuple, kwargs: dict) -> None:
        streams = [req[3] for req in group]
        n = len(streams)
        agen = self.call(*args, **kwargs)
        try:
            async for out in agen:
                err = self._output_error(out, n, True)
                if err is not None:
                    for s in streams:
                        s.end(err)
                    return
                live = 0
                for s, value in zip(streams, out):
                    if s.ended:
                        continue
                    if _is_stop(value):
                        s.end()
                    elif not s.closed:
                        s.push(value)
                        live += 1
                if not live:
                    return  # every caller has finished or gone away
        except asyncio.CancelledError:
            for s in streams:
                s.end(asyncio.CancelledError())
            if _being_cancelled():
                raise
        except Exception as e:  # noqa: BLE001 - every caller still listening gets the error
            for s in streams:
                s.end(e)
        finally:
            for s in streams:
                s.end()
            try:
                await agen.aclose()
            except Exception:  # noqa: BLE001 - its callers are served; only the cleanup failed
                logger.exception("Closing the batched generator '%s' failed.", self.name)


def _describe(value: Any) -> str:
    name = type(value).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    try:
        return f"{article} {name} of length {len(value)}"
    except TypeError:
        return f"{article} {name} (it has no length)"


# --- where the queues live ----------------------------------------------------------------------------

class _QueueTable:
    """Queues by event loop (for plain functions; methods keep theirs in the instance's `__dict__`).
    Never pickled with its contents: a function shipped to a replica starts with no queues."""

    __slots__ = ("by_loop", "__weakref__")

    def __init__(self) -> None:
        self.by_loop: dict[asyncio.AbstractEventLoop, _BatchQueue] = {}

    def __reduce__(self) -> tuple:
        return (_QueueTable, ())


def _prune_closed(by_loop: dict) -> None:
    for loop in [lp for lp in by_loop if lp.is_closed()]:
        del by_loop[loop]


class _Batcher:
    """What one decorated function shares across its calls: options, queues, the warning check."""

    def __init__(self, func: Callable, settings: _Settings):
        self.func = func
        self.settings = settings
        self.name = getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))
        self.is_gen = inspect.isasyncgenfunction(func)
        self.functions = _QueueTable()
        self.attr = f"_shoal_batch_queues_{getattr(func, '__name__', 'fn')}_{id(self):x}"
        # Owners without a __dict__ (__slots__ classes).
        self.slotted: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()
        self.slotted_strong: dict[int, tuple[Any, dict]] = {}
        self._signatures: dict[bool, Optional[inspect.Signature]] = {}
        # Whether a call whose first argument has this type is a method call (`self` first).
        self.method_types: dict[type, bool] = {}

    def learn_type(self, cls: type, wrapper: Callable) -> bool:
        is_method = _holds(cls, wrapper)
        if len(self.method_types) >= 1024:
            self.method_types.clear()
        self.method_types[cls] = is_method
        return is_method

    def __reduce__(self) -> tuple:
        return (_Batcher, (self.func, self.settings))

    def signature(self, method: bool) -> Optional[inspect.Signature]:
        if method not in self._signatures:
            try:
                sig = inspect.signature(self.func)
                if method:
                    params = list(sig.parameters.values())[1:]
                    sig = sig.replace(parameters=params)
            except (TypeError, ValueError):
                sig = None
            self._signatures[method] = sig
        return self._signatures[method]

    def owner_table(self, owner: Any) -> dict:
        try:
            d = owner.__dict__
        except AttributeError:
            d = None
        if d is not None:
            table = d.get(self.attr)
            if table is None:
                table = d[self.attr] = {}
            return table
        try:
            table = self.slotted.get(owner)
            if table is None:
                table = self.slotted[owner] = {}
            return table
        except TypeError:  # neither weak-referenceable nor hashable: keep it (and the owner) alive
            entry = self.slotted_strong.get(id(owner))
            if entry is None or entry[0] is not owner:
                entry = self.slotted_strong[id(owner)] = (owner, {})
            return entry[1]

    def new_queue(self, by_loop: dict, owner: Any, loop: asyncio.AbstractEventLoop) -> _BatchQueue:
        if not self.settings.checked:
            self.settings.checked = True
            self.check_replica_limits()
        _prune_closed(by_loop)
        method = owner is not None
        call = types.MethodType(self.func, owner) if method else self.func
        q = _BatchQueue(call, self.settings, loop, self.is_gen, self.name, self.signature(method))
        by_loop[loop] = q
        return q

    def check_replica_limits(self) -> None:
        """Warn once if the replica can never fill a batch (too few requests allowed at once)."""
        replica = _context._replica_context
        if replica is None:
            return
        try:
            max_ongoing = replica._deployment_config.max_ongoing_requests
        except AttributeError:
            return
        s = self.settings
        wanted = s.max_batch_size * s.max_concurrent_batches
        if isinstance(max_ongoing, int) and max_ongoing < wanted:
            logger.warning(
                "@serve.batch on '%s' has max_batch_size=%d and max_concurrent_batches=%d (up to %d requests "
                "at once), but the deployment's max_ongoing_requests is %d, so batches can never be full. "
                "Set max_ongoing_requests to at least %d.",
                self.name, s.max_batch_size, s.max_concurrent_batches, wanted, max_ongoing, wanted)


def _holds(cls: type, fn: Callable) -> bool:
    """Whether `fn` (or a decorator wrapping it) is a plain attribute of `cls` or a base class:
    then a call whose first argument is an instance of `cls` is a method call."""
    for klass in cls.__mro__:
        for value in list(vars(klass).values()):
            for _ in range(8):  # follow functools.wraps chains of decorators stacked on top
                if value is fn:
                    return True
                value = getattr(value, "__wrapped__", None) if inspect.isfunction(value) else None
                if value is None:
                    break
    return False


def _make_wrapper(func: Callable, settings: _Settings) -> Callable:
    # The wrappers below are pickled by value with the user's class or function when that lives in
    # `__main__` (cloudpickle): they must name only picklable globals (modules, importable names),
    # hence `_context._request_context` rather than the ContextVar itself.
    batcher = _Batcher(func, settings)

    def find_queue(args: tuple) -> tuple[_BatchQueue, tuple]:
        """The queue for this call (its instance's for a method call, on the running loop)."""
        loop = asyncio.get_running_loop()
        if args:
            first = args[0]
            is_method = batcher.method_types.get(type(first))
            if is_method is None:
                is_method = batcher.learn_type(type(first), wrapper)
        else:
            is_method = False
        if is_method:
            args = args[1:]
            try:
                table = first.__dict__[batcher.attr]
            except (AttributeError, KeyError):
                table = batcher.owner_table(first)
        else:
            first = None
            table = batcher.functions.by_loop
        q = table.get(loop)
        if q is None:
            q = batcher.new_queue(table, first, loop)
        return q, args

    if batcher.is_gen:
        def enqueue(args: tuple, kwargs: dict) -> _Stream:
            q, args = find_queue(args)
            stream = _Stream(q.loop)
            q.put((args, kwargs, _context._request_context.get(), stream, _monotonic()))
            return stream

        # A plain function, not an async generator function: the request joins the queue when the
        # function is called (as in Ray Serve), not when the caller first iterates its generator.
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no event loop yet: queue on the first __anext__, on its loop
                return _receive(None, functools.partial(enqueue, args, kwargs))
            stream = enqueue(args, kwargs)
            agen = _receive(stream, None)
            # A caller that drops its generator without iterating it stops counting as a listener.
            stream.owner = weakref.ref(agen, stream.dropped)
            return agen
    else:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            # find_queue, inlined: this runs on every call.
            loop = asyncio.get_running_loop()
            q = None
            if args:
                first = args[0]
                is_method = batcher.method_types.get(type(first))
                if is_method is None:
                    is_method = batcher.learn_type(type(first), wrapper)
                if is_method:
                    try:
                        q = first.__dict__[batcher.attr].get(loop)
                    except (AttributeError, KeyError):
                        pass
                    if q is not None:
                        args = args[1:]
                else:
                    q = batcher.functions.by_loop.get(loop)
            if q is None:
                q, args = find_queue(args)
            fut = loop.create_future()
            # q.put(...), inlined.
            items = q.items
            items.append((args, kwargs, _context._request_context.get(), fut, _monotonic()))
            w = q.waiter
            if w is not None:
                if len(items) >= q.need:
                    q.waiter = None
                    if not w.done():
                        w.set_result(None)
            elif q.runner is None and q.active < settings.max_concurrent_batches:
                q.runner = loop.create_task(q._run())
            return await fut

    functools.update_wrapper(wrapper, func)

    def set_max_batch_size(new_max_batch_size: int) -> None:
        """Change max_batch_size for batches formed from now on."""
        settings.max_batch_size = _positive_int("max_batch_size", new_max_batch_size)

    def set_batch_wait_timeout_s(new_batch_wait_timeout_s: float) -> None:
        """Change batch_wait_timeout_s for batches formed from now on."""
        settings.batch_wait_timeout_s = _timeout("batch_wait_timeout_s", new_batch_wait_timeout_s)

    def _get_max_batch_size() -> int:
        return settings.max_batch_size

    def _get_batch_wait_timeout_s() -> float:
        return settings.batch_wait_timeout_s

    def _get_max_concurrent_batches() -> int:
        return settings.max_concurrent_batches

    wrapper.set_max_batch_size = set_max_batch_size  # type: ignore[attr-defined]
    wrapper.set_batch_wait_timeout_s = set_batch_wait_timeout_s  # type: ignore[attr-defined]
    wrapper._get_max_batch_size = _get_max_batch_size  # type: ignore[attr-defined]
    wrapper._get_batch_wait_timeout_s = _get_batch_wait_timeout_s  # type: ignore[attr-defined]
    wrapper._get_max_concurrent_batches = _get_max_concurrent_batches  # type: ignore[attr-defined]
    wrapper._shoal_batcher = batcher  # type: ignore[attr-defined]
    return wrapper


def batch(
    _func: Optional[Callable] = None,
    /,
    max_batch_size: int = 10,
    batch_wait_timeout_s: float = 0.01,
    max_concurrent_batches: int = 1,
    batch_size_fn: Optional[Callable[[list], int]] = None,
) -> Callable:
    """Turn an `async def` that takes lists into one that callers call with single items.

    Use as `@serve.batch` or `@serve.batch(max_batch_size=..., ...)` on a method or a function. Each
    argument becomes a list across the batch; the function returns a list with one result per
    caller (or, for an `async def ... yield` function, yields such lists; an element that is
    `StopIteration` ends that caller's stream). Its error goes to every caller of the batch.

    Args:
        max_batch_size: the most requests in one batch (with `batch_size_fn`: the most total size).
        batch_wait_timeout_s: how long a batch may wait for more requests after its first arrived.
        max_concurrent_batches: how many batches of this function (per instance) may run at once.
        batch_size_fn: `fn(items) -> size`, called with a one-element list per request (the
            request's first argument) to give its size; a batch holds requests whose sizes sum to
            at most `max_batch_size`, and a request larger than that on its own fails with
            `RuntimeError`.

    The wrapper also has `set_max_batch_size(n)` and `set_batch_wait_timeout_s(t)` to change the
    options at run time (for every instance of a method), and `_get_max_batch_size()`,
    `_get_batch_wait_timeout_s()`.
    """
    if _func is not None and not callable(_func):
        raise TypeError(
            f"@serve.batch takes the function to decorate as its only positional argument, got {_func!r}; "
            "pass options as keywords, e.g. @serve.batch(max_batch_size=8).")
    options = (
        _positive_int("max_batch_size", max_batch_size),
        _timeout("batch_wait_timeout_s", batch_wait_timeout_s),
        _positive_int("max_concurrent_batches", max_concurrent_batches),
        _size_fn(batch_size_fn),
    )

    def decorator(func: Callable) -> Callable:
        if isinstance(func, (staticmethod, classmethod)):
            raise TypeError(f"@serve.batch must be applied below @{type(func).__name__}, directly on the "
                            "'async def' function.")
        if not (inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)):
            name = getattr(func, "__qualname__", repr(func))
            raise TypeError(f"Functions decorated with @serve.batch must be 'async def'; '{name}' is not.")
        return _make_wrapper(func, _Settings(*options))  # settings of its own, for the setters

    if _func is not None:
        return decorator(_func)
    return decorator
