"""`shoal.serve.autoscaling_policy`, as `ray.serve.autoscaling_policy`: the default policy, and what a
custom one receives."""

from shoal.serve._reexport import reexport

__all__ = reexport(globals(), {
    "shoal.autoscaling_policy": ["default_autoscaling_policy", "replica_queue_length_autoscaling_policy",
                                 "AutoscalingContext", "AutoscalingConfig"],
    "shoal.config": ["AutoscalingContext", "AutoscalingConfig"],
})
