"""shoal: Ray Serve's programming model, faster and lighter.

`from shoal import serve` mirrors `from ray import serve`; the same names are also available here.
They load on first use: shoal's own processes (controller, proxies, replicas) import `shoal.*`
modules and should not pay for the whole public API at start-up.
"""

from typing import Any

__version__ = "0.1.0"

# `shoal.serve.__all__`, here so that asking for any other name (a submodule being imported with
# `from shoal import client`) never loads the public API (tests/test_ray_parity_surface.py checks it).
_PUBLIC = frozenset({
    "Application", "ApplicationStatus", "AutoscalingConfig", "BackPressureError", "Deployment",
    "DeploymentConfig", "DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator",
    "DeploymentStatus", "DeploymentStatusTrigger", "DeploymentUnavailableError", "HTTPOptions", "LoggingConfig",
    "ProxyStatus", "RayServeException", "ReplicaContext", "ReplicaDiedError", "ReplicaState",
    "RequestCancelledError", "RequestRouterConfig", "RunTarget", "ServeStatus", "_run", "_run_many", "batch",
    "delete", "deployment", "get_app_handle", "get_deployment_handle", "get_multiplexed_model_id",
    "get_replica_context", "ingress", "metrics", "multiplexed", "run", "run_many", "shutdown", "shutdown_async", "start",
    "status",
})


def __getattr__(name: str) -> Any:
    if name != "serve" and name != "__all__" and name not in _PUBLIC:
        raise AttributeError(f"module 'shoal' has no attribute '{name}'")
    import importlib

    serve = importlib.import_module("shoal.serve")  # binds the public names here (see its end)
    if name == "serve":
        return serve
    if name == "__all__":
        return ["serve", *serve.__all__]
    return getattr(serve, name)
