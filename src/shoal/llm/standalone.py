"""`StandaloneLLMServer`: one model that serves the OpenAI API itself, without an ingress in front.

`build_openai_app` with a single model (no API keys, no LoRA adapters, no ingress options) deploys
this instead of `OpenAiIngress` + `LLMServer`: the proxy hands each HTTP request straight to a
replica that owns the engine, one hop and one process fewer. Why it matters: at 1 stream on a small
CPU, llama.cpp's threads take every core, and every process that wakes per streamed token steals
time from them (measured on 2 cores: a 1-token `llama_decode` takes 11.0 ms inside the server,
7.6-9.5 ms alone); the ingress cost ~0.2 ms of CPU per token, and its process ~45 MiB.

The HTTP side is `OpenAiIngress`'s own code (the same routes, validation and error shapes), given a
`_LocalHandle` that calls the replica's `LLMServer` directly where the ingress would call a
deployment handle. Handles to this deployment (named like the `LLMServer` one) keep working: its
`chat`, `completions`, `embeddings`, `model_card` and `engine_stats` are the server's.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any, Optional, Union

from shoal.deployment import Application, deployment

from .config import LLMConfig, LLMServingArgs
from .ingress import OpenAiIngress
from .server import LLMServer


class _LocalMethod:
    """`handle.<method>` for a method of an object in this process: `.remote(...)` calls it."""

    __slots__ = ("_method",)

    def __init__(self, method: Any) -> None:
        self._method = method

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """The method's async iterator or awaitable, as a handle's response would be consumed."""
        result = self._method(*args, **kwargs)
        if inspect.isasyncgen(result) or inspect.isawaitable(result):
            return result
        return _resolved(result)


async def _resolved(value: Any) -> Any:
    return value


class _LocalHandle:
    """What `OpenAiIngress` calls on a model's handle (`options(...)`, `<method>.remote(...)`), run
    on an `LLMServer` in this replica: no framing, no second process."""

    __slots__ = ("_server",)

    def __init__(self, server: LLMServer) -> None:
        self._server = server

    def options(self, **_: Any) -> "_LocalHandle":
        return self

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self._server, name))


class StandaloneLLMServer(OpenAiIngress):
    """One model's `LLMServer` and the OpenAI HTTP API in one replica (see the module docstring)."""

    async def __init__(self, llm_config: Union[LLMConfig, dict[str, Any]]) -> None:
        OpenAiIngress.__init__(self, {})
        server = LLMServer.__new__(LLMServer)
        await LLMServer.__init__(server, llm_config)  # type: ignore[misc] - LLMServer's __init__ is async
        self.server = server
        self._handles = {server.model_id: _LocalHandle(server)}

    # -- the LLMServer's methods, for handles of this deployment -----------------------------------
    # (`completions` and `embeddings` shadow the ingress's route methods of those names only as
    # attributes: the routes call the ingress's functions themselves.)

    async def chat(self, request: dict[str, Any]) -> AsyncIterator[str]:
        async for item in self.server.chat(request):
            yield item

    async def completions(self, request: dict[str, Any]) -> AsyncIterator[str]:
        async for item in self.server.completions(request):
            yield item

    async def embeddings(self, request: dict[str, Any]) -> str:
        return await self.server.embeddings(request)

    def model_card(self) -> dict[str, Any]:
        return self.server.model_card()

    def engine_stats(self) -> dict[str, Any]:
        return self.server.engine_stats()

    async def check_health(self) -> None:
        await self.server.check_health()

    async def __del__(self) -> None:
        await self.server.__del__()


def standalone_app(args: LLMServingArgs) -> Optional[Application]:
    """`args` as one `StandaloneLLMServer` deployment, or None when something needs the ingress: more
    than one model, API keys, LoRA adapters (routed by name), ingress options, a queue limit (the
    ingress answers its overflow with OpenAI's 429), or scaling to zero replicas. The last two are
    read from the deployment's own validated config, not from the raw options."""
    configs = args.configs()
    if len(configs) != 1 or args.keys() or args.ingress_deployment_config or configs[0].lora_config is not None:
        return None
    config = configs[0]
    app = deployment(StandaloneLLMServer).options(**config.deployment_options()).bind(config.model_dump())
    options = app.deployment.config
    scales_to_zero = options.autoscaling_config is not None and options.autoscaling_config.min_replicas == 0
    if options.max_queued_requests != -1 or scales_to_zero:
        return None
    return app
