"""`shoal.serve.batching`, as `ray.serve.batching`: `@serve.batch`."""

from shoal.serve._reexport import reexport

__all__ = reexport(globals(), {
    "shoal.batching": ["batch"],
})
