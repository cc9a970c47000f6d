"""Every user-facing option as a typed pydantic model: one source of truth for code, YAML and docs.

Validation errors are turned into `ValueError`s that name the option, the value given and
what is allowed, so a wrong option fails at decoration time rather than inside a replica.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, List, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PrivateAttr, ValidationError,
                      field_serializer, field_validator, model_validator)

from shoal.common import DeploymentID, ReplicaID  # DeploymentID: Ray's `ray.serve.config` exports it too

DEFAULT_MAX_ONGOING_REQUESTS = 5
DEFAULT_TARGET_ONGOING_REQUESTS = 2.0
MAX_REPLICAS_PER_NODE_MAX_VALUE = 100


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, arbitrary_types_allowed=True)


DEFAULT_AUTOSCALING_POLICY_NAME = "ray.serve.autoscaling_policy:default_autoscaling_policy"
# Names of the default policy: Ray's public paths and shoal's own (the default policy is shoal's).
DEFAULT_AUTOSCALING_POLICY_NAMES = frozenset(
    f"{module}{sep}{name}"
    for module in ("ray.serve.autoscaling_policy", "shoal.autoscaling_policy")
    for sep in (":", ".")
    for name in ("default_autoscaling_policy", "replica_queue_length_autoscaling_policy"))


def _import_attr(path: str) -> Any:
    """`module:attr` or `module.attr` (Ray accepts both)."""
    import importlib

    module, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    if not module or not name:
        raise ValueError(f"'{path}' is not an import path of the form 'module:name'.")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def pickle_by_value(obj: Any) -> bytes:
    """cloudpickle `obj` with its module's code inside (as Ray does for policies), so the process that
    unpickles it (the controller) needs only the modules that module imports, not the module itself."""
    import cloudpickle

    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    name = getattr(module, "__name__", "")
    register = (module is not None and name != "__main__" and name.split(".")[0] != "shoal"
                and name not in cloudpickle.list_registry_pickle_by_value())
    if register:
        try:
            cloudpickle.register_pickle_by_value(module)
        except ValueError:
            register = False
    try:
        return cloudpickle.dumps(obj)
    finally:
        if register:
            cloudpickle.unregister_pickle_by_value(module)


def _callable_path(fn: Any) -> str:
    """`module.QualName`, the form Ray gives a policy passed as a function or class."""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


class AutoscalingPolicy(_Strict):
    """Which policy decides a deployment's (or, in a config file, an application's) replica count.

    `policy_function` is an import path (`module:function`, `module:Class`) or the function or class
    itself; a class is instantiated once with `policy_kwargs` and then called like a function:
    `policy(ctx) -> (replicas, policy_state)`. The policy runs in the controller, which gets it
    pickled by value: its module need not be importable there (the modules it imports must be).
    """

    policy_function: Union[str, Callable] = DEFAULT_AUTOSCALING_POLICY_NAME
    policy_kwargs: Dict[str, Any] = Field(default_factory=dict)
    _serialized_policy_def: bytes = PrivateAttr(default=b"")

    @field_validator("policy_function")
    @classmethod
    def _check_function(cls, v: Any) -> Any:
        if isinstance(v, str):
            module, _, name = v.partition(":") if ":" in v else v.rpartition(".")
            if not module or not name:
                raise ValueError(f"policy_function '{v}' must be an import path of the form 'module:function' "
                                 "(or a function or class).")
        elif not callable(v):
            raise ValueError("policy_function must be an import path, a function or a class.")
        return v

    @field_serializer("policy_function", when_used="json")
    def _function_as_path(self, v: Any) -> str:
        """In a config file (`shoal build`), a function or class is written as its import path."""
        return v if isinstance(v, str) else _callable_path(v)

    @field_validator("policy_kwargs")
    @classmethod
    def _check_kwargs(cls, v: Dict[str, Any]) -> Dict[str, Any]:
        try:
            json.dumps(v)
        except (TypeError, ValueError) as e:
            raise ValueError(f"policy_kwargs is not JSON-serializable: {e}.") from None
        return v

    def __eq__(self, other: Any) -> bool:
        return (isinstance(other, AutoscalingPolicy) and self.policy_function == other.policy_function
                and self.policy_kwargs == other.policy_kwargs)

    def __hash__(self) -> int:
        return hash((self.policy_function, json.dumps(self.policy_kwargs, sort_keys=True, default=str)))

    def is_default_policy_function(self) -> bool:
        return isinstance(self.policy_function, str) and self.policy_function in DEFAULT_AUTOSCALING_POLICY_NAMES

    def get_serialized_policy_def(self) -> bytes:
        return self._serialized_policy_def

    def prepared(self) -> "AutoscalingPolicy":
        """A copy ready for the controller: the policy pickled by value, `policy_function` its path.

        Imports the policy (a string path) here, in the process that deploys, where the user's
        modules are importable; raises a `ValueError` naming the path when it cannot."""
        if self.is_default_policy_function() or self._serialized_policy_def:
            return self
        fn = self.policy_function
        if isinstance(fn, str):
            try:
                fn = _import_attr(fn)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"autoscaling policy_function '{self.policy_function}' could not be imported: "
                                 f"{type(e).__name__}: {e}") from None
            if not callable(fn):
                raise ValueError(f"autoscaling policy_function '{self.policy_function}' is not callable.")
            path = self.policy_function
        else:
            path = _callable_path(fn)
        try:
            data = pickle_by_value(fn)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"autoscaling policy_function '{path}' could not be serialized: {e}") from None
        copy = AutoscalingPolicy.model_construct(policy_function=path, policy_kwargs=dict(self.policy_kwargs))
        copy._serialized_policy_def = data
        return copy

    def get_policy(self) -> Callable:
        """The function or class itself (in the controller: unpickled, else imported by path)."""
        if self._serialized_policy_def:
            import cloudpickle

            return cloudpickle.loads(self._serialized_policy_def)
        if callable(self.policy_function):
            return self.policy_function
        return _import_attr(self.policy_function)


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
    # None: shoal's default policy (`shoal.autoscaling_policy.default_autoscaling_policy`).
    policy: Optional[AutoscalingPolicy] = None

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

    def get_target_ongoing_requests(self) -> float:
        return self.target_ongoing_requests

    def get_policy(self) -> AutoscalingPolicy:
        return self.policy if self.policy is not None else AutoscalingPolicy()


@dataclass(order=True)
class TimeStampedValue:
    """One sample of a custom metric (`record_autoscaling_stats`), as in Ray."""

    timestamp: float
    value: float = field(compare=False)


TimeSeries = List[TimeStampedValue]

_UNSET: Any = object()


class AutoscalingContext:
    """What a policy knows when it decides (Ray Serve's fields; values may be given lazily as callables).

    `total_num_requests` and `total_queued_requests` are aggregated over `look_back_period_s` with the
    deployment's `aggregation_function`; `current_num_requests` (shoal's) is the newest sample.
    `aggregated_metrics` / `raw_metrics` hold the custom metrics replicas report from
    `record_autoscaling_stats()`: `{metric: {ReplicaID: value}}` / `{metric: {ReplicaID: [TimeStampedValue]}}`.
    `current_time`, `last_scale_up_time` and `last_scale_down_time` are `time.time()` seconds.
    """

    def __init__(
        self,
        deployment_id: Optional[DeploymentID] = None,
        deployment_name: str = "",
        app_name: Optional[str] = None,
        current_num_replicas: int = 0,
        target_num_replicas: int = 0,
        running_replicas: Optional[List[ReplicaID]] = None,
        total_num_requests: Union[float, Callable[[], float]] = 0.0,
        total_queued_requests: Optional[Union[float, Callable[[], float]]] = 0.0,
        aggregated_metrics: Any = None,
        raw_metrics: Any = None,
        capacity_adjusted_min_replicas: int = 0,
        capacity_adjusted_max_replicas: int = 0,
        policy_state: Optional[Dict[str, Any]] = None,
        last_scale_up_time: Optional[float] = None,
        last_scale_down_time: Optional[float] = None,
        current_time: Optional[float] = None,
        config: Optional["AutoscalingConfig"] = None,
        current_num_requests: Any = _UNSET,
    ):
        if deployment_id is None:
            deployment_id = DeploymentID(deployment_name, app_name or "default")
        self.deployment_id = deployment_id
        self.deployment_name = deployment_name or deployment_id.name
        self.app_name = app_name if app_name is not None else deployment_id.app_name
        self.current_num_replicas = current_num_replicas
        self.target_num_replicas = target_num_replicas
        self.running_replicas = list(running_replicas or [])
        self._lazy: Dict[str, Any] = {
            "total_num_requests": total_num_requests,
            "total_queued_requests": total_queued_requests,
            "aggregated_metrics": aggregated_metrics,
            "raw_metrics": raw_metrics,
            "current_num_requests": total_num_requests if current_num_requests is _UNSET else current_num_requests,
        }
        self.capacity_adjusted_min_replicas = capacity_adjusted_min_replicas
        self.capacity_adjusted_max_replicas = capacity_adjusted_max_replicas
        self.policy_state = policy_state if policy_state is not None else {}
        self.last_scale_up_time = last_scale_up_time
        self.last_scale_down_time = last_scale_down_time
        self.current_time = time.time() if current_time is None else current_time
        self.config = config if config is not None else AutoscalingConfig()

    def _get(self, name: str) -> Any:
        value = self._lazy[name]
        if callable(value):
            value = self._lazy[name] = value()
        return value

    total_num_requests = property(lambda self: self._get("total_num_requests"))
    total_queued_requests = property(lambda self: self._get("total_queued_requests") or 0.0)
    current_num_requests = property(lambda self: self._get("current_num_requests"))
    aggregated_metrics = property(lambda self: self._get("aggregated_metrics") or {})
    raw_metrics = property(lambda self: self._get("raw_metrics") or {})

    @property
    def total_running_requests(self) -> float:
        return max(0.0, self.total_num_requests - self.total_queued_requests)

    def __repr__(self) -> str:
        return (f"AutoscalingContext(deployment={self.deployment_id}, current_num_replicas={self.current_num_replicas}, "
                f"target_num_replicas={self.target_num_replicas}, total_num_requests={self.total_num_requests})")


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
    # Retry backoff of Ray-style routers (`shoal.request_router.RequestRouter`) when no replica they
    # ranked has room; a router also retries at once when room frees up.
    initial_backoff_s: PositiveFloat = 0.025
    backoff_multiplier: PositiveFloat = 2.0
    max_backoff_s: PositiveFloat = 0.5

    @field_validator("request_router_class", mode="before")
    @classmethod
    def _class_to_path(cls, v: Any) -> Any:
        """A class is accepted as in Ray, and kept as its import path (`module:QualName`)."""
        if isinstance(v, type):
            return f"{v.__module__}:{v.__qualname__}"
        return v


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
