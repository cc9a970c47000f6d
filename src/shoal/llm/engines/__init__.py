"""shoal's LLM engines, one module per engine, and the registry that picks one.

- `base`: the request/sampling/output types and the `LLMEngine` protocol the OpenAI layer talks to;
- `detokenize`, `stopping`: shared text handling (incremental detokenizing, stop strings);
- `threaded`: `ThreadedEngine`, the shared part of the continuous-batching engines (the decode
  thread, request intake and validation, aborts, delivering deltas, per-token stop handling);
- `llama_cpp`: `LlamaCppEngine` (llama.cpp, continuous batching, prefix caching; the default for
  ``.gguf`` files on CPU);
- `transformers`: `TransformersEngine` (PyTorch, continuous batching; HF directories and CUDA);
- `embeddings`: `EmbeddingEngine` (sentence-transformers).

Adding an engine is one new module plus one line in `ENGINES`. Engine modules load on first use
(PEP 562), so importing this package does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
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
    "llama_cpp": ".llama_cpp:LlamaCppEngine",
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
    "LlamaCppEngine",
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
    """The engine a model's files get when none is named: sentence-transformers models embed; a
    ``.gguf`` file runs on llama.cpp when there is no CUDA device (and llama-cpp-python is
    installed); everything else runs on transformers."""
    if resolved.format == "sentence-transformers":
        return "sentence-transformers"
    if resolved.format == "gguf" and not _cuda_present() and _llama_cpp_installed():
        return "llama_cpp"
    return "transformers"


def _llama_cpp_installed() -> bool:
    return "llama_cpp" in sys.modules or importlib.util.find_spec("llama_cpp") is not None


def _cuda_present() -> bool:
    """Whether a CUDA device is usable, without importing torch just to ask (that alone takes
    seconds, and the llama.cpp engine never needs torch)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/proc/driver/nvidia/version")


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
