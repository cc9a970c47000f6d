"""API keys on the OpenAI server (`api_keys` of `build_openai_app`), driven by the official `openai`
client over real HTTP on the bundled chat model: 401 without a key or with a wrong one, 429 +
`Retry-After` past a key's requests or tokens per minute, per-key counts in `/metrics`, and no key
text in the instance's status, logs or checkpoints. The limiter and key parsing have their unit
tests in test_llm_api_keys_unit.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import require_llm_stack, wait_for  # noqa: E402

require_llm_stack()

import openai  # noqa: E402
from test_llm_metrics import samples, value  # noqa: E402
from test_llm_openai import CHAT, ask  # noqa: E402

from shoal import serve  # noqa: E402
from shoal.api import get_http_url  # noqa: E402
from shoal.client import get_global_client  # noqa: E402
from shoal.llm import LLMConfig, build_openai_app  # noqa: E402

APP = "openai_keys"
ALICE = "sk-alice-4f9c2e7b1d8a6350"
BOB = "sk-bob-from-the-environment-77"
TINY = "sk-tiny-limit-0123456789"
METER = "sk-tokens-limit-9876543210"
CAROL = "sk-carol-for-metrics-135790"
ALL_KEYS = (ALICE, BOB, TINY, METER, CAROL)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def base_url(serve_instance):
    os.environ["SHOAL_TEST_BOB_KEY"] = BOB  # read when the app is built, in this process
    chat = LLMConfig(model_loading_config={"model_id": CHAT}, engine_kwargs={"max_num_seqs": 4})
    keys = [
        {"name": "alice", "key": ALICE},
        {"name": "bob", "key_env": "SHOAL_TEST_BOB_KEY"},
        {"name": "tiny", "key": TINY, "requests_per_minute": 2},
        {"name": "meter", "key": METER, "tokens_per_minute": 1},
        {"name": "carol", "key": CAROL},
    ]
    serve.run(build_openai_app({"llm_configs": [chat], "api_keys": keys}), name=APP)
    yield get_http_url().rstrip("/")
    serve.delete(APP)
    os.environ.pop("SHOAL_TEST_BOB_KEY", None)


def client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key=key, max_retries=0, timeout=120)


def test_v1_needs_a_valid_key_and_other_routes_stay_open(base_url):
    with pytest.raises(openai.AuthenticationError) as info:
        client(base_url, "sk-wrong-key-000000000000").chat.completions.create(
            model=CHAT, messages=ask("hi"), max_tokens=2)
    assert info.value.status_code == 401
    assert info.value.body == {"message": info.value.body["message"], "type": "invalid_request_error",
                               "param": None, "code": "invalid_api_key"}
    assert info.value.body["message"].startswith("Incorrect API key provided: sk-****0000.")
    for method, path in (("GET", "/v1/models"), ("GET", f"/v1/models/{CHAT}"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings")):
        r = httpx.request(method, base_url + path, json={"model": CHAT, "prompt": "hi"}, timeout=30)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["message"].startswith("You didn't provide an API key.")
        assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(base_url + "/v1/models", headers={"Authorization": f"Basic {ALICE}"}, timeout=30)
    assert r.status_code == 401
    assert httpx.get(base_url + "/metrics", timeout=30).status_code == 200


def test_each_key_works_and_streams_are_unchanged(base_url):
    alice, bob = client(base_url, ALICE), client(base_url, BOB)
    assert [m.id for m in alice.models.list().data] == [CHAT]
    r = alice.chat.completions.create(model=CHAT, messages=ask("Say hi."), max_tokens=4, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens > 0
    r = bob.completions.create(model=CHAT, prompt="The sky is", max_tokens=4, temperature=0)  # key from env
    assert r.choices[0].text
    # A stream without include_usage looks as it does without keys: no usage event reaches the client.
    chunks = list(bob.completions.create(model=CHAT, prompt="The sky is", max_tokens=4, temperature=0,
                                         stream=True))
    assert chunks and all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    chunks = list(bob.chat.completions.create(model=CHAT, messages=ask("Hi"), max_tokens=3, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_past_a_keys_request_limit_is_429_with_retry_after(base_url):
    tiny = client(base_url, TINY)
    tiny.models.list()
    tiny.chat.completions.create(model=CHAT, messages=ask("Hi"), max_tokens=2)
    with pytest.raises(openai.RateLimitError) as info:
        tiny.chat.completions.create(model=CHAT, messages=ask("Hi"), max_tokens=2)
    assert info.value.status_code == 429
    assert 1 <= int(info.value.response.headers["retry-after"]) <= 30  # 2 per minute: one every 30 s
    body = info.value.body
    assert body["code"] == "rate_limit_exceeded" and body["type"] == "requests" and body["param"] is None
    assert "requests per min (RPM): Limit 2" in body["message"]
    # Another key is not affected.
    assert client(base_url, ALICE).models.list().data


def test_past_a_keys_token_limit_is_429(base_url):
    meter = client(base_url, METER)
    meter.completions.create(model=CHAT, prompt="Hello", max_tokens=3)  # admitted, then overdraws
    with pytest.raises(openai.RateLimitError) as info:
        meter.completions.create(model=CHAT, prompt="Hello", max_tokens=3)
    assert info.value.body["type"] == "tokens" and info.value.body["code"] == "rate_limit_exceeded"
    assert int(info.value.response.headers["retry-after"]) >= 60  # 1 token a minute, several tokens used


def test_metrics_count_requests_tokens_and_rejections_per_key(base_url):
    carol = client(base_url, CAROL)
    prompt = completion = 0
    r = carol.chat.completions.create(model=CHAT, messages=ask("Name a colour."), max_tokens=5)
    prompt, completion = prompt + r.usage.prompt_tokens, completion + r.usage.completion_tokens
    chunks = list(carol.chat.completions.create(model=CHAT, messages=ask("Name a fruit."), max_tokens=5,
                                                stream=True, stream_options={"include_usage": True}))
    prompt, completion = prompt + chunks[-1].usage.prompt_tokens, completion + chunks[-1].usage.completion_tokens
    # Without include_usage the client sees no usage, yet the key is charged what the stream used
    # (the same prompt without streaming tells how many prompt tokens that is).
    stream = carol.completions.create(model=CHAT, prompt="One, two,", max_tokens=4, stream=True,
                                      extra_body={"ignore_eos": True})
    assert all(c.usage is None for c in stream)
    r = carol.completions.create(model=CHAT, prompt="One, two,", max_tokens=1, extra_body={"ignore_eos": True})
    prompt, completion = prompt + 2 * r.usage.prompt_tokens, completion + 4 + r.usage.completion_tokens
    with pytest.raises(openai.AuthenticationError):
        client(base_url, "sk-not-a-key-11111111111").models.list()

    got: dict = {}

    def counted() -> bool:
        got["s"] = s = samples(httpx.get(base_url + "/metrics", timeout=30).text)
        return value(s, "shoal_llm_api_key_requests_total", key="carol") == 4 and value(
            s, "shoal_llm_api_key_tokens_total", key="carol", kind="completion") == completion

    wait_for(counted, timeout=30, interval=0.25, what="carol's 4 requests and their tokens in /metrics")
    s = got["s"]
    assert value(s, "shoal_llm_api_key_requests_total", key="carol", model=CHAT) == 4
    assert value(s, "shoal_llm_api_key_tokens_total", key="carol", model=CHAT, kind="prompt") == prompt
    assert value(s, "shoal_llm_api_key_rejections_total", key="", reason="invalid_key") >= 1
    wait_for(lambda: value(samples(httpx.get(base_url + "/metrics", timeout=30).text),
                           "shoal_llm_api_key_rejections_total", key="tiny", reason="requests_per_minute"),
             timeout=30, what="tiny's refusal in /metrics")


def test_key_text_is_never_in_status_logs_or_checkpoints(base_url):
    status = json.dumps(serve.status().to_dict(), default=str)
    assert not [k for k in ALL_KEYS if k in status]
    session = Path(get_global_client().session_dir)
    leaks = []
    for path in session.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaks += [(str(path), k) for k in ALL_KEYS if k.encode() in data]
    assert not leaks
    # The ingress did log which keys it accepts, by name.
    logs = "".join(p.read_text(errors="replace") for p in (session / "logs").rglob("*OpenAiIngress*"))
    assert "API keys required on /v1/*: 5 key(s): alice, bob, tiny, meter, carol" in logs
