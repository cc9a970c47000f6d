"""`LLMServer`: the deployment that owns one model's engine and speaks OpenAI's response format.

Its methods take validated request dicts from the ingress and yield JSON text (one string per SSE
event when streaming, one body otherwise), so the ingress forwards bytes without re-encoding them.
Engine errors become `OpenAIError`s with the right status (prompt too long: 400).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import os
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
    default_engine_name,
    normalize_engine_name,
)
from .engines.base import InvalidParameterError, TokenLogprob
from .engines.embeddings import EmbeddingEngine
from .engines.structured import response_format_kind
from .metrics import LLMMetrics
from .models import resolve_model_source
from shoal.context import get_multiplexed_model_id, get_replica_context
from shoal.multiplex import model_ids_of, multiplexed

from .lora import LoadedAdapter, adapter_path
from .tools import ToolCallStream, forced_response_format, parse_reply, render_messages
from .protocol import (
    USAGE_EVENT_FLAG,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIError,
    dumps,
    model_card,
    model_not_found,
    new_id,
    now,
    usage_dict,
)

logger = logging.getLogger(__name__)


def make_engine(config: LLMConfig) -> LLMEngine:
    """The engine `config` asks for: `engine_kwargs["engine"]`, else `llm_engine`, else by the
    model's files (see `engines.default_engine_name`)."""
    source = config.model_loading_config.source
    kwargs = dict(config.engine_kwargs)
    kwargs.setdefault("model_id", config.model_id)
    name = kwargs.pop("engine", None) or config.llm_engine
    if name == "auto":
        name = default_engine_name(resolve_model_source(source))
    replicas = config.deployment_config.get("num_replicas")
    if normalize_engine_name(name) == "llama_cpp" and isinstance(replicas, int):
        kwargs.setdefault("replicas", replicas)  # its threads per replica come from the CPU count
    return build_engine(source, engine=name, **kwargs)


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
        #: OpenAI's `system_fingerprint`: names the model and engine configuration that answered.
        self.fingerprint = "fp_" + hashlib.sha256(
            f"{self.model_id}|{type(self.engine).__name__}|{sorted(self.config.engine_kwargs.items())}".encode()
        ).hexdigest()[:10]
        self.metrics = LLMMetrics(self.model_id, self.engine)  # vLLM's metrics, labelled by model_name
        self._adapter_loads = 0
        self._adapters = self._adapter_cache(self.config.lora_config)
        logger.info("model %s ready", self.model_id)

    # -- LoRA adapters (`lora.py`) -------------------------------------------------------------------

    def _adapter_cache(self, lora: Any) -> Any:
        """The replica's LRU cache of loaded adapters (`serve.multiplexed`, so the routers send an
        adapter's requests to replicas that hold it), or None without a `lora_config`."""
        if lora is None:
            return None
        if not callable(getattr(self.engine, "load_adapter", None)):
            raise ValueError(f"lora_config: the {type(self.engine).__name__} of {self.model_id} does not load "
                             "LoRA adapters (the llama_cpp and transformers engines do)")
        if not os.path.isdir(lora.dynamic_lora_loading_path):
            raise ValueError(f"lora_config.dynamic_lora_loading_path: {lora.dynamic_lora_loading_path} is not "
                             "a directory on this machine")
        return multiplexed(max_num_models_per_replica=lora.max_num_adapters_per_replica)(self._load_adapter)

    async def _load_adapter(self, adapter_id: str) -> LoadedAdapter:
        path = adapter_path(self.config.lora_config.dynamic_lora_loading_path, self.model_id, adapter_id)
        try:
            adapter = await asyncio.to_thread(self.engine.load_adapter, adapter_id, path)
        except (ValueError, OSError) as exc:
            raise OpenAIError(400, str(exc), param="model", code="invalid_value") from None
        self._adapter_loads += 1
        return LoadedAdapter(self.engine, adapter)

    async def _request_adapter(self) -> Any:
        """The adapter this request names (``model: "<base>:<adapter>"``, sent as its multiplexed
        model id by the ingress), loaded; None for the base model."""
        adapter_id = get_multiplexed_model_id()
        if not adapter_id:
            return None
        if self._adapters is None:
            raise model_not_found(f"{self.model_id}:{adapter_id}", [self.model_id])
        for _ in range(3):  # an adapter evicted between the lookup and its use is loaded again
            loaded = await self._adapters(adapter_id)
            if not loaded.adapter.retired:
                return loaded.adapter
        raise OpenAIError(503, f"LoRA adapter {adapter_id!r} keeps being evicted; raise "
                               "max_num_adapters_per_replica", type="server_error", code="adapter_evicted")

    # -- OpenAI methods ----------------------------------------------------------------------------

    async def chat(self, request: dict[str, Any]) -> AsyncIterator[str]:
        """`/v1/chat/completions`: SSE event payloads when streaming, else one response body. With
        `n` > 1 the request fans out into `n` sequences in the engine (each prefills the prompt).
        With `tools`, replies become `tool_calls` as `tools.py` describes."""
        usage_event = bool(request.pop(USAGE_EVENT_FLAG, False))
        req = ChatCompletionRequest.model_validate(request)
        kwargs = req.sampling_kwargs()
        adapter = await self._request_adapter()
        tools, mode, function = req.tool_mode()
        messages, template_vars = req.messages, dict(req.chat_template_kwargs or {})
        response_format = req.response_format
        if tools:
            messages, extra = render_messages(req.messages, tools, mode, self._chat_template_text())
            template_vars = {**extra, **template_vars}
            response_format = forced_response_format(tools, mode, function) or response_format
        await self._prepare(response_format)
        streams = [
            self._generate(GenerationRequest(
                messages=messages, sampling=_choice_sampling(kwargs, j),
                chat_template_kwargs=template_vars or None, response_format=response_format, adapter=adapter,
            ), param="messages")
            for j in range(req.num_choices)
        ]  # fmt: skip
        want_logprobs = kwargs["logprobs"] is not None
        head = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": req.model,
                "system_fingerprint": self.fingerprint}  # fmt: skip
        if not req.stream:
            choices = await _collect_all(streams)
            messages = [_message(c.text, tools, mode, function) for c in choices]
            yield dumps({**head, "choices": [
                {"index": i, "message": m,
                 "logprobs": {"content": _chat_logprobs(c.logprobs), "refusal": None} if want_logprobs else None,
                 "finish_reason": _finish(c.finish, m)}
                for i, (c, m) in enumerate(zip(choices, messages))
            ], "usage": _usage(choices, req.num_choices)})  # fmt: skip
            return
        head["object"] = "chat.completion.chunk"
        started: set[int] = set()
        finished: list[Any] = [None] * len(streams)
        calls = [ToolCallStream(tools, mode, function) for _ in streams]
        pending: list[list[TokenLogprob]] = [[] for _ in streams]  # logprobs not sent yet

        def events(i: int, deltas: list[dict[str, Any]]) -> list[str]:
            out = []
            for delta in deltas:
                if i not in started:
                    started.add(i)
                    delta = {"role": "assistant", **delta}
                logprobs = None
                if want_logprobs:
                    logprobs = {"content": _chat_logprobs(pending[i])}
                    pending[i] = []
                out.append(_event(head, req, {"index": i, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": None}))
            return out

        async for i, delta in _merged(streams):
            if delta.logprobs:
                pending[i].extend(delta.logprobs)
            deltas = calls[i].feed(delta.text) if delta.text else []
            if not deltas and (i not in started or (pending[i] and not tools)):
                deltas = [{"content": ""}]  # the role goes first; or logprobs of tokens with no text yet
            for event in events(i, deltas):
                yield event
            if delta.finish_reason is not None:
                finished[i] = delta
                last, called = calls[i].finish()
                for event in events(i, last):
                    yield event
                reason = "tool_calls" if called and delta.finish_reason == "stop" else delta.finish_reason
                yield _event(head, req, {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason})
        if req.include_usage or usage_event:
            yield _usage_event(head, _usage(finished, req.num_choices))

    async def completions(self, request: dict[str, Any]) -> AsyncIterator[str]:
        """`/v1/completions`: as `chat`, for one or several prompts (text or token ids); choice
        ``index = prompt_index * n + j``."""
        usage_event = bool(request.pop(USAGE_EVENT_FLAG, False))
        req = CompletionRequest.model_validate(request)
        kwargs = req.sampling_kwargs()
        n = req.num_choices
        adapter = await self._request_adapter()
        await self._prepare(req.response_format)
        streams = [
            self._generate(GenerationRequest(prompt=prompt, sampling=_choice_sampling(kwargs, j),
                                             response_format=req.response_format, adapter=adapter), param="prompt")
            for prompt in req.prompts()
            for j in range(n)
        ]
        want_logprobs = kwargs["logprobs"] is not None
        head = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": req.model,
                "system_fingerprint": self.fingerprint}  # fmt: skip
        if not req.stream:
            choices = await _collect_all(streams)
            yield dumps({**head, "choices": [
                {"index": i, "text": c.text,
                 "logprobs": _completion_logprobs(c.logprobs, 0) if want_logprobs else None,
                 "finish_reason": c.finish}
                for i, c in enumerate(choices)
            ], "usage": _usage(choices, n)})  # fmt: skip
            return
        offsets = [0] * len(streams)
        finished: list[Any] = [None] * len(streams)
        async for i, delta in _merged(streams):
            if delta.text or delta.finish_reason is not None or delta.logprobs:
                logprobs = None
                if want_logprobs:
                    logprobs = _completion_logprobs(delta.logprobs or [], offsets[i])
                    offsets[i] += sum(len(t.token) for t in delta.logprobs or [])
                yield _event(head, req, {"index": i, "text": delta.text, "logprobs": logprobs,
                                         "finish_reason": delta.finish_reason})
            if delta.finish_reason is not None:
                finished[i] = delta
        if req.include_usage or usage_event:
            yield _usage_event(head, _usage(finished, n))

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

    def _chat_template_text(self) -> Any:
        """The engine's chat template (tools go into it natively when it speaks them)."""
        return getattr(self.engine, "chat_template_text", None)

    def model_card(self) -> dict[str, Any]:
        """This model's entry for `/v1/models` (`lora`: whether ``"<model>:<adapter>"`` ids are served)."""
        return model_card(self.model_id, self.created, kind=self.kind, lora=self._adapters is not None)

    def engine_stats(self) -> dict[str, Any]:
        """The engine's counters, plus this replica's id and, with LoRA, the adapters it loaded."""
        stats = getattr(self.engine, "stats", None)
        out = dict(stats()) if callable(stats) else {}
        out["replica"] = get_replica_context().replica_id.unique_id
        if self._adapters is not None:
            out["lora_adapter_loads"] = self._adapter_loads
            out["lora_adapters"] = sorted(model_ids_of(self._adapters))
        return out

    async def check_health(self) -> None:
        is_alive = getattr(self.engine, "is_alive", None)  # engines with a decode thread have it
        if callable(is_alive) and not is_alive():
            raise RuntimeError(f"the decode thread of {self.model_id} is not running")

    async def __del__(self) -> None:
        await self.engine.shutdown()

    # -- helpers -----------------------------------------------------------------------------------

    async def _prepare(self, response_format: Any) -> None:
        """Before the first structured request: build the engine's grammar machinery in a worker
        thread, not on this event loop where it would stall every stream meanwhile."""
        if getattr(self.engine, "structured_ready", True) or response_format_kind(response_format) == "text":
            return
        await asyncio.to_thread(self.engine.prepare_structured)

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
        except InvalidParameterError as exc:
            raise OpenAIError(400, str(exc), param=exc.param, code="invalid_value") from None
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


def _message(text: str, tools: list[dict[str, Any]], mode: str, function: Any) -> dict[str, Any]:
    """A finished choice's ``message``: its text, or its tool calls (`tools.parse_reply`)."""
    if not tools:
        return {"role": "assistant", "content": text}
    content, calls = parse_reply(text, tools, mode, function)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return message


def _finish(reason: str, message: dict[str, Any]) -> str:
    """OpenAI's ``tool_calls`` finish reason for a reply that made calls (a cut-off one keeps ``length``)."""
    return "tool_calls" if message.get("tool_calls") and reason == "stop" else reason


def _usage_event(head: dict[str, Any], usage: dict[str, int]) -> str:
    """The last event when `stream_options.include_usage` is set: no choices, the whole usage."""
    return dumps({**head, "choices": [], "usage": usage})


def _choice_sampling(kwargs: dict[str, Any], j: int) -> SamplingParams:
    """Choice `j`'s sampling: with a seed, choice j samples with ``seed + j`` so the n choices differ
    and each stays reproducible."""
    params = SamplingParams(**kwargs)
    if params.seed is not None and j:
        params.seed = (params.seed + j) % (1 << 63)
    if params.logit_bias is not None:
        params.logit_bias = dict(params.logit_bias)
    return params


@dataclasses.dataclass
class _Choice:
    text: str = ""
    finish: str = "stop"
    usage: Any = None
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)


_END = object()


async def _merged(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """``(choice index, delta)`` from every stream as they come; one stream is passed through as is.
    Closing this generator (client gone) or an error in one stream closes them all."""
    if len(streams) == 1:
        async for delta in streams[0]:
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, exc))
            return
        queue.put_nowait((i, _END))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _collect_all(streams: list[AsyncIterator[Any]]) -> list[_Choice]:
    """Drain the streams into one `_Choice` each (text, finish_reason, usage, logprobs)."""
    choices = [_Choice() for _ in streams]
    parts: list[list[str]] = [[] for _ in streams]
    async for i, delta in _merged(streams):
        parts[i].append(delta.text)
        if delta.logprobs:
            choices[i].logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            choices[i].finish = delta.finish_reason
            choices[i].usage = delta.usage
    for choice, texts in zip(choices, parts):
        choice.text = "".join(texts)
    return choices


def _usage(finished: list[Any], n: int) -> dict[str, int]:
    """Completion tokens of every choice; prompt tokens once per prompt (choices ``k*n..k*n+n-1``
    share prompt k). `finished` holds `_Choice`s or final `Delta`s (None for a choice that never ended)."""
    prompt = completion = 0
    for i, item in enumerate(finished):
        usage = getattr(item, "usage", None)
        if usage is None:
            continue
        completion += usage.completion_tokens
        if i % n == 0:
            prompt += usage.prompt_tokens
    return usage_dict(prompt, completion)


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def _chat_logprobs(tokens: list[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` of a chat choice."""
    return [
        {"token": t.token, "logprob": t.logprob, "bytes": _token_bytes(t.token),
         "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": _token_bytes(a.token)} for a in t.top]}
        for t in tokens
    ]  # fmt: skip


def _completion_logprobs(tokens: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The completions API's ``logprobs``: parallel lists; `top_logprobs` maps token text to logprob
    for the best alternatives plus the chosen token (so up to ``logprobs + 1`` entries)."""
    text_offset = []
    for t in tokens:
        text_offset.append(offset)
        offset += len(t.token)
    top = []
    for t in tokens:
        alternatives = {a.token: a.logprob for a in t.top}
        alternatives.setdefault(t.token, t.logprob)
        top.append(alternatives)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": top,
        "text_offset": text_offset,
    }
