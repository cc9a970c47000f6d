"""`shoal.serve.handle`, as `ray.serve.handle`: handles and the responses of their calls."""

from shoal.serve._reexport import reexport

__all__ = reexport(globals(), {
    "shoal.handle": ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator",
                     "DeploymentBroadcastResponse"],
})
