"""The declarative config file (Ray Serve's schema, so a Ray Serve config deploys on shoal unchanged).

    schema = load_config_file("config.yaml")          # ServeDeploySchema, or ConfigError
    for app_schema, app in build_applications(schema):  # import, call builders, apply overrides
        serve.run(app, name=app_schema.name, route_prefix=app_schema.route_prefix)

Deployment options are not redefined here: `DeploymentSchema` is generated from
`shoal.config.DeploymentConfig`, and the HTTP and logging sections reuse `HTTPOptions` and
`LoggingConfig`. Every deployment option in the file is optional; only the keys written in the file
override the code (config over code over defaults), read through `model_fields_set`.

Fields only Ray can honour (`runtime_env`, `grpc_options` servicers, `accelerator_type`, ...) are
accepted and reported as `ConfigWarning`s; unknown fields at the top level, in an application and in
`http_options` / `grpc_options` are tolerated with a warning (forward compatibility, as in Ray);
an unknown field inside a deployment is an error. Errors name the field path and the reason,
one line each, prefixed with the file name: `config.yaml: applications[1].deployments[0].max_ongoing_requests:
Input should be greater than 0 (got -1)`.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import re
import sys
import typing
import warnings
from enum import Enum
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PrivateAttr, ValidationError
from pydantic import create_model, field_validator, model_validator

from shoal.common import SERVE_DEFAULT_APP_NAME
from shoal.config import AutoscalingConfig, DeploymentConfig, HTTPOptions, LoggingConfig, ProxyLocation, RayActorOptions
from shoal.deployment import _DEPLOYMENT_OPTIONS, Application, Deployment, deployment_names
from shoal.import_path import ImportPathError, describe_error, split_import_path
from shoal.import_path import import_attribute as _import_attribute

__all__ = [
    "BUILD_HEADER", "ConfigError", "ConfigWarning", "DeploymentSchema", "GRPCOptionsSchema", "HTTPOptionsSchema",
    "RayActorOptionsSchema", "ServeApplicationSchema", "ServeDeploySchema", "build_application",
    "build_applications", "build_config", "call_app_builder", "format_validation_errors", "import_attribute",
    "load_config_file", "parse_config", "to_yaml",
]

BUILD_HEADER = "# This file was generated using the `shoal build` command."
DEFAULT_GRPC_PORT = 9000


# ----------------------------------------------------------------------------------------------
# Errors and warnings

class ConfigError(ValueError):
    """An invalid config: one problem per line, `[source: ]path: reason`."""

    def __init__(self, problems: Union[str, Sequence[str]], source: Optional[str] = None):
        self.problems: List[str] = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


class ConfigWarning(UserWarning):
    """A field that is accepted but has no effect on shoal (or is unknown and ignored)."""


_NOTHING = object()


class _FieldError(ValueError):
    """Raised inside a validator to point at a field below the validated model (pydantic would
    report the model itself); `format_validation_errors` appends `path` to the error's location."""

    def __init__(self, path: Tuple[Union[str, int], ...], reason: str, got: Any = _NOTHING):
        super().__init__(reason)
        self.path = path
        self.reason = reason
        self.got = got


def _format_loc(loc: Sequence[Union[str, int]]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out


# The location segment pydantic adds for each member of a Union (`int`, `literal['A','B']`, ...).
_UNION_TAG = re.compile(r"^(int|float|str|bool|bytes|none|dict|list|[a-z][a-z_-]*\[.*\])$")
_MEMBER_WORDS = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
                 "float_type": "a number", "float_parsing": "a number", "string_type": "a string",
                 "bool_type": "a boolean", "bool_parsing": "a boolean", "dict_type": "a mapping",
                 "list_type": "a list"}


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, Enum))


def _unwrap(annotation: Any) -> Any:
    if typing.get_origin(annotation) is Union:
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if models:
            return models[0]
        if len(members) == 1:
            return _unwrap(members[0])
    return annotation


def _model_at(root: Any, loc: Sequence[Union[str, int]]) -> Optional[type]:
    """The pydantic model that the location `loc` (inside `root`) points into, if any."""
    annotation = root
    for part in loc:
        annotation = _unwrap(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            field = annotation.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            annotation = field.annotation
        elif typing.get_origin(annotation) in (list, List) and isinstance(part, int):
            annotation = typing.get_args(annotation)[0]
        elif typing.get_origin(annotation) in (dict, Dict):
            annotation = typing.get_args(annotation)[1]
        else:
            return None
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def format_validation_errors(err: ValidationError, model: Any = None,
                             prefix: Tuple[Union[str, int], ...] = ()) -> List[str]:
    """One `path: reason (got value)` line per problem. `model` (the validated class) lets an unknown
    field's message list the allowed ones; `prefix` is put in front of every path."""
    items: List[list] = []
    for e in err.errors(include_url=False):
        loc, msg, kind = tuple(e["loc"]), e["msg"], e["type"]
        got = e.get("input", _NOTHING)
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldError):
            loc, msg, got = loc + cause.path, cause.reason, cause.got
        else:
            msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if kind == "extra_forbidden":
            owner = _model_at(model, loc[:-1]) if model is not None else None
            allowed = f" (allowed: {', '.join(owner.model_fields)})" if owner is not None else ""
            msg, got = f"unknown field{allowed}", _NOTHING
        elif kind == "missing" or not _scalar(got):
            got = _NOTHING
        items.append([loc, msg, got, kind, e.get("ctx") or {}])

    # Errors of the members of one Union (`log_level: 5.5` fails as int and as each literal) become one.
    merged: List[list] = []
    groups: Dict[tuple, list] = {}
    for item in items:
        loc = item[0]
        if loc and isinstance(loc[-1], str) and _UNION_TAG.match(loc[-1]) and \
                sum(1 for other in items if other[0][:-1] == loc[:-1]) > 1:
            key = loc[:-1]
            if key not in groups:
                groups[key] = [key, [], item[2], "union", {}]
                merged.append(groups[key])
            kind, ctx = item[3], item[4]
            word = ctx["expected"] if "expected" in ctx else _MEMBER_WORDS.get(kind, item[1].removeprefix(
                "Input should be "))
            groups[key][1].append(word)
        else:
            merged.append(item)
    lines = []
    for loc, msg, got, kind, _ in merged:
        if kind == "union":
            msg = "Input should be " + " or ".join(dict.fromkeys(msg))
        line = f"{_format_loc(prefix + tuple(loc)) or '(top level)'}: {msg.rstrip('.')}"
        if got is not _NOTHING:
            line += f" (got {got.value if isinstance(got, Enum) else got!r})"
        if line not in lines:
            lines.append(line)
    return lines


def _validate(model: type, data: Any, source: Optional[str] = None,
              prefix: Tuple[Union[str, int], ...] = ()) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_errors(e, model, prefix), source) from None


# ----------------------------------------------------------------------------------------------
# The models

class _SchemaModel(BaseModel):
    """Base of the config models: collects `ConfigWarning` texts (`path: reason`) in `config_warnings`."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    _warnings: List[str] = PrivateAttr(default_factory=list)

    @property
    def config_warnings(self) -> List[str]:
        """What in this config is ignored, one `path: reason` per entry (paths relative to this model)."""
        return list(self._warnings)

    def _take_extras(self, what: str) -> None:
        _take_extras(self, what)


def _take_extras(model: Any, what: str) -> None:
    """With extra="allow": report unknown fields in `model._warnings`, then drop them (never dumped)."""
    extra = model.__pydantic_extra__ or {}
    for key in extra:
        model._warnings.append(f"{key}: unknown {what} field, ignored")
    if extra:
        model.__pydantic_fields_set__ -= set(extra)
        model.__pydantic_extra__ = {}


class RayActorOptionsSchema(RayActorOptions):
    """`ray_actor_options` as Ray's config accepts them; `object_store_memory` is accepted and ignored."""

    object_store_memory: Optional[NonNegativeFloat] = None


_NUM_REPLICAS_REASON = 'must be an integer >= 1 or "auto"'


class _DeploymentSchemaBase(_SchemaModel):
    @model_validator(mode="before")
    @classmethod
    def _check_num_replicas(cls, data: Any) -> Any:
        if isinstance(data, dict) and "num_replicas" in data:
            n = data["num_replicas"]
            if not (n is None or n == "auto" or (isinstance(n, int) and not isinstance(n, bool) and n >= 1)):
                raise _FieldError(("num_replicas",), _NUM_REPLICAS_REASON, n if _scalar(n) else _NOTHING)
        return data

    @model_validator(mode="after")
    def _check_combinations(self) -> "_DeploymentSchemaBase":
        if not self.name:
            raise _FieldError(("name",), "deployment names must not be empty", self.name)
        set_ = self.model_fields_set
        n = getattr(self, "num_replicas")
        if "num_replicas" in set_ and isinstance(n, int) and getattr(self, "autoscaling_config") is not None:
            raise _FieldError(("num_replicas",), "Manually setting num_replicas is not allowed when "
                              "autoscaling_config is provided (remove one of them)", n)
        if "max_queued_requests" in set_:
            q = getattr(self, "max_queued_requests")
            if q != -1 and q < 1:
                raise _FieldError(("max_queued_requests",), "must be -1 (no limit) or an integer >= 1", q)
        if getattr(self, "max_replicas_per_node") is not None and getattr(self, "placement_group_bundles") is not None:
            raise _FieldError(("max_replicas_per_node",), "Setting max_replicas_per_node is not allowed when "
                              "placement_group_bundles is provided", getattr(self, "max_replicas_per_node"))
        if "ray_actor_options" in set_:
            ray = getattr(self, "ray_actor_options")
            for key, why in (("runtime_env", "shoal runs replicas in the current Python environment"),
                             ("accelerator_type", "shoal does not place replicas by accelerator type"),
                             ("object_store_memory", "shoal has no object store")):
                if getattr(ray, key):
                    self._warnings.append(f"ray_actor_options.{key}: ignored ({why})")
        return self

    def is_autoscaling_configured(self) -> bool:
        return getattr(self, "num_replicas") == "auto" or getattr(self, "autoscaling_config") is not None

    def overrides(self) -> Dict[str, Any]:
        """The options this entry sets, ready for `Deployment.options(**overrides)` (name excluded)."""
        data = self.model_dump(exclude_unset=True)
        data.pop("name", None)
        if "num_replicas" in data and data["num_replicas"] is None:
            del data["num_replicas"]  # null: "use the default" (the code's value), as in Ray
        if isinstance(data.get("ray_actor_options"), dict):
            data["ray_actor_options"].pop("object_store_memory", None)
        return data


def _deployment_schema_fields() -> Dict[str, Any]:
    """`name` plus every deployment option, copied from DeploymentConfig (constraints and defaults
    included), except the two whose shape in the file differs: num_replicas (also "auto") and
    ray_actor_options (also Ray-only keys)."""
    fields: Dict[str, Any] = {"name": (str, Field(..., description="Name of a deployment of the application."))}
    for option in _DEPLOYMENT_OPTIONS:
        if option == "num_replicas":
            fields[option] = (Optional[Union[int, Literal["auto"]]], Field(
                DeploymentConfig.model_fields[option].default,
                description='Number of replicas, or "auto" for the default autoscaling config.'))
        elif option == "ray_actor_options":
            fields[option] = (RayActorOptionsSchema, Field(default_factory=RayActorOptionsSchema))
        else:
            info = DeploymentConfig.model_fields[option]
            fields[option] = (info.annotation, copy.copy(info))
    return fields


DeploymentSchema = create_model(  # type: ignore[call-overload]
    "DeploymentSchema", __base__=_DeploymentSchemaBase, __module__=__name__, **_deployment_schema_fields())
DeploymentSchema.__doc__ = (
    "Options of one deployment of an application, overriding the code: only the keys written in the "
    "file override (see `overrides()`). Field definitions come from `shoal.config.DeploymentConfig`.")


class HTTPOptionsSchema(HTTPOptions):
    """`http_options`: shoal's `HTTPOptions` plus Ray's other `ssl_*` keys; unknown keys are tolerated."""

    model_config = ConfigDict(extra="allow")
    ssl_keyfile_password: Optional[str] = None
    ssl_ca_certs: Optional[str] = None
    _warnings: List[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _report(self) -> "HTTPOptionsSchema":
        _take_extras(self, "http_options")
        for key in ("ssl_keyfile_password", "ssl_ca_certs"):
            if getattr(self, key) is not None:
                self._warnings.append(f"{key}: not supported by shoal, ignored")
        return self

    def to_http_options(self) -> Dict[str, Any]:
        """The keys set in the file that `serve.start(http_options=...)` takes."""
        return {k: v for k, v in self.model_dump(exclude_unset=True).items() if k in HTTPOptions.model_fields}


class GRPCOptionsSchema(_SchemaModel):
    """`grpc_options`: accepted so Ray configs load; shoal serves no gRPC."""

    model_config = ConfigDict(extra="allow")
    port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535)
    grpc_servicer_functions: List[str] = Field(default_factory=list)
    request_timeout_s: Optional[PositiveFloat] = None

    @model_validator(mode="after")
    def _report(self) -> "GRPCOptionsSchema":
        self._take_extras("grpc_options")
        if self.grpc_servicer_functions:
            self._warnings.append("grpc_servicer_functions: shoal does not serve gRPC; grpc_options are ignored")
        return self


def _strip_invalid(message: str) -> str:
    """`Invalid route_prefix 'x': it must ...` -> `it must ...` (the path and value are printed anyway)."""
    return message.split(": ", 1)[1] if message.startswith("Invalid ") and ": " in message else message


class ServeApplicationSchema(_SchemaModel):
    """One application: what to import, its arguments, its route, and per-deployment overrides."""

    model_config = ConfigDict(extra="allow")
    name: str = SERVE_DEFAULT_APP_NAME
    route_prefix: Optional[str] = "/"
    import_path: str
    runtime_env: Dict[str, Any] = Field(default_factory=dict)
    args: Dict[str, Any] = Field(default_factory=dict)
    logging_config: Optional[LoggingConfig] = None
    external_scaler_enabled: bool = False
    # Application-level autoscaling policy ({"policy_function": ..., "policy_kwargs": {...}}): one policy
    # decides for every autoscaling deployment of the application (their own policies are not used).
    autoscaling_policy: Optional[Dict[str, Any]] = None

    @field_validator("autoscaling_policy", mode="before")
    @classmethod
    def _policy_to_dict(cls, v: Any) -> Any:
        from shoal.config import AutoscalingPolicy

        return v.model_dump() if isinstance(v, AutoscalingPolicy) else v
    deployments: List[DeploymentSchema] = Field(default_factory=list)  # type: ignore[valid-type]

    @model_validator(mode="before")
    @classmethod
    def _check_host_port(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("host", "port"):
                if key in data:
                    raise _FieldError((key,), f"{key} can only be set for all applications, in the top-level "
                                      f"http_options; remove it from the application",
                                      data[key] if _scalar(data[key]) else _NOTHING)
            data = dict(data)
            for key in ("runtime_env", "args", "deployments"):
                if key in data and data[key] is None:
                    data[key] = [] if key == "deployments" else {}
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not v:
            raise ValueError("application names must not be empty")
        return v

    @field_validator("route_prefix")
    @classmethod
    def _check_route_prefix(cls, v: Optional[str]) -> Optional[str]:
        from shoal.api import _validate_route_prefix

        try:
            _validate_route_prefix(v)
        except ValueError as e:
            raise ValueError(_strip_invalid(str(e))) from None
        return v

    @field_validator("import_path")
    @classmethod
    def _check_import_path(cls, v: str) -> str:
        try:
            split_import_path(v)
        except ImportPathError as e:
            raise ValueError(_strip_invalid(str(e))) from None
        return v

    @model_validator(mode="after")
    def _check_deployments(self) -> "ServeApplicationSchema":
        seen: Dict[str, int] = {}
        for i, d in enumerate(self.deployments):
            if d.name in seen:
                raise _FieldError(("deployments", i, "name"),
                                  f"deployment listed twice (also deployments[{seen[d.name]}])", d.name)
            seen[d.name] = i
            if self.external_scaler_enabled and d.is_autoscaling_configured():
                field = "autoscaling_config" if d.autoscaling_config is not None else "num_replicas"
                raise _FieldError(("deployments", i, field), "autoscaling is not allowed when "
                                  "external_scaler_enabled is true (an external scaler sets num_replicas)")
        self._take_extras("application")
        if self.runtime_env:
            self._warnings.append("runtime_env: ignored (shoal runs replicas in the current Python environment)")
        if self.autoscaling_policy is not None:
            from shoal.config import AutoscalingPolicy

            try:
                AutoscalingPolicy.model_validate(self.autoscaling_policy)
            except ValidationError as e:
                first = e.errors()[0]
                field = tuple(first["loc"]) or ("policy_function",)
                raise _FieldError(("autoscaling_policy",) + field, first["msg"].removeprefix("Value error, "),
                                  first.get("input") if _scalar(first.get("input")) else _NOTHING) from None
        for i, d in enumerate(self.deployments):
            self._warnings.extend(f"deployments[{i}].{w}" for w in d.config_warnings)
        return self


class ServeDeploySchema(_SchemaModel):
    """A whole config file (`serve deploy` / `serve run config.yaml` / the REST PUT body)."""

    model_config = ConfigDict(extra="allow")
    proxy_location: ProxyLocation = ProxyLocation.EveryNode
    http_options: HTTPOptionsSchema = Field(default_factory=HTTPOptionsSchema)
    grpc_options: GRPCOptionsSchema = Field(default_factory=GRPCOptionsSchema)
    logging_config: Optional[LoggingConfig] = None
    target_capacity: Optional[float] = Field(None, ge=0, le=100)
    applications: List[ServeApplicationSchema]

    @model_validator(mode="before")
    @classmethod
    def _check_format(cls, data: Any) -> Any:
        if isinstance(data, dict) and "import_path" in data and "applications" not in data:
            raise _FieldError(("import_path",), "this is the old single-application format; list the "
                              "application under `applications:` instead")
        return data

    @model_validator(mode="after")
    def _check_applications(self) -> "ServeDeploySchema":
        names: Dict[str, int] = {}
        routes: Dict[str, int] = {}
        for i, app in enumerate(self.applications):
            if app.name in names:
                raise _FieldError(("applications", i, "name"), f"application name already used by "
                                  f"applications[{names[app.name]}]", app.name)
            names[app.name] = i
            if app.route_prefix is not None:
                if app.route_prefix in routes:
                    j = routes[app.route_prefix]
                    raise _FieldError(("applications", i, "route_prefix"), f"route prefix already used by "
                                      f"applications[{j}] ('{self.applications[j].name}')", app.route_prefix)
                routes[app.route_prefix] = i
        self._take_extras("top-level")
        self._warnings.extend(f"http_options.{w}" for w in self.http_options._warnings)
        self._warnings.extend(f"grpc_options.{w}" for w in self.grpc_options._warnings)
        for i, app in enumerate(self.applications):
            self._warnings.extend(f"applications[{i}].{w}" for w in app.config_warnings)
        return self


# ----------------------------------------------------------------------------------------------
# Loading

class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that rejects a key written twice in one mapping (PyYAML keeps the last)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Dict[Any, Any]:
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _emit_warnings(schema: _SchemaModel, source: Optional[str]) -> None:
    prefix = f"{source}: " if source else ""
    for w in schema.config_warnings:
        warnings.warn(prefix + w, ConfigWarning, stacklevel=3)


def parse_config(data: Any, source: Optional[str] = None) -> ServeDeploySchema:
    """Validate a config already parsed (a dict from YAML or a JSON request body).

    Raises `ConfigError` (each line `[source: ]path: reason`); emits one `ConfigWarning` per ignored
    field (also kept in the result's `config_warnings`)."""
    schema = _validate(ServeDeploySchema, data, source)
    _emit_warnings(schema, source)
    return schema


def load_config_file(path: Union[str, os.PathLike]) -> ServeDeploySchema:
    """Read and validate a YAML config file; every error line starts with the file's name."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the config file: {e.strerror or e}", source) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None)
        if mark is None or problem is None:
            raise ConfigError(f"invalid YAML: {' '.join(str(e).split())}", source) from None
        context = getattr(e, "context", None)
        raise ConfigError(f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
                          + (f" ({context})" if context else ""), source) from None
    if data is None:
        raise ConfigError("the file is empty; expected a mapping with `applications:`", source)
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping with `applications:`, not a {type(data).__name__}",
                          source)
    return parse_config(data, source)


# ----------------------------------------------------------------------------------------------
# Building applications from a config

def import_attribute(import_path: str, base_dir: Optional[Union[str, os.PathLike]] = None) -> Any:
    """Import `module:attr` / `module.attr` (attr may be dotted), as `shoal run` does; `base_dir` goes
    first on `sys.path`. Failures become `ConfigError`s."""
    try:
        return _import_attribute(import_path, None if base_dir is None else os.fspath(base_dir))
    except ImportPathError as e:
        raise ConfigError(str(e)) from None


def _builder_model(builder: Any, param: inspect.Parameter) -> Optional[type]:
    """The pydantic model the builder's first parameter is annotated with, if any."""
    annotation = param.annotation
    try:
        annotation = typing.get_type_hints(builder).get(param.name, annotation)
    except Exception:  # noqa: BLE001 - unresolvable annotations: use what is there
        pass
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def call_app_builder(target: Any, args: Optional[Dict[str, Any]], import_path: str) -> Application:
    """Turn what an import path names into an Application, as Ray does.

    An Application is used as is and a Deployment is bound with no arguments (`args` must be empty
    then). A function is a builder: with no parameters it is called with none; otherwise it gets
    `args` as its one argument, first validated into the parameter's pydantic model when it is
    annotated with one (errors name `args.<field>`).
    """
    args = dict(args or {})
    if isinstance(target, (Application, Deployment)):
        if args:
            what = "an Application" if isinstance(target, Application) else "a Deployment"
            raise ConfigError(f"args: '{import_path}' is {what}, not a builder function, so it takes no args")
        if isinstance(target, Application):
            return target
        try:
            return target.bind()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"Could not bind deployment '{import_path}': {describe_error(e)}") from None
    if isinstance(target, type):
        raise ConfigError(f"'{import_path}' is a class, not an application: decorate it with @serve.deployment "
                          f"and point at `{target.__name__}.bind()` (or at the deployment itself).")
    if not callable(target):
        raise ConfigError(f"'{import_path}' is a {type(target).__name__}, not an application: expected an "
                          "Application (from Deployment.bind()), a Deployment, or a builder function.")
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    required_after = [p for p in positional[1:] if p.default is p.empty and p.kind != p.VAR_POSITIONAL]
    if required_after:
        raise ConfigError(f"The application builder '{import_path}' must take one argument (the args), but it "
                          f"also requires {', '.join(p.name for p in required_after)}.")
    call_args: tuple = ()
    if positional:
        value: Any = args
        model = _builder_model(target, positional[0])
        if model is not None:
            value = _validate(model, args, prefix=("args",))
        call_args = (value,)
    elif args:
        raise ConfigError(f"args: the application builder '{import_path}' takes no arguments, but args were "
                          f"given ({', '.join(args)})")
    try:
        built = target(*call_args)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"The application builder '{import_path}' failed: {describe_error(e)}") from None
    if not isinstance(built, Application):
        raise ConfigError(f"The application builder '{import_path}' returned {type(built).__name__}, not an "
                          "Application (from Deployment.bind()).")
    return built


def _replace_nested(value: Any, convert: Any) -> Any:
    """`value` with every Application inside lists, tuples and dicts passed through `convert`;
    the same object when nothing changed."""
    if isinstance(value, Application):
        return convert(value)
    if isinstance(value, (list, tuple)):
        items = [_replace_nested(v, convert) for v in value]
        if all(a is b for a, b in zip(items, value)):
            return value
        return type(value)(items) if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        new = {k: _replace_nested(v, convert) for k, v in value.items()}
        return value if all(new[k] is value[k] for k in value) else new
    return value


def graph_deployments(app: Application) -> List[Deployment]:
    """Every bound deployment of the graph, the ingress first (each once), under the name it deploys
    under (a deployment bound twice is `Model` and `Model_1`)."""
    found: List[Deployment] = []
    seen: set = set()
    names = deployment_names(app, warn=False)

    def visit(node: Application) -> Application:
        if id(node) not in seen:
            seen.add(id(node))
            d = node.deployment
            found.append(d if names[id(node)] == d.name else d.options(name=names[id(node)]))
            _replace_nested(node.deployment.init_args, visit)
            _replace_nested(node.deployment.init_kwargs, visit)
        return node

    visit(app)
    return found


def apply_overrides(app: Application, app_schema: ServeApplicationSchema) -> Application:
    """A copy of the graph with the config's deployment options applied (config over code over
    defaults; only keys set in the file), and the app's logging_config given to the deployments
    that set none. The original graph is left unchanged."""
    final_names = deployment_names(app, warn=False)  # a deployment bound twice: `Model`, `Model_1`, as in Ray
    names = [d.name for d in graph_deployments(app)]
    overrides: Dict[str, Tuple[int, Dict[str, Any]]] = {}
    for i, d in enumerate(app_schema.deployments):
        if d.name not in names:
            raise ConfigError(f"deployments[{i}].name: deployment '{d.name}' is not in the application "
                              f"(its deployments: {', '.join(repr(n) for n in dict.fromkeys(names))})")
        overrides[d.name] = (i, d.overrides())
    app_logging = (app_schema.logging_config.model_dump(exclude_unset=True)
                   if app_schema.logging_config is not None else None)
    memo: Dict[int, Application] = {}

    def convert(node: Application) -> Application:
        if id(node) in memo:
            return memo[id(node)]
        d = node.deployment
        args = _replace_nested(d.init_args, convert)
        kwargs = _replace_nested(d.init_kwargs, convert)
        index, options = overrides.get(final_names[id(node)], (None, {}))
        options = dict(options)
        if isinstance(options.get("num_replicas"), int) and "autoscaling_config" not in options \
                and d.config.autoscaling_config is not None:
            options["autoscaling_config"] = None  # a fixed count in the file replaces the code's autoscaling
        if app_logging is not None and "logging_config" not in options and d.config.logging_config is None:
            options["logging_config"] = app_logging
        if not options and args is d.init_args and kwargs is d.init_kwargs:
            memo[id(node)] = node
            return node
        try:
            new = d.options(_init_args=tuple(args), _init_kwargs=dict(kwargs), **options)
        except (TypeError, ValueError) as e:
            where = f"deployments[{index}]" if index is not None else "logging_config"
            raise ConfigError(f"{where} ({d.name}): {e}") from None
        memo[id(node)] = Application(new)
        return memo[id(node)]

    return convert(app)


def build_application(app_schema: Union[ServeApplicationSchema, Dict[str, Any]],
                      base_dir: Optional[Union[str, os.PathLike]] = None,
                      on_step: Optional[Callable[[str], None]] = None) -> Application:
    """Import the app's import_path, call its builder with `args`, apply the deployment overrides.
    `on_step("import")` / `on_step("build")` is called before importing / calling a builder function.

    Raises `ConfigError` whose lines start with `application '<name>': `."""
    if not isinstance(app_schema, ServeApplicationSchema):
        app_schema = _validate(ServeApplicationSchema, app_schema)
    try:
        if on_step is not None:
            on_step("import")
        target = import_attribute(app_schema.import_path, base_dir)
        if on_step is not None and callable(target) and not isinstance(target, (Application, Deployment, type)):
            on_step("build")
        app = call_app_builder(target, app_schema.args, app_schema.import_path)
        return apply_overrides(app, app_schema)
    except ConfigError as e:
        raise ConfigError([f"application '{app_schema.name}': {p}" for p in e.problems]) from None


def build_applications(schema: ServeDeploySchema, base_dir: Optional[Union[str, os.PathLike]] = None,
                       source: Optional[str] = None, on_step: Optional[Callable[[int, str], None]] = None
                       ) -> List[Tuple[ServeApplicationSchema, Application]]:
    """`build_application` for every application of a config, in order (errors prefixed with `source`;
    `on_step(index, step)` as `build_application`'s)."""
    built = []
    for i, app_schema in enumerate(schema.applications):
        step = None if on_step is None else functools.partial(on_step, i)
        try:
            built.append((app_schema, build_application(app_schema, base_dir, step)))
        except ConfigError as e:
            raise ConfigError([_config_path(i, p) for p in e.problems], source) from None
    return built


def _config_path(index: int, problem: str) -> str:
    """`application 'a': args.x: reason` -> `applications[0].args.x: reason`; a problem with no field
    of its own (an import or a builder that failed) belongs to `applications[0].import_path`."""
    problem = re.sub(r"^application '[^']*': ", "", problem)
    if re.match(r"^(args|deployments\[\d+\]|logging_config)\b", problem):
        return f"applications[{index}].{problem}"
    return f"applications[{index}].import_path: {problem}"


# ----------------------------------------------------------------------------------------------
# `shoal build`: from Applications to a config

def _dump_option(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    if isinstance(value, Enum):
        return value.value
    return value


def deployment_options_from_code(d: Deployment) -> Dict[str, Any]:
    """The options a deployment's code sets explicitly, as a `deployments:` entry of the config."""
    entry: Dict[str, Any] = {"name": d.name}
    configured = d._user_configured
    config = d.config
    auto = "num_replicas" in configured and config.num_replicas is None and config.autoscaling_config is not None
    for option in _DEPLOYMENT_OPTIONS:
        if option not in configured:
            continue
        if auto and option == "num_replicas":
            # `num_replicas: auto` plus the autoscaling keys that differ from what "auto" means:
            # loading it back merges them over the same defaults, giving the same config.
            entry["num_replicas"] = "auto"
            defaults = AutoscalingConfig.default().model_dump(mode="json")
            actual = config.autoscaling_config.model_dump(mode="json")  # type: ignore[union-attr]
            diff = {k: v for k, v in actual.items() if defaults.get(k) != v}
            if diff:
                entry["autoscaling_config"] = diff
        elif auto and option == "autoscaling_config":
            continue
        else:
            entry[option] = _dump_option(getattr(config, option))
    return entry


def build_config(apps: Sequence[Application], import_paths: Sequence[str]) -> ServeDeploySchema:
    """The config `shoal build` writes: apps `app1`, `app2`, ... at `/` (one app) or `/app1`, ...
    (several), each deployment with the options its code sets explicitly."""
    if len(apps) != len(import_paths):
        raise ValueError(f"build_config needs one import path per application ({len(apps)} applications, "
                         f"{len(import_paths)} import paths).")
    entries = []
    for i, (app, import_path) in enumerate(zip(apps, import_paths)):
        if not isinstance(app, Application):
            raise TypeError(f"build_config takes Applications (from Deployment.bind()), got {type(app).__name__} "
                            f"for '{import_path}'.")
        name = f"app{i + 1}"
        entries.append({
            "name": name,
            "route_prefix": "/" if len(apps) == 1 else f"/{name}",
            "import_path": import_path,
            "runtime_env": {},
            "deployments": [deployment_options_from_code(d) for d in graph_deployments(app)],
        })
    defaults = HTTPOptions()
    data = {
        "proxy_location": ProxyLocation.EveryNode.value,
        "http_options": {"host": defaults.host, "port": defaults.port},
        "logging_config": LoggingConfig().model_dump(mode="json"),
        "applications": entries,
    }
    return parse_config(data)


def to_yaml(schema: ServeDeploySchema) -> str:
    """The config as YAML (only the fields that are set), with the `shoal build` header."""
    data = schema.model_dump(mode="json", exclude_unset=True)
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    return f"{BUILD_HEADER}\n\n{body}"
