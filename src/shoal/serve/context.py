"""`shoal.serve.context`, as `ray.serve.context`: what a replica knows about itself."""

from shoal.serve._reexport import reexport

__all__ = reexport(globals(), {
    "shoal.context": ["ReplicaContext", "ReplicaRank"],
})
