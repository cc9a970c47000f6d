"""Probe shoal's LLM engine: tokens/s and time to first token at 1, 4 and 16 concurrent streams.

Each of N clients sends chat requests back to back (`--rounds` each), every request generating
exactly `--max-tokens` new tokens (EOS ignored), straight through the engine's `generate`
(no HTTP; `--engine transformers|llama_cpp`, default: the one `shoal llm serve` picks). Optionally (`--baseline`) the same machine state also runs the two reference setups the
targets are stated against, so ratios can be read even on a busy machine:

- "batched": `model.generate` on batches of 16 left-padded prompts (what `@serve.batch
  (max_batch_size=16)` around `generate` does), float32, greedy;
- "naive": one request at a time through `model.generate` (a plain transformers pipeline).

Timings on a shared machine swing with other load: compare numbers from the same run.

Usage: python benchmarks/llm_engine_probe.py [--engine auto] [--streams 1 4 16] [--rounds 2] [--dtype auto]
       [--baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = [
    "a lighthouse keeper", "a robot learning to paint", "the first snow of winter", "a lost cat",
    "a city under the sea", "an old clock", "a dragon who hates fire", "a train at midnight",
    "a garden on Mars", "a forgotten library", "two rival bakers", "a storm at sea",
    "a child's kite", "a haunted violin", "a desert caravan", "a talking tree",
]  # fmt: skip


def prompt(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def run_streams(engine: Any, streams: int, rounds: int, max_tokens: int) -> dict[str, Any]:
    from shoal.llm.engines import GenerationRequest, SamplingParams

    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = 0

    async def client(c: int) -> None:
        nonlocal tokens
        for r in range(rounds):
            request = GenerationRequest(
                messages=prompt(c * rounds + r),
                sampling=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
            )
            sent = last = time.perf_counter()
            first = True
            async for delta in engine.generate(request):
                now = time.perf_counter()
                if first:
                    ttfts.append(now - sent)
                    first = False
                else:
                    gaps.append(now - last)
                last = now
                tokens += len(delta.token_ids)

    before = engine.stats()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(streams)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    after = engine.stats()
    engine_stats = {
        k: after[k] - before[k] for k in ("prefill_ms", "decode_ms", "decode_steps", "decode_rows")
    }
    return {
        "streams": streams,
        "requests": streams * rounds,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_per_s": round(tokens / wall, 1),
        "tok_per_cpu_s": round(tokens / cpu, 1),
        "ttft_p50_s": round(pct(ttfts, 50), 3),
        "ttft_p99_s": round(pct(ttfts, 99), 3),
        "itl_p50_ms": round(1000 * pct(gaps, 50), 1),
        "engine": engine_stats,
    }


def run_baselines(rounds: int, max_tokens: int) -> list[dict[str, Any]]:
    """The reference setups, float32 as a plain transformers user would run them: "batched" is
    `rounds` batches of 16 prompts, "naive" is `rounds` + 2 prompts one after another."""
    import torch

    from shoal.llm.models import load_causal_lm, resolve_model_source

    model, tokenizer = load_causal_lm(resolve_model_source("SmolLM2-135M-Instruct"))
    tokenizer.padding_side = "left"
    results = []

    def generate(batch: list[int]) -> int:
        texts = [
            tokenizer.apply_chat_template(prompt(i), tokenize=False, add_generation_prompt=True)
            for i in batch
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )  # fmt: skip
        return int((out.shape[1] - enc["input_ids"].shape[1]) * len(batch))

    generate([0])  # warm
    for name, size, count in (("batched", 16, 16 * rounds), ("naive", 1, rounds + 2)):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        tokens = sum(generate(list(range(i, min(count, i + size)))) for i in range(0, count, size))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        results.append({
            "baseline": name, "batch": size, "requests": count, "tokens": tokens, "wall_s": round(wall, 2),
            "tok_per_s": round(tokens / wall, 1), "tok_per_cpu_s": round(tokens / cpu, 1),
        })  # fmt: skip
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--engine", default="auto", help="auto | llama_cpp | transformers")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--baseline", action="store_true", help="also time the reference setups")
    parser.add_argument("--engine-kwargs", default="{}", help="JSON of more engine options, e.g. '{\"kv_unified\": false}'")
    args = parser.parse_args()

    from shoal.llm.engines import build_engine

    started = time.perf_counter()
    engine: Any = build_engine(args.model, engine=args.engine, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                     **json.loads(args.engine_kwargs))
    await engine.start()
    print(json.dumps({
        "model": args.model, "engine": type(engine).__name__, "precision": getattr(engine, "precision", "gguf"),
        "device": getattr(engine, "device", "cpu"), "threads": getattr(engine, "num_threads", None),
        "max_num_seqs": engine.max_num_seqs, "start_s": round(time.perf_counter() - started, 1),
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
    }), flush=True)  # fmt: skip
    try:
        for streams in args.streams:
            print(json.dumps(await run_streams(engine, streams, args.rounds, args.max_tokens)), flush=True)
    finally:
        await engine.shutdown()
    if args.baseline:
        for row in run_baselines(args.rounds, args.max_tokens):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
