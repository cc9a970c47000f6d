"""`@serve.ingress(app)`: serve a FastAPI / Starlette / any ASGI app from a deployment's replicas.

The decorator only records the app on the class (`__shoal_asgi_app__`), so the class stays a plain
class that `@serve.deployment` accepts and that travels to replicas with the rest of the user's code.
In the replica, after the user's constructor ran, `await ASGIIngress.create(instance)` builds the app
(calling a builder function if one was given) and makes the routes written as methods of the class
receive that instance as `self`.

How `self` is supplied: each route whose endpoint is a function of the class is rebuilt once, in place,
around a wrapper whose signature is the method's without `self` (so FastAPI parses parameters, bodies
and the OpenAPI schema exactly as for a bound method). The wrapper reads the instance from a context
variable that `ASGIIngress` sets around every call into the app. The app object itself is therefore the
user's own (middleware, `app.state`, exception handlers, mounts and docs keep working unchanged), and
two instances of the class in one process (local testing mode) share it while each request sees the
instance of the ingress that received it.

Only the standard library is imported at module level: FastAPI and Starlette load only when an app
that needs them is served.
"""

from __future__ import annotations

import asyncio
import contextvars
import copyreg
import dataclasses
import functools
import inspect
import logging
import sys
import threading
from typing import Any, Awaitable, Callable, MutableMapping, Optional, TypeVar

logger = logging.getLogger("shoal.ingress")

ASGI_APP_ATTR = "__shoal_asgi_app__"
"""Class attribute that holds what `@serve.ingress` was given: an ASGI app, an APIRouter or a builder."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

T = TypeVar("T", bound=type)

_current_instance: contextvars.ContextVar[Any] = contextvars.ContextVar("shoal_ingress_instance")
_bind_lock = threading.Lock()  # local testing mode may create ingresses from several threads
_LIFESPAN_EXIT_GRACE_S = 5.0


# ----------------------------------------------------------------------------------------------
# The decorator


def ingress(app: Any) -> Callable[..., T]:
    """`@serve.ingress(app)`: serve `app` (FastAPI app, APIRouter, ASGI app, or a no-argument
    function returning one, called in the replica) from the decorated deployment class.

    `serve.ingress(app)()`, with no class, makes one (`ASGIIngressDeployment`, as in Ray): its
    constructor keeps whatever `.bind()` passed as `self.args` / `self.kwargs`."""
    if not callable(app):
        raise TypeError(
            "@serve.ingress expects a FastAPI app, an APIRouter, an ASGI app or a function that builds "
            f"one, got {type(app).__name__}."
        )
    _install_pickle_support()

    def decorator(cls: Optional[T] = None) -> T:
        if cls is None:
            cls = _default_ingress_class()  # type: ignore[assignment]
        if not inspect.isclass(cls):
            hint = (" Put @serve.ingress below @serve.deployment." if hasattr(cls, "func_or_class") else "")
            raise TypeError(f"@serve.ingress must decorate a class, got {type(cls).__name__}.{hint}")
        if _defines_call(cls):
            raise ValueError("Class passed to @serve.ingress may not have __call__ method.")
        setattr(cls, ASGI_APP_ATTR, app)
        return cls

    return decorator


def _default_ingress_class() -> Any:
    """A new class per call (the app is recorded on it); defined in a function, so it travels to
    replicas by value with the app."""

    class ASGIIngressDeployment:
        def __init__(self, *args: Any, **kwargs: Any):
            self.args = args
            self.kwargs = kwargs

    return ASGIIngressDeployment


def is_ingress(target: Any) -> bool:
    """Whether a class, an instance of it, or a `Deployment` of it was decorated with `@serve.ingress`."""
    from shoal.deployment import Deployment  # late: keeps this module importable on its own

    if isinstance(target, Deployment):
        target = target.func_or_class
    cls = target if inspect.isclass(target) else type(target)
    return getattr(cls, ASGI_APP_ATTR, None) is not None


def _defines_call(cls: type) -> bool:
    return any("__call__" in vars(k) for k in cls.__mro__ if k is not object)


# ----------------------------------------------------------------------------------------------
# The per-replica ingress


class ASGIIngress:
    """The user's ASGI app bound to one instance of its class: what a replica serves HTTP with.

    Itself an ASGI callable (`.app` returns it): every call runs the user's app with this instance as
    `self` of the class's route methods and, once `startup()` ran, the lifespan state in `scope["state"]`.
    """

    def __init__(self, asgi_app: ASGIApp, instance: Any):
        self.asgi_app = asgi_app  # the user's app, its class routes already bound
        self.instance = instance
        self.docs_path: Optional[str] = _docs_path(asgi_app)
        self._state: dict[str, Any] = {}  # the lifespan's state, copied into each request's scope
        self._lifespan: Optional[_Lifespan] = None

    @classmethod
    async def create(cls, instance: Any) -> "ASGIIngress":
        """Build the app recorded on `type(instance)` (calling its builder) and bind its routes to `instance`."""
        target = getattr(type(instance), ASGI_APP_ATTR, None)
        if target is None:
            raise TypeError(f"{type(instance).__name__} is not decorated with @serve.ingress.")
        app = await _materialize(target)
        _bind_class_routes(app, type(instance))
        return cls(app, instance)

    @property
    def app(self) -> ASGIApp:
        """The ASGI callable to run requests with (this object)."""
        return self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._lifespan is not None and scope["type"] in ("http", "websocket"):
            # ASGI lifespan state: every request gets a shallow copy of what startup stored.
            scope = dict(scope)
            scope["state"] = dict(self._state)
        token = _current_instance.set(self.instance)
        try:
            await self.asgi_app(scope, receive, send)
        finally:
            _current_instance.reset(token)

    async def startup(self) -> None:
        """Run the app's ASGI lifespan startup; `RuntimeError` with the app's message if it fails.

        An app that returns or raises on the lifespan scope without answering has no lifespan support,
        which is fine (as in uvicorn's `lifespan="auto"`).
        """
        if self._lifespan is not None:
            raise RuntimeError("ASGIIngress.startup() was already called.")
        lifespan = _Lifespan(self.asgi_app, self._state, self.instance)
        try:
            reply = await lifespan.exchange("lifespan.startup")
        except BaseException:
            await lifespan.close(grace_s=0)
            raise
        if reply is None:
            await lifespan.close(grace_s=0)
            logger.debug("ASGI app of %s has no lifespan support (%r).", type(self.instance).__name__,
                         lifespan.exception())
            return
        if reply.get("type") == "lifespan.startup.complete":
            self._lifespan = lifespan
            return
        await lifespan.close()
        if reply.get("type") == "lifespan.startup.failed":
            raise RuntimeError(reply.get("message") or "ASGI lifespan startup failed.") from lifespan.exception()
        raise RuntimeError(f"Unexpected ASGI message {reply.get('type')!r} in reply to lifespan.startup.")

    async def shutdown(self) -> None:
        """Run the app's ASGI lifespan shutdown (no-op without a started lifespan); `RuntimeError` if it fails."""
        lifespan, self._lifespan = self._lifespan, None
        if lifespan is None:
            return
        try:
            reply = await lifespan.exchange("lifespan.shutdown")
        finally:
            await lifespan.close()
        error = lifespan.exception()
        if reply is None:
            if error is not None:
                raise RuntimeError(f"ASGI lifespan shutdown raised {error!r}") from error
            return
        if reply.get("type") == "lifespan.shutdown.complete":
            return
        if reply.get("type") == "lifespan.shutdown.failed":
            raise RuntimeError(reply.get("message") or "ASGI lifespan shutdown failed.") from error
        raise RuntimeError(f"Unexpected ASGI message {reply.get('type')!r} in reply to lifespan.shutdown.")


class _Lifespan:
    """The server side of one ASGI lifespan session: the app runs in a task, we send events to it."""

    def __init__(self, app: ASGIApp, state: dict[str, Any], instance: Any):
        self._events: asyncio.Queue[Message] = asyncio.Queue()
        self._reply: Optional[asyncio.Future[Message]] = None
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": state}
        token = _current_instance.set(instance)  # the task copies this context: handlers see `self` too
        try:
            self._task: asyncio.Task[None] = asyncio.ensure_future(app(scope, self._events.get, self._send))
        finally:
            _current_instance.reset(token)

    async def _send(self, message: Message) -> None:
        if self._reply is not None and not self._reply.done():
            self._reply.set_result(message)

    async def exchange(self, event: str) -> Optional[Message]:
        """Send `event`; return the app's reply, or None if the app ended without one."""
        self._reply = asyncio.get_running_loop().create_future()
        await self._events.put({"type": event})
        # The app's `send` resolves the future before the task can end, so a reply is never missed.
        await asyncio.wait({self._reply, self._task}, return_when=asyncio.FIRST_COMPLETED)
        return self._reply.result() if self._reply.done() else None

    async def close(self, grace_s: float = _LIFESPAN_EXIT_GRACE_S) -> None:
        """Let the app's lifespan task end (cancel it after `grace_s`) and collect its outcome."""
        if not self._task.done() and grace_s > 0:
            await asyncio.wait({self._task}, timeout=grace_s)
        if not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})
        self.exception()  # marks the outcome as retrieved: no "exception was never retrieved" noise

    def exception(self) -> Optional[BaseException]:
        if not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()


def _docs_path(app: Any) -> Optional[str]:
    """FastAPI's Swagger UI path, which FastAPI serves only when both docs_url and openapi_url are set."""
    docs_url = getattr(app, "docs_url", None)
    return docs_url if isinstance(docs_url, str) and getattr(app, "openapi_url", None) else None


# ----------------------------------------------------------------------------------------------
# Building the app


def _is_builder(obj: Any) -> bool:
    """A plain function callable with no arguments builds the app; an ASGI function needs three."""
    if not (inspect.isfunction(obj) or inspect.ismethod(obj)):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


async def _materialize(target: Any) -> ASGIApp:
    app = target
    if _is_builder(target):
        app = target()
        if inspect.isawaitable(app):
            app = await app
    fastapi = sys.modules.get("fastapi")  # an APIRouter exists only if FastAPI was imported
    if fastapi is not None and isinstance(app, fastapi.APIRouter):
        router, app = app, fastapi.FastAPI()
        app.include_router(router)
    if not callable(app):
        raise TypeError(f"The @serve.ingress app builder returned {type(app).__name__}, which is not an ASGI app.")
    return app


# ----------------------------------------------------------------------------------------------
# Binding the class's route methods


def _bind_class_routes(app: Any, cls: type) -> int:
    """Put instance-supplying wrappers in place of routes whose endpoint is a function of `cls`.

    Idempotent (wrapped routes no longer match), so every instance of `cls` can call it on the same app.
    Returns the number of routes changed.
    """
    functions = _class_functions(cls)
    if not functions:
        return 0
    with _bind_lock:
        changed = _bind_routes(app, functions, set())
        if changed:
            _forget_openapi(app)  # an included router's routes may have changed below the app
    return changed


def _class_functions(cls: type) -> dict[int, Callable[..., Any]]:
    """Functions defined on `cls` or its bases, with what they wrap (decorators put above `@app.get`)."""
    found: dict[int, Callable[..., Any]] = {}
    for klass in cls.__mro__:
        if klass is object:
            continue
        for value in vars(klass).values():
            while inspect.isfunction(value) and id(value) not in found:
                found[id(value)] = value
                value = getattr(value, "__wrapped__", None)
    return found


def _bind_routes(owner: Any, functions: dict[int, Callable[..., Any]], seen: set[int]) -> int:
    """Rebind in `owner.routes`, then in included routers and mounted apps below it."""
    if id(owner) in seen:
        return 0
    seen.add(id(owner))
    routes = getattr(owner, "routes", None)
    if not isinstance(routes, list):
        return 0
    changed = total = 0
    for i, route in enumerate(routes):
        endpoint = getattr(route, "endpoint", None)
        if endpoint is not None and functions.get(id(endpoint)) is endpoint:
            wrapper = _method_endpoint(endpoint)
            if wrapper is not None:
                routes[i] = _rebuild_route(route, wrapper, owner)
                changed += 1
        # FastAPI >= 0.12x keeps included routers as routes of their own; Mount/Host hold an app.
        for child in (getattr(route, "original_router", None), getattr(route, "app", None)):
            if child is not None:
                total += _bind_routes(child, functions, seen)
    if changed:
        mark = getattr(owner, "_mark_routes_changed", None) or getattr(getattr(owner, "router", None),
                                                                       "_mark_routes_changed", None)
        if callable(mark):
            mark()  # FastAPI caches included routes and the OpenAPI schema per routes version
        _forget_openapi(owner)
    return total + changed


def _forget_openapi(app: Any) -> None:
    """Drop a FastAPI app's cached OpenAPI schema: it was computed with `self` as a parameter."""
    if getattr(app, "openapi_schema", None) is not None:
        app.openapi_schema = None


def _method_endpoint(func: Callable[..., Any]) -> Optional[Callable[..., Any]]:
    """A function of the same kind as `func` (async, generator, ...) minus `self`, which it supplies."""
    try:
        sig = inspect.signature(func, eval_str=True)  # resolve string annotations in func's module
    except Exception:  # noqa: BLE001 - leave unresolvable names to FastAPI, as for any endpoint
        sig = inspect.signature(func)
    params = list(sig.parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        return None  # no `self` to supply: leave the route as it is

    endpoint: Callable[..., Any]
    if inspect.isasyncgenfunction(func):
        async def endpoint(*args: Any, **kwargs: Any) -> Any:
            agen = func(_bound_instance(), *args, **kwargs)
            try:
                async for item in agen:
                    yield item
            finally:
                await agen.aclose()
    elif inspect.iscoroutinefunction(func):
        async def endpoint(*args: Any, **kwargs: Any) -> Any:
            return await func(_bound_instance(), *args, **kwargs)
    elif inspect.isgeneratorfunction(func):
        def endpoint(*args: Any, **kwargs: Any) -> Any:
            return (yield from func(_bound_instance(), *args, **kwargs))
    else:
        def endpoint(*args: Any, **kwargs: Any) -> Any:
            return func(_bound_instance(), *args, **kwargs)

    functools.update_wrapper(endpoint, func)
    endpoint.__signature__ = sig.replace(parameters=params[1:])  # type: ignore[attr-defined]
    return endpoint


def _bound_instance() -> Any:
    try:
        return _current_instance.get()
    except LookupError:
        raise RuntimeError(
            "This route is a method of an @serve.ingress class: it runs only when served through its "
            "deployment (ASGIIngress), which supplies `self`."
        ) from None


def _rebuild_route(route: Any, endpoint: Callable[..., Any], owner: Any) -> Any:
    """A new route of the same class and options as `route`, with `endpoint`.

    Options are read back from the route's attributes named like its constructor's parameters (all of
    FastAPI's and Starlette's route options are stored that way), so new options keep working.
    """
    cls = type(route)
    params = _init_parameters(cls)
    kwargs: dict[str, Any] = {}
    for name in params:
        if name in ("path", "endpoint"):
            continue
        if hasattr(route, name):
            kwargs[name] = getattr(route, name)
        elif name == "dependency_overrides_provider":  # APIWebSocketRoute does not keep it
            router = getattr(owner, "router", owner)
            kwargs[name] = getattr(router, "dependency_overrides_provider", None)
    if "response_model" in kwargs and "response_model" in params:
        # The stored response_model is the resolved one; an inferred one must be inferred again, or
        # derived settings (a generator's stream item type) are lost. Keep the inference if it agrees.
        try:
            inferred = cls(path=route.path, endpoint=endpoint,
                           **{**kwargs, "response_model": params["response_model"].default})
        except Exception:  # noqa: BLE001 - inference fails where the user set response_model explicitly
            inferred = None
        if (inferred is not None and _same(inferred.response_model, route.response_model)
                and _same(getattr(inferred, "stream_item_type", None), getattr(route, "stream_item_type", None))):
            return inferred
    return cls(path=route.path, endpoint=endpoint, **kwargs)


def _init_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """Named parameters of `cls.__init__`, following `**kwargs` up to the base class that takes them."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        forwards = False
        for name, p in list(inspect.signature(init).parameters.items())[1:]:
            if p.kind is p.VAR_KEYWORD:
                forwards = True
            elif p.kind is not p.VAR_POSITIONAL:
                found.setdefault(name, p)
        if not forwards:
            break
    return found


def _same(a: Any, b: Any) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:  # noqa: BLE001 - exotic __eq__
        return False


# ----------------------------------------------------------------------------------------------
# Pickling: the app travels to replica processes inside the decorated class


def _install_pickle_support() -> None:
    """Make Starlette/FastAPI apps picklable: `State` (every app's `app.state`) recurses forever in its
    `__getattr__` when unpickled, and FastAPI's included routers hold a lock. Idempotent."""
    datastructures = sys.modules.get("starlette.datastructures")
    state_cls = getattr(datastructures, "State", None)
    if (state_cls is not None and state_cls not in copyreg.dispatch_table
            and not any(n in vars(state_cls) for n in ("__reduce__", "__reduce_ex__", "__setstate__"))
            and "_state" in vars(state_cls())):
        copyreg.pickle(state_cls, _reduce_state)
    routing = sys.modules.get("fastapi.routing")
    included = getattr(routing, "_IncludedRouter", None)
    if (included is not None and included not in copyreg.dispatch_table and dataclasses.is_dataclass(included)
            and {"original_router", "include_context"} <= {f.name for f in dataclasses.fields(included)}):
        copyreg.pickle(included, _reduce_included_router)


def _reduce_state(state: Any) -> tuple:
    return type(state), (dict(vars(state)["_state"]),)


def _reduce_included_router(route: Any) -> tuple:
    return _restore_included_router, (type(route), route.original_router, route.include_context)


def _restore_included_router(cls: type, original_router: Any, include_context: Any) -> Any:
    """Rebuild with a fresh lock and empty caches: they are per process."""
    return cls(original_router=original_router, include_context=include_context)
