"""LoRA adapters served through model multiplexing (`LLMConfig.lora_config`, Ray Serve LLM's shape).

The path of a request for ``model: "<base>:<adapter>"``:

1. The ingress finds the base model's handle and sends the call with ``multiplexed_model_id=<adapter>``,
   so the router prefers a replica that already holds the adapter (`router/pow2.py`).
2. The `LLMServer` replica looks the adapter up in its `serve.multiplexed` LRU cache of
   `max_num_adapters_per_replica`; a miss loads ``<dynamic_lora_loading_path>/<adapter>`` through
   the engine (`load_adapter`), an eviction retires the least recently used one (`unload_adapter`:
   the engine frees it once no running sequence uses it). The loaded ids reach the controller and
   the routers as the replica's multiplexed model ids; `/v1/models` lists them.
3. The request runs on the base model with the adapter (`GenerationRequest.adapter`).
"""

from __future__ import annotations

import os
import re
from typing import Any

from .protocol import OpenAIError

_ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def adapter_path(root: str, base_model: str, adapter_id: str) -> str:
    """Where adapter `adapter_id` lives under `root`: ``root/<id>`` (a directory or a file), else
    ``root/<id>.gguf``. A 404 naming the model when it is missing, a 400 for an id that is not a
    plain name (it must not reach outside `root`)."""
    model = f"{base_model}:{adapter_id}"
    if not _ADAPTER_ID.fullmatch(adapter_id) or ".." in adapter_id:
        raise OpenAIError(400, f"Invalid adapter name in model `{model}`: use letters, digits, '.', '_' and '-'.",
                          param="model", code="invalid_value")
    for candidate in (os.path.join(root, adapter_id), os.path.join(root, adapter_id + ".gguf")):
        if os.path.exists(candidate):
            return candidate
    raise OpenAIError(404, f"The model `{model}` does not exist: no LoRA adapter `{adapter_id}` in {root}.",
                      param="model", code="model_not_found")


class LoadedAdapter:
    """An adapter in a replica's multiplexing cache: evicting it (`__del__`, run once by
    `serve.multiplexed`) retires it in the engine."""

    def __init__(self, engine: Any, adapter: Any) -> None:
        self.engine = engine
        self.adapter = adapter

    def __del__(self) -> None:
        self.engine.unload_adapter(self.adapter)
