"""`shoal.serve.request_router`, as `ray.serve.request_router`: what a custom request router builds on."""

from shoal.serve._reexport import reexport

__all__ = reexport(globals(), {
    "shoal.request_router": ["RequestRouter", "FIFOMixin", "LocalityMixin", "MultiplexMixin", "PendingRequest",
                             "RunningReplica", "ReplicaID", "ReplicaResult"],
    "shoal.common": ["ReplicaID"],
})
