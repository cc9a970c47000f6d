"""`from shoal import serve`: Ray Serve's public names with Ray Serve's semantics."""

from shoal.api import (
    delete,
    get_app_handle,
    get_deployment_handle,
    run,
    shutdown,
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
    "metrics", "multiplexed", "run",
    "shutdown", "start", "status",
]
