"""`@serve.multiplexed`: the replica side of model multiplexing.

A deployment serves many models but holds only a few at a time::

    @serve.deployment
    class Models:
        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str):
            return await load_from_disk(model_id)

        async def __call__(self, x):
            model = await self.get_model()  # the id the request was sent with
            return model(x)

Calling the decorated loader returns the model for an id from a least-recently-used cache: a hit moves
the model to most recent and returns it without loading; a miss, when the cache is full, first evicts
the least recently used model and unloads it (its `__del__` runs once, awaited when it is `async def`,
in the loop's default executor otherwise), then runs the loader. One cache per instance for a method,
one per process for a plain function; in a replica both mean "per replica".

Concurrency: callers asking for an id that is already loading wait for that one load (it runs in its own
task, so a caller that is cancelled does not cancel it for the others); different ids load concurrently.
A load holds a slot of the cache from before it starts until it fails or the model is evicted, and an
evicted model's slot passes straight to the load that evicted it, after the unload finished: so the
models in memory plus the loads running never exceed `max_num_models_per_replica`. A load that finds
every slot taken by other loads waits until one of them ends. A load that raises propagates its
exception to every caller waiting for that id and caches nothing (the next call tries again).

What the replica reports for routing: `model_ids_of(obj)` gives the ids loaded or loading (holding a
slot) on one instance (or one loader function); `all_model_ids()` the same for every cache in this
process; and `set_model_ids_listener(callback)` registers a process-wide callback that is called with
`all_model_ids()` (a frozenset) each time that set changes, and only then.

Hooking it into a replica process (see also `set_model_ids_listener`):

1. Before constructing the user's object (a constructor may preload models), call
   `set_model_ids_listener(on_ids)` with a callback that remembers the newest frozenset and schedules
   one push of it to the controller (e.g. coalesced with `loop.call_later(0.1, ...)`, like Ray's
   `PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S`), never pushing the same set twice. The callback runs
   synchronously inside the cache's bookkeeping on the thread that drives the loader (the replica's
   loop for async methods): it must return quickly; an exception it raises is logged and dropped.
2. The controller stores the ids in that replica's `RunningReplicaInfo.multiplexed_model_ids` and
   republishes the deployment's replica set when they change.
3. Routers, for a request with a `multiplexed_model_id`, prefer replicas whose
   `multiplexed_model_ids` contain it; otherwise the replicas holding the fewest models; otherwise any.
4. On teardown call `set_model_ids_listener(None)`.

Everything here also works outside a replica (no listener set: nothing is reported).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import weakref
from collections import OrderedDict
from typing import Any, Callable, Optional

from shoal.context import get_multiplexed_model_id

logger = logging.getLogger("shoal.multiplex")

__all__ = ["multiplexed", "model_ids_of", "all_model_ids", "set_model_ids_listener"]

DEFAULT_MAX_NUM_MODELS_PER_REPLICA = 3
_INSTANCE_ATTR = "__shoal_multiplex_caches__"  # in an instance's __dict__: {loader qualname: _ModelCache}
_SPEC_ATTR = "__shoal_multiplexed__"  # on the wrapper: its _LoaderSpec

ModelIdsListener = Callable[[frozenset], None]


# ----------------------------------------------------------------------------------------------
# Reporting: the ids this process holds, and who hears about changes


_caches: "weakref.WeakSet[_ModelCache]" = weakref.WeakSet()
_listener: Optional[ModelIdsListener] = None
_last_reported: frozenset = frozenset()
# Caches of instances that have no __dict__ (slotted classes) but can be weakly referenced.
_slotted_owner_caches: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def set_model_ids_listener(callback: Optional[ModelIdsListener]) -> None:
    """Register (or, with None, remove) the process-wide callback told about changes of `all_model_ids()`.

    The callback receives the new frozenset of ids (loaded, or loading and holding a slot) each time it
    differs from the set last passed to a callback; setting a listener does not call it. It runs
    synchronously wherever the change happened (the event loop running the loader), so it should only
    record the set and schedule the push; exceptions from it are logged and swallowed.
    """
    global _listener, _last_reported
    _listener = callback
    _last_reported = all_model_ids()


def all_model_ids() -> frozenset:
    """The ids loaded or loading in every multiplexed cache of this process (in a replica: the replica's)."""
    ids: set = set()
    for cache in list(_caches):
        ids.update(cache.model_ids())
    return frozenset(ids)


def model_ids_of(obj: Any) -> set:
    """The ids loaded or loading for `obj`: an instance whose class has `@serve.multiplexed` methods (all
    of them together), or a decorated plain function (its process-wide cache)."""
    spec = getattr(obj, _SPEC_ATTR, None)
    if isinstance(spec, _LoaderSpec):
        if not spec.is_method:
            return spec.function_cache().model_ids() if spec.has_function_cache() else set()
        if inspect.ismethod(obj):  # `instance.get_model`: that loader's cache on that instance
            cache = (_owner_caches(obj.__self__, create=False) or {}).get(spec.key)
            return cache.model_ids() if cache is not None else set()
    caches = _owner_caches(obj, create=False)
    ids: set = set()
    for cache in (caches or {}).values():
        ids.update(cache.model_ids())
    return ids


def _changed() -> None:
    global _last_reported
    if _listener is None:
        return
    ids = all_model_ids()
    if ids == _last_reported:
        return
    _last_reported = ids
    try:
        _listener(ids)
    except Exception:  # noqa: BLE001 - a broken listener must not break loading models
        logger.exception("the multiplexed model ids listener raised")


def _owner_caches(owner: Any, create: bool) -> Optional[dict]:
    d = getattr(owner, "__dict__", None)
    if isinstance(d, dict):
        caches = d.get(_INSTANCE_ATTR)
        if caches is None and create:
            caches = d[_INSTANCE_ATTR] = {}
        return caches
    try:
        caches = _slotted_owner_caches.get(owner)
        if caches is None and create:
            caches = _slotted_owner_caches[owner] = {}
        return caches
    except TypeError:
        if not create:
            return None
        raise TypeError(
            f"@serve.multiplexed needs somewhere to keep the models of a {type(owner).__name__} instance: "
            "give the class a __dict__ or a __weakref__ slot"
        ) from None


# ----------------------------------------------------------------------------------------------
# Unloading


_no_del_classes: dict = {}


def _disarm_del(model: Any) -> None:
    """After its `__del__` ran, make sure the garbage collector does not run it a second time: move the
    object to a subclass whose `__del__` does nothing (same layout, so the assignment is allowed)."""
    cls = type(model)
    sub = _no_del_classes.get(cls)
    if sub is None:
        try:
            sub = type(cls.__name__, (cls,), {"__slots__": (), "__del__": lambda self: None,
                                             "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        except Exception:  # noqa: BLE001 - a final class, or a metaclass that refuses this subclass
            return
        _no_del_classes[cls] = sub
    try:
        model.__class__ = sub
    except TypeError:
        pass  # not a heap type, or a different layout: its __del__ may run again when it is collected


async def _unload(model_id: str, model: Any) -> None:
    """Run the evicted model's `__del__` (once); errors are logged, never raised."""
    if not hasattr(model, "__del__"):
        return
    try:
        del_fn = model.__del__
        if inspect.iscoroutinefunction(del_fn):
            await del_fn()
        else:
            ret = await asyncio.get_running_loop().run_in_executor(None, del_fn)
            if inspect.isawaitable(ret):
                await ret
    except Exception:  # noqa: BLE001
        logger.exception("unloading model %r: its __del__ raised", model_id)
    finally:
        if hasattr(type(model), "__del__"):
            _disarm_del(model)


# ----------------------------------------------------------------------------------------------
# The cache


class _ModelCache:
    """The LRU of one instance (or one loader function): loaded models plus the loads in flight."""

    def __init__(self, spec: "_LoaderSpec", owner: Any):
        self.spec = spec
        self.limit = spec.max_num_models_per_replica
        self._owner_ref = None if owner is None else _ref(owner)
        self.loaded: "OrderedDict[str, Any]" = OrderedDict()  # least recently used first
        self.loading: set = set()  # ids whose load holds a slot (reported with the loaded ones)
        self.tasks: dict = {}  # id -> the task loading it (waiting for a slot, evicting or loading)
        self._slot_waiters: list = []
        _caches.add(self)

    def model_ids(self) -> set:
        return set(self.loaded) | self.loading

    async def get(self, model_id: str) -> Any:
        loaded = self.loaded
        if model_id in loaded:
            loaded.move_to_end(model_id)
            return loaded[model_id]
        task = self.tasks.get(model_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(model_id))
            task.add_done_callback(_retrieve)
            self.tasks[model_id] = task
        # Shielded: a caller that is cancelled stops waiting, the load goes on for the others.
        return await asyncio.shield(task)

    async def _load(self, model_id: str) -> Any:
        try:
            await self._take_slot(model_id)
            owner = None
            if self._owner_ref is not None:
                owner = self._owner_ref()
                if owner is None:
                    raise RuntimeError("the instance that owns this multiplexed loader was garbage collected")
            fn = self.spec.func
            model = await (fn(owner, model_id) if self.spec.is_method else fn(model_id))
        except BaseException:
            if self.tasks.get(model_id) is asyncio.current_task():
                del self.tasks[model_id]
            if model_id in self.loading:  # only this task loads this id, so the slot is its own
                self.loading.discard(model_id)
                self._wake_slot_waiters()
                _changed()
            raise
        # Loading -> loaded in one step: the reported set does not change.
        del self.tasks[model_id]
        self.loading.discard(model_id)
        self.loaded[model_id] = model
        self.loaded.move_to_end(model_id)
        self._wake_slot_waiters()  # a loaded model can be evicted to make room
        return model

    async def _take_slot(self, model_id: str) -> None:
        while True:
            if self.limit < 0 or len(self.loaded) + len(self.loading) < self.limit:
                self.loading.add(model_id)
                _changed()
                return
            if self.loaded:
                victim_id, victim = self.loaded.popitem(last=False)
                self.loading.add(model_id)  # the victim's slot, taken before anyone else can
                _changed()
                try:
                    await _unload(victim_id, victim)
                finally:
                    del victim  # the cache keeps no reference to an evicted model
                return
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)

    def _wake_slot_waiters(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)


def _ref(owner: Any) -> Callable[[], Any]:
    try:
        return weakref.ref(owner)
    except TypeError:
        return lambda: owner  # not weakly referenceable: the cache lives in its __dict__ anyway


def _retrieve(task: "asyncio.Task") -> None:
    # Every waiter may have been cancelled: still consume the exception so asyncio does not log it.
    if not task.cancelled():
        task.exception()


# ----------------------------------------------------------------------------------------------
# The decorator


class _LoaderSpec:
    """What `@serve.multiplexed` knows about one loader. Pickles without its cache: a class that travels
    to a replica starts there with no model loaded."""

    def __init__(self, func: Callable, max_num_models_per_replica: int, is_method: bool, param_name: str):
        self.func = func
        self.max_num_models_per_replica = max_num_models_per_replica
        self.is_method = is_method
        self.param_name = param_name
        self.key = getattr(func, "__qualname__", getattr(func, "__name__", "loader"))
        self._function_cache: Optional[_ModelCache] = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_function_cache"] = None
        return state

    def has_function_cache(self) -> bool:
        return self._function_cache is not None

    def function_cache(self) -> _ModelCache:
        if self._function_cache is None:
            self._function_cache = _ModelCache(self, None)
        return self._function_cache

    def cache_for(self, owner: Any) -> _ModelCache:
        caches = _owner_caches(owner, create=True)
        cache = caches.get(self.key)  # type: ignore[union-attr]
        if cache is None or cache.spec is not self:
            cache = caches[self.key] = _ModelCache(self, owner)  # type: ignore[index]
        return cache


def _validate_max(value: Any) -> int:
    # As in Ray Serve: not an integer is a TypeError, an integer out of range a ValueError.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            "max_num_models_per_replica must be an integer (a positive one, or -1 for no limit); "
            f"got {value!r} ({type(value).__name__})"
        )
    if not (value > 0 or value == -1):
        raise ValueError(
            "max_num_models_per_replica must be a positive integer, or -1 for no limit; "
            f"got {value!r}"
        )
    return value


def _inspect_loader(func: Any) -> tuple[bool, str]:
    """(is_method, name of the model id parameter); TypeError for anything that is not a loader."""
    if not callable(func):
        raise TypeError(f"@serve.multiplexed decorates an async function or method, got {func!r}")
    name = getattr(func, "__qualname__", repr(func))
    if not inspect.iscoroutinefunction(func):
        raise TypeError(
            f"@serve.multiplexed: {name} must be 'async def' (a coroutine function taking the model id)"
        )
    params = list(inspect.signature(func).parameters.values())
    usage = ("it must take exactly one parameter, the model id, besides `self`: "
             "`async def load(self, model_id: str)` or `async def load(model_id: str)`")
    if not params or len(params) > 2 or (len(params) == 1 and params[0].name == "self"):
        raise TypeError(f"@serve.multiplexed: {name} takes {len(params)} parameter(s); {usage}")
    for p in params:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            raise TypeError(f"@serve.multiplexed: parameter {p.name!r} of {name} must be positional; {usage}")
    return len(params) == 2, params[-1].name


def multiplexed(func: Optional[Callable] = None, /,
                max_num_models_per_replica: int = DEFAULT_MAX_NUM_MODELS_PER_REPLICA) -> Any:
    """`@serve.multiplexed` / `@serve.multiplexed(max_num_models_per_replica=N)` on an async loader
    taking a model id; calls return the model from a per-replica LRU cache of at most N models
    (`-1`: no limit). Called without a model id, the loader uses `serve.get_multiplexed_model_id()`."""
    limit = _validate_max(max_num_models_per_replica)
    if func is None:
        return functools.partial(_decorate, limit=limit)
    return _decorate(func, limit=limit)


def _decorate(func: Callable, limit: int) -> Callable:
    is_method, param_name = _inspect_loader(func)
    spec = _LoaderSpec(func, limit, is_method, param_name)

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_method:
            if not args:
                raise TypeError(f"{spec.key}() missing its instance (`self`)")
            owner, args = args[0], args[1:]
            cache = spec.cache_for(owner)
        else:
            cache = spec.function_cache()
        return await cache.get(_model_id_from(spec, args, kwargs))

    setattr(wrapper, _SPEC_ATTR, spec)
    wrapper.max_num_models_per_replica = limit  # type: ignore[attr-defined]
    return wrapper


def _model_id_from(spec: _LoaderSpec, args: tuple, kwargs: dict) -> str:
    if kwargs:
        if set(kwargs) != {spec.param_name} or args:
            raise TypeError(f"{spec.key}() takes one argument, the model id ({spec.param_name!r}); "
                            f"got {len(args)} positional and keyword(s) {sorted(kwargs)}")
        model_id = kwargs[spec.param_name]
    elif len(args) > 1:
        raise TypeError(f"{spec.key}() takes at most one argument, the model id; got {len(args)}")
    elif args:
        model_id = args[0]
    else:
        model_id = get_multiplexed_model_id()
        if not model_id:
            raise ValueError(
                f"{spec.key}() was called without a model id and the current request has none: pass the "
                "id, or send the request with `handle.options(multiplexed_model_id=...)` or the "
                "`serve_multiplexed_model_id` HTTP header"
            )
        return model_id
    if not isinstance(model_id, str):
        raise TypeError(f"{spec.key}(): the model id must be a str, got {type(model_id).__name__}")
    if not model_id:
        raise ValueError(f"{spec.key}(): the model id must be a non-empty string")
    return model_id
