"""`LLMServer`: the deployment that owns one model's engine and speaks OpenAI's response format.

Its methods take validated request dicts from the ingress and yield JSON text (one string per SSE
event when streaming, one body otherwise), so the ingress forwards bytes without re-encoding them.
Engine errors become `OpenAIError`s with the right status (prompt too long: 400).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
from collections.abc import AsyncIterator
from typing import Any, Union

from .config import LLMConfig, load_llm_config
from .engines import (
    EngineShutdownError,
    GenerationRequest,
    LLMEngine,
    PromptTooLongError,
    SamplingParams,
    build_engine,
)
from .engines.embeddings import EmbeddingEngine
from .metrics import LLMMetrics
from .protocol import (
    USAGE_EVENT_FLAG,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIError,
    dumps,
    model_card,
    new_id,
    now,
    usage_dict,
)

logger = logging.getLogger(__name__)


def make_engine(config: LLMConfig) -> LLMEngine:
    """The engine `config` asks for (by `llm_engine`, else by the model's files)."""
    source = config.model_loading_config.source
    kwargs = dict(config.engine_kwargs)
    kwargs.setdefault("model_id", config.model_id)
    return build_engine(source, engine=config.llm_engine, **kwargs)


class LLMServer:
    """One model behind OpenAI's chat, completions and embeddings methods (deploy it with
    `build_llm_deployment`, or several behind one API with `build_openai_app`)."""

    async def __init__(self, llm_config: Union[LLMConfig, dict[str, Any]]) -> None:
        self.config = load_llm_config(llm_config)
        self.model_id = self.config.model_id
        self.created = now()
        # Resolving the source may look in the hub cache (or download): not on the replica's loop.
        self.engine = await asyncio.to_thread(make_engine, self.config)
        logger.info("loading model %s from %s", self.model_id, self.config.model_loading_config.source)
        await self.engine.start()
        self.kind = "embedding" if isinstance(self.engine, EmbeddingEngine) else "generate"
        self.metrics = LLMMetrics(self.model_id, self.engine)  # vLLM's metrics, labelled by model_name
        logger.info("model %s ready", self.model_id)

    # -- OpenAI methods ----------------------------------------------------------------------------

    async def chat(self, request: dict[str, Any]) -> AsyncIterator[str]:
        """`/v1/chat/completions`: SSE event payloads when streaming, else one response body."""
        usage_event = bool(request.pop(USAGE_EVENT_FLAG, False))
        req = ChatCompletionRequest.model_validate(request)
        generation = GenerationRequest(
            messages=req.messages,
            sampling=SamplingParams(**req.sampling_kwargs()),
            chat_template_kwargs=req.chat_template_kwargs,
            response_format=req.response_format,
        )
        stream = self._generate(generation, param="messages")
        head = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": req.model}
        if not req.stream:
            text, finish, usage = await _collect(stream)
            message = {"role": "assistant", "content": text}
            yield dumps({**head, "choices": [{"index": 0, "message": message, "logprobs": None,
                                              "finish_reason": finish}], "usage": usage})
            return
        head["object"] = "chat.completion.chunk"
        first = True
        async for delta in stream:
            if first:
                first = False
                yield _event(head, req, {"index": 0, "delta": {"role": "assistant", "content": delta.text},
                                         "logprobs": None, "finish_reason": None})
            elif delta.text:
                yield _event(head, req, {"index": 0, "delta": {"content": delta.text}, "logprobs": None,
                                         "finish_reason": None})
            if delta.finish_reason is not None:
                yield _event(head, req, {"index": 0, "delta": {}, "logprobs": None,
                                         "finish_reason": delta.finish_reason})
                if (req.include_usage or usage_event) and delta.usage is not None:
                    yield _usage_event(head, delta.usage)

    async def completions(self, request: dict[str, Any]) -> AsyncIterator[str]:
        """`/v1/completions`: as `chat`, for a plain prompt (text or token ids)."""
        usage_event = bool(request.pop(USAGE_EVENT_FLAG, False))
        req = CompletionRequest.model_validate(request)
        generation = GenerationRequest(
            prompt=req.single_prompt(), sampling=SamplingParams(**req.sampling_kwargs()),
            response_format=req.response_format,
        )
        stream = self._generate(generation, param="prompt")
        head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model}
        if not req.stream:
            text, finish, usage = await _collect(stream)
            yield dumps({**head, "choices": [{"index": 0, "text": text, "logprobs": None,
                                              "finish_reason": finish}], "usage": usage})
            return
        async for delta in stream:
            if delta.text or delta.finish_reason is not None:
                yield _event(head, req, {"index": 0, "text": delta.text, "logprobs": None,
                                         "finish_reason": delta.finish_reason})
            if delta.finish_reason is not None and (req.include_usage or usage_event) and delta.usage is not None:
                yield _usage_event(head, delta.usage)

    async def embeddings(self, request: dict[str, Any]) -> str:
        """`/v1/embeddings`: float lists, or base64 of little-endian float32 (the openai client's default)."""
        req = EmbeddingRequest.model_validate(request)
        if self.kind != "embedding":
            raise OpenAIError(
                400, f"model `{self.model_id}` does not support embeddings; use an embedding model",
                param="model", code="model_not_supported",
            )
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        started = time.monotonic()
        output = await self.engine.embed(texts)
        self.metrics.embedded(output.prompt_tokens, started)
        data = []
        for i, vector in enumerate(output.embeddings):
            value: Any = vector
            if req.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": i, "embedding": value})
        return dumps({
            "object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": output.prompt_tokens, "total_tokens": output.prompt_tokens},
        })

    def model_card(self) -> dict[str, Any]:
        """This model's entry for `/v1/models`."""
        return model_card(self.model_id, self.created, kind=self.kind)

    def engine_stats(self) -> dict[str, Any]:
        stats = getattr(self.engine, "stats", None)
        return stats() if callable(stats) else {}

    async def check_health(self) -> None:
        is_alive = getattr(self.engine, "is_alive", None)  # engines with a decode thread have it
        if callable(is_alive) and not is_alive():
            raise RuntimeError(f"the decode thread of {self.model_id} is not running")

    async def __del__(self) -> None:
        await self.engine.shutdown()

    # -- helpers -----------------------------------------------------------------------------------

    def _generate(self, request: GenerationRequest, param: str) -> AsyncIterator[Any]:
        if self.kind != "generate":
            raise OpenAIError(
                400, f"model `{self.model_id}` is an embedding model; it cannot generate text",
                param="model", code="model_not_supported",
            )
        try:
            return self.metrics.track(self.engine.generate(request))
        except PromptTooLongError as exc:
            raise OpenAIError(400, str(exc), param=param, code="context_length_exceeded") from None
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param=param, code="invalid_value") from None
        except EngineShutdownError as exc:
            raise OpenAIError(503, str(exc), type="server_error", code="engine_shut_down") from None


def _event(head: dict[str, Any], req: Any, choice: dict[str, Any]) -> str:
    """One streamed event: `usage` is present (null) on every event when the client asked for usage."""
    body = {**head, "choices": [choice]}
    if req.include_usage:
        body["usage"] = None
    return dumps(body)


def _usage_event(head: dict[str, Any], usage: Any) -> str:
    """The last event when `stream_options.include_usage` is set: no choices, the whole usage."""
    return dumps({**head, "choices": [], "usage": usage_dict(usage.prompt_tokens, usage.completion_tokens)})


async def _collect(stream: AsyncIterator[Any]) -> tuple[str, str, dict[str, int]]:
    """Drain a stream into (text, finish_reason, usage) for a non-streaming response."""
    parts: list[str] = []
    finish, usage = "stop", usage_dict(0, 0)
    async for delta in stream:
        parts.append(delta.text)
        if delta.finish_reason is not None:
            finish = delta.finish_reason
            if delta.usage is not None:
                usage = usage_dict(delta.usage.prompt_tokens, delta.usage.completion_tokens)
    return "".join(parts), finish, usage
