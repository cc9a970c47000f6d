"""Pickling for the wire: plain pickle when it is safe, cloudpickle when values must travel by value.

Classes and functions defined in `__main__` or a notebook pickle *by reference* with plain pickle and
would fail to load in a replica, so anything that is not built from plain builtin values goes
through cloudpickle. Plain values (the common case on the hot path) take the fast C pickler.
"""

from __future__ import annotations

import io
import pickle
import sys
import traceback
from typing import Any

import cloudpickle

from shoal.exceptions import RayServeException, RemoteError

PROTOCOL = 5
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, bytearray, complex})


def _is_plain(value: Any, depth: int = 0) -> bool:
    """True for builtin scalars and shallow lists/tuples/dicts of them: safe for the C pickler."""
    t = type(value)
    if t in _PLAIN:
        return True
    if depth >= 3:
        return False
    if t is tuple or t is list:
        for v in value:
            if type(v) not in _PLAIN and not _is_plain(v, depth + 1):
                return False
        return True
    if t is dict:
        for k, v in value.items():
            if type(k) not in _PLAIN or (type(v) not in _PLAIN and not _is_plain(v, depth + 1)):
                return False
        return True
    return False


def dumps(value: Any) -> bytes:
    """Serialize a value for another process; raises `TypeError` naming what could not be pickled."""
    if _is_plain(value):
        return pickle.dumps(value, PROTOCOL)
    return cloudpickle.dumps(value, PROTOCOL)


def dumps_call_args(args: tuple, kwargs: dict, where: str, envelope: tuple = ()) -> bytes:
    """Serialize `envelope + (args, kwargs)` in one pass; a failure names the argument and why."""
    try:
        return dumps(envelope + (args, kwargs))
    except RayServeException:
        raise  # already says what is wrong (e.g. a nested DeploymentResponse)
    except Exception as e:  # noqa: BLE001 - any pickling failure becomes one clear error
        for i, a in enumerate(args):
            if not _can_pickle(a):
                raise TypeError(f"Could not serialize argument {i} ({type(a).__name__}) of {where}: {e}") from e
        for k, v in kwargs.items():
            if not _can_pickle(v):
                raise TypeError(f"Could not serialize keyword argument '{k}' ({type(v).__name__}) of {where}: {e}") from e
        raise TypeError(f"Could not serialize the arguments of {where}: {e}") from e


def _can_pickle(value: Any) -> bool:
    try:
        cloudpickle.dumps(value, PROTOCOL)
        return True
    except Exception:  # noqa: BLE001
        return False


loads = pickle.loads


class PlainPickler:
    """Pickles builtin data (no cycles) with one reused C Pickler in fast mode (no memo).

    `pickle.dumps` builds a Pickler, a memo table and a 4 KiB output buffer per call; for the small
    envelopes of the proxy's hot path that set-up is most of the cost. Not thread-safe: one per loop.
    """

    __slots__ = ("_buf", "_pickler")

    def __init__(self) -> None:
        self._buf = io.BytesIO()
        self._pickler = pickle.Pickler(self._buf, PROTOCOL)
        self._pickler.fast = True  # no memo: shared values are written twice, cycles are refused

    def dumps(self, value: Any) -> bytes:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        self._pickler.dump(value)
        return buf.getvalue()


def dumps_exception(exc: BaseException, context: str = "") -> bytes:
    """Serialize a user exception with its formatted traceback, falling back to a `RemoteError`."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        return cloudpickle.dumps((exc, tb, context), PROTOCOL)
    except Exception:  # noqa: BLE001 - the exception itself did not pickle
        fallback = RemoteError(f"{type(exc).__name__}: {exc}")
        return cloudpickle.dumps((fallback, tb, context), PROTOCOL)


def loads_exception(data: bytes) -> BaseException:
    """Rebuild an exception sent by `dumps_exception`, with the remote traceback as a note."""
    try:
        exc, tb, context = pickle.loads(data)
    except Exception as e:  # noqa: BLE001
        return RayServeException(f"An error happened remotely but could not be deserialized here: {e!r}")
    if tb and isinstance(exc, BaseException):
        where = f" in {context}" if context else ""
        try:
            exc.add_note(f"\nTraceback of the remote error{where}:\n{tb.rstrip()}")
        except Exception:  # noqa: BLE001 - exotic exception types may refuse attributes
            pass
    return exc


def dumps_callable(obj: Any) -> bytes:
    """Serialize a deployment's class or function: by import path when it can be imported, else by value.

    By reference, replicas import the user's module themselves, so tracebacks show real file names
    and module-level state is set up as the author expects. Code from `__main__`, a notebook or a
    function body cannot be imported elsewhere, so it travels by value.
    """
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if module and module != "__main__" and "<locals>" not in qualname:
        target: Any = sys.modules.get(module)
        for part in qualname.split("."):
            target = getattr(target, part, None)
        if target is obj or getattr(target, "func_or_class", None) is obj:
            # By value too, in case the replica cannot import the module after all.
            return cloudpickle.dumps(("import", module, qualname, _by_value(obj)), PROTOCOL)
    return cloudpickle.dumps(("value", _by_value(obj)), PROTOCOL)


def _by_value(obj: Any) -> bytes:
    module = getattr(obj, "__module__", None)
    mod = sys.modules.get(module) if module and module != "__main__" else None
    if mod is None:
        return cloudpickle.dumps(obj, PROTOCOL)
    cloudpickle.register_pickle_by_value(mod)
    try:
        return cloudpickle.dumps(obj, PROTOCOL)
    finally:
        cloudpickle.unregister_pickle_by_value(mod)


def loads_callable(data: bytes) -> Any:
    """Inverse of `dumps_callable`; unwraps a `Deployment` found at the import path."""
    kind, *rest = pickle.loads(data)
    if kind == "value":
        return pickle.loads(rest[0])
    import importlib

    module, qualname, by_value = rest
    try:
        target: Any = importlib.import_module(module)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError):
        return pickle.loads(by_value)
    return getattr(target, "func_or_class", target)

