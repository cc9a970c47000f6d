"""Where user code asks "which replica am I, which request is this?" (`serve.get_replica_context`)."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Optional

from shoal.common import ReplicaID
from shoal.config import ReplicaRank
from shoal.exceptions import RayServeException


@dataclass
class ReplicaContext:
    """`rank` is this replica's `ReplicaRank` (rank, node_rank, local_rank); `world_size` is the
    deployment's replica count (its target). Both are set before the constructor runs and follow
    scaling: a replica whose rank changes gets `reconfigure(user_config, rank=...)` when its
    `reconfigure` takes a `rank` argument (or a user_config is set), as in Ray Serve."""

    replica_id: ReplicaID
    servable_object: Any
    _deployment_config: Any = None
    rank: Optional[ReplicaRank] = None
    world_size: int = 1

    @property
    def app_name(self) -> str:
        return self.replica_id.deployment_id.app_name

    @property
    def deployment(self) -> str:
        return self.replica_id.deployment_id.name

    @property
    def replica_tag(self) -> str:
        return self.replica_id.unique_id


class RequestContext:
    """What user code may ask about the request it is serving (set once per request)."""

    __slots__ = ("request_id", "multiplexed_model_id", "app_name", "route")

    def __init__(self, request_id: str = "", multiplexed_model_id: str = "", app_name: str = "", route: str = ""):
        self.request_id = request_id
        self.multiplexed_model_id = multiplexed_model_id
        self.app_name = app_name
        self.route = route


_replica_context: Optional[ReplicaContext] = None
_request_context: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "shoal_request_context", default=RequestContext()
)
# Inside a `@serve.batch` function: the contexts of the requests in the batch being run, one per element
# of the argument lists (set by shoal.batching; None elsewhere). All of them ask for the same model.
_batch_request_context: contextvars.ContextVar[Optional[list]] = contextvars.ContextVar(
    "shoal_batch_request_context", default=None
)


def _set_replica_context(ctx: Optional[ReplicaContext]) -> None:
    global _replica_context
    _replica_context = ctx


def get_replica_context() -> ReplicaContext:
    """The context of the replica this code runs in; raises outside a replica."""
    if _replica_context is None:
        raise RayServeException(
            "`serve.get_replica_context()` may only be called from within a shoal deployment replica."
        )
    return _replica_context


def get_multiplexed_model_id() -> str:
    """The model id the current request asked for (`""` when none).

    Inside a `@serve.batch` function it is the id shared by every request of the batch (batches are
    split by model id), although the request context itself is empty there, as in Ray Serve.
    """
    batch = _batch_request_context.get()
    if batch:
        return batch[0].multiplexed_model_id
    return _request_context.get().multiplexed_model_id


def current_request_context() -> RequestContext:
    return _request_context.get()


def current_batch_request_contexts() -> list:
    """The request contexts of the batch being run (inside a `@serve.batch` function), else `[]`."""
    return list(_batch_request_context.get() or ())


# Ray Serve's (private) names in `ray.serve.context`, which ported code and tests use.
_RequestContext = RequestContext
_serve_request_context = _request_context
_serve_batch_request_context = _batch_request_context
_get_serve_request_context = current_request_context
_get_serve_batch_request_context = current_batch_request_contexts
