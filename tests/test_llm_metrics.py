"""vLLM's metrics from `shoal.llm`: they move after a chat completion, and `GET /metrics` on the
OpenAI server's port answers as `vllm serve` does (docs/observability.md).

One small application (the bundled SmolLM2 chat model), a few tokens per request. With one model,
`build_openai_app` deploys a `StandaloneLLMServer` (no ingress hop), so this module also checks that
path: one deployment, handles to it, and a client that goes away aborting its request.
"""

from __future__ import annotations

import os

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import require_llm_stack, wait_for  # noqa: E402

require_llm_stack()

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from shoal import serve  # noqa: E402
from shoal.api import get_http_url  # noqa: E402
from shoal.llm import LLMConfig, build_openai_app  # noqa: E402

CHAT = "SmolLM2-135M-Instruct"
APP = "openai_metrics"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def base_url(serve_instance):
    chat = LLMConfig(model_loading_config={"model_id": CHAT}, engine_kwargs={"max_num_seqs": 2})
    serve.run(build_openai_app({"llm_configs": [chat]}), name=APP)
    yield get_http_url().rstrip("/")
    serve.delete(APP)


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(s: dict, name: str, **labels: str):
    found = [v for (n, ls), v in s.items() if n == name and set(labels.items()) <= ls]
    return sum(found) if found else None


def test_vllm_metrics_move_after_a_chat_completion(base_url):
    def scrape() -> dict:
        r = httpx.get(base_url + "/metrics", timeout=30)  # the OpenAI server's own port, as vLLM
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return samples(r.text)

    before = scrape()
    done_before = value(before, "vllm:request_success_total", model_name=CHAT) or 0
    body = {"model": CHAT, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
            "temperature": 0}
    r = httpx.post(base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    with httpx.stream("POST", base_url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as s:
        assert s.status_code == 200
        assert "data: [DONE]" in "".join(s.iter_text())

    got: dict = {}

    def moved() -> bool:
        got["s"] = s = scrape()
        return (value(s, "vllm:request_success_total", model_name=CHAT) or 0) == done_before + 2

    wait_for(moved, timeout=60, interval=0.25, what="two finished requests in vllm:request_success_total")
    s = got["s"]
    labels = dict(model_name=CHAT)
    assert value(s, "vllm:time_to_first_token_seconds_count", **labels) >= 2
    assert value(s, "vllm:e2e_request_latency_seconds_count", **labels) >= 2
    assert value(s, "vllm:e2e_request_latency_seconds_sum", **labels) > 0
    assert value(s, "vllm:prompt_tokens_total", **labels) >= 2 * usage["prompt_tokens"]
    assert value(s, "vllm:generation_tokens_total", **labels) >= usage["completion_tokens"] + 1
    assert value(s, "vllm:time_per_output_token_seconds_count", **labels) >= 1
    reasons = {dict(ls)["finished_reason"] for (n, ls), v in s.items() if n == "vllm:request_success_total" and v}
    assert reasons <= {"stop", "length"} and reasons
    # Idle again: nothing running or waiting, and the KV cache holds nothing.
    wait_for(lambda: value(scrape(), "vllm:num_requests_running", **labels) == 0, timeout=60)
    s = scrape()
    assert value(s, "vllm:num_requests_waiting", **labels) == 0
    assert value(s, "vllm:kv_cache_usage_perc", **labels) == 0
    # The same text carries shoal's own metrics for the app (the proxy pushes on its own tick).
    wait_for(lambda: (value(scrape(), "ray_serve_num_http_requests_total", application=APP, method="POST",
                            status_code="200") or 0) >= 2, timeout=60, what="the proxy's count of the two requests")


def test_one_model_is_one_deployment_that_serves_http_and_aborts_on_disconnect(base_url):
    deployments = serve.status().applications[APP].deployments
    assert set(deployments) == {f"LLMServer:{CHAT.replace('.', '_')}"}
    handle = serve.get_deployment_handle(f"LLMServer:{CHAT.replace('.', '_')}", APP)
    aborted = handle.engine_stats.remote().result()["aborted"]

    body = {"model": CHAT, "prompt": "Once upon a time", "max_tokens": 700, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
    # The client hung up long before 700 tokens: the engine drops the request.
    wait_for(lambda: handle.engine_stats.remote().result()["aborted"] > aborted, timeout=60, what="an abort")
    stats = handle.engine_stats.remote().result()
    assert stats["active"] == 0 and stats["waiting"] == 0

    # Handle callers get the server's methods, as from an `LLMServer` deployment.
    events = list(handle.options(stream=True).completions.remote(
        {"model": CHAT, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "stream": True}))
    assert events and all('"text_completion"' in e for e in events)
    assert handle.model_card.remote().result()["id"] == CHAT
