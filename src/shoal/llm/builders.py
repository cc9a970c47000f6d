"""Application builders: one model as a deployment, or many models behind one OpenAI API."""

from __future__ import annotations

from typing import Any, Union

from shoal.deployment import Application, deployment

from .api_keys import ingress_auth
from .config import LLMConfig, LLMServingArgs, load_llm_config
from .ingress import INGRESS_DEPLOYMENT_DEFAULTS, OpenAiIngress
from .server import LLMServer
from .standalone import standalone_app


def build_llm_deployment(
    llm_config: Union[LLMConfig, dict[str, Any], str], *, name_prefix: str = "LLMServer:"
) -> Application:
    """One `LLMServer` deployment for `llm_config`, bound and ready for `serve.run` or composition."""
    config = load_llm_config(llm_config)
    return deployment(LLMServer).options(**config.deployment_options(name_prefix)).bind(config.model_dump())


def build_openai_app(llm_serving_args: Union[LLMServingArgs, dict[str, Any], list[Any]]) -> Application:
    """The OpenAI-compatible app: an `OpenAiIngress` in front of one `LLMServer` per model, or for
    a single model without keys, LoRA or ingress options, one `StandaloneLLMServer` deployment
    (named like the `LLMServer` one) whose replicas serve the API themselves.

    Accepts `LLMServingArgs`, its dict form (``{"llm_configs": [...]}``, as a config file's `args`
    give it), or a plain list of configs. Its `api_keys` are resolved here (`key_env` read from this
    process's environment) and reach the ingress as digests only.
    """
    if isinstance(llm_serving_args, list):
        llm_serving_args = {"llm_configs": llm_serving_args}
    args = (llm_serving_args if isinstance(llm_serving_args, LLMServingArgs)
            else LLMServingArgs.model_validate(llm_serving_args))
    alone = standalone_app(args)  # one model: its replicas serve the API themselves, no ingress hop
    if alone is not None:
        return alone
    servers = {config.model_id: build_llm_deployment(config) for config in args.configs()}
    options = {**INGRESS_DEPLOYMENT_DEFAULTS, **args.ingress_deployment_config}
    auth = ingress_auth(args.keys(), _ingress_replicas(options))
    if auth is None:
        return deployment(OpenAiIngress).options(**options).bind(servers)
    return deployment(OpenAiIngress).options(**options).bind(servers, auth)


def _ingress_replicas(options: dict[str, Any]) -> int:
    """How many ingress replicas share each key's limits: `num_replicas`, else the autoscaling minimum."""
    replicas = options.get("num_replicas")
    if isinstance(replicas, int):
        return max(1, replicas)
    autoscaling = options.get("autoscaling_config") or {}
    if not isinstance(autoscaling, dict):
        autoscaling = getattr(autoscaling, "__dict__", {})
    return max(1, int(autoscaling.get("initial_replicas") or autoscaling.get("min_replicas") or 1))
