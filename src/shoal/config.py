"""Every user-facing option as a typed pydantic model: one source of truth for code, YAML and docs.

Validation errors are turned into `ValueError`s that name the option, the value given and
what is allowed, so a wrong option fails at decoration time rather than inside a replica.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, ValidationError, model_validator

DEFAULT_MAX_ONGOING_REQUESTS = 5
DEFAULT_TARGET_ONGOING_REQUESTS = 2.0
MAX_REPLICAS_PER_NODE_MAX_VALUE = 100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


class AutoscalingConfig(_Strict):
    """How a deployment follows its load (Ray Serve's keys and defaults)."""

    min_replicas: int = Field(1, ge=0)
    initial_replicas: Optional[int] = Field(None, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: PositiveFloat = DEFAULT_TARGET_ONGOING_REQUESTS
    metrics_interval_s: PositiveFloat = 10.0
    look_back_period_s: PositiveFloat = 30.0
    smoothing_factor: PositiveFloat = 1.0
    upscale_smoothing_factor: Optional[PositiveFloat] = None
    downscale_smoothing_factor: Optional[PositiveFloat] = None
    upscaling_factor: Optional[PositiveFloat] = None
    downscaling_factor: Optional[PositiveFloat] = None
    upscale_delay_s: NonNegativeFloat = 30.0
    downscale_delay_s: NonNegativeFloat = 600.0
    downscale_to_zero_delay_s: Optional[NonNegativeFloat] = None
    aggregation_function: Literal["mean", "max", "min"] = "mean"
    policy: Optional[Dict[str, Any]] = None

    @model_validator(mode="before")
    @classmethod
    def _accept_old_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and "target_num_ongoing_requests_per_replica" in data:
            data = dict(data)
            old = data.pop("target_num_ongoing_requests_per_replica")
            data.setdefault("target_ongoing_requests", old)
        return data

    @model_validator(mode="after")
    def _check_bounds(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be less than or equal to max_replicas ({self.max_replicas})."
            )
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError(
                f"initial_replicas ({self.initial_replicas}) must be between min_replicas ({self.min_replicas}) "
                f"and max_replicas ({self.max_replicas})."
            )
        return self

    @classmethod
    def default(cls) -> "AutoscalingConfig":
        """What `num_replicas="auto"` means."""
        return cls(target_ongoing_requests=2, min_replicas=1, max_replicas=100)

    def get_upscaling_factor(self) -> float:
        return self.upscaling_factor or self.upscale_smoothing_factor or self.smoothing_factor

    def get_downscaling_factor(self) -> float:
        return self.downscaling_factor or self.downscale_smoothing_factor or self.smoothing_factor


class RayActorOptions(_Strict):
    """Resources one replica reserves; the name is Ray's so configs port unchanged."""

    num_cpus: Optional[NonNegativeFloat] = None
    num_gpus: Optional[NonNegativeFloat] = None
    memory: Optional[NonNegativeFloat] = None
    resources: Dict[str, NonNegativeFloat] = Field(default_factory=dict)
    accelerator_type: Optional[str] = None
    runtime_env: Optional[Dict[str, Any]] = None

    @model_validator(mode="after")
    def _check_gpus(self) -> "RayActorOptions":
        if self.num_gpus is not None and self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"num_gpus above 1 must be a whole number, got {self.num_gpus}.")
        return self


class LoggingConfig(_Strict):
    encoding: Literal["TEXT", "JSON"] = "TEXT"
    log_level: Union[int, Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]] = "INFO"
    logs_dir: Optional[str] = None
    enable_access_log: bool = True
    additional_log_standard_attrs: List[str] = Field(default_factory=list)


class RequestRouterConfig(_Strict):
    request_router_class: str = "shoal.router.pow2:PowerOfTwoChoicesRequestRouter"
    request_router_kwargs: Dict[str, Any] = Field(default_factory=dict)
    request_routing_stats_period_s: PositiveFloat = 10.0
    request_routing_stats_timeout_s: PositiveFloat = 30.0


class BackpressureConfig(_Strict):
    status_code: Literal[429, 503] = 503
    retry_after_s: Optional[NonNegativeFloat] = None


class ReplicaRank(BaseModel):
    """Where a replica stands among its deployment's replicas (`serve.get_replica_context().rank`).

    `rank` is 0 .. N-1 across the deployment, `node_rank` numbers the nodes its replicas run on,
    `local_rank` numbers its replicas on one node. Ranks stay dense: a new replica takes the lowest
    free one, and once the deployment is steady, ranks left above the count are moved down.
    """

    model_config = ConfigDict(frozen=True)

    rank: int = Field(description="Global rank of the replica across all nodes scoped to the deployment.")
    node_rank: int = Field(description="Rank of the node in the deployment.")
    local_rank: int = Field(description="Rank of the replica on the node scoped to the deployment.")


PlacementGroupStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class DeploymentConfig(_Strict):
    """Options of `@serve.deployment` that shape how replicas run (Ray Serve's section 1.1)."""

    num_replicas: Optional[int] = Field(1, ge=1)
    max_ongoing_requests: int = Field(DEFAULT_MAX_ONGOING_REQUESTS, gt=0)
    max_queued_requests: int = -1
    user_config: Any = None
    autoscaling_config: Optional[AutoscalingConfig] = None
    graceful_shutdown_wait_loop_s: NonNegativeFloat = 2.0
    graceful_shutdown_timeout_s: NonNegativeFloat = 20.0
    health_check_period_s: PositiveFloat = 10.0
    health_check_timeout_s: PositiveFloat = 30.0
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    placement_group_bundles: Optional[List[Dict[str, NonNegativeFloat]]] = None
    placement_group_strategy: Optional[PlacementGroupStrategy] = None
    max_replicas_per_node: Optional[int] = Field(None, ge=1, le=MAX_REPLICAS_PER_NODE_MAX_VALUE)
    logging_config: Optional[LoggingConfig] = None
    request_router_config: RequestRouterConfig = Field(default_factory=RequestRouterConfig)
    backpressure_config: BackpressureConfig = Field(default_factory=BackpressureConfig)
    max_constructor_retry_count: int = Field(20, ge=1)
    version: Optional[str] = None

    @model_validator(mode="after")
    def _check_combinations(self) -> "DeploymentConfig":
        if self.max_queued_requests != -1 and self.max_queued_requests < 1:
            raise ValueError("max_queued_requests must be -1 (no limit) or an integer >= 1.")
        if self.user_config is not None:
            try:
                json.dumps(self.user_config)
            except (TypeError, ValueError) as e:
                raise ValueError(f"user_config must be JSON-serializable: {e}") from None
        if self.placement_group_bundles is not None and not self.placement_group_bundles:
            raise ValueError("placement_group_bundles must be a non-empty list of resource dicts.")
        if self.placement_group_strategy is not None and self.placement_group_bundles is None:
            raise ValueError("placement_group_strategy is only allowed together with placement_group_bundles.")
        if self.placement_group_bundles is not None and self.max_replicas_per_node is not None:
            raise ValueError("Setting max_replicas_per_node is not allowed when placement_group_bundles is provided.")
        return self


class HTTPOptions(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    root_path: str = ""
    request_timeout_s: Optional[PositiveFloat] = None
    keep_alive_timeout_s: PositiveFloat = 90.0
    request_header_timeout_s: PositiveFloat = Field(30.0, description=(
        "Seconds a client has to send a request's head (request line and headers): from the connection's "
        "start for its first request, from the first byte of the next request on a keep-alive connection "
        "(idle time before that is `keep_alive_timeout_s`'s). A client still sending its head then gets 408 "
        "and is disconnected; one that sent nothing is disconnected. Not a Ray Serve option."))
    max_request_body_bytes: int = Field(100 * 1024 * 1024, ge=0)
    num_proxies: int = Field(1, ge=1)
    ssl_keyfile: Optional[str] = None
    ssl_certfile: Optional[str] = None


class ProxyLocation(str, Enum):
    Disabled = "Disabled"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"


# Option names that only the controller needs (no replica restart, no reconfigure).
LIGHTWEIGHT_OPTIONS = {"num_replicas", "max_queued_requests", "graceful_shutdown_timeout_s",
                       "health_check_period_s", "health_check_timeout_s", "backpressure_config",
                       "max_constructor_retry_count", "request_router_config"}
# Options applied to running replicas in place via reconfigure.
RECONFIGURE_OPTIONS = {"user_config", "max_ongoing_requests", "graceful_shutdown_wait_loop_s",
                       "autoscaling_config", "logging_config"}


def format_validation_error(err: ValidationError, what: str) -> str:
    """One readable line per problem: `option=value: reason`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or what
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown option '{loc}'")
        else:
            lines.append(f"{loc}={e.get('input')!r}: {msg}")
    return f"Invalid {what}: " + "; ".join(lines)


def validate_model(model: type[BaseModel], data: dict, what: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, what)) from None
