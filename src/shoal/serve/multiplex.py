"""`shoal.serve.multiplex`, as `ray.serve.multiplex`: model multiplexing in a replica."""

from shoal.serve._reexport import reexport

__all__ = reexport(globals(), {
    "shoal.multiplex": ["multiplexed"],
})
