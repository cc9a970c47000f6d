"""The rest of OpenAI's request surface (`n`, logprobs, penalties, `logit_bias`, `seed`, several
prompts) driven by the official `openai` client against a real server on the bundled model, plus unit
tests of the shared sampling module (`shoal.llm.engines.sampling`).

The server is `test_llm_openai`'s module fixture (imported, so this module gets its own instance).
"""

from __future__ import annotations

import os

import httpx
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import require_llm_stack  # noqa: E402

require_llm_stack()

import openai  # noqa: E402
import torch  # noqa: E402

from shoal.llm.engines.base import SamplingParams  # noqa: E402
from shoal.llm.engines.sampling import (  # noqa: E402
    LogitsProcessor,
    apply_logits_processors,
    make_logits_processor,
    sample_tokens,
    row_logprobs,
    token_logprobs,
    validate_logit_bias,
)
from test_llm_openai import CHAT, ask, base_url, client  # noqa: E402,F401 - the server fixture

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tokenizer(client):  # noqa: F811 - after the server, which has converted the bundled GGUF once
    from shoal.llm.models import load_causal_lm, resolve_model_source

    _, tok = load_causal_lm(resolve_model_source(CHAT))
    return tok


# -- the sampling module -------------------------------------------------------------------------------


def test_penalties_follow_openai_formula_and_only_touch_their_rows():
    logits = torch.zeros(3, 6)
    p = LogitsProcessor(6, "cpu", presence_penalty=0.5, frequency_penalty=1.0)
    for token in (2, 2, 4):
        p.observe(token)
    assert apply_logits_processors(logits, [None, p, None]) is logits  # in place
    assert logits[0].tolist() == [0.0] * 6 and logits[2].tolist() == [0.0] * 6
    # token 2 seen twice: -(1.0 * 2 + 0.5); token 4 once: -(1.0 + 0.5)
    assert logits[1].tolist() == [0.0, 0.0, -2.5, 0.0, -1.5, 0.0]
    both = LogitsProcessor(6, presence_penalty=1.0, logit_bias={2: 3.0})
    both.observe(2)
    strided = torch.zeros(2, 2, 6)[:, -1, :]  # a slice of a model's output, as engines pass it
    assert apply_logits_processors(strided, [both, None])[0].tolist() == [0.0, 0.0, 2.0, 0.0, 0.0, 0.0]


def test_logit_bias_is_added_and_validated():
    logits = torch.zeros(2, 5)
    p = make_logits_processor(SamplingParams(logit_bias={1: 100.0, 3: -100.0}), 5, "cpu")
    assert p is not None and p.counts is None  # bias only: no token counting
    apply_logits_processors(logits, [p, None])
    assert logits[0].tolist() == [0.0, 100.0, 0.0, -100.0, 0.0] and logits[1].tolist() == [0.0] * 5
    assert make_logits_processor(SamplingParams(), 5, "cpu") is None
    with pytest.raises(ValueError, match="not in the vocabulary"):
        validate_logit_bias({5: 1.0}, 5)
    with pytest.raises(ValueError, match="-100, 100"):
        validate_logit_bias({1: 101.0}, 5)


def test_sample_tokens_greedy_and_seeded():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    greedy = SamplingParams(temperature=0)
    assert sample_tokens(logits, [greedy, greedy], [None, None]) == [1, 0]
    hot = SamplingParams(temperature=1.5)
    draws = [sample_tokens(torch.zeros(1, 50), [hot], [torch.Generator().manual_seed(9)])[0] for _ in range(2)]
    assert draws[0] == draws[1]  # the same seed draws the same token
    tiny_top_p = SamplingParams(temperature=1.0, top_p=1e-6)
    assert sample_tokens(logits, [tiny_top_p, tiny_top_p], [None, None], torch.Generator()) == [1, 0]


def test_row_logprobs_in_numpy_match_token_logprobs_in_torch():
    """The llama.cpp engine's numpy path gives the torch path's values and order, masked tokens included."""
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 5000, generator=generator) * 4
    logits[1, ::3] = float("-inf")  # a response_format mask
    logits[2, 10:20] = logits[2].max() + 1  # ties at the top: broken by token id
    for r in range(3):
        row = logits[r].numpy().copy()
        chosen = int(logits[r].argmax())
        ours = row_logprobs(row, chosen, 5)
        theirs = token_logprobs(logits[r : r + 1], [chosen], [5])[0]
        assert theirs is not None and ours.token_id == chosen
        assert ours.logprob == pytest.approx(theirs.logprob, abs=1e-5)
        assert [lp for _, lp in ours.top] == pytest.approx([lp for _, lp in theirs.top], abs=1e-5)
        if r < 2:
            assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
        assert (row == logits[r].numpy()).all()  # the row is left as it was
    tied = row_logprobs(logits[2].numpy().copy(), 10, 4)
    assert [t for t, _ in tied.top] == [10, 11, 12, 13]
    assert row_logprobs(logits[0].numpy().copy(), 3, 0).top == []


def test_token_logprobs_shape_and_values():
    logits = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]])
    rows = token_logprobs(logits, [1, 2, 0], [2, None, 0])
    assert rows[1] is None
    first = rows[0]
    assert first is not None and first.token_id == 1
    expected = torch.log_softmax(logits[0], -1)
    assert first.logprob == pytest.approx(float(expected[1]))
    assert [t for t, _ in first.top] == [1, 2]
    assert [lp for _, lp in first.top] == pytest.approx([float(expected[1]), float(expected[2])])
    assert rows[2] is not None and rows[2].top == [] and rows[2].logprob <= 0
    assert token_logprobs(logits, [0, 0, 0], [None, None, None]) == [None, None, None]


# -- n ----------------------------------------------------------------------------------------------------


def test_n_gives_n_choices_and_usage_sums_them(client):
    kwargs = dict(model=CHAT, messages=ask("Name a colour."), max_tokens=8, temperature=0)
    one = client.chat.completions.create(**kwargs)
    three = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in three.choices] == [0, 1, 2]
    texts = {c.message.content for c in three.choices}
    assert texts == {one.choices[0].message.content}  # greedy: the same text three times
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # one prompt, counted once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert three.system_fingerprint and three.system_fingerprint == one.system_fingerprint


def test_n_streamed_interleaves_choices_by_index(client):
    stream = client.chat.completions.create(
        model=CHAT, messages=ask("Count to five."), max_tokens=10, temperature=0, n=2, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    texts = {0: "", 1: ""}
    finishes = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length"}
    assert texts[0] == texts[1] and texts[0]
    assert usage is not None and usage.completion_tokens == 20


def test_seed_reproducible_per_choice(client):
    kwargs = dict(model=CHAT, messages=ask("Write a word."), max_tokens=12, temperature=1.0, n=2, seed=1234)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


# -- logprobs ---------------------------------------------------------------------------------------------


def test_chat_top_logprobs_shape_and_order(client):
    r = client.chat.completions.create(
        model=CHAT, messages=ask("Say hello."), max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.bytes == list(t.token.encode())
        assert all(alt.logprob <= t.logprob + 1e-6 for alt in t.top_logprobs)  # greedy: chosen is the best
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
    plain = client.chat.completions.create(model=CHAT, messages=ask("Say hello."), max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_streamed(client):
    chunks = list(client.chat.completions.create(
        model=CHAT, messages=ask("Say hello."), max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
        stream=True, extra_body={"ignore_eos": True},
    ))
    tokens = [t for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.content
              for t in ch.logprobs.content]
    assert len(tokens) == 5 and all(len(t.top_logprobs) == 2 for t in tokens)
    assert "".join(t.token for t in tokens) == "".join(ch.delta.content or "" for c in chunks for ch in c.choices)


def test_completion_logprobs_shape(client):
    r = client.completions.create(model=CHAT, prompt="One, two, three,", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 2 <= len(top) <= 3 and top[token] == pytest.approx(value)


# -- penalties and bias -----------------------------------------------------------------------------------


def _greedy_tokens(client, prompt: str, **extra) -> list[str]:
    r = client.completions.create(model=CHAT, prompt=prompt, max_tokens=32, temperature=0, logprobs=0,
                                  extra_body={"ignore_eos": True}, **extra)
    return r.choices[0].logprobs.tokens


def test_frequency_and_presence_penalties_reduce_repetition(client):
    prompt = "The sky is blue. The sky is blue. The sky is blue. The sky is"
    plain = _greedy_tokens(client, prompt)
    penalized = _greedy_tokens(client, prompt, frequency_penalty=2.0, presence_penalty=2.0)
    repeats = lambda tokens: len(tokens) - len(set(tokens))  # noqa: E731
    assert repeats(plain) > 0
    assert repeats(penalized) < repeats(plain)


def test_logit_bias_bans_and_forces_tokens(client, tokenizer):
    kwargs = dict(model=CHAT, prompt="The capital of France is", max_tokens=1, temperature=0)
    first = client.completions.create(**kwargs).choices[0].text
    ids = tokenizer.encode(first, add_special_tokens=False)
    assert len(ids) == 1
    banned = client.completions.create(logit_bias={str(ids[0]): -100}, **kwargs).choices[0].text
    assert banned != first
    forced_id = tokenizer.encode(" banana", add_special_tokens=False)[0]
    forced = client.completions.create(**{**kwargs, "max_tokens": 3}, logit_bias={str(forced_id): 100},
                                       extra_body={"ignore_eos": True})
    assert forced.choices[0].text == tokenizer.decode([forced_id]) * 3


# -- several prompts --------------------------------------------------------------------------------------


def test_several_prompts_in_one_completions_request(client):
    prompts = ["Roses are red,", "1, 2, 3,"]
    singles = [client.completions.create(model=CHAT, prompt=p, max_tokens=6, temperature=0) for p in prompts]
    both = client.completions.create(model=CHAT, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    # prompt-major: choices 0 and 1 answer the first prompt, 2 and 3 the second
    assert [c.text for c in both.choices] == [singles[0].choices[0].text] * 2 + [singles[1].choices[0].text] * 2
    assert both.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert both.usage.completion_tokens == 2 * sum(s.usage.completion_tokens for s in singles)
    streamed = list(client.completions.create(model=CHAT, prompt=prompts, max_tokens=6, temperature=0,
                                              stream=True))
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {0: singles[0].choices[0].text, 1: singles[1].choices[0].text}


# -- errors -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("n", 17), ("n", 0), ("presence_penalty", 2.5), ("frequency_penalty", -2.5), ("top_logprobs", 21),
    ("logit_bias", {"5": 150}),
])  # fmt: skip
def test_out_of_range_values_are_400_naming_them(client, field, value):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=ask("hi"), max_tokens=1, **extra, **{field: value})
    assert info.value.body["param"] == field


def test_engine_side_errors_name_their_field(client, base_url):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as info:  # a token id past the vocabulary
        client.chat.completions.create(model=CHAT, messages=ask("hi"), max_tokens=1, logit_bias={"10000000": 1})
    assert info.value.body["param"] == "logit_bias" and "vocabulary" in info.value.message
    raw = httpx.post(f"{base_url}/completions", json={"model": CHAT, "prompt": "x", "logprobs": 6}, timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=CHAT, messages=ask("hi"), max_tokens=1, top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"
