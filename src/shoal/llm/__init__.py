"""OpenAI-compatible LLM serving for shoal (the counterpart of `ray.serve.llm`).

    from shoal.llm import LLMConfig, build_openai_app
    app = build_openai_app({"llm_configs": [LLMConfig(model_loading_config={"model_id": "SmolLM2-135M-Instruct"})]})

Names load on first use (PEP 562), so `shoal --help` does not import FastAPI, and torch and
transformers load only in the replicas that run a model.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLMConfig": ".config",
    "LLMServingArgs": ".config",
    "LoraConfig": ".config",
    "ModelLoadingConfig": ".config",
    "LLMServer": ".server",
    "OpenAIError": ".protocol",
    "OpenAiIngress": ".ingress",
    "build_llm_deployment": ".builders",
    "build_openai_app": ".builders",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shoal.llm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
