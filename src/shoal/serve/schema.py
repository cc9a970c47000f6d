"""`shoal.serve.schema`, as `ray.serve.schema`: the config-file models, `LoggingConfig`, and the
status types `serve.status()` returns."""

from shoal.serve._reexport import reexport

__all__ = reexport(globals(), {
    "shoal.schema": ["ServeDeploySchema", "ServeApplicationSchema", "DeploymentSchema", "HTTPOptionsSchema",
                     ("gRPCOptionsSchema", "GRPCOptionsSchema"), "RayActorOptionsSchema", "EncodingType",
                     "TracingConfig", "LoggingConfig"],
    "shoal.config": ["LoggingConfig", "EncodingType"],
    "shoal.status": ["ApplicationStatus", "ProxyStatus", "DeploymentStatus", "DeploymentStatusTrigger", "ReplicaState",
                     "DeploymentStatusOverview", "ApplicationStatusOverview", "ServeStatus"],
    "shoal.context": ["ReplicaRank"],
})
