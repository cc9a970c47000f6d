"""The OpenAI-compatible API (`shoal.llm.build_openai_app`) driven by the official `openai` client.

One application serves both bundled models over real HTTP for the whole module; the chat model is
limited to 4 requests at a time with 2 more queued, so the overload test can provoke 429s.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import require_llm_stack, wait_for  # noqa: E402

require_llm_stack()

import openai  # noqa: E402

from shoal import serve  # noqa: E402
from shoal.api import get_http_url  # noqa: E402
from shoal.llm import LLMConfig, build_openai_app  # noqa: E402

CHAT = "SmolLM2-135M-Instruct"
EMBED = "all-MiniLM-L6-v2"
APP = "openai"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def base_url(serve_instance):
    chat = LLMConfig(
        model_loading_config={"model_id": CHAT},
        engine_kwargs={"max_num_seqs": 8},
        deployment_config={"max_ongoing_requests": 4, "max_queued_requests": 2},
    )
    embed = LLMConfig(model_loading_config={"model_id": EMBED})
    serve.run(build_openai_app({"llm_configs": [chat, embed]}), name=APP)
    yield get_http_url().rstrip("/") + "/v1"
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def aclient(base_url):
    """A fresh async client per test: its connection pool belongs to the test's own event loop."""
    return openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- models ------------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client):
    ids = sorted(m.id for m in client.models.list().data)
    assert ids == sorted([CHAT, EMBED])
    card = client.models.retrieve(CHAT)
    assert card.id == CHAT and card.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


# -- chat completions --------------------------------------------------------------------------------


def test_chat_completion(client):
    # "Name the capital of France." rather than "What is ...?": on llama.cpp's kernels (the default
    # engine for the bundled GGUF) the 135M model's greedy answer to the latter starts "L'Étoile"
    # (llama-server's too: "L" outscores "The" by 0.2); both engines answer this one "... is Paris."
    r = client.chat.completions.create(
        model=CHAT, messages=ask("Name the capital of France."), max_tokens=24, temperature=0
    )
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == CHAT
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_max_tokens_and_max_completion_tokens_cap_the_output(client):
    for cap in ({"max_tokens": 5}, {"max_completion_tokens": 5}):
        r = client.chat.completions.create(
            model=CHAT, messages=ask("Write a long story about a dragon."), temperature=0, **cap
        )
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == 5


def test_chat_stream_with_usage_ends_with_done(client, base_url):
    chunks = list(client.chat.completions.create(
        model=CHAT, messages=ask("Name three colours."), max_tokens=16, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens > 0
    # The same request without streaming gives the same text (greedy) and the same usage.
    whole = client.chat.completions.create(
        model=CHAT, messages=ask("Name three colours."), max_tokens=16, temperature=0
    )
    assert whole.choices[0].message.content == text
    assert whole.usage.completion_tokens == usage.completion_tokens
    # On the wire: server-sent events, the last one `data: [DONE]`.
    body = {"model": CHAT, "messages": ask("Hi"), "max_tokens": 3, "stream": True}
    raw = httpx.post(f"{base_url}/chat/completions", json=body, timeout=60)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_seed_makes_sampling_repeatable_and_tiny_top_p_is_greedy(client):
    kwargs = dict(model=CHAT, messages=ask("Tell me a fact about cats."), max_tokens=16)
    a = client.chat.completions.create(temperature=1.0, seed=7, **kwargs).choices[0].message.content
    b = client.chat.completions.create(temperature=1.0, seed=7, **kwargs).choices[0].message.content
    assert a == b
    greedy = client.chat.completions.create(temperature=0, **kwargs).choices[0].message.content
    nucleus = client.chat.completions.create(temperature=1.0, top_p=1e-6, seed=3, **kwargs)
    assert nucleus.choices[0].message.content == greedy


# -- tools -------------------------------------------------------------------------------------------

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"], "additionalProperties": False}}}


def test_forced_tool_call_parses_into_the_functions_arguments(client):
    import jsonschema

    for question in ("What is the weather in Paris?", "Is it raining in Oslo today?", "Weather for Tokyo, please."):
        reply = client.chat.completions.create(
            model=CHAT, messages=ask(question), tools=[WEATHER_TOOL, TIME_TOOL], max_tokens=60,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])


def test_required_tool_call_picks_one_of_the_tools(client):
    import jsonschema

    reply = client.chat.completions.create(model=CHAT, messages=ask("What time is it in UTC?"),
                                           tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", max_tokens=60)
    (call,) = reply.choices[0].message.tool_calls
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER_TOOL, TIME_TOOL)}
    jsonschema.validate(json.loads(call.function.arguments), schema[call.function.name])
    assert reply.choices[0].finish_reason == "tool_calls"


def test_forced_tool_call_streams_as_deltas(client):
    chunks = list(client.chat.completions.create(
        model=CHAT, messages=ask("Weather in Rome?"), tools=[WEATHER_TOOL], max_tokens=60, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    head = next(tc for tc in calls if tc.id)
    assert head.function.name == "get_weather" and head.index == 0
    arguments = "".join(tc.function.arguments or "" for tc in calls)
    assert len([tc for tc in calls if tc.function.arguments]) > 1  # streamed in pieces, as generated
    assert set(json.loads(arguments)) == {"city", "unit"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


def test_tool_choice_none_and_a_tool_result_turn_give_text(client):
    reply = client.chat.completions.create(model=CHAT, messages=ask("Say hello."), tools=[WEATHER_TOOL],
                                           tool_choice="none", max_tokens=12, temperature=0)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
    history = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"},
    ]
    reply = client.chat.completions.create(model=CHAT, messages=history, tools=[WEATHER_TOOL], max_tokens=24,
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.choices[0].message.content or reply.choices[0].message.tool_calls


# -- completions -------------------------------------------------------------------------------------


def test_completion_and_stop_strings(client):
    prompt = "Monday, Tuesday, Wednesday,"
    full = client.completions.create(model=CHAT, prompt=prompt, max_tokens=12, temperature=0)
    text = full.choices[0].text
    assert full.object == "text_completion" and text
    stop = text.strip()[len(text.strip()) // 2:][:3]  # a piece from the middle of the greedy output
    cut = client.completions.create(model=CHAT, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_completion_stream_and_token_prompt(client):
    pieces = list(client.completions.create(
        model=CHAT, prompt="The sky is", max_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True}
    ))
    assert pieces[-1].choices[0].finish_reason == "length"
    streamed = "".join(p.choices[0].text for p in pieces)
    whole = client.completions.create(model=CHAT, prompt="The sky is", max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert whole.choices[0].text == streamed and whole.usage.completion_tokens == 6
    by_ids = client.completions.create(model=CHAT, prompt=[504, 6375, 314], max_tokens=3, temperature=0)
    assert by_ids.usage.prompt_tokens == 3 and by_ids.usage.completion_tokens >= 1


# -- embeddings --------------------------------------------------------------------------------------


def _cos(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_embeddings_float_and_base64(client, base_url):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    r = client.embeddings.create(model=EMBED, input=texts)  # the client asks for base64 by default
    vectors = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 384 for v in vectors)
    assert abs(math.sqrt(sum(x * x for x in vectors[0])) - 1) < 1e-3
    assert _cos(vectors[0], vectors[1]) > _cos(vectors[0], vectors[2]) + 0.2
    assert r.usage.prompt_tokens > 0
    floats = httpx.post(f"{base_url}/embeddings", json={"model": EMBED, "input": texts[0]}, timeout=60).json()
    assert floats["object"] == "list"
    assert floats["data"][0]["embedding"] == pytest.approx(vectors[0], abs=1e-6)


# -- errors ------------------------------------------------------------------------------------------


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=ask("hi"))
    assert info.value.status_code == 404 and info.value.body["param"] == "model"
    assert CHAT in info.value.message  # it lists what is available
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="gpt-9", input="hi")


def test_invalid_fields_are_400_naming_them(client, base_url):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=ask("hi"), temperature=5)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=ask("hi"), extra_body={"bogus_option": 1})
    assert info.value.body["param"] == "bogus_option" and "Unrecognized" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=[{"role": "wizard", "content": "hi"}])
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=CHAT, input="hi")  # not an embedding model
    assert info.value.body["param"] == "model"
    raw = httpx.post(f"{base_url}/chat/completions", content=b"{not json", timeout=30)
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=CHAT, prompt="word " * 9000, max_tokens=4)
    assert info.value.body["code"] == "context_length_exceeded"
    # The context is the engine's: a slot of the llama.cpp engine's split KV cache by default.
    assert "maximum context length is 768 tokens" in info.value.message


def test_overload_is_429_with_retry_after(aclient, base_url):
    async def one(i: int) -> str:
        try:
            await aclient.chat.completions.create(
                model=CHAT, messages=ask(f"Story number {i}"), max_tokens=40, extra_body={"ignore_eos": True}
            )
            return "ok"
        except openai.RateLimitError as e:
            assert e.response.headers.get("retry-after") == "1"
            assert e.body["code"] == "rate_limit_exceeded"
            return "429"

    async def burst() -> list[str]:
        return await asyncio.gather(*(one(i) for i in range(10)))

    outcomes = asyncio.run(burst())
    # 4 running and 2 queued are admitted; the rest are refused at once, never dropped silently.
    assert outcomes.count("429") >= 1 and outcomes.count("ok") >= 6
    assert outcomes.count("ok") + outcomes.count("429") == 10
    # Capacity comes back once the burst is over.
    r = httpx.post(f"{base_url}/completions", json={"model": CHAT, "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


# -- concurrency and cancellation -------------------------------------------------------------------


def test_two_streams_interleave(aclient):
    arrivals: list[tuple[str, float]] = []

    async def stream(name: str) -> None:
        chunks = await aclient.completions.create(
            model=CHAT, prompt=f"A list of {name} names:", max_tokens=24, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )
        async for _ in chunks:
            arrivals.append((name, time.monotonic()))

    async def both() -> None:
        await asyncio.gather(stream("a"), stream("b"))

    asyncio.run(both())
    order = [name for name, _ in arrivals]
    assert order.count("a") >= 20 and order.count("b") >= 20
    # Neither waited for the other: each one's first token came before the other's last.
    first = {n: order.index(n) for n in "ab"}
    last = {n: len(order) - 1 - order[::-1].index(n) for n in "ab"}
    assert first["a"] < last["b"] and first["b"] < last["a"]


def test_client_disconnect_aborts_generation(base_url):
    handle = serve.get_deployment_handle(f"LLMServer:{CHAT}", APP)
    before = handle.engine_stats.remote().result()["aborted"]
    body = {"model": CHAT, "prompt": "Count forever:", "max_tokens": 700, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=60) as r:
        events = r.iter_lines()
        got = [line for line, _ in zip((e for e in events if e.startswith("data: ")), range(3))]
        assert len(got) == 3 and json.loads(got[0][6:])["choices"]
    stats = wait_for(lambda: (s := handle.engine_stats.remote().result())["aborted"] > before and s,
                     timeout=30, what="the engine to abort the abandoned stream")
    assert stats["active"] == 0
