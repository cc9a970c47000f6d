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
    "InvalidParameterError",
    "LLMEngine",
    "PromptTooLongError",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
]


@dataclass
class SamplingParams:
    """Per-request sampling. ``temperature=0`` is greedy; `seed` gives the request its own RNG."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None  # None, 0 or -1: off
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    #: OpenAI's penalties over the generated tokens: logit -= frequency * count + presence * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: Token id -> bias added to its logit (-100..100).
    logit_bias: dict[int, float] | None = None
    #: Return each token's logprob and this many alternatives (None: no logprobs).
    logprobs: int | None = None

    def validate(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or more, got {self.top_k}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise InvalidParameterError(name, f"{name} must be in [-2, 2], got {value}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidParameterError("logprobs", f"logprobs must be in [0, 20], got {self.logprobs}")
        for token_id, bias in (self.logit_bias or {}).items():
            if not -100 <= bias <= 100:
                raise InvalidParameterError("logit_bias", f"the bias of token {token_id} must be in [-100, 100]")

    @property
    def needs_logits_processing(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


class LoraAdapterBase:
    """A LoRA adapter an engine loaded (`load_adapter`); `unload_adapter` retires it, after which no
    new request may use it. Each engine's subclass holds the adapter's weights its own way."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.retired = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.path!r})"


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of token lists `a` and `b`, at most `limit` (prefix caching)."""
    lo, hi = 0, limit
    if list(a[:hi]) == list(b[:hi]):
        return hi
    while lo < hi:  # binary search on "the first k tokens agree"
        mid = (lo + hi + 1) // 2
        if list(a[:mid]) == list(b[:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


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
    #: A LoRA adapter the engine loaded (`load_adapter`), or None for the base model.
    adapter: Any = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenLogprob:
    """A generated token's text and log-probability, with the most likely alternatives (`top`)."""

    token_id: int
    token: str
    logprob: float
    top: list["TokenLogprob"] = field(default_factory=list)


@dataclass
class Delta:
    """New text of one stream. The last delta has `finish_reason` ("stop" | "length") and `usage`.
    With `SamplingParams.logprobs` set, `logprobs` has one entry per token of the text (a token that
    ends the stream, like EOS, has none)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class EmbeddingOutput:
    embeddings: list[list[float]]
    prompt_tokens: int


class EngineShutdownError(RuntimeError):
    """Raised into streams still running when the engine shuts down."""


class InvalidParameterError(ValueError):
    """A request field the engine rejects; `param` names it (the 400's `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


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
