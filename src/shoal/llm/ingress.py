"""`OpenAiIngress`: the OpenAI-compatible HTTP API in front of one or more `LLMServer` deployments.

The request path: the proxy hands the HTTP request to this FastAPI app; the body is parsed and
validated here (400 naming the field), the `model` field picks the model's handle (404 if unknown),
and the call goes straight to an `LLMServer` replica as a streaming handle call. The first item is
awaited before any response is started, so errors raised up front (prompt too long, overload) still
get their own status code; after that, each item is written out as one server-sent event.

With API keys (`auth`, see `api_keys.py`), every `/v1/*` route first checks the caller's
`Authorization: Bearer <key>` (401) and the key's limits (429, `rate_limit.py`); the tokens of each
answered request are charged to its key. `/metrics` and the proxy's health routes stay open.

This module imports no torch: the ingress replica stays small.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from shoal import serve
from shoal.exceptions import BackPressureError
from shoal.handle import DeploymentHandle

from .protocol import (
    USAGE_EVENT_FLAG,
    USAGE_EVENT_MARK,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIError,
    dumps,
    from_validation_error,
    model_not_found,
    usage_of,
)

logger = logging.getLogger(__name__)

#: The ingress holds every open stream; its own concurrency limit must not be the bottleneck.
INGRESS_DEPLOYMENT_DEFAULTS: dict[str, Any] = {"max_ongoing_requests": 4096}
_RETRY_AFTER_S = "1"

app = FastAPI(title="shoal OpenAI-compatible API", docs_url="/docs", redoc_url=None)


def error_response(exc: OpenAIError) -> JSONResponse:
    headers = None
    if exc.status == 429:
        headers = {"Retry-After": str(getattr(exc, "retry_after", None) or _RETRY_AFTER_S)}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _as_openai_error(exc: BaseException) -> OpenAIError:
    """Any failure of a model call in OpenAI's shape; the full error goes to this replica's log."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, BackPressureError):
        return OpenAIError(
            429, "The server is overloaded: too many requests are queued for this model. Retry later.",
            type="rate_limit_error", code="rate_limit_exceeded",
        )
    logger.error("model call failed", exc_info=exc)
    kind = type(exc).__name__
    return OpenAIError(500, f"Internal server error ({kind}); see the server's logs.", type="server_error")


@serve.ingress(app)
class OpenAiIngress:
    """Routes OpenAI requests by their `model` to that model's `LLMServer` handle."""

    def __init__(self, llm_deployments: Union[dict[str, DeploymentHandle], list[DeploymentHandle]],
                 auth: Optional[dict[str, Any]] = None) -> None:
        self._pending_handles: list[DeploymentHandle] = []
        self._handles: dict[str, DeploymentHandle] = {}
        if isinstance(llm_deployments, dict):
            self._handles = dict(llm_deployments)
        else:
            self._pending_handles = list(llm_deployments)
        self._cards: dict[str, dict[str, Any]] = {}
        self._adapter_handles: dict[str, DeploymentHandle] = {}  # "<base>:<adapter>" -> its handle
        self._cards_lock = asyncio.Lock()
        # API keys: `auth` holds their names, limits and SHA-256 digests (`api_keys.ingress_auth`).
        self._keys: Any = None
        self._key_metrics: Any = None
        if auth:
            from .api_keys import KeyTable
            from .metrics import ApiKeyMetrics

            self._keys = KeyTable(auth)
            self._key_metrics = ApiKeyMetrics()
            names = [c.name for c in self._keys.callers.values()]
            logger.info("API keys required on /v1/*: %d key(s): %s", len(names), ", ".join(names))

    # -- routes ------------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        if self._keys is not None:
            try:
                self._key_metrics.admitted(self._caller(request).name, "")
            except OpenAIError as exc:
                return error_response(exc)
        cards = await self._model_cards()
        return JSONResponse({"object": "list", "data": list(cards.values()) + self._adapter_cards(cards)})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(self, model_id: str, request: Request) -> JSONResponse:
        if self._keys is not None:
            try:
                self._key_metrics.admitted(self._caller(request).name, "")
            except OpenAIError as exc:
                return error_response(exc)
        cards = await self._model_cards()
        card = cards.get(model_id) or next((c for c in self._adapter_cards(cards) if c["id"] == model_id), None)
        if card is None:
            return error_response(model_not_found(model_id, list(cards)))
        return JSONResponse(card)

    @app.get("/metrics")
    async def metrics(self) -> Response:
        """Prometheus metrics, as `vllm serve` answers on its port: the whole instance's (the
        models' `vllm:*` and shoal's `ray_serve_*`), from the controller that gathers them."""
        from prometheus_client import CONTENT_TYPE_LATEST

        from shoal.metrics import metrics_text_async

        return Response(await metrics_text_async(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest, "completions")

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        caller = None
        try:
            if self._keys is not None:
                caller = self._caller(request)
            body, req = await self._parse(request, EmbeddingRequest)
            handle = await self._handle_for(req.model)
            if caller is not None:
                self._key_metrics.admitted(caller.name, req.model)
            text = await handle.embeddings.remote(body)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI-shaped error
            return error_response(_as_openai_error(exc))
        if caller is not None:
            self._charge(caller, req.model, text)
        return Response(text, media_type="application/json")

    # -- the request path --------------------------------------------------------------------------

    async def _generate(self, request: Request, model_cls: type, method: str) -> Response:
        caller = None
        try:
            if self._keys is not None:
                caller = self._caller(request)
            body, req = await self._parse(request, model_cls)
            handle = await self._handle_for(req.model)
            if caller is not None:
                self._key_metrics.admitted(caller.name, req.model)
                if req.stream and not req.include_usage:
                    body[USAGE_EVENT_FLAG] = True  # the tokens are charged from the usage event
            stream = getattr(handle.options(stream=True), method).remote(body)
            first = await stream.__anext__()
        except StopAsyncIteration:
            return error_response(OpenAIError(500, "the model returned no output", type="server_error"))
        except Exception as exc:  # noqa: BLE001
            return error_response(_as_openai_error(exc))
        if not req.stream:
            if caller is not None:
                self._charge(caller, req.model, first)
            return Response(first, media_type="application/json")
        on_usage = None
        if caller is not None:
            def on_usage(text: str, caller: Any = caller, model: str = req.model) -> None:
                self._charge(caller, model, text)
        return StreamingResponse(
            _server_sent_events(first, stream, on_usage, forward_usage=bool(req.include_usage)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def _adapter_cards(self, cards: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """A card per LoRA adapter loaded (or loading) on a replica of a model, as the routers know
        from the replicas' multiplexed model ids: ``"<base>:<adapter>"``, `parent` the base."""
        out = []
        for model_id, card in cards.items():
            if card.get("lora"):
                for adapter in sorted(self._handles[model_id].multiplexed_model_ids()):
                    out.append({**card, "id": f"{model_id}:{adapter}", "parent": model_id, "lora": False})
        return out

    def _caller(self, request: Request) -> Any:
        """The caller's key (`api_keys.Caller`), admitted under its limits; OpenAIError 401/429 if not."""
        try:
            caller = self._keys.check(_authorization(request.scope["headers"]))
        except OpenAIError as exc:
            self._key_metrics.rejected("", getattr(exc, "reason", "invalid_key"))
            raise
        limits = caller.limits
        if limits is not None:
            refusal = limits.admit()
            if refusal is not None:
                self._key_metrics.rejected(caller.name, refusal.reason)  # type: ignore[attr-defined]
                raise refusal
        return caller

    def _charge(self, caller: Any, model: str, text: str) -> None:
        """Count the tokens of a response body or usage event against the caller's key."""
        prompt, completion = usage_of(text)
        self._key_metrics.used(caller.name, model, prompt, completion)
        if caller.limits is not None:
            caller.limits.used(prompt + completion)

    async def _parse(self, request: Request, model_cls: type) -> tuple[dict[str, Any], Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise OpenAIError(400, f"The request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "The request body must be a JSON object.")
        try:
            return body, model_cls.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    async def _handle_for(self, model: str) -> DeploymentHandle:
        if self._pending_handles:
            await self._model_cards()
        handle = self._handles.get(model)
        if handle is not None:
            return handle
        handle = self._adapter_handles.get(model)
        if handle is not None:
            return handle
        base, _, adapter = model.partition(":")
        if adapter and base in self._handles and (await self._model_cards())[base].get("lora"):
            # A LoRA adapter of `base` (`lora.py`): routed to replicas that hold it.
            if len(self._adapter_handles) >= 1024:
                self._adapter_handles.clear()
            handle = self._adapter_handles[model] = self._handles[base].options(multiplexed_model_id=adapter)
            return handle
        raise model_not_found(model, sorted(self._handles))

    async def _model_cards(self) -> dict[str, dict[str, Any]]:
        """Each model's card, asked once from its server (which also learns unnamed handles' ids)."""
        async with self._cards_lock:
            if self._pending_handles:
                cards = await asyncio.gather(*(h.model_card.remote() for h in self._pending_handles))
                for handle, card in zip(self._pending_handles, cards):
                    self._handles[card["id"]] = handle
                self._pending_handles = []
            missing = [m for m in self._handles if m not in self._cards]
            if missing:
                cards = await asyncio.gather(*(self._handles[m].model_card.remote() for m in missing))
                for model_id, card in zip(missing, cards):
                    self._cards[model_id] = {**card, "id": model_id}
        return dict(self._cards)


def _authorization(headers: list[tuple[bytes, bytes]]) -> Optional[str]:
    """The `Authorization` header of an ASGI scope (names are lower-case there): a scan of the raw
    pairs, cheaper than building Starlette's `Headers` for one look-up."""
    for name, value in headers:
        if name == b"authorization":
            return value.decode("latin-1")
    return None


async def _server_sent_events(first: str, rest: AsyncIterator[str], on_usage: Optional[Any] = None,
                              forward_usage: bool = True) -> AsyncIterator[str]:
    """`data: <json>` events, an error event if the stream fails midway, then `data: [DONE]`.

    With `on_usage`, the usage event is handed to it, and passed on only if `forward_usage`.
    """
    yield f"data: {first}\n\n"
    try:
        if on_usage is None:
            async for item in rest:
                yield f"data: {item}\n\n"
        else:
            async for item in rest:
                if USAGE_EVENT_MARK in item:
                    on_usage(item)
                    if not forward_usage:
                        continue
                yield f"data: {item}\n\n"
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the status line is gone; report in-band
        yield f"data: {dumps(_as_openai_error(exc).body())}\n\n"
    yield "data: [DONE]\n\n"
