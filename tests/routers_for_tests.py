"""Router policies used by the routing tests (importable by replicas and callers alike)."""

from shoal.router.base import RequestRouter


class LowestIdRouter(RequestRouter):
    """Always the replica with the smallest id that has room: makes routing observable."""

    def initialize_state(self, note: str = "") -> None:
        self.note = note

    def choose_replica(self, candidates, request):
        free = [c for c in candidates if c.has_capacity()]
        return min(free, key=lambda c: c.replica_id.unique_id) if free else None


def two_replicas_policy(ctx):
    """A custom autoscaling policy: always two replicas."""
    return 2, {}


# --- Ray's interface (shoal.request_router), as Ray's documentation writes routers ----------------

from typing import List, Optional  # noqa: E402

from shoal.request_router import (  # noqa: E402
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    RequestRouter as RayRequestRouter,
    RunningReplica,
)

# What the Ray-style routers below saw, per process (the tests read the driver's).
EVENTS: list = []


class LowestIdRayRouter(RayRequestRouter):
    """Ray-style: always rank the replica with the smallest id first, one rank per replica."""

    def initialize_state(self, tag: str = "") -> None:
        self.tag = tag

    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        return [[r] for r in ordered]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        EVENTS.append(("routed", self.tag, pending_request.metadata.request_id, replica_id.unique_id))

    def on_request_completed(self, replica_id, internal_request_id) -> None:
        EVENTS.append(("completed", self.tag, internal_request_id, replica_id.unique_id))


class RaisingRayRouter(RayRequestRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        raise ValueError(f"no replica for {pending_request.metadata.request_id}")


class RaisingShoalRouter(RequestRouter):
    def choose_replica(self, candidates, request):
        raise LookupError("shoal-style router failed")


class ModelAffinityRayRouter(FIFOMixin, MultiplexMixin, LocalityMixin, RayRequestRouter):
    """The shape of Ray's documented ThroughputAwareRequestRouter: model holders, then locality."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        ranks = [candidate_replicas]
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            ranks = self.rank_replicas_via_multiplex(
                replicas=candidate_replicas, multiplexed_model_id=pending_request.metadata.multiplexed_model_id)
        out = []
        for rank in ranks:
            out.extend(r for r in self.rank_replicas_via_locality(rank) if r)
        return out


class ScaleTo:
    """A class-based autoscaling policy: `replicas` from policy_kwargs; counts its calls in its state."""

    def __init__(self, replicas: int):
        self.replicas = replicas

    def __call__(self, ctx):
        calls = ctx.policy_state.get("calls", 0) + 1
        return self.replicas, {"calls": calls}


def by_queue_depth_metric(ctx):
    """One replica per unit of the deepest `queue_depth` a replica reports (record_autoscaling_stats)."""
    import math

    from shoal.config import TimeStampedValue

    for series in ctx.raw_metrics.get("queue_depth", {}).values():
        assert series and all(isinstance(p, TimeStampedValue) for p in series)
    depth = max(ctx.aggregated_metrics.get("queue_depth", {}).values(), default=0.0)
    return max(1, math.ceil(depth - 0.01)), {}


def always_fails(ctx):
    raise RuntimeError("this policy always fails")


class BadKwargsRayRouter(RayRequestRouter):
    def initialize_state(self, **kwargs) -> None:
        raise RuntimeError(f"unexpected request_router_kwargs {sorted(kwargs)}")

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [candidate_replicas]
