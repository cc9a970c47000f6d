"""What every engine shares: the request, sampling and output types, and the `LLMEngine` protocol
the OpenAI layer talks to. Nothing here imports torch or an engine library."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Delta",
    "EmbeddingOutput",
    "EngineShutdownError",
    "GenerationRequest",
    "LLMEngine",
    "PromptTooLongError",
    "SamplingParams",
    "Usage",
]


@dataclass
class SamplingParams:
    """Per-request sampling. ``temperature=0`` is greedy; `seed` gives the request its own RNG."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


@dataclass
class GenerationRequest:
    """A completion (`prompt`: text or token ids) or chat (`messages`) request."""

    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    #: OpenAI's ``response_format`` (``{"type": "json_object"}``, ``{"type": "json_schema", ...}``):
    #: decoding is constrained to it (see `engines.structured`); None or type "text" is free text.
    response_format: dict[str, Any] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    """New text of one stream. The last delta has `finish_reason` ("stop" | "length") and `usage`."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass
class EmbeddingOutput:
    embeddings: list[list[float]]
    prompt_tokens: int


class EngineShutdownError(RuntimeError):
    """Raised into streams still running when the engine shuts down."""


class PromptTooLongError(ValueError):
    """The prompt (plus `max_tokens`) does not fit the model's context."""


@runtime_checkable
class LLMEngine(Protocol):
    """What the serving layer needs from an engine (vLLM, transformers, embeddings...)."""

    model_id: str

    async def start(self) -> None:
        """Load weights and start background work; must be awaited before use."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        """Validate `request` (``ValueError`` at call time) and stream its deltas."""

    async def embed(self, texts: Sequence[str]) -> EmbeddingOutput:
        """Embed `texts` (engines without embeddings raise ``NotImplementedError``)."""

    async def shutdown(self) -> None:
        """Stop background work; streams still running get `EngineShutdownError`."""
