"""`@serve.deployment`, `Deployment` and `Application`: the user-facing description of what to run.

Options are validated when the decorator runs, so a wrong option fails where it is written.
`Deployment.bind()` builds an `Application` graph; bound applications nested in constructor
arguments become `DeploymentHandle`s when the graph is deployed.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from typing import Any, Callable, Optional, Union

from shoal.config import AutoscalingConfig, DeploymentConfig, validate_model

logger = logging.getLogger("shoal")

_DEPLOYMENT_OPTIONS = (
    "num_replicas", "max_ongoing_requests", "max_queued_requests", "user_config", "autoscaling_config",
    "graceful_shutdown_wait_loop_s", "graceful_shutdown_timeout_s", "health_check_period_s",
    "health_check_timeout_s", "ray_actor_options", "placement_group_bundles", "placement_group_strategy",
    "max_replicas_per_node", "logging_config", "request_router_config", "backpressure_config",
    "max_constructor_retry_count", "version",
)
_ALL_OPTIONS = ("name",) + _DEPLOYMENT_OPTIONS


def _build_config(options: dict[str, Any], base: Optional[DeploymentConfig] = None) -> DeploymentConfig:
    """Merge explicitly passed options over `base`, applying Ray Serve's rules for num_replicas."""
    data = base.model_dump(exclude_unset=True) if base is not None else {}
    data.update(options)
    num_replicas = data.get("num_replicas")
    if isinstance(num_replicas, bool) or (num_replicas is not None and not isinstance(num_replicas, (int, str))):
        raise ValueError(f"Invalid deployment option num_replicas={num_replicas!r}: it must be an integer >= 1 or \"auto\".")
    if num_replicas == "auto":
        auto = AutoscalingConfig.default().model_dump()
        user = data.get("autoscaling_config") or {}
        if isinstance(user, AutoscalingConfig):
            user = user.model_dump(exclude_unset=True)
        auto.update(user)
        data["autoscaling_config"] = auto
        data["num_replicas"] = None
    elif isinstance(num_replicas, str):
        raise ValueError(f"Invalid deployment option num_replicas={num_replicas!r}: it must be an integer >= 1 or \"auto\".")
    elif "num_replicas" in options and options["num_replicas"] is not None and data.get("autoscaling_config") is not None:
        raise ValueError("Manually setting num_replicas is not allowed when autoscaling_config is provided.")
    elif data.get("autoscaling_config") is not None and "num_replicas" not in options:
        data["num_replicas"] = None
    if data.get("max_ongoing_requests", 1) is None:
        raise ValueError("Invalid deployment option max_ongoing_requests=None: it must be an integer > 0.")
    for key in ("autoscaling_config", "ray_actor_options", "logging_config", "request_router_config",
                "backpressure_config"):
        v = data.get(key)
        if hasattr(v, "model_dump"):
            data[key] = v.model_dump(exclude_unset=True)
    return validate_model(DeploymentConfig, data, "deployment option")  # type: ignore[return-value]


class Deployment:
    """A class or function with the options its replicas run with. Create with `@serve.deployment`."""

    def __init__(self, func_or_class: Any, name: str, config: DeploymentConfig, *,
                 init_args: tuple = (), init_kwargs: Optional[dict] = None,
                 user_configured: frozenset = frozenset(), _internal: bool = False):
        if not _internal:
            raise RuntimeError("Deployments are created with the @serve.deployment decorator, "
                               "not by calling Deployment() directly.")
        self._func_or_class = func_or_class
        self._name = name
        self._config = config
        self._init_args = init_args
        self._init_kwargs = init_kwargs or {}
        self._user_configured = user_configured

    # Read-only properties, as in Ray Serve.
    name = property(lambda self: self._name)
    func_or_class = property(lambda self: self._func_or_class)
    num_replicas = property(lambda self: self._config.num_replicas)
    user_config = property(lambda self: self._config.user_config)
    max_ongoing_requests = property(lambda self: self._config.max_ongoing_requests)
    max_queued_requests = property(lambda self: self._config.max_queued_requests)
    ray_actor_options = property(lambda self: self._config.ray_actor_options.model_dump(exclude_unset=True))
    init_args = property(lambda self: self._init_args)
    init_kwargs = property(lambda self: self._init_kwargs)
    logging_config = property(lambda self: self._config.logging_config)
    version = property(lambda self: self._config.version)

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"Deployment '{self._name}' cannot be called directly. Use `.bind()` to build an "
                           "application, then call it through the handle `serve.run` returns.")

    def options(self, *, _init_args: Optional[tuple] = None, _init_kwargs: Optional[dict] = None,
                **options: Any) -> "Deployment":
        """A copy with the given options changed; all other options keep their values."""
        _check_option_names(options)
        name = options.pop("name", self._name)
        if "route_prefix" in options:
            raise ValueError(_ROUTE_PREFIX_REMOVED)
        config = _build_config(options, self._config)
        return Deployment(self._func_or_class, _check_name(name), config,
                          init_args=self._init_args if _init_args is None else _init_args,
                          init_kwargs=self._init_kwargs if _init_kwargs is None else _init_kwargs,
                          user_configured=self._user_configured | frozenset(options), _internal=True)

    def bind(self, *args: Any, **kwargs: Any) -> "Application":
        """Bind constructor arguments; other bound applications among them become handles."""
        return Application(self.options(_init_args=args, _init_kwargs=kwargs))

    def __repr__(self) -> str:
        return f"Deployment(name={self._name})"


class Application:
    """A bound deployment graph, ready for `serve.run`."""

    def __init__(self, bound_deployment: Deployment):
        if not isinstance(bound_deployment, Deployment):
            raise TypeError("Application is created by Deployment.bind().")
        self._bound_deployment = bound_deployment

    @property
    def deployment(self) -> Deployment:
        return self._bound_deployment

    def __repr__(self) -> str:
        return f"Application(ingress={self._bound_deployment.name})"


def _bound_children(value: Any, out: list) -> list:
    """The applications bound in `value` (constructor arguments), in argument order."""
    if isinstance(value, Application):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _bound_children(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _bound_children(v, out)
    return out


def deployment_names(target: Application, warn: bool = True) -> dict[int, str]:
    """The name each bound application of the graph deploys under, by `id()` of the application.

    As in Ray Serve, a deployment bound more than once (two `.bind()` calls of the same deployment,
    or two deployments that share a name) is not an error: the graph is walked children first, in
    argument order, and a name already taken gets the first free suffix (`Model`, `Model_1`, ...).
    The same `Application` object used twice is one deployment."""
    names: dict[int, str] = {}
    taken: set[str] = set()

    def visit(app: Application) -> None:
        if id(app) in names:
            return
        d = app.deployment
        for child in _bound_children((d.init_args, d.init_kwargs), []):
            visit(child)
        if id(app) in names:
            return
        name, i = d.name, 1
        while name in taken:
            name = f"{d.name}_{i}"
            i += 1
        if name != d.name and warn:
            logger.warning("There are multiple deployments with the same name '%s'. Renaming one to '%s'.",
                           d.name, name)
        names[id(app)] = name
        taken.add(name)

    visit(target)
    return names


_ROUTE_PREFIX_REMOVED = ("`route_prefix` can no longer be specified at the deployment level. "
                         "Pass it to `serve.run` or in the application config instead.")


def _check_option_names(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(_ALL_OPTIONS) - {"route_prefix"})
    if unknown:
        raise TypeError(f"Unknown deployment option(s) {unknown}. Valid options: {sorted(_ALL_OPTIONS)}.")


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid deployment option name={name!r}: it must be a non-empty string.")
    if "#" in name:
        warnings.warn(f"Deployment names should not contain '#' ({name!r}); it is used as a separator.",
                      stacklevel=3)
    return name


def deployment(_func_or_class: Optional[Callable] = None, **options: Any) -> Union[Deployment, Callable]:
    """Turn a class or function into a deployment: `@serve.deployment` or `@serve.deployment(**options)`."""
    _check_option_names(options)
    if "route_prefix" in options:
        raise ValueError(_ROUTE_PREFIX_REMOVED)
    name = options.pop("name", None)
    config = _build_config(options)

    def decorator(func_or_class: Callable) -> Deployment:
        if not (inspect.isclass(func_or_class) or inspect.isfunction(func_or_class)):
            raise TypeError(f"@serve.deployment must decorate a class or a function, got {type(func_or_class).__name__}.")
        return Deployment(func_or_class, _check_name(name if name is not None else func_or_class.__name__),
                          config, user_configured=frozenset(options), _internal=True)

    return decorator(_func_or_class) if _func_or_class is not None else decorator
