"""`from shoal import serve`: Ray Serve's public names with Ray Serve's semantics.

A package, as `ray.serve` is: its modules `handle`, `config`, `schema`, `exceptions`, `context`,
`request_router`, `autoscaling_policy`, `multiplex` and `batching` hold the names of Ray's modules of
the same name (`from shoal.serve.config import AutoscalingContext`), taken from the shoal modules that
implement them (see `_reexport.py`).
"""

import starlette.requests  # noqa: F401 - Ray's `serve` loads it, and Ray code relies on `starlette.requests`

from shoal.api import (
    RunTarget,
    _run,
    _run_many,
    delete,
    get_app_handle,
    get_deployment_handle,
    run,
    run_many,
    shutdown,
    shutdown_async,
    start,
    status,
)
from shoal.config import AutoscalingConfig, DeploymentConfig, HTTPOptions, LoggingConfig, RequestRouterConfig
from shoal.context import ReplicaContext, get_multiplexed_model_id, get_replica_context
from shoal.deployment import Application, Deployment, deployment
from shoal.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaDiedError,
    RequestCancelledError,
)
from shoal.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from shoal.http.ingress import ingress
from shoal.batching import batch
from shoal.multiplex import multiplexed
from shoal import metrics  # `from shoal.serve import metrics`, as `from ray.serve import metrics`
from shoal.status import (
    ApplicationStatus,
    DeploymentStatus,
    DeploymentStatusTrigger,
    ProxyStatus,
    ReplicaState,
    ServeStatus,
)

__all__ = [
    "Application", "ApplicationStatus", "batch", "AutoscalingConfig", "BackPressureError", "Deployment",
    "DeploymentConfig", "DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator",
    "DeploymentStatus", "DeploymentStatusTrigger", "DeploymentUnavailableError", "HTTPOptions",
    "LoggingConfig", "ProxyStatus", "RayServeException", "ReplicaContext", "ReplicaDiedError",
    "ReplicaState", "RequestCancelledError", "RequestRouterConfig", "ServeStatus", "delete", "deployment",
    "get_app_handle", "get_deployment_handle", "get_multiplexed_model_id", "get_replica_context", "ingress",
    "metrics", "multiplexed", "run", "run_many", "RunTarget", "_run", "_run_many",
    "shutdown", "shutdown_async", "start", "status",
]

# The modules of `ray.serve`, reachable as attributes too (`serve.config.ProxyLocation`); imported last,
# and not in `__all__` (`from shoal.serve import *` must not bind `config` or `context` in the caller).
from shoal.serve import (  # noqa: E402
    autoscaling_policy,
    batching,
    config,
    context,
    exceptions,
    handle,
    multiplex,
    request_router,
    schema,
)


def _publish_on_the_package() -> None:
    """`import shoal; shoal.deployment(...)` works as `serve.deployment(...)`: the package's public
    names are this module's. Some share a name with a shoal module (`shoal.deployment`,
    `shoal.status`) that importing this module just bound on the package; rebind them here."""
    import shoal

    for name in __all__:
        setattr(shoal, name, globals()[name])


_publish_on_the_package()
