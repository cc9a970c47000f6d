"""`shoal.serve.exceptions`, as `ray.serve.exceptions`: what shoal raises (Ray's names)."""

from shoal.serve._reexport import reexport

__all__ = reexport(globals(), {
    "shoal.exceptions": ["RayServeException", "BackPressureError", "RequestCancelledError",
                         "DeploymentUnavailableError", "ReplicaUnavailableError", "gRPCStatusError",
                         # shoal's own
                         "ReplicaDiedError", "ActorDiedError", "ReplicaOutOfMemoryError", "DeployFailedError",
                         "RemoteError"],
})
