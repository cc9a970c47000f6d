"""vLLM's metrics for shoal's LLM engines: same names, types, buckets and `model_name` label.

An `LLMServer` replica records per request (time to first token, time per output token, end-to-end
latency, prompt and generated tokens, finished requests by reason); the engine's queue and KV-cache
gauges are read when the replica takes its metrics snapshot. The values travel with the replica's
other metrics to the instance's Prometheus endpoint, and `GET /metrics` on the OpenAI ingress
answers with the same text, as `vllm serve` does.

Labels are vLLM's `model_name` and `engine`; `engine` is the replica's id (vLLM's engine index), so
the series of several replicas of one model stay apart.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from shoal.telemetry.registry import COUNTER, GAUGE, HISTOGRAM, REGISTRY, Snapshot, add_family

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0)
E2E_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0)
LABELS = ("model_name", "engine")

_monotonic = time.monotonic


class LLMMetrics:
    """The vLLM metric families of one model served in this process."""

    def __init__(self, model_name: str, engine: Any) -> None:
        from shoal.context import _replica_context

        self.engine = engine
        self.labels = (model_name, _replica_context.replica_tag if _replica_context is not None else "0")
        m = REGISTRY.metric
        self.ttft = m("vllm:time_to_first_token_seconds", HISTOGRAM, "Histogram of time to first token in seconds.",
                      LABELS, TTFT_BUCKETS_S)
        self.tpot = m("vllm:time_per_output_token_seconds", HISTOGRAM,
                      "Histogram of time per output token in seconds.", LABELS, TPOT_BUCKETS_S)
        self.itl = m("vllm:inter_token_latency_seconds", HISTOGRAM, "Histogram of inter-token latency in seconds.",
                     LABELS, TPOT_BUCKETS_S)
        self.e2e = m("vllm:e2e_request_latency_seconds", HISTOGRAM,
                     "Histogram of e2e request latency in seconds.", LABELS, E2E_BUCKETS_S)
        self.prompt_tokens = m("vllm:prompt_tokens", COUNTER, "Number of prefill tokens processed.", LABELS)
        self.generation_tokens = m("vllm:generation_tokens", COUNTER, "Number of generation tokens processed.",
                                   LABELS)
        self.success = m("vllm:request_success", COUNTER, "Count of successfully processed requests.",
                         LABELS + ("finished_reason",))
        # Every series exists from the start, as in vLLM (a dashboard's rate() needs the zero).
        self.prompt_tokens.inc(self.labels, 0.0)
        self.generation_tokens.inc(self.labels, 0.0)
        REGISTRY.add_source(self._gauges, weak=True)  # ends with its LLMServer

    def _gauges(self, out: Snapshot) -> None:
        stats = getattr(self.engine, "stats", None)
        if not callable(stats):
            return
        s = stats()
        if "active" in s:
            add_family(out, "vllm:num_requests_running", GAUGE, "Number of requests in model execution batches.",
                       LABELS, None, {self.labels: float(s["active"])})
            add_family(out, "vllm:num_requests_waiting", GAUGE, "Number of requests waiting to be processed.",
                       LABELS, None, {self.labels: float(s.get("waiting", 0))})
        capacity = s.get("kv_cache_capacity_tokens") or 0
        if capacity:
            usage = min(1.0, s.get("kv_cache_tokens", 0) / capacity)
            key = {self.labels: usage}
            add_family(out, "vllm:kv_cache_usage_perc", GAUGE, "KV-cache usage. 1 means 100 percent usage.",
                       LABELS, None, key)
            add_family(out, "vllm:gpu_cache_usage_perc", GAUGE,
                       "KV-cache usage. 1 means 100 percent usage (vLLM's older name).", LABELS, None, dict(key))

    async def track(self, stream: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Pass the engine's deltas through, timing them; `stream` is closed with this one."""
        labels = self.labels
        start = last = _monotonic()
        first = True
        try:
            async for delta in stream:
                now = _monotonic()
                n = len(delta.token_ids) if delta.token_ids else 0
                if first:
                    first = False
                    self.ttft.observe(labels, now - start)
                elif n:
                    per_token = (now - last) / n
                    self.tpot.observe(labels, per_token, n)
                    self.itl.observe(labels, per_token, n)
                last = now
                if delta.finish_reason is not None:
                    self.e2e.observe(labels, now - start)
                    if delta.usage is not None:
                        self.prompt_tokens.inc(labels, float(delta.usage.prompt_tokens))
                        self.generation_tokens.inc(labels, float(delta.usage.completion_tokens))
                    self.success.inc(labels + (delta.finish_reason,))
                yield delta
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()

    def embedded(self, prompt_tokens: int, started: float) -> None:
        """One finished embeddings request (it has no output tokens)."""
        self.e2e.observe(self.labels, _monotonic() - started)
        self.prompt_tokens.inc(self.labels, float(prompt_tokens))
        self.success.inc(self.labels + ("stop",))


class ApiKeyMetrics:
    """Per-API-key counts of the OpenAI ingress (its replicas sum at the controller). `key` is the
    key's name, never the key; a request without a known key is counted under ``key=""``."""

    def __init__(self) -> None:
        m = REGISTRY.metric
        self.requests = m("shoal_llm_api_key_requests", COUNTER, "Requests admitted, by API key and model.",
                          ("key", "model"))
        self.tokens = m("shoal_llm_api_key_tokens", COUNTER, "Tokens used, by API key, model and kind.",
                        ("key", "model", "kind"))
        self.rejections = m("shoal_llm_api_key_rejections", COUNTER,
                            "Requests refused by API key checks and limits, by reason.", ("key", "reason"))

    def admitted(self, key: str, model: str) -> None:
        self.requests.inc((key, model))

    def used(self, key: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        if prompt_tokens:
            self.tokens.inc((key, model, "prompt"), float(prompt_tokens))
        if completion_tokens:
            self.tokens.inc((key, model, "completion"), float(completion_tokens))

    def rejected(self, key: str, reason: str) -> None:
        self.rejections.inc((key, reason))
