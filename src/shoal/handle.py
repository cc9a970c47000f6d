"""Handles: how any caller (driver, proxy, replica) calls a deployment.

`handle.remote()` sends the request at once (no await needed) through the router that lives
on the caller's event loop, or, from plain sync code, on the process's I/O loop thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
import time
from collections import deque
from typing import Any, AsyncIterator, Iterator, Optional, Union

from shoal.common import SERVE_DEFAULT_APP_NAME, DeploymentID
from shoal.context import _request_context
from shoal.exceptions import RayServeException, RequestCancelledError

_request_counter = itertools.count(1)
_REQUEST_PREFIX = f"{os.getpid():x}-"


# The running loop of this thread, or None (no exception on the hot path).
_running_loop = asyncio._get_running_loop


class _HandleMeta:
    """Per-call options; immutable so `.options()` copies can share them safely."""

    __slots__ = ("method_name", "stream", "multiplexed_model_id", "session_id")

    def __init__(self, method_name: str = "__call__", stream: bool = False, multiplexed_model_id: str = "",
                 session_id: str = ""):
        self.method_name = method_name
        self.stream = stream
        self.multiplexed_model_id = multiplexed_model_id
        self.session_id = session_id


class DeploymentHandle:
    """A reference to a deployment that can be called, copied with `.options()` and pickled."""

    def __init__(self, deployment_name: str, app_name: str = SERVE_DEFAULT_APP_NAME, *,
                 _meta: Optional[_HandleMeta] = None, _routers: Optional[dict] = None):
        self.deployment_id = DeploymentID(deployment_name, app_name)
        self._meta = _meta or _HandleMeta()
        # Routers per event loop, shared by every copy made with `.options()`.
        self._routers: dict = _routers if _routers is not None else {}

    @property
    def deployment_name(self) -> str:
        return self.deployment_id.name

    @property
    def app_name(self) -> str:
        return self.deployment_id.app_name

    def options(self, *, method_name: Optional[str] = None, stream: Optional[bool] = None,
                multiplexed_model_id: Optional[str] = None, session_id: Optional[str] = None,
                **unsupported: Any) -> "DeploymentHandle":
        """A handle with some call options changed. `session_id` feeds affinity routing."""
        if unsupported:
            raise TypeError(
                f"DeploymentHandle.options() got unexpected option(s) {sorted(unsupported)}; "
                "allowed: method_name, stream, multiplexed_model_id, session_id."
            )
        m = self._meta
        meta = _HandleMeta(
            m.method_name if method_name is None else method_name,
            m.stream if stream is None else bool(stream),
            m.multiplexed_model_id if multiplexed_model_id is None else multiplexed_model_id,
            m.session_id if session_id is None else session_id,
        )
        return DeploymentHandle(self.deployment_id.name, self.deployment_id.app_name, _meta=meta, _routers=self._routers)

    def __getattr__(self, name: str) -> "DeploymentHandle":
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def __reduce__(self):
        m = self._meta
        return (_rebuild_handle, (self.deployment_id.name, self.deployment_id.app_name,
                                  m.method_name, m.stream, m.multiplexed_model_id, m.session_id))

    def __repr__(self) -> str:
        return f"DeploymentHandle(deployment='{self.deployment_id.name}', app='{self.deployment_id.app_name}')"

    def _router(self, loop: Optional[asyncio.AbstractEventLoop]):
        router = self._routers.get(loop)
        if router is None or router.closed:
            from shoal.client import get_global_client
            from shoal.local_testing import local_router

            router = local_router(self.deployment_id)
            if router is None:
                router = get_global_client().get_router(self.deployment_id, loop)
            for old_loop in [k for k, r in list(self._routers.items()) if r.closed or r.loop.is_closed()]:
                self._routers.pop(old_loop, None)  # (a cached handle may be shared by threads)
            self._routers[loop] = router
        return router

    def multiplexed_model_ids(self) -> set[str]:
        """The multiplexed model ids the deployment's replicas hold (or are loading), as this
        process's router for the running loop knows them (a shoal extension; Ray has no such call)."""
        router = self._router(_running_loop())
        return set().union(*(entry.models for entry in list(getattr(router, "entries", {}).values())))

    def shutdown(self) -> None:
        """Let go of this handle's routers (shared with its `.options()` copies) and their connections
        to replicas: each closes once the requests sent through it are done. A later call through the
        handle starts afresh."""
        routers = list(self._routers.values())
        self._routers.clear()
        for router in routers:
            _close_router_when_idle(router)

    async def shutdown_async(self) -> None:
        """`shutdown()` from async code."""
        self.shutdown()

    def remote(self, *args: Any, **kwargs: Any) -> Union["DeploymentResponse", "DeploymentResponseGenerator"]:
        meta = self._meta
        loop = _running_loop()
        router = self._router(loop)
        on_loop = loop is not None and router.loop is loop
        if meta.stream:
            resp: Any = DeploymentResponseGenerator(self, meta, args, kwargs, router, on_loop)
        else:
            resp = DeploymentResponse(self, meta, args, kwargs, router, on_loop)
        if on_loop:
            router.assign(resp)
        elif router.sync_loop is not None:
            router.sync_loop.submit(router.assign, resp)
        else:
            router.loop.call_soon_threadsafe(router.assign, resp)
        return resp


def _close_router_when_idle(router: Any) -> None:
    """Close `router` on its own loop once nothing is queued or running through it."""
    close = getattr(router, "close", None)
    if router.closed or close is None:  # (an in-process router of local testing mode holds no connection)
        router.closed = True
        return
    loop = router.loop

    def check() -> None:
        if router.closed or loop.is_closed():
            return
        if router.pending or router.in_flight():
            loop.call_later(0.05, check)
        else:
            close()

    if loop.is_closed():
        close()
    elif _running_loop() is loop:
        check()
    elif router.sync_loop is not None:
        router.sync_loop.submit(check)
    else:
        try:
            loop.call_soon_threadsafe(check)
        except RuntimeError:  # its loop closed meanwhile
            close()


def _rebuild_handle(name: str, app: str, method: str, stream: bool, model_id: str,
                    session_id: str = "") -> DeploymentHandle:
    return DeploymentHandle(name, app, _meta=_HandleMeta(method, stream, model_id, session_id))


class _Request:
    """What a router needs to send one call; the base of both response types."""

    payload = None  # the request body already serialized, when the caller made it (the HTTP proxy does)

    def __init__(self, handle: DeploymentHandle, meta: _HandleMeta, args: tuple, kwargs: dict, router, on_loop: bool):
        self._handle = handle
        self.method_name = meta.method_name
        self.stream = meta.stream
        self.multiplexed_model_id = meta.multiplexed_model_id
        self.args = args
        self.kwargs = kwargs
        # `internal_request_id` is this call's own; `request_id` is the one of the request being served
        # (an HTTP request's `x-request-id`, a handle call's), so it travels through nested handle calls.
        self.internal_request_id = iid = _REQUEST_PREFIX + str(next(_request_counter))
        self.request_id = _request_context.get().request_id or iid
        self._router = router
        self._on_loop = on_loop
        # Set when this thread drives the router's loop itself (sync callers in a driver).
        self._sync_loop = None if on_loop else router.sync_loop
        self._cancelled = False
        self.session_id = meta.session_id
        self._queued_at = 0.0
        # Set by the router while the request is in flight (used to cancel it).
        self._call = None

    @property
    def queued_for_s(self) -> float:
        """How long the request has waited in its caller's queue (for router policies)."""
        return time.monotonic() - self._queued_at if self._queued_at else 0.0

    def cancel(self) -> None:
        """Best-effort cancel: drops it from the queue, or stops it in the replica."""
        if self._cancelled:
            return
        self._cancelled = True
        loop = _running_loop()
        if loop is self._router.loop:
            self._router.cancel(self)
        elif self._sync_loop is not None:
            self._sync_loop.submit(self._router.cancel, self)
        else:
            self._router.loop.call_soon_threadsafe(self._router.cancel, self)

    def cancelled(self) -> bool:
        return self._cancelled


class _Outcome:
    """A minimal future for responses whose waiters drive the loop themselves (see sync_loop.py).

    Completed on the loop; read after `SyncLoop.wait` saw `done()`. Cheaper than a
    `concurrent.futures.Future`, which allocates a condition variable per call.
    """

    __slots__ = ("_done", "_value", "_exc", "_callbacks")

    def __init__(self) -> None:
        self._done = False
        self._value: Any = None
        self._exc: Optional[BaseException] = None
        self._callbacks: list = []

    def done(self) -> bool:
        return self._done

    def cancelled(self) -> bool:
        return False

    def set_result(self, value: Any) -> None:
        self._value, self._done = value, True
        self._run_callbacks()

    def set_exception(self, exc: BaseException) -> None:
        self._exc, self._done = exc, True
        self._run_callbacks()

    def _run_callbacks(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    def add_done_callback(self, cb) -> None:  # called on the loop only
        if self._done:
            cb(self)
        else:
            self._callbacks.append(cb)

    def exception(self) -> Optional[BaseException]:
        return self._exc

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._exc is not None:
            raise self._exc
        return self._value


class DeploymentResponse(_Request):
    """The future result of a unary call: awaitable, `.result()`-able, repeatable."""

    def __init__(self, *a: Any):
        super().__init__(*a)
        if self._on_loop:
            self._fut: Any = self._router.loop.create_future()
        elif self._sync_loop is not None:
            self._fut = _Outcome()
        else:
            self._fut = concurrent.futures.Future()

    # Called by the router on its loop.
    def _complete(self, value: Any = None, exc: Optional[BaseException] = None) -> None:
        fut = self._fut
        if fut.done():
            return
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)
            if isinstance(fut, asyncio.Future):
                fut.exception()  # mark retrieved: an unawaited failure is not an "unhandled" error
        if self._sync_loop is not None:
            self._sync_loop.wake()

    def _done(self) -> bool:
        return self._fut.done()

    def __await__(self):
        fut = self._fut
        loop = _running_loop()
        if isinstance(fut, asyncio.Future) and fut.get_loop() is loop:
            waiter = fut
        else:
            waiter = asyncio.wrap_future(self._as_concurrent_future())
            if self._sync_loop is not None and loop is not self._router.loop:
                self._sync_loop.kick()  # nobody may be running the loop that completes it
        try:
            return (yield from waiter.__await__())
        except asyncio.CancelledError:
            if not self._done() or fut.cancelled():
                self.cancel()  # the awaiting task was cancelled: stop the call downstream too
            raise

    def _as_concurrent_future(self) -> concurrent.futures.Future:
        fut = self._fut
        if isinstance(fut, concurrent.futures.Future):
            return fut
        out: concurrent.futures.Future = concurrent.futures.Future()

        def chain(f: Any) -> None:
            if f.cancelled():
                out.set_exception(RequestCancelledError(self.request_id))
            elif f.exception() is not None:
                out.set_exception(f.exception())
            else:
                out.set_result(f.result())

        if self._sync_loop is not None:
            self._sync_loop.submit(fut.add_done_callback, chain)
        else:
            self._router.loop.call_soon_threadsafe(fut.add_done_callback, chain)
        return out

    def result(self, timeout_s: Optional[float] = None, *, _skip_asyncio_check: bool = False) -> Any:
        """Block until the result is ready; `TimeoutError` after `timeout_s` seconds."""
        if not _skip_asyncio_check and _running_loop() is not None:
            raise RuntimeError(
                "Sync methods should not be called from within an `asyncio` event loop. "
                "Use `await response` instead."
            )
        try:
            if self._sync_loop is not None:
                fut = self._fut
                call = self._call
                if not fut._done and not self._sync_loop.wait(fut.done, timeout_s,
                                                              call.entry.conn if call is not None else None):
                    raise concurrent.futures.TimeoutError()
                return fut.result()
            return self._as_concurrent_future().result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"Timed out waiting for the result of request {self.request_id} "
                               f"after {timeout_s}s.") from None
        except concurrent.futures.CancelledError:
            raise RequestCancelledError(self.request_id) from None

    def _to_object_ref(self, *a: Any, **k: Any):
        raise RuntimeError("Converting DeploymentResponses to Ray ObjectRefs is not supported by shoal.")

    _to_object_ref_sync = _to_object_ref

    def __reduce__(self):
        raise RayServeException(
            "`DeploymentResponse` is not serializable. If you are passing the `DeploymentResponse` in a "
            "nested object (e.g. a list or dictionary) to a downstream deployment handle call, that is not "
            "supported. Please only pass `DeploymentResponse` objects as top level arguments."
        )


_END = object()


class _StreamBuffer:
    """Items pushed by the router on its loop; read by async or sync consumers on any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sync_loop=None):
        self.loop = loop
        self.sync_loop = sync_loop
        self.items: deque = deque()
        self.exc: Optional[BaseException] = None
        self.finished = False
        self._waiter: Optional[asyncio.Future] = None
        self._cond = threading.Condition()

    def push(self, item: Any) -> None:
        self.items.append(item)
        self._wake()

    def finish(self, exc: Optional[BaseException] = None) -> None:
        if self.finished:
            return
        self.exc = exc
        self.finished = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)
        with self._cond:
            self._cond.notify_all()
        if self.sync_loop is not None:
            self.sync_loop.wake()

    async def next_async(self) -> Any:
        while not self.items:
            if self.finished:
                if self.exc is not None:
                    raise self.exc
                raise StopAsyncIteration
            if _running_loop() is self.loop:
                self._waiter = self.loop.create_future()
                await self._waiter
            else:
                if self.sync_loop is not None:
                    self.sync_loop.kick()
                await asyncio.get_running_loop().run_in_executor(None, self._wait_blocking, 0.1)
        return self.items.popleft()

    def _wait_blocking(self, timeout: Optional[float]) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.items or self.finished, timeout)

    def next_sync(self) -> Any:
        while not self.items:
            if self.finished:
                if self.exc is not None:
                    raise self.exc
                raise StopIteration
            if self.sync_loop is not None:
                self.sync_loop.wait(lambda: bool(self.items) or self.finished)
            else:
                self._wait_blocking(None)
        return self.items.popleft()


class DeploymentResponseGenerator(_Request):
    """The stream of a generator call (`stream=True`): iterate with `for` or `async for`."""

    def __init__(self, *a: Any):
        super().__init__(*a)
        self._buffer = _StreamBuffer(self._router.loop, self._sync_loop)

    # Called by the router on its loop.
    def _push(self, item: Any) -> None:
        self._buffer.push(item)

    def _complete(self, value: Any = None, exc: Optional[BaseException] = None) -> None:
        self._buffer.finish(exc)

    def _done(self) -> bool:
        return self._buffer.finished

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._buffer.next_async()
        except asyncio.CancelledError:
            self.cancel()
            raise

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if _running_loop() is not None:
            raise RuntimeError(
                "Sync methods should not be called from within an `asyncio` event loop. "
                "Use `async for` instead."
            )
        return self._buffer.next_sync()

    def __await__(self):
        raise TypeError("`DeploymentResponseGenerator` cannot be awaited; iterate it with `async for` instead.")

    def __reduce__(self):
        raise TypeError("`DeploymentResponseGenerator` cannot be passed to another deployment call.")
