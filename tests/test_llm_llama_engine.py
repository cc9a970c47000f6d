"""The llama.cpp engine (shoal.llm.engines.llama_cpp) on the bundled SmolLM2 GGUF: continuous
batching, chunked prefill, prefix caching, stop strings, aborts, context limits, engine choice.

Needs llama-cpp-python; the module is skipped (with the reason) when it cannot be imported.
Nothing here uses the network or asserts on timings.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")

from shoal.llm.engines import (  # noqa: E402
    Delta,
    GenerationRequest,
    LLMEngine,
    LlamaCppEngine,
    PromptTooLongError,
    SamplingParams,
    TransformersEngine,
    build_engine,
    default_engine_name,
)
from shoal.llm.models import resolve_model_source  # noqa: E402

PROMPTS = [f"Tell me a fact about the number {i}." for i in range(16)]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def chat(content: str, **sampling: Any) -> GenerationRequest:
    sampling.setdefault("temperature", 0)
    return GenerationRequest(messages=[{"role": "user", "content": content}], sampling=SamplingParams(**sampling))


async def tokens_of(engine: LlamaCppEngine, request: GenerationRequest) -> list[int]:
    return [t async for d in engine.generate(request) for t in d.token_ids]


async def collect(engine: LlamaCppEngine, request: GenerationRequest) -> tuple[str, list[Delta]]:
    deltas = [d async for d in engine.generate(request)]
    return "".join(d.text for d in deltas), deltas


@pytest.fixture(scope="module")
def engine() -> Any:
    """The default configuration: a split KV cache (one slot per sequence) with prefix caching."""
    eng = LlamaCppEngine(max_prefill_tokens=64)
    run(eng.start())
    yield eng
    run(eng.shutdown())


@pytest.fixture(scope="module")
def exact_engine() -> Any:
    """The default split cache (one KV stream per sequence): bit-identical whatever the batch."""
    eng = LlamaCppEngine()
    run(eng.start())
    yield eng
    run(eng.shutdown())


def test_default_engine_for_gguf_on_cpu_and_explicit_choice() -> None:
    resolved = resolve_model_source("SmolLM2-135M-Instruct")
    assert resolved.format == "gguf"
    assert default_engine_name(resolved) == "llama_cpp"
    assert isinstance(build_engine("SmolLM2-135M-Instruct"), LlamaCppEngine)
    assert isinstance(build_engine("SmolLM2-135M-Instruct", engine="transformers"), TransformersEngine)
    assert isinstance(build_engine("SmolLM2-135M-Instruct", engine="llama.cpp"), LlamaCppEngine)
    with pytest.raises(ValueError, match="unknown engine"):
        build_engine("SmolLM2-135M-Instruct", engine="vllm")


def test_protocol_and_sensible_greedy_answer(engine: LlamaCppEngine) -> None:
    assert isinstance(engine, LLMEngine)
    request = chat("What is 2 + 2? Answer with one number.", max_tokens=16)
    text, deltas = run(collect(engine, request))
    assert "4" in text
    last = deltas[-1]
    assert last.finish_reason in ("stop", "length") and last.usage is not None
    assert last.usage.prompt_tokens == len(engine.render_prompt(request))
    assert last.usage.completion_tokens == sum(len(d.token_ids) for d in deltas)
    assert all(d.finish_reason is None and d.usage is None for d in deltas[:-1])
    assert engine.num_threads >= 1


def test_chat_template_comes_from_the_gguf(engine: LlamaCppEngine) -> None:
    ids = engine.render_prompt(GenerationRequest(messages=[{"role": "user", "content": "Hi"}]))
    text = engine._decode_text(ids)  # special tokens are skipped when decoding
    assert text.startswith("system\n") and text.endswith("user\nHi\nassistant\n")
    im_start = engine.tokenize("<|im_start|>", add_special=False)
    assert len(im_start) == 1 and ids.count(im_start[0]) == 3  # parsed as one special token each


def test_greedy_output_alone_equals_output_in_a_batch_of_16(exact_engine: LlamaCppEngine) -> None:
    """However the 16 trickle in (a busy machine decides), each answer is its solo answer: slots keep
    sequences apart, and prompts of different lengths never share a `llama_decode`."""
    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        alone = [await tokens_of(exact_engine, chat(p, max_tokens=16)) for p in PROMPTS]
        batch = await asyncio.gather(*[tokens_of(exact_engine, chat(p, max_tokens=16)) for p in PROMPTS])
        staggered = []
        for i, p in enumerate(PROMPTS):  # joining a running batch one by one
            staggered.append(asyncio.ensure_future(tokens_of(exact_engine, chat(p, max_tokens=16))))
            await asyncio.sleep(0.01 * (i % 3))
        return alone, [*batch, *await asyncio.gather(*staggered)]

    alone, batched = run(scenario())
    assert batched == alone + alone
    assert exact_engine.stats()["decode_rows"] > exact_engine.stats()["decode_steps"]  # really batched


def test_plain_greedy_takes_the_argmax_and_matches_llama_cpps_greedy_sampler(exact_engine: LlamaCppEngine) -> None:
    """Plain greedy requests skip llama.cpp's sampler chain (numpy's argmax over the logits); a zero
    logit_bias keeps the chain, and both must pick the same tokens, in a batch as alone."""
    plain = [chat(p, max_tokens=24) for p in PROMPTS[:4]]
    chained = [chat(p, max_tokens=24, logit_bias={0: 0.0}) for p in PROMPTS[:4]]
    for request, argmax in ((plain[0], True), (chained[0], False)):  # the two paths really differ
        seq = exact_engine._make_sequence(request)
        exact_engine._llama.llama_sampler_free(exact_engine._make_sampler(seq))
        assert seq.argmax is argmax

    async def scenario() -> list[list[int]]:
        return list(await asyncio.gather(*[tokens_of(exact_engine, r) for r in plain + chained]))

    answers = run(scenario())
    assert answers[:4] == answers[4:]
    assert all(len(a) == 24 or a[-1] in exact_engine._eos_ids for a in answers)


def test_a_burst_of_prompts_is_prefilled_in_small_calls_shortest_first(exact_engine: LlamaCppEngine) -> None:
    """Prompts of one step run as several `llama_decode` calls (each call's first tokens go out as it
    ends): one chunk length per call (bit-exactness), shortest first, a few short prompts per call."""
    from types import SimpleNamespace

    from shoal.llm.engines.llama_cpp import PROMPT_CALL_TOKENS

    lengths = [12, 3, 3, 3, 3, 3, 3, 12, 40]
    plan = [(SimpleNamespace(seq_id=slot), n, None if slot % 2 else 0) for slot, n in enumerate(lengths)]
    calls = exact_engine._prompt_groups(plan)

    assert sorted(id(seq) for call in calls for seq, _, _ in call) == sorted(id(seq) for seq, _, _ in plan)
    sizes = [call[0][1] for call in calls]
    assert all(len({n for _, n, _ in call}) == 1 for call in calls)
    assert sizes == sorted(sizes) == [3, 3, 12, 12, 40]
    assert all(sum(n for _, n, _ in call) <= PROMPT_CALL_TOKENS or len(call) == 1 for call in calls)
    for call in calls:  # slot order inside a call; logits indices are those of the call's own batch
        assert [seq.seq_id for seq, _, _ in call] == sorted(seq.seq_id for seq, _, _ in call)
        ends = [sum(n for _, n, _ in call[: i + 1]) - 1 for i in range(len(call))]
        assert [out for _, _, out in call] == [
            end if out is not None else None for (_, _, out), end in zip(call, ends)
        ]


def test_sequences_joining_mid_stream_do_not_disturb_running_ones(exact_engine: LlamaCppEngine) -> None:
    async def scenario() -> tuple[list[int], list[int], list[list[int]]]:
        solo = await tokens_of(exact_engine, chat(PROMPTS[0], max_tokens=32))
        got: list[int] = []
        joiners: list[asyncio.Task[list[int]]] = []
        async for delta in exact_engine.generate(chat(PROMPTS[0], max_tokens=32)):
            got.extend(delta.token_ids)
            if len(got) in (4, 12):  # others join while this stream runs
                joiners += [asyncio.create_task(tokens_of(exact_engine, chat(p, max_tokens=8))) for p in PROMPTS[1:4]]
        return solo, got, list(await asyncio.gather(*joiners))

    solo, got, joined = run(scenario())
    assert got == solo
    assert all(len(j) >= 1 for j in joined)


SYSTEM = "You are a terse assistant. " * 20  # a long shared prefix


def with_system(question: str, max_tokens: int = 16, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0, **sampling),
    )


@pytest.fixture(scope="module")
def cold_color() -> list[int]:
    """"Name a color." after the shared system prompt, computed without any prefix cache."""
    async def scenario() -> list[int]:
        fresh = LlamaCppEngine(prefix_cache_entries=0, warmup=False)
        await fresh.start()
        try:
            return await tokens_of(fresh, with_system("Name a color."))
        finally:
            await fresh.shutdown()

    return run(scenario())


def test_prefix_reuse_gives_the_same_tokens_as_no_reuse(engine: LlamaCppEngine, cold_color: list[int]) -> None:
    """A finished request's slot keeps its cells; the next prompt sharing the prefix reuses them."""
    async def scenario() -> tuple[list[int], int]:
        before = engine.stats()["prefix_hit_tokens"]
        await tokens_of(engine, with_system("Name a fruit."))  # leaves the system prompt cached
        warm = await tokens_of(engine, with_system("Name a color."))
        return warm, engine.stats()["prefix_hit_tokens"] - before

    warm, reused = run(scenario())
    assert reused > 100  # the system prompt's tokens were not computed again
    assert warm == cold_color


def test_prefix_is_copied_from_a_running_sequence_in_another_slot(
    engine: LlamaCppEngine, cold_color: list[int]
) -> None:
    """While one request runs, a second with the same system prompt takes another slot and gets
    the prefix's cells copied from the running one's slot (a cross-stream copy in llama.cpp); its
    output is the cold one's."""
    async def scenario() -> tuple[list[int], int]:
        seen: list[int] = []
        warm: list[int] = []
        before = 0
        async for delta in engine.generate(with_system("Tell me a long story.", max_tokens=48, ignore_eos=True)):
            seen.extend(delta.token_ids)
            if len(seen) >= 4 and not warm:
                before = engine.stats()["prefix_hit_tokens"]
                warm = await tokens_of(engine, with_system("Name a color."))
        return warm, engine.stats()["prefix_hit_tokens"] - before

    warm, reused = run(scenario())
    assert reused > 100
    assert warm == cold_color


def test_a_repeated_prompt_reuses_all_but_its_last_tokens(engine: LlamaCppEngine) -> None:
    """The same prompt again: its slot's cells are reused up to two tokens from the end, and the
    greedy output is the same as the first time (n > 1 and retries rely on it)."""
    request = chat("Name a colour.", max_tokens=8)
    first = run(tokens_of(engine, request))
    before = engine.stats()["prefix_hit_tokens"]
    async def three() -> list[list[int]]:
        return list(await asyncio.gather(*[tokens_of(engine, request) for _ in range(3)]))

    again = run(three())
    assert engine.stats()["prefix_hit_tokens"] - before >= len(engine.render_prompt(request)) - 2
    assert again == [first] * 3
    assert run(three()) == [first] * 3  # now three slots hold the prompt: each reuses its own


def test_unified_cache_serves_and_reuses_prefixes(cold_color: list[int]) -> None:
    """`kv_unified=True`: one cache for all sequences (a request may use the model's whole context)."""
    async def scenario() -> tuple[list[int], int, int]:
        eng = LlamaCppEngine(kv_unified=True, warmup=False)
        await eng.start()
        try:
            await tokens_of(eng, with_system("Name a fruit."))
            warm = await tokens_of(eng, with_system("Name a color."))
            return warm, eng.stats()["prefix_hit_tokens"], eng.max_model_len
        finally:
            await eng.shutdown()

    warm, reused, max_model_len = run(scenario())
    assert max_model_len == 8192  # the model's own context
    assert reused > 100
    assert warm == cold_color


def test_long_prompt_is_prefilled_in_chunks_without_stalling_running_streams(engine: LlamaCppEngine) -> None:
    long_prompt = "Here is a long story about a dragon. " * 60  # ~600 tokens, 64 per step

    async def scenario() -> tuple[int, int]:
        events: list[str] = []

        async def runner() -> None:
            async for _ in engine.generate(chat(PROMPTS[5], max_tokens=48, ignore_eos=True)):
                events.append("run")

        async def newcomer() -> None:
            while events.count("run") < 2:
                await asyncio.sleep(0.01)
            async for _ in engine.generate(GenerationRequest(prompt=long_prompt, sampling=SamplingParams(
                    max_tokens=2, temperature=0))):
                events.append("new")

        await asyncio.gather(runner(), newcomer())
        first_new = events.index("new")
        started = 2
        return first_new - started, len(engine.render_prompt(GenerationRequest(prompt=long_prompt)))

    tokens_meanwhile, prompt_len = run(scenario())
    assert prompt_len > 4 * 64
    assert tokens_meanwhile >= 3  # the running stream kept getting tokens during the prefill


def test_stop_strings_and_stop_reasons(engine: LlamaCppEngine) -> None:
    text, _ = run(collect(engine, chat(PROMPTS[3], max_tokens=32, ignore_eos=True)))
    assert len(text) > 12
    stop = text[8:12]
    cut, deltas = run(collect(engine, chat(PROMPTS[3], max_tokens=32, ignore_eos=True, stop=[stop])))
    assert cut == text[: text.index(stop)]
    assert deltas[-1].finish_reason == "stop"
    _, deltas = run(collect(engine, chat(PROMPTS[3], max_tokens=3, ignore_eos=True)))
    assert deltas[-1].finish_reason == "length" and deltas[-1].usage.completion_tokens == 3


def test_seed_makes_sampling_reproducible(exact_engine: LlamaCppEngine) -> None:
    def sampled(seed: int, **kwargs: Any) -> list[int]:
        request = chat(PROMPTS[7], max_tokens=16, temperature=1.0, seed=seed, **kwargs)
        return run(tokens_of(exact_engine, request))

    assert sampled(11, top_p=0.95) == sampled(11, top_p=0.95)
    assert sampled(11, top_k=5) == sampled(11, top_k=5)
    greedy = run(tokens_of(exact_engine, chat(PROMPTS[7], max_tokens=16)))
    assert sampled(3, top_p=1e-6) == greedy  # a tiny top_p (or top_k=1) is greedy
    assert sampled(3, top_k=1) == greedy


def test_abandoned_stream_is_aborted_and_leaves_the_batch(engine: LlamaCppEngine) -> None:
    async def scenario() -> None:
        before = engine.stats()["aborted"]
        stream = engine.generate(chat(PROMPTS[9], max_tokens=200, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # what the server does when the client disconnects
        for _ in range(500):
            if engine.stats()["aborted"] > before and engine.stats()["active"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats()["aborted"] == before + 1
        assert engine.stats()["active"] == 0
        text, _ = await collect(engine, chat("Say hi.", max_tokens=4))  # the engine goes on
        assert text

    run(scenario())


def test_prompt_longer_than_the_context_is_refused_at_once(engine: LlamaCppEngine) -> None:
    assert engine.max_model_len == 768  # DEFAULT_SLOT_TOKENS: one slot of the split KV cache
    with pytest.raises(PromptTooLongError, match="maximum context length is 768 tokens"):
        engine.generate(GenerationRequest(prompt=[1] * 900))
    with pytest.raises(PromptTooLongError):
        engine.generate(GenerationRequest(prompt="hello", sampling=SamplingParams(max_tokens=768)))
    with pytest.raises(ValueError, match="out of range"):
        engine.generate(GenerationRequest(prompt=[10**9]))


def test_server_picks_the_engine_from_engine_kwargs_or_llm_engine() -> None:
    from shoal.llm import LLMConfig
    from shoal.llm.server import make_engine

    def config(**kwargs: Any) -> Any:
        return LLMConfig(model_loading_config={"model_id": "SmolLM2-135M-Instruct"}, **kwargs)

    default = make_engine(config(deployment_config={"num_replicas": 2}))
    assert isinstance(default, LlamaCppEngine)
    assert default.num_threads == max(1, (len(os.sched_getaffinity(0)) - 1) // 2)
    assert isinstance(make_engine(config(engine_kwargs={"engine": "transformers"})), TransformersEngine)
    assert isinstance(make_engine(config(llm_engine="transformers")), TransformersEngine)
    assert isinstance(make_engine(config(llm_engine="llama_cpp")), LlamaCppEngine)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine: LlamaCppEngine) -> None:
    real_fill = engine._fill_batch
    calls = {"n": 0}

    def flaky_fill(plan: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real_fill(plan)

    engine._fill_batch = flaky_fill  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="generation failed"):
            run(collect(engine, chat("Say hi.", max_tokens=4)))
    finally:
        del engine._fill_batch
    text, _ = run(collect(engine, chat("Say hi.", max_tokens=4)))
    assert text and engine.stats()["active"] == 0


def test_lora_adapters_in_one_batch_match_their_solo_runs_and_are_freed_when_unloaded(
        exact_engine: LlamaCppEngine, tmp_path: Any) -> None:
    from lora_adapters import write_lora

    paths = [str(tmp_path / f"a{i}.gguf") for i in range(2)]
    for i, path in enumerate(paths):
        write_lora(path, seed=i)
    adapters = [exact_engine.load_adapter(f"a{i}", path) for i, path in enumerate(paths)]

    def request(adapter: Any, prompt: str) -> GenerationRequest:
        return GenerationRequest(prompt=prompt, adapter=adapter, sampling=SamplingParams(max_tokens=12, temperature=0))

    cases = [(a, p) for a in (None, *adapters) for p in PROMPTS[:2]]

    async def scenario() -> tuple[list[list[int]], list[list[int]]]:
        alone = [await tokens_of(exact_engine, request(a, p)) for a, p in cases]
        together = await asyncio.gather(*(tokens_of(exact_engine, request(a, p)) for a, p in cases))
        return alone, list(together)

    alone, together = run(scenario())
    assert together == alone  # one decode per adapter in each step, none mixes into another's
    assert alone[0] != alone[2] and alone[2] != alone[4]  # each adapter changes the output
    exact_engine.unload_adapter(adapters[0])
    with pytest.raises(ValueError, match="not loaded"):
        run(tokens_of(exact_engine, request(adapters[0], "Hi")))
    run(tokens_of(exact_engine, request(None, "Hi")))  # a step frees the retired adapter
    assert adapters[0].pointer is None and adapters[1].pointer is not None
    exact_engine.unload_adapter(adapters[1])


def test_structured_machinery_is_built_off_the_event_loop_before_first_use() -> None:
    """`prepare_structured` (what the server runs in a worker thread before the first
    `response_format` request) builds the grammar machinery once; requests then start at once."""
    async def scenario() -> tuple[bool, bool, str]:
        eng = LlamaCppEngine(warmup=False)
        await eng.start()
        try:
            before = eng.structured_ready
            await asyncio.to_thread(eng.prepare_structured)
            request = GenerationRequest(
                messages=[{"role": "user", "content": "Give a JSON object about a colour."}],
                sampling=SamplingParams(max_tokens=24, temperature=0), response_format={"type": "json_object"},
            )
            text, _ = await collect(eng, request)
            return before, eng.structured_ready, text
        finally:
            await eng.shutdown()

    before, after, text = run(scenario())
    assert not before and after
    assert text.startswith("{")
