"""Affinity routing: the same session (or prompt prefix) goes to the same replica while load is even.

Keeps per-session state and LLM prefix caches warm. The key is hashed onto the replicas with
rendezvous hashing, so adding or removing a replica moves only the keys that must move. When the
preferred replica is busier than the least loaded one by more than `imbalance_threshold`
requests (or full), the request falls back to power of two choices.

    request_router_config={"request_router_class": "shoal.router.affinity:AffinityRequestRouter",
                           "request_router_kwargs": {"key": "prefix", "prefix_chars": 256}}

`key="session"` (default) uses the request's session id: the `x-session-id` HTTP header, or a
`session_id` keyword argument in handle calls. `key="prefix"` uses the first `prefix_chars`
characters of the prompt (`prompt`, or the text of `messages`, in the first argument when it is a
dict or an object with those fields, e.g. an OpenAI request).
"""

from __future__ import annotations

import hashlib
from typing import Any, Optional, Sequence

from shoal.router.base import ReplicaView, RequestRouter
from shoal.router.pow2 import pick_two


def _score(key: str, replica_id: Any) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{replica_id}".encode(), digest_size=8).digest(), "big")


def prompt_text(request: Any, limit: int) -> str:
    """The beginning of the prompt carried by a request, or ''."""
    payload = request.args[0] if getattr(request, "args", None) else None
    get = payload.get if isinstance(payload, dict) else (lambda k, d=None: getattr(payload, k, d))
    if payload is None:
        return ""
    prompt = get("prompt")
    if isinstance(prompt, str):
        return prompt[:limit]
    messages = get("messages") or []
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else getattr(m, "content", "")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(str(content or ""))
        if sum(map(len, parts)) >= limit:
            break
    return "".join(parts)[:limit]


class AffinityRequestRouter(RequestRouter):
    def initialize_state(self, key: str = "session", prefix_chars: int = 256, imbalance_threshold: int = 4,
                         **unknown: Any) -> None:
        if unknown:
            raise TypeError(f"AffinityRequestRouter got unknown request_router_kwargs {sorted(unknown)}; "
                            "allowed: key, prefix_chars, imbalance_threshold.")
        if key not in ("session", "prefix"):
            raise ValueError(f"AffinityRequestRouter key={key!r}: allowed values are 'session' and 'prefix'.")
        self.key = key
        self.prefix_chars = int(prefix_chars)
        self.imbalance_threshold = int(imbalance_threshold)

    def _key(self, request: Any) -> str:
        if self.key == "session":
            return getattr(request, "session_id", "") or ""
        return prompt_text(request, self.prefix_chars)

    def choose_replica(self, candidates: Sequence[ReplicaView], request: Any) -> Optional[ReplicaView]:
        key = self._key(request)
        if not key or not candidates:
            return pick_two(candidates)
        preferred = max(candidates, key=lambda c: _score(key, c.replica_id))
        least = min(c.queue_len for c in candidates)
        if preferred.has_capacity() and preferred.queue_len - least <= self.imbalance_threshold:
            return preferred
        return pick_two(candidates)
