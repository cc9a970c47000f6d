"""`shoal.serve.config`, as `ray.serve.config`: the option models of `serve.start`, deployments and
autoscaling."""

from shoal.serve._reexport import reexport

__all__ = reexport(globals(), {
    "shoal.config": ["AutoscalingConfig", "AutoscalingPolicy", "AutoscalingContext", "AggregationFunction",
                     "RequestRouterConfig", "BackpressureConfig", "ProxyLocation", "HTTPOptions", "gRPCOptions",
                     "ControllerOptions",
                     # shoal's own, also here for code that imported them from `shoal.config`
                     "DeploymentConfig", "LoggingConfig"],
    "shoal.autoscaling_policy": ["AutoscalingContext", "AutoscalingPolicy", "AggregationFunction"],
})
