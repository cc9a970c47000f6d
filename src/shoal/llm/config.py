"""`LLMConfig` and `LLMServingArgs`: what one served model is, as typed models (Ray Serve LLM's shape).

A config written for `ray.serve.llm` loads here unchanged: vLLM-only choices (`llm_engine="vLLM"`,
`accelerator_type`, `runtime_env`, ...) are accepted and reported as ignored, never silently
dropped, and unknown keys are rejected with the field named (``extra="forbid"``).
"""

from __future__ import annotations

import logging
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .api_keys import ApiKeyConfig, load_api_keys

logger = logging.getLogger(__name__)

#: Deployment options an LLM deployment gets unless its `deployment_config` says otherwise. The engine
#: batches and queues by itself, so the replica admits many requests (Ray Serve LLM uses 1e9).
LLM_DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 256,
    "health_check_period_s": 10.0,
    "health_check_timeout_s": 10.0,
    "graceful_shutdown_timeout_s": 20.0,
    # A model that fails to load (missing files, out of memory) rarely loads on the 20th try.
    "max_constructor_retry_count": 3,
}
#: Engine choices; "auto" picks by the model's files (sentence-transformers -> embeddings, .gguf on
#: CPU -> llama_cpp, else transformers). `engine_kwargs={"engine": ...}` may name one too.
EngineName = Literal["auto", "llama_cpp", "transformers", "sentence-transformers"]
_FOREIGN_ENGINES = {"vllm", "sglang"}
#: Keys of `deployment_config` that the LLM layer owns (Ray Serve LLM forbids them there too).
_FORBIDDEN_DEPLOYMENT_KEYS = ("placement_group_bundles", "placement_group_strategy", "name")


class ModelLoadingConfig(BaseModel):
    """Which model to serve: `model_id` is the name clients send, `model_source` where weights are."""

    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(min_length=1)
    model_source: Optional[str] = None

    @property
    def source(self) -> str:
        return self.model_source or self.model_id


class LoraConfig(BaseModel):
    """LoRA adapters served through model multiplexing (Ray Serve LLM's `LoraConfig`): a request for
    model ``"<base>:<adapter>"`` runs the base model with the adapter found at
    ``<dynamic_lora_loading_path>/<adapter>`` (a directory holding one GGUF LoRA file, or that
    file with a ``.gguf`` suffix), loaded on first use and kept in a per-replica LRU cache of
    `max_num_adapters_per_replica`. Requests for an adapter go to replicas that already hold it."""

    model_config = ConfigDict(extra="forbid")

    dynamic_lora_loading_path: str = Field(min_length=1)
    max_num_adapters_per_replica: int = Field(16, ge=1)
    # Ray's download settings: accepted; adapters are read from a local directory here.
    download_timeout_s: Optional[float] = None
    max_download_tries: Optional[int] = None

    @field_validator("dynamic_lora_loading_path")
    @classmethod
    def _local_directory(cls, value: str) -> str:
        if "://" in value:
            raise ValueError(f"must be a local directory (got {value!r}): shoal loads adapters from this "
                             "machine's files, never over the network")
        return str(Path(value).expanduser())


class LLMConfig(BaseModel):
    """One served model: its files, its engine options and its deployment options."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_loading_config: ModelLoadingConfig
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    llm_engine: str = "auto"
    deployment_config: dict[str, Any] = Field(default_factory=dict)
    # Accepted so Ray Serve LLM configs load; they have no effect here (a warning says so).
    accelerator_type: Optional[str] = None
    runtime_env: Optional[dict[str, Any]] = None
    placement_group_config: Optional[dict[str, Any]] = None
    log_engine_metrics: bool = False
    lora_config: Optional[LoraConfig] = None
    experimental_configs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("llm_engine")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        allowed = typing.get_args(EngineName)
        if value in allowed:
            return value
        if value.lower() in _FOREIGN_ENGINES:
            logger.warning("llm_engine=%r is not available in shoal; using its transformers engine", value)
            return "auto"
        raise ValueError(f"llm_engine must be one of {', '.join(allowed)} (got {value!r})")

    @field_validator("deployment_config")
    @classmethod
    def _check_deployment_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in _FORBIDDEN_DEPLOYMENT_KEYS:
            if key in value:
                raise ValueError(f"deployment_config may not set {key!r}; the LLM layer sets it")
        from shoal.deployment import _check_option_names

        try:
            _check_option_names(value)  # a wrong name is reported with the allowed ones
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _warn_ignored(self) -> "LLMConfig":
        for name in ("accelerator_type", "runtime_env", "placement_group_config"):
            if getattr(self, name) is not None:
                logger.warning("LLMConfig.%s is accepted for Ray Serve compatibility and ignored", name)
        return self

    @property
    def model_id(self) -> str:
        return self.model_loading_config.model_id

    def deployment_name(self, prefix: str = "LLMServer:") -> str:
        """Ray Serve LLM's naming: prefix + model id with ``/`` -> ``--`` and ``.`` -> ``_``."""
        return prefix + self.model_id.replace("/", "--").replace(".", "_")

    def deployment_options(self, prefix: str = "LLMServer:") -> dict[str, Any]:
        """Options for this model's `LLMServer` deployment: defaults, then `deployment_config`."""
        options = dict(LLM_DEPLOYMENT_DEFAULTS)
        options.update(self.deployment_config)
        options["name"] = self.deployment_name(prefix)
        return options


class LLMServingArgs(BaseModel):
    """Arguments of `build_openai_app`: the models, options for the ingress deployment, and the API
    keys every `/v1/*` request must carry (none: the API is open). See `api_keys.py`."""

    # Errors name the field and the reason but do not echo the input: it may hold an API key.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    llm_configs: list[Union[LLMConfig, str, dict[str, Any]]] = Field(min_length=1)
    ingress_deployment_config: dict[str, Any] = Field(default_factory=dict)
    api_keys: list[Union[ApiKeyConfig, str, dict[str, Any]]] = Field(default_factory=list)

    @field_validator("api_keys")
    @classmethod
    def _load_keys(cls, value: list[Any]) -> list[ApiKeyConfig]:
        return load_api_keys(value)

    @field_validator("llm_configs")
    @classmethod
    def _load_each(cls, value: list[Any]) -> list[LLMConfig]:
        configs = [load_llm_config(item) for item in value]
        seen: set[str] = set()
        for config in configs:
            if config.model_id in seen:
                raise ValueError(f"model id {config.model_id!r} appears twice in llm_configs")
            seen.add(config.model_id)
        return configs

    def configs(self) -> list[LLMConfig]:
        return list(self.llm_configs)  # type: ignore[arg-type] - `_load_each` made each an LLMConfig

    def keys(self) -> list[ApiKeyConfig]:
        return list(self.api_keys)  # type: ignore[arg-type] - `_load_keys` made each an ApiKeyConfig


def load_llm_config(item: Union[LLMConfig, str, Path, dict[str, Any]]) -> LLMConfig:
    """An `LLMConfig` from itself, a dict, or a YAML file's path (as Ray Serve LLM accepts)."""
    if isinstance(item, LLMConfig):
        return item
    if isinstance(item, (str, Path)):
        import yaml

        path = Path(item)
        if not path.is_file():
            raise ValueError(f"llm config file {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"llm config file {str(path)!r} must hold a mapping")
        return LLMConfig.model_validate(data)
    return LLMConfig.model_validate(item)
