"""llama.cpp alone: decode speed in a split KV cache (one stream per sequence) against one shared
(unified) cache, with and without kept prefixes, on the bundled SmolLM2 GGUF.

Why it exists: it is the measurement behind the llama.cpp engine's default (`kv_unified=False`,
docs/architecture.md). In a shared cache every token's attention runs over all used cells, so
prefixes kept for reuse slow every running sequence; in a split cache they cost nothing.

Each case prefills `--kept` finished sequences of 94 tokens (unified only: a split cache keeps them
in slots nobody attends to), then `--streams` sequences of 30 prompt tokens, then times 64 decode
steps of one token per sequence (greedy sampling included).

Usage: python benchmarks/llama_kv_layout.py [--streams 1 16] [--kept 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT_TOKENS, KEPT_TOKENS, STEPS = 30, 94, 64


def decode_rate(llama, model, *, unified: bool, streams: int, kept: int, threads: int) -> float:
    """Tokens/s of `STEPS` decode steps over `streams` sequences, `kept` finished ones alongside."""
    params = llama.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 8192 if unified else 512 * (streams + kept), 512, 512
    params.n_seq_max, params.kv_unified = streams + kept, unified
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama.llama_init_from_model(model, params)
    batch = llama.llama_batch_init(512, 0, 1)
    sampler = llama.llama_sampler_init_greedy()

    def decode(entries: list[tuple[int, int, list[int]]]) -> None:
        i = 0
        for seq_id, start, tokens in entries:
            for j, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + j, 1
                batch.seq_id[i][0], batch.logits[i] = seq_id, 0
                i += 1
            batch.logits[i - 1] = 1
        batch.n_tokens = i
        if llama.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    try:
        for s in range(streams, streams + kept):
            decode([(s, 0, [100 + s + k for k in range(KEPT_TOKENS)])])
        for s in range(streams):
            decode([(s, 0, [100 + s + k for k in range(PROMPT_TOKENS)])])
        started = time.perf_counter()
        for step in range(STEPS):
            decode([(s, PROMPT_TOKENS + step, [200 + step]) for s in range(streams)])
            for s in range(streams):
                llama.llama_sampler_sample(sampler, ctx, s)
        return streams * STEPS / (time.perf_counter() - started)
    finally:
        llama.llama_sampler_free(sampler)
        llama.llama_batch_free(batch)
        llama.llama_free(ctx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--kept", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import llama_cpp as llama

    from shoal.llm.engines.llama_cpp import _init_backend  # llama.cpp's log: warnings and errors only
    from shoal.llm.models import resolve_model_source

    _init_backend(llama)
    mparams = llama.llama_model_default_params()
    mparams.use_extra_bufts = False  # as the engine on AMX machines (see docs/architecture.md)
    path = str(resolve_model_source("SmolLM2-135M-Instruct").path).encode()
    model = llama.llama_model_load_from_file(path, mparams)
    cases = [("split", False, 0), ("unified", True, 0), (f"unified, {a.kept} kept", True, a.kept)]
    print("| streams | " + " | ".join(name for name, _, _ in cases) + " |")
    print("| --- |" + " --- |" * len(cases))
    for streams in a.streams:
        rates = [decode_rate(llama, model, unified=u, streams=streams, kept=k, threads=a.threads) for _, u, k in cases]
        print(f"| {streams} | " + " | ".join(f"{r:.1f} tok/s" for r in rates) + " |", flush=True)
    llama.llama_model_free(model)


if __name__ == "__main__":
    main()
