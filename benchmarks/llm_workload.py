"""One side of the LLM benchmark: deploy it, load it at 1, 4 and 16 concurrent streams, print RESULT.

Sides: `shoal` (`build_openai_app` on the default model with default engine options, streaming
`/v1/completions` with `ignore_eos`), `naive` and `batched` (llm_baselines.py). Every request asks
for exactly `--tokens` new tokens on its own prompt. At concurrency C, C client tasks each send
`--requests-per-client` requests back to back (before the first level, one uncounted warm-up
request per client); tokens/s is all generated tokens over the wall time of the measured rounds, and time to first
token runs from sending a request to its first token (the whole response for sides that do not
stream). With `--memory`, the side also serves the embedding model and reports the RSS of every
shoal process (controller, proxy, replicas) after the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shoal import serve  # noqa: E402
from shoal.api import get_http_url  # noqa: E402

TOPICS = ["a lighthouse", "a dragon", "the sea", "a robot", "a garden", "a train", "the moon", "a city",
          "a violin", "a storm", "a library", "a fox", "a bridge", "a comet", "a bakery", "a glacier"]


def prompt(i: int) -> str:
    return f"Here is a short story about {TOPICS[i % len(TOPICS)]}, number {i}:"


async def shoal_request(client: httpx.AsyncClient, url: str, i: int, tokens: int) -> tuple[float, int]:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": prompt(i), "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, completion = None, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if ttft is None and event["choices"] and event["choices"][0]["text"]:
                ttft = time.perf_counter() - start
            if event.get("usage"):
                completion = event["usage"]["completion_tokens"]
    return (ttft if ttft is not None else time.perf_counter() - start), completion


async def baseline_request(client: httpx.AsyncClient, url: str, i: int, tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    r = await client.post(url + "/", json={"prompt": prompt(i), "max_tokens": tokens})
    r.raise_for_status()
    return time.perf_counter() - start, r.json()["completion_tokens"]


async def level(send, url: str, concurrency: int, per_client: int, tokens: int, warmup: bool) -> dict:
    """Warm up (one request per client) if asked, then measure `per_client` requests per client."""
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=64)) as client:
        if warmup:
            await asyncio.gather(*(send(client, url, 1000 + c, tokens) for c in range(concurrency)))
        ttfts: list[float] = []
        total = 0

        async def worker(c: int) -> None:
            nonlocal total
            for k in range(per_client):
                ttft, n = await send(client, url, c * per_client + k, tokens)
                ttfts.append(ttft)
                total += n

        start = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in range(concurrency)))
        wall = time.perf_counter() - start
    ttfts.sort()
    return {"concurrency": concurrency, "tokens_per_s": total / wall, "requests": len(ttfts),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "wall_s": wall}


def shoal_memory_mb() -> float:
    """RSS of every process of this shoal instance (this driver's children), in MiB."""
    me = psutil.Process()
    return sum(p.memory_info().rss for p in me.children(recursive=True)) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", choices=["shoal", "naive", "batched"], required=True)
    ap.add_argument("--levels", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--memory", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    serve.start(http_options={"port": 0})
    t0 = time.perf_counter()
    if a.side == "shoal":
        from shoal.llm import build_openai_app

        models = ["SmolLM2-135M-Instruct"] + (["all-MiniLM-L6-v2"] if a.memory else [])
        serve.run(build_openai_app({"llm_configs": [{"model_loading_config": {"model_id": m}} for m in models]}))
        send = shoal_request
    else:
        import llm_baselines

        serve.run(llm_baselines.naive_app if a.side == "naive" else llm_baselines.batched_app)
        send = baseline_request
    ready_s = time.perf_counter() - t0
    url = get_http_url().rstrip("/")
    levels = []
    for c in (int(x) for x in a.levels.split(",")):
        # The naive side serves one request at a time: one request per client keeps its run short.
        per_client = 1 if (a.side == "naive" and c > 1) else a.requests_per_client
        levels.append(asyncio.run(level(send, url, c, per_client, a.tokens, warmup=not levels)))
        print(f"{a.side} c={c}: {levels[-1]['tokens_per_s']:.1f} tok/s", file=sys.stderr, flush=True)
    result = {"side": a.side, "ready_s": ready_s, "levels": levels}
    if a.memory:
        result["memory_mb"] = shoal_memory_mb()
    serve.shutdown()
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
