"""shoal's LLM engines, one module per engine, and the registry that picks one.

- `base`: the request/sampling/output types and the `LLMEngine` protocol the OpenAI layer talks to;
- `detokenize`, `stopping`: shared text handling (incremental detokenizing, stop strings);
- `threaded`: `ThreadedEngine`, the shared part of the continuous-batching engines (the decode
  thread, request intake and validation, aborts, delivering deltas, per-token stop handling);
- `transformers`: `TransformersEngine` (PyTorch, continuous batching; HF directories and CUDA);
- `embeddings`: `EmbeddingEngine` (sentence-transformers).

Adding an engine is one new module plus one line in `ENGINES`. Engine modules load on first use
(PEP 562), so importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..models import ModelSourceError, ResolvedModel, resolve_model_source
from .base import (
    Delta,
    EmbeddingOutput,
    EngineShutdownError,
    GenerationRequest,
    LLMEngine,
    PromptTooLongError,
    SamplingParams,
    Usage,
)
from .detokenize import IncrementalDetokenizer
from .stopping import find_stop, stop_holdback

#: Engine name -> "module:class" (the module relative to this package).
ENGINES: dict[str, str] = {
    "transformers": ".transformers:TransformersEngine",
    "sentence-transformers": ".embeddings:EmbeddingEngine",
}
_CLASS_EXPORTS = {path.rsplit(":", 1)[1]: path for path in ENGINES.values()}

__all__ = [
    "ENGINES",
    "Delta",
    "EmbeddingEngine",
    "EmbeddingOutput",
    "EngineShutdownError",
    "GenerationRequest",
    "IncrementalDetokenizer",
    "LLMEngine",
    "ModelSourceError",
    "PromptTooLongError",
    "SamplingParams",
    "TransformersEngine",
    "Usage",
    "build_engine",
    "default_engine_name",
    "engine_class",
    "find_stop",
    "normalize_engine_name",
    "stop_holdback",
]


def normalize_engine_name(name: str) -> str:
    """The registry's name for `name` (case, ``-``/``_``/``.`` are not significant)."""
    key = name.strip().lower().replace("_", "-").replace(".", "-")
    for known in ENGINES:
        if known.replace("_", "-") == key:
            return known
    raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(sorted(ENGINES))}")


def engine_class(name: str) -> type:
    """The engine class registered under `name` (imports its module)."""
    module, _, attr = ENGINES[normalize_engine_name(name)].partition(":")
    return getattr(importlib.import_module(module, __name__), attr)


def default_engine_name(resolved: ResolvedModel) -> str:
    """The engine a model's files get when none is named."""
    if resolved.format == "sentence-transformers":
        return "sentence-transformers"
    return "transformers"


def build_engine(model_source: str, *, engine: str | None = None, **kwargs: Any) -> LLMEngine:
    """An engine for `model_source`: the one named by `engine` ("auto" or None: by the model's
    files, see `default_engine_name`). Other keyword options go to the engine's constructor."""
    if engine is None or engine == "auto":
        engine = default_engine_name(resolve_model_source(model_source))
    return engine_class(engine)(model_source, **kwargs)


def __getattr__(name: str) -> Any:
    path = _CLASS_EXPORTS.get(name)
    if path is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, _, attr = path.partition(":")
    value = getattr(importlib.import_module(module, __name__), attr)
    globals()[name] = value
    return value
