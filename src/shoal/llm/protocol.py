"""The OpenAI wire format: request models, response bodies, and OpenAI-shaped errors.

Requests are validated here, in the ingress, so a bad field is a 400 that names it before any model
is touched. Responses are built as plain dicts and serialized once, in the `LLMServer` replica; the
ingress relays the JSON text without parsing it again.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class OpenAIError(Exception):
    """An error with an HTTP status, sent as ``{"error": {message, type, param, code}}``.

    Raised in the `LLMServer` replica or the ingress; it pickles, so it crosses the handle as itself.
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: Optional[str] = None,
        code: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.quiet_in_logs = status < 500  # a client's mistake: no traceback in the replica's log
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (OpenAIError, (self.status, self.message, self.type, self.param, self.code))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_not_found(model: str, available: list[str]) -> OpenAIError:
    return OpenAIError(
        404,
        f"The model `{model}` does not exist. Available models: {', '.join(available) or 'none'}.",
        param="model",
        code="model_not_found",
    )


def from_validation_error(exc: ValidationError) -> OpenAIError:
    """The first pydantic error as a 400 naming its field, in OpenAI's words where they exist."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    if first.get("type") == "extra_forbidden":
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if first.get("type") == "missing":
        return OpenAIError(400, f"Missing required parameter: '{param}'.", param=param)
    message = str(first.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    return OpenAIError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------


def _refuse_when_set(cls: type, value: Any) -> Any:
    """Validator for OpenAI fields the engine does not implement: only their neutral value passes."""
    if value:
        raise ValueError("not supported by this server")
    return value


def _check_response_format(cls: type, value: Any) -> Any:
    """``text``, ``json_object`` or ``json_schema`` with a schema the grammar compiler accepts (so a
    bad schema is a 400 naming `response_format`, with the compiler's message)."""
    from .engines.structured import grammar_for_response_format

    grammar_for_response_format(value)  # ValueError -> 400; cached, so the engine does not recompile
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


#: Most choices per request (`n`), and most choices of a completions request (prompts times `n`).
MAX_N = 16
MAX_CHOICES = 128


class _SamplingFields(BaseModel):
    """Fields common to chat and text completions."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(1, ge=1, le=MAX_N)
    user: Optional[str] = None
    presence_penalty: Optional[float] = Field(0, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    metadata: Optional[dict[str, str]] = None
    store: Optional[bool] = None
    # Extension (as in vLLM): keep generating past end-of-sequence, e.g. to benchmark fixed lengths.
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: Optional[Union[str, list[str]]]) -> Optional[Union[str, list[str]]]:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids_and_range(cls, value: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
        for key, bias in (value or {}).items():
            try:
                token_id = int(key)
            except ValueError:
                raise ValueError(f"the keys must be token ids (got {key!r})") from None
            if token_id < 0:
                raise ValueError(f"token id {key} is negative")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {key} must be between -100 and 100 (got {bias})")
        return value

    @property
    def num_choices(self) -> int:
        return self.n or 1

    def _logprobs_count(self) -> Optional[int]:
        """How many alternatives to return per token, or None for no logprobs."""
        return None

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `engine.SamplingParams` (OpenAI's defaults: temperature 1, top_p 1)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "stop": self.stop,
            "seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "logit_bias": {int(k): float(v) for k, v in self.logit_bias.items()} if self.logit_bias else None,
            "logprobs": self._logprobs_count(),
        }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    chat_template_kwargs: Optional[dict[str, Any]] = None

    @field_validator("messages")
    @classmethod
    def _text_messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for i, message in enumerate(messages):
            role = message.get("role")
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}].role must be system, user, assistant or tool (got {role!r})")
            m: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _text_of(message, i)}
            calls = message.get("tool_calls")
            if role == "assistant" and calls:
                if not isinstance(calls, list) or not all(
                        isinstance(c, dict) and isinstance(c.get("function"), dict) for c in calls):
                    raise ValueError(f"messages[{i}].tool_calls must be a list of "
                                     '{"id", "type": "function", "function": {"name", "arguments"}}')
                m["tool_calls"] = calls
            if role == "tool" and message.get("tool_call_id") is not None:
                m["tool_call_id"] = str(message["tool_call_id"])
            if message.get("name") is not None:
                m["name"] = str(message["name"])
            out.append(m)
        return out

    @field_validator("tools")
    @classmethod
    def _function_tools(cls, value: Optional[list[Any]]) -> Optional[list[Any]]:
        from .tools import check_tools

        return check_tools(value) if value is not None else None

    @field_validator("tool_choice")
    @classmethod
    def _known_tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        from .tools import check_tool_choice

        check_tool_choice(value, info.data.get("tools") or [])
        return value

    def tool_mode(self) -> tuple[list[dict[str, Any]], str, Optional[str]]:
        """``(tools, mode, function name)``; mode ``none``, ``auto``, ``required`` or ``named``
        (see `tools.py`)."""
        from .tools import check_tool_choice

        tools = self.tools or []
        mode, name = check_tool_choice(self.tool_choice, tools)
        return tools, mode, name

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: Optional[int], info: ValidationInfo) -> Optional[int]:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("logprobs must be set to true when top_logprobs is used")
        return value

    def _logprobs_count(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None

    _response_format = field_validator("response_format")(_check_response_format)

    def sampling_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampling_kwargs()
        if self.max_completion_tokens is not None:
            kwargs["max_tokens"] = self.max_completion_tokens
        return kwargs


def _text_of(message: dict[str, Any], index: int) -> str:
    """A message's content as text: a string, or the text parts of a content list."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"messages[{index}].content: only text parts are supported (got {kind!r})")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ValueError(f"messages[{index}].content must be a string or a list of parts")


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    best_of: Optional[int] = Field(None, ge=1, le=1)
    # Extension (as in vLLM): OpenAI has response_format on chat completions only.
    response_format: Optional[dict[str, Any]] = None

    _unsupported_text = field_validator("echo", "suffix")(_refuse_when_set)
    _response_format = field_validator("response_format")(_check_response_format)

    @field_validator("prompt")
    @classmethod
    def _some_prompt(
        cls, value: Union[str, list[str], list[int], list[list[int]]]
    ) -> Union[str, list[str], list[int], list[list[int]]]:
        if isinstance(value, list) and not value:
            raise ValueError("the prompt must not be empty")
        return value

    def _logprobs_count(self) -> Optional[int]:
        return self.logprobs

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompts (text or token ids): a string or a list of token ids is one prompt, a list of
        strings or of token-id lists is several. At most `MAX_CHOICES` choices in all (else 400)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            prompts: list[Union[str, list[int]]] = [prompt]
        elif all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]  # type: ignore[arg-type]
        else:
            prompts = [p if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]
        if len(prompts) * self.num_choices > MAX_CHOICES:
            raise OpenAIError(
                400, f"at most {MAX_CHOICES} choices per request (prompts times n); got "
                f"{len(prompts)} prompts and n={self.num_choices}", param="prompt", code="invalid_value",
            )  # fmt: skip
        return prompts


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    input: Union[str, list[str]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None

    @field_validator("input")
    @classmethod
    def _non_empty(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, list) and not value:
            raise ValueError("input must not be empty")
        return value

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: Optional[int]) -> Optional[int]:
        if value is not None:
            raise ValueError("not supported by this server (the model's own size is used)")
        return value


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


#: Set by the ingress in a streaming request's dict (after validation, so clients cannot send it): the
#: server then ends the stream with the usage event even when the client did not ask for usage.
USAGE_EVENT_FLAG = "_shoal_usage_event"
#: In a streamed event's JSON text only the usage event has this (compact `dumps`; inside a JSON
#: string the quotes would be escaped, so text cannot fake it).
USAGE_EVENT_MARK = '"choices":[]'


def usage_of(text: str) -> tuple[int, int]:
    """(prompt_tokens, completion_tokens) of a response body or usage event (`usage` is its last
    field), without parsing the rest; (0, 0) when it has none."""
    at = text.rfind('"usage":{')
    if at < 0:
        return 0, 0
    try:
        usage, _ = _decoder.raw_decode(text, at + 8)
        return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return 0, 0


_decoder = json.JSONDecoder()


def dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def model_card(model_id: str, created: int, owned_by: str = "shoal", **extra: Any) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, **extra}
