"""The public, pluggable replica-choice interface (`request_router_config.request_router_class`).

(Ray Serve's own interface, `RequestRouter` with an async `choose_replicas`, is in
`shoal.request_router`; this synchronous one is shoal's faster path.)

A router policy decides, for one request, which replica gets it. It is called on the caller's
event loop on every request, so it must be quick and must not block. Subclass `RequestRouter`,
override `choose_replica`, and name the class in the deployment's `request_router_config`:

    @serve.deployment(request_router_config={
        "request_router_class": "my_pkg.routing:MyRouter",
        "request_router_kwargs": {"threshold": 4},
    })

Candidates are `ReplicaView`s: `replica_id`, `queue_len` (requests this caller has in flight
there), `max_ongoing_requests`, `has_capacity()`, `multiplexed_model_ids`, `node_id`. The request
exposes `method_name`, `args`, `kwargs`, `multiplexed_model_id`, `request_id`, `session_id` and
`queued_for_s` (how long it has waited in this caller's queue).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence


class ReplicaView(Protocol):
    replica_id: Any
    queue_len: int
    max_ongoing_requests: int
    multiplexed_model_ids: frozenset
    node_id: str

    def has_capacity(self) -> bool: ...


class RequestRouter:
    """Base class of router policies. Return None from `choose_replica` to keep the request queued."""

    def __init__(self, **kwargs: Any) -> None:
        self.initialize_state(**kwargs)

    def initialize_state(self, **kwargs: Any) -> None:
        """Receives `request_router_kwargs`."""
        if kwargs:
            raise TypeError(f"{type(self).__name__} takes no request_router_kwargs, got {sorted(kwargs)}.")

    def choose_replica(self, candidates: Sequence[ReplicaView], request: Any) -> Optional[ReplicaView]:
        raise NotImplementedError

    def on_request_routed(self, request: Any, replica: ReplicaView) -> None:
        """Called after a request was sent to `replica`."""

    def update_replicas(self, replicas: Sequence[ReplicaView]) -> None:
        """Called when the set of replicas changes."""


def load_router_class(path: str) -> type:
    """Import `module:Class` (or `module.Class`); Ray's default path maps to shoal's."""
    import importlib

    aliases = {
        "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter": "shoal.router.pow2:PowerOfTwoChoicesRequestRouter",
        "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter": "shoal.router.pow2:PowerOfTwoChoicesRequestRouter",
    }
    path = aliases.get(path, path)
    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    cls: Any = importlib.import_module(module)
    for part in name.split("."):
        cls = getattr(cls, part)
    if isinstance(cls, type) and issubclass(cls, RequestRouter):
        return cls
    from shoal.request_router import RequestRouter as RayStyleRequestRouter

    if isinstance(cls, type) and issubclass(cls, RayStyleRequestRouter):
        return cls
    raise TypeError(f"request_router_class '{path}' is not a subclass of shoal.router.RequestRouter or "
                    "shoal.request_router.RequestRouter (Ray's interface).")
