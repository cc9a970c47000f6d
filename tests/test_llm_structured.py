"""Structured output (`response_format`): llguidance-constrained decoding, unit-level with the bundled
model's tokenizer and end to end with the official `openai` client against a real server."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import require_llm_stack  # noqa: E402

require_llm_stack()

import jsonschema  # noqa: E402
import numpy as np  # noqa: E402
import openai  # noqa: E402

from shoal import serve  # noqa: E402
from shoal.api import get_http_url  # noqa: E402
from shoal.llm import LLMConfig, build_openai_app  # noqa: E402
from shoal.llm.engines.structured import (  # noqa: E402
    StructuredDecoding,
    grammar_for_response_format,
    mask_logits,
)
from shoal.llm.protocol import ChatCompletionRequest, OpenAIError, from_validation_error  # noqa: E402

CHAT = "SmolLM2-135M-Instruct"
APP = "structured"
pytestmark = pytest.mark.timeout(600)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "hobbies"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

PROMPTS = [
    "Describe a pirate captain.", "Tell me about a baker in Paris.", "Invent a chess champion.",
    "Who is your favourite teacher?", "Describe an astronaut.", "Make up a jazz musician.",
    "Describe a grumpy old farmer.", "Invent a young inventor.", "Tell me about a marathon runner.",
    "Describe a librarian who loves cats.", "Invent a famous chef.", "Describe a shy painter.",
    "Describe a deep-sea diver.", "Invent a medieval knight.", "Tell me about a taxi driver.",
    "Describe a retired detective.", "Invent a mountain climber.", "Describe a beekeeper.",
    "Invent a comedian.", "Describe a lighthouse keeper.",
]  # fmt: skip


# -- unit: grammar compilation, masks, advancing -----------------------------------------------------


@pytest.fixture(scope="module")
def structured():
    from transformers import AutoTokenizer

    from shoal.llm.models import local_model_dir

    tokenizer = AutoTokenizer.from_pretrained(str(local_model_dir(CHAT)), local_files_only=True)
    return tokenizer, StructuredDecoding.from_hf_tokenizer(tokenizer, eos_ids=[tokenizer.eos_token_id])


def test_response_format_kinds_and_errors():
    assert grammar_for_response_format(None) is None
    assert grammar_for_response_format({"type": "text"}) is None
    assert grammar_for_response_format({"type": "json_object"})
    assert grammar_for_response_format(PERSON_FORMAT) is grammar_for_response_format(PERSON_FORMAT)  # cached
    for bad in (
        {"type": "xml"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "[["}}},
    ):
        with pytest.raises(ValueError):
            grammar_for_response_format(bad)


def test_bad_schema_is_a_400_naming_response_format():
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}
    with pytest.raises(Exception) as info:
        ChatCompletionRequest.model_validate(body)
    error = from_validation_error(info.value)
    assert isinstance(error, OpenAIError) and error.status == 400
    assert error.param == "response_format" and "nope" in error.message


def _walk(structured, grammar, text_tokens):
    tokenizer, decoding = structured
    state = decoding.new_state(grammar)
    vocab = decoding.vocab_size
    for token in text_tokens:
        logits = np.zeros((2, vocab), dtype=np.float32)
        mask_logits(logits, [None, state])
        assert np.isfinite(logits[0]).all()  # the free-text row is untouched
        assert np.isfinite(logits[1, token]), tokenizer.decode([token])
        done = state.advance(token)
    return state, done


def test_mask_allows_a_valid_document_and_ends_the_grammar(structured):
    tokenizer, decoding = structured
    grammar = grammar_for_response_format(PERSON_FORMAT)
    doc = '{"name":"Ann","age":31,"mood":"calm","hobbies":["chess"]}'
    state, done = _walk(structured, grammar, tokenizer.encode(doc, add_special_tokens=False))
    assert done and state.is_accepting()


def test_mask_forbids_what_breaks_the_schema(structured):
    import torch

    tokenizer, decoding = structured
    state = decoding.new_state(grammar_for_response_format(PERSON_FORMAT))
    logits = torch.zeros(3, decoding.vocab_size)
    mask_logits(logits, [state, None, None])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).startswith("{") for t in allowed)
    assert torch.isfinite(logits[1:]).all()
    # After '{"name":"A' a digit cannot close the string into an age; the enum only allows its words.
    ids = tokenizer.encode('{"name":"A","age":3,"mood":"', add_special_tokens=False)
    for t in ids:
        assert not state.advance(t)
    row = torch.zeros(decoding.vocab_size)
    mask_logits(row, [state])
    texts = [tokenizer.decode([t]) for t in torch.isfinite(row).nonzero().flatten().tolist()]
    assert texts and all(
        any(w.startswith(x) or x.startswith(w) for w in ('happy"', 'sad"', 'calm"')) for x in texts
    )
    # A compiled grammar is cached: a second state starts fresh from the same compiled matcher.
    again = decoding.new_state(grammar_for_response_format(PERSON_FORMAT))
    logits = torch.zeros(1, decoding.vocab_size)
    mask_logits(logits, [again])
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == allowed


def test_json_object_ends_on_eos_or_close(structured):
    tokenizer, decoding = structured
    grammar = grammar_for_response_format({"type": "json_object"})
    state, done = _walk(structured, grammar, tokenizer.encode('{"a":[1,2]}', add_special_tokens=False))
    assert done and state.is_accepting()


# -- end to end: the openai client against a real server ---------------------------------------------


@pytest.fixture(scope="module", params=["llama_cpp", "transformers"])
def client(request, serve_instance):
    """A server on each engine: the default for the bundled GGUF (llama.cpp) and transformers."""
    chat = LLMConfig(
        model_loading_config={"model_id": CHAT},
        llm_engine=request.param,
        engine_kwargs={"max_num_seqs": 16},
    )
    serve.run(build_openai_app({"llm_configs": [chat]}), name=APP)
    base_url = get_http_url().rstrip("/") + "/v1"
    yield openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    serve.delete(APP)


def _ask(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "Answer with a JSON object describing a person."},
            {"role": "user", "content": text}]


def test_json_schema_validates_on_20_prompts(client):
    from concurrent.futures import ThreadPoolExecutor

    def one(i_prompt):
        i, prompt = i_prompt
        sampled = {"temperature": 0.8, "top_p": 0.95, "seed": i} if i % 2 else {"temperature": 0}
        r = client.chat.completions.create(
            model=CHAT, messages=_ask(prompt), max_tokens=200, response_format=PERSON_FORMAT, **sampled
        )
        return r.choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, enumerate(PROMPTS)))
    outputs = set()
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        value = json.loads(choice.message.content)
        jsonschema.validate(value, PERSON)
        outputs.add(choice.message.content)
    assert len(outputs) > 1


def test_json_object_parses(client):
    """`json_object` constrains to JSON but not its length: a small model may keep nesting keys past
    `max_tokens` ("length", a cut object, as with OpenAI). Every answer that ends must parse as an
    object, every answer starts one, and at least one of these short-answer prompts ends."""
    ended = 0
    for thing in ("a cat", "a dog", "a colour", "a number", "a fruit"):
        r = client.chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": f"Give a short JSON object (two keys) about {thing}."}],
            max_tokens=200, temperature=0, response_format={"type": "json_object"},
        )
        content, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert content.startswith("{"), content
        if finish == "stop":
            assert isinstance(json.loads(content), dict), content
            ended += 1
    assert ended >= 1


def test_streamed_json_schema_validates(client):
    chunks = list(client.chat.completions.create(
        model=CHAT, messages=_ask("Describe a sailor."), max_tokens=200, temperature=0,
        response_format=PERSON_FORMAT, stream=True,
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), PERSON)
    whole = client.chat.completions.create(
        model=CHAT, messages=_ask("Describe a sailor."), max_tokens=200, temperature=0,
        response_format=PERSON_FORMAT,
    )
    assert whole.choices[0].message.content == text


def test_completions_accept_response_format_and_max_tokens_still_cuts(client):
    r = client.completions.create(
        model=CHAT, prompt="A person as JSON:", max_tokens=200, temperature=0,
        extra_body={"response_format": PERSON_FORMAT},
    )
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    cut = client.chat.completions.create(
        model=CHAT, messages=_ask("Describe a sailor."), max_tokens=3, temperature=0,
        response_format=PERSON_FORMAT,
    )
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 3


def test_bad_schema_and_unknown_type_are_400s(client):
    for fmt in (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
        {"type": "yaml"},
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=CHAT, messages=_ask("hi"), max_tokens=5, response_format=fmt
            )
        assert info.value.body["param"] == "response_format"
    # Free text still works beside it.
    r = client.chat.completions.create(
        model=CHAT, messages=_ask("hi"), max_tokens=5, temperature=0, response_format={"type": "text"}
    )
    assert r.choices[0].message.content
