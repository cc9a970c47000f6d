"""Prefix caching's TTFT gain (issue 15): requests that share a long prefix, with and without the cache.

Each request is one shared instruction block of ~260 tokens (within llama-server's 512-token slots) (a RAG-style template) followed by its
own short question, sent one after another (streaming, 8 tokens), so the time to first token is
mostly the prompt's prefill. Sides, in rotating rounds, best round of each:

- `shoal`: the default (llama.cpp engine, prefix caching on: the shared block's KV is reused);
- `shoal-no-prefix-cache`: the same with `prefix_cache_entries=0` (every prompt prefilled whole);
- `llama-server`: llama.cpp's server (its prompt cache is on by default), as in `llm_bench.py`;
- `shoal-transformers` / `shoal-transformers-no-prefix-cache` (pick them with `--sides`): the
  transformers engine with its opt-in prefix cache on and off.

    .venv/bin/python benchmarks/llm_prefix_bench.py --rounds 2

Prints a table of TTFT p50 per side and shoal's gain (TTFT without the cache / with it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import httpx

sys.path.insert(0, __import__("os").path.dirname(__file__))
from llm_workload import LLM_ID, first_answer, start_llama_server  # noqa: E402

SHARED = (
    "You answer questions about the Harbor Street library using only the notes below. "
    "Notes: The library opens at nine in the morning and closes at six in the evening on weekdays. "
    "On Saturdays it opens at ten and closes at four; it is closed on Sundays and public holidays. "
    "Members may borrow up to eight books at a time for three weeks, and renew each book twice. "
    "Late returns cost twenty cents a day per book, capped at five dollars per book. "
    "The reading room on the second floor is silent; group study rooms can be booked a week ahead. "
    "Printing costs ten cents a page in black and white and fifty cents a page in colour. "
    "The children's corner holds story time on Tuesday and Thursday mornings at half past ten. "
    "Wi-Fi is free for everyone; the password is printed on the card at the front desk. "
    "Lost cards are replaced for two dollars; bring an identity document to the front desk. "
    "The library runs a book club on the first Monday of each month, in the large meeting room. "
    "Donations of books in good condition are welcome at the side entrance on weekday mornings. "
)
QUESTIONS = ["When does it open on Saturday?", "How many books can I borrow?", "What do late returns cost?",
             "Is there Wi-Fi?", "When is story time?", "How much is colour printing?",
             "Can I book a study room?", "What if I lose my card?", "When is the book club?",
             "Where do I donate books?"]


async def ttfts(url: str, questions: list[str]) -> list[float]:
    out = []
    async with httpx.AsyncClient(timeout=300) as client:
        for q in questions:
            body = {"model": LLM_ID, "prompt": f"{SHARED}\nQuestion: {q}\nAnswer:", "max_tokens": 8,
                    "temperature": 0, "stream": True, "ignore_eos": True}
            start = time.perf_counter()
            first = None
            async with client.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        first = time.perf_counter() - start
            out.append(first if first is not None else time.perf_counter() - start)
    return out


def shoal_side(engine_kwargs: dict[str, Any]) -> Callable[[], dict[str, float]]:
    def run() -> dict[str, float]:
        from shoal import serve
        from shoal.api import get_http_url
        from shoal.llm import build_openai_app

        serve.start(http_options={"port": 0})
        try:
            serve.run(build_openai_app({"llm_configs": [{"model_loading_config": {"model_id": LLM_ID},
                                                         "engine_kwargs": engine_kwargs}]}))
            url = get_http_url().rstrip("/")
            first_answer(url)
            return measure(url)
        finally:
            serve.shutdown()
    return run


def llama_server_side() -> dict[str, float]:
    server = start_llama_server()
    try:
        url = "http://127.0.0.1:18777"
        first_answer(url, server)
        return measure(url)
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure(url: str) -> dict[str, float]:
    times = asyncio.run(ttfts(url, QUESTIONS))
    return {"first_s": times[0], "p50_s": statistics.median(times[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sides", default="shoal,shoal-no-prefix-cache,llama-server")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # run one side here, print its JSON
    a = ap.parse_args()
    sides = {"shoal": shoal_side({}), "shoal-no-prefix-cache": shoal_side({"prefix_cache_entries": 0}),
             "llama-server": llama_server_side,
             # the transformers engine, its (opt-in) prefix cache on and off
             "shoal-transformers": shoal_side({"engine": "transformers", "prefix_cache_tokens": 4096}),
             "shoal-transformers-no-prefix-cache": shoal_side({"engine": "transformers"})}
    if a.one:
        print("RESULT " + json.dumps(sides[a.one]()), flush=True)
        return
    names = [s for s in a.sides.split(",") if s in sides]
    best: dict[str, dict[str, float]] = {}
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: no side runs twice in a row
            # Each side in its own process: nothing of one side (processes, ports, threads) meets the next.
            for attempt in range(2):  # llama-server sometimes drops a stream on this machine: one more try
                out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                     timeout=600)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if line is not None:
                    break
                print(f"  round {r} {name}: failed (attempt {attempt + 1}): {out.stderr.strip().splitlines()[-1:]}",
                      file=sys.stderr, flush=True)
            else:
                raise SystemExit(f"the {name} side failed twice:\n{out.stderr[-3000:]}")
            result = json.loads(line[7:])
            print(f"  round {r} {name}: first {result['first_s'] * 1000:.0f} ms, then p50 "
                  f"{result['p50_s'] * 1000:.0f} ms", file=sys.stderr, flush=True)
            if name not in best or result["p50_s"] < best[name]["p50_s"]:
                best[name] = result
    print("\n| side | TTFT, first request | TTFT p50, next 9 (shared prefix) |")
    print("| --- | --- | --- |")
    for name in names:
        print(f"| {name} | {best[name]['first_s'] * 1000:.0f} ms | {best[name]['p50_s'] * 1000:.0f} ms |")
    if "shoal" in best and "shoal-no-prefix-cache" in best:
        gain = best["shoal-no-prefix-cache"]["p50_s"] / best["shoal"]["p50_s"]
        print(f"\nprefix caching: TTFT p50 {gain:.2f}x lower with the cache")
    if "shoal-transformers" in best and "shoal-transformers-no-prefix-cache" in best:
        gain = best["shoal-transformers-no-prefix-cache"]["p50_s"] / best["shoal-transformers"]["p50_s"]
        print(f"prefix caching, transformers engine: TTFT p50 {gain:.2f}x lower with the cache")
    if "shoal" in best and "llama-server" in best:
        ratio = best["shoal"]["p50_s"] / best["llama-server"]["p50_s"]
        print(f"shoal / llama-server TTFT p50: {ratio:.2f}")


if __name__ == "__main__":
    main()
